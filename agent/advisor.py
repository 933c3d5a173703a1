"""The DeepAgents advisor client: asks a model to size a workload, within bounds.

Theory of operation
-------------------
The advisor is optional and outside our control, so it may only ever improve
an answer, never delay or break one. Every call:

1. asks the circuit breaker first: while the advisor is known to be failing,
   no call is made and the analyzer's estimate is used ("circuit_open");
2. POSTs `{url}/invoke/structured` with the seed's body (a user message and a
   JSON schema for the answer), under a trio deadline of `timeout_s` for the
   whole exchange as well as httpx's own per-phase timeouts;
3. accepts the response's `structured_output` only through
   `coordinator.advice.bound_advice`, which validates and clamps it.

Any fault (timeout, connection error, non-2xx status, a body that is not JSON,
an answer that fails validation) gives the analyzer's estimate with a short
reason ("timeout", "http_503", "invalid_output: ..."), counts as a failure on
the breaker, and is logged at warning once per kind of fault until the advisor
answers well again, so an outage is one log line, not one per request.
`advise` never raises for the advisor's faults.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import httpx
import trio

from coordinator.advice import MAX_PRIORITY, MIN_PRIORITY, bound_advice
from coordinator.backoff import CircuitBreaker
from coordinator.workload import WorkloadEstimate

logger = logging.getLogger(__name__)

ADVISOR = "advisor"
ANALYZER = "analyzer"

# The answer's shape, as the seed sent it: the three figures are required.
ADVICE_SCHEMA: Mapping[str, Any] = {
    "name": "gpu_workload_estimate",
    "schema": {
        "type": "object",
        "properties": {
            "required_gpus": {"type": "integer", "minimum": 1},
            "min_memory_mb": {"type": "integer", "minimum": 0},
            "priority": {"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY},
            "reasoning": {"type": "string"},
        },
        "required": ["required_gpus", "min_memory_mb", "priority"],
    },
}


@dataclass(frozen=True, slots=True)
class AdvisorOutcome:
    """The estimate to use, who decided it, and why the advisor was not used (None if it was)."""

    estimate: WorkloadEstimate
    decided_by: str  # ADVISOR | ANALYZER
    fallback_reason: str | None


class _AdvisorFault(Exception):
    """Why one call to the advisor gave no usable answer; internal to this module."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def build_prompt(
    service_name: str, workload_type: str, workload_data: Mapping[str, Any], *, max_gpus_per_node: int
) -> str:
    """The user message sent to the advisor."""
    data = json.dumps(dict(workload_data), sort_keys=True, default=str)
    return (
        f"Estimate the GPU resources for service {service_name!r}, "
        f"workload type {workload_type!r}, with workload data {data}. "
        f"All GPUs of one allocation are on a single node with at most {max_gpus_per_node} GPUs. "
        "Answer with required_gpus (GPUs needed), min_memory_mb (free GPU memory in MiB needed "
        f"on each GPU), priority ({MIN_PRIORITY}-{MAX_PRIORITY}, higher is more urgent) "
        "and a short reasoning."
    )


class DeepAgentsAdvisor:
    """Client for a DeepAgents service (see the module doc)."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        timeout_s: float = 2.0,
        breaker: CircuitBreaker,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._endpoint = url.rstrip("/") + "/invoke/structured"
        self._client = client
        # Bound on one whole call, connect to last byte; the request waits no longer.
        self._timeout_s = timeout_s
        self._breaker = breaker
        # Only the breaker reads it; any monotonic-enough clock will do.
        self._clock = clock
        # Kinds of fault already logged in the current run of failures.
        self._logged: set[str] = set()

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def advise(
        self,
        service_name: str,
        workload_type: str,
        workload_data: Mapping[str, Any],
        fallback: WorkloadEstimate,
        *,
        max_gpus_per_node: int,
    ) -> AdvisorOutcome:
        """The advisor's bounded estimate, or `fallback` with the reason. Never raises for advisor faults."""
        if not self._breaker.allow(self._clock()):
            return self._fall_back(fallback, "circuit_open")
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": build_prompt(
                        service_name, workload_type, workload_data, max_gpus_per_node=max_gpus_per_node
                    ),
                }
            ],
            "response_format": {"type": "json_schema", "json_schema": ADVICE_SCHEMA},
        }
        try:
            structured_output = await self._call(body)
            estimate, why = bound_advice(structured_output, fallback, max_gpus_per_node=max_gpus_per_node)
            if estimate is None:
                raise _AdvisorFault(f"invalid_output: {why}")
        except _AdvisorFault as fault:
            self._breaker.record_failure(self._clock())
            return self._fall_back(fallback, fault.reason)
        self._breaker.record_success(self._clock())
        if self._logged:
            logger.info("DeepAgents advisor at %s answers again", self._endpoint)
            self._logged.clear()
        return AdvisorOutcome(estimate, ADVISOR, None)

    async def _call(self, body: Mapping[str, Any]) -> object:
        """POST the request; the response's structured_output, or _AdvisorFault."""
        with trio.move_on_after(self._timeout_s):
            try:
                response = await self._client.post(self._endpoint, json=body, timeout=self._timeout_s)
            except httpx.TimeoutException:
                raise _AdvisorFault("timeout") from None
            except httpx.ConnectError:
                raise _AdvisorFault("connection_error") from None
            except httpx.HTTPError as exc:
                raise _AdvisorFault(f"transport_error: {type(exc).__name__}") from None
            except httpx.InvalidURL:
                raise _AdvisorFault("invalid_url") from None
            if not 200 <= response.status_code < 300:
                raise _AdvisorFault(f"http_{response.status_code}")
            try:
                decoded = response.json()
            except ValueError:
                raise _AdvisorFault("invalid_json") from None
            if not isinstance(decoded, dict) or "structured_output" not in decoded:
                raise _AdvisorFault("invalid_output: no structured_output in the response")
            return decoded["structured_output"]
        raise _AdvisorFault("timeout")

    def _fall_back(self, fallback: WorkloadEstimate, reason: str) -> AdvisorOutcome:
        kind = reason.split(":", 1)[0]
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning("DeepAgents advisor at %s not used (%s); using the analyzer's estimate", self._endpoint, reason)
        return AdvisorOutcome(fallback, ANALYZER, reason)
