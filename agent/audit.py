"""The audit trail of writes: one log line and one counted outcome per state-changing request.

Every request to a write route (allocate, release, renew, drain, undrain,
adding or removing a Raft server) that this agent *answers* is recorded, once
it is answered and whatever the answer: allowed or refused, queued, rate
limited, failed. A request this agent forwarded to the leader is recorded by
the leader (with `via=<this node>`), not here, so each write appears once in
the cluster's logs; one this agent could not forward (503) is recorded here.

Each record is one line on the `gpu_orchestrator.audit` logger, at INFO, as
space-separated key=value pairs in a fixed order (values that contain a space,
a quote or '=' are JSON-quoted), so it greps and parses without a schema:

    write action=allocate outcome=ok status=200 key=ci-bot service=training
          ids=training-1a2b3c4d,req-7 client=10.0.0.9 via=-

`key` is the API key's name from the keys file (never the key itself; `-`
while auth is off), `service` the service acted for (`-` when the request
named none), `ids` the allocation, request, GPU (`node/index`) or server names
the request or its answer mention, `client` the peer address of the connection
and `via` the agent that forwarded it (`-` when it came straight from the
client). Outcomes: ok, queued, denied (401/403), rate_limited (429), rejected
(any other 4xx), unavailable (503), error (any other 5xx); the same pair
(action, outcome) is counted in gpu_orchestrator_audit_writes_total.

Lines are buffered and written in batches (`flush`, every 2 s from the agent's
housekeeping, at once for a batch of 512, and at exit): one write to the log per
line cost the agent 15 % of its request rate. A kill -9 loses at most the last
2 s of lines; the writes themselves are in the Raft log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter

AUDIT_LOGGER = "gpu_orchestrator.audit"
log = logging.getLogger(AUDIT_LOGGER)

# (method, route template) -> the action recorded.
WRITE_ACTIONS: Mapping[tuple[str, str], str] = {
    ("POST", "/gpu/allocate"): "allocate",
    ("POST", "/gpu/release"): "release",
    ("POST", "/gpu/renew"): "renew",
    ("POST", "/gpu/drain"): "drain",
    ("POST", "/gpu/undrain"): "undrain",
    ("POST", "/cluster/servers"): "add_server",
    ("DELETE", "/cluster/servers/<name>"): "remove_server",
}
OUTCOMES = ("ok", "queued", "denied", "rate_limited", "rejected", "unavailable", "error")
# Fields of a request body or an answer that name what a write touched.
_ID_FIELDS = ("allocation_id", "request_id", "name")
_ID_LISTS = ("released", "cancelled")


def outcome_of(status: int) -> str:
    """The audit outcome of an answer's HTTP status."""
    if status == 202:
        return "queued"
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "unavailable"
    return "rejected" if status < 500 else "error"


def ids_in(*documents: Any) -> list[str]:
    """The ids that JSON request bodies and answers name, each once, in order of appearance."""
    found: list[str] = []

    def add(value: object) -> None:
        if isinstance(value, str) and value and value not in found:
            found.append(value)

    for doc in documents:
        if not isinstance(doc, dict):
            continue
        for name in _ID_FIELDS:
            add(doc.get(name))
        for name in _ID_LISTS:
            values = doc.get(name)
            if isinstance(values, list):
                for value in values:
                    add(value)
        if isinstance(doc.get("index"), int) and isinstance(doc.get("node"), str):
            add(f"{doc['node']}/{doc['index']}")
    return found


def _field(value: str) -> str:
    if value == "" or any(c in value for c in ' "=\n\\'):
        return json.dumps(value)
    return value


class AuditTrail:
    """Writes audit lines and counts them in `counter` (labels: action, outcome)."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        # An audit trail that a quieter [agent] log_level (warning, error) switched off
        # would fail exactly when it is needed: its lines are emitted at INFO regardless.
        log.setLevel(logging.INFO)
        # Batched into the root logger's handlers (the agent's log), instead of one write per line.
        self._buffer: logging.handlers.MemoryHandler | None = None
        targets = logging.getLogger().handlers
        if targets:
            self._buffer = logging.handlers.MemoryHandler(512, flushLevel=logging.CRITICAL, target=_Fanout(targets))
            log.addHandler(self._buffer)
            log.propagate = False

    def flush(self) -> None:
        """Write the buffered lines now (the agent calls it every 2 s)."""
        if self._buffer is not None:
            self._buffer.flush()

    def record(
        self,
        *,
        action: str,
        status: int,
        key: str | None,
        service: str | None,
        ids: Iterable[str],
        client: str | None,
        via: str | None,
    ) -> str:
        """Log and count one answered write; return its outcome."""
        outcome = outcome_of(status)
        self._counter.labels(action, outcome).inc()
        log.info(
            "write action=%s outcome=%s status=%d key=%s service=%s ids=%s client=%s via=%s",
            action,
            outcome,
            status,
            _field(key or "-"),
            _field(service or "-"),
            _field(",".join(ids) or "-"),
            _field(client or "-"),
            _field(via or "-"),
        )
        return outcome


class _Fanout(logging.Handler):
    """Hands each record to every handler the root logger had when the trail was built."""

    def __init__(self, targets: Iterable[logging.Handler]) -> None:
        super().__init__()
        self._targets = tuple(targets)

    def emit(self, record: logging.LogRecord) -> None:
        for target in self._targets:
            if record.levelno >= target.level:
                target.handle(record)
