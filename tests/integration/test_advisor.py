"""The DeepAgents advisor client against a real fake advisor on loopback.

A Quart-trio app served by Hypercorn on an ephemeral 127.0.0.1 port plays the
advisor; each scenario sets what it answers and checks what the client decided
and what the server saw.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from agent.advisor import AdvisorOutcome, DeepAgentsAdvisor
from coordinator.backoff import CircuitBreaker
from coordinator.workload import WorkloadEstimate

FALLBACK = WorkloadEstimate(
    required_gpus=1,
    min_memory_mb=16384,
    priority=8,
    max_utilization=85.0,
    estimate={"method": "analyzer", "model_params_b": 7.0},
)
WORKLOAD = {"model_name": "qwen2.5-72b", "precision": "bf16"}


class FakeAdvisor:
    """Answers POST /invoke/structured with `answer` (a JSON value), after `delay_s`."""

    def __init__(self) -> None:
        self.answer: Any = {}
        self.status = 200
        self.raw: bytes | None = None  # sent as-is instead of `answer` when set
        self.delay_s = 0.0
        self.requests: list[Any] = []
        self.app = QuartTrio("fake-advisor")
        self.app.add_url_rule("/invoke/structured", view_func=self._invoke, methods=["POST"])

    async def _invoke(self) -> Response:
        self.requests.append(await request.get_json())
        await trio.sleep(self.delay_s)
        body = self.raw if self.raw is not None else json.dumps(self.answer).encode()
        return Response(body, status=self.status, content_type="application/json")


@asynccontextmanager
async def serving(advisor: FakeAdvisor) -> AsyncIterator[str]:
    """Serve the fake advisor on an ephemeral loopback port; yields the base URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, advisor.app, config))
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


Scenario = Callable[[FakeAdvisor, Callable[[], Awaitable[AdvisorOutcome]]], Awaitable[None]]


def run_scenario(
    scenario: Scenario, *, timeout_s: float = 1.0, breaker: CircuitBreaker | None = None, url: str | None = None
) -> None:
    """Run `scenario` with a fake advisor and an `ask()` that calls the client once."""

    async def main() -> None:
        fake = FakeAdvisor()
        with trio.fail_after(5):
            async with serving(fake) as base, httpx.AsyncClient() as client:
                advisor = DeepAgentsAdvisor(
                    url or base + "/",
                    client,
                    timeout_s=timeout_s,
                    breaker=breaker or CircuitBreaker(failure_threshold=5, reset_after_s=30.0),
                )

                async def ask() -> AdvisorOutcome:
                    return await advisor.advise("llm-api", "inference", WORKLOAD, FALLBACK, max_gpus_per_node=4)

                await scenario(fake, ask)

    trio.run(main)


def test_a_good_answer_is_used_within_bounds_and_the_request_has_the_seeds_shape() -> None:
    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        fake.answer = {
            "structured_output": {"required_gpus": 8, "min_memory_mb": 76_000, "priority": 9, "reasoning": "72B bf16"}
        }
        outcome = await ask()
        assert outcome.decided_by == "advisor" and outcome.fallback_reason is None
        assert (outcome.estimate.required_gpus, outcome.estimate.min_memory_mb, outcome.estimate.priority) == (
            4,  # clamped to the node's 4 GPUs
            76_000,
            9,
        )
        assert outcome.estimate.max_utilization == 85.0
        assert outcome.estimate.estimate["advisor_raw"]["required_gpus"] == 8
        assert outcome.estimate.estimate["analyzer"] == FALLBACK.estimate

        [sent] = fake.requests
        [message] = sent["messages"]
        assert message["role"] == "user"
        for part in ("llm-api", "inference", json.dumps(WORKLOAD, sort_keys=True), "required_gpus", "priority"):
            assert part in message["content"]
        assert sent["response_format"]["type"] == "json_schema"
        schema = sent["response_format"]["json_schema"]["schema"]
        assert schema["required"] == ["required_gpus", "min_memory_mb", "priority"]
        assert schema["properties"]["priority"] == {"type": "integer", "minimum": 1, "maximum": 10}

    run_scenario(scenario)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"structured_output": {"min_memory_mb": 8192, "priority": 5}}, "invalid_output: missing required_gpus"),
        (
            {"structured_output": {"required_gpus": "two", "min_memory_mb": 8192, "priority": 5}},
            "invalid_output: required_gpus must be an integer, got str",
        ),
        (
            {"structured_output": {"required_gpus": 2, "min_memory_mb": 8192, "priority": 99}},
            "invalid_output: priority must be in 1..10, got 99",
        ),
        ({"output": "use 2 GPUs"}, "invalid_output: no structured_output in the response"),
        ([1, 2, 3], "invalid_output: no structured_output in the response"),
    ],
)
def test_a_bad_answer_falls_back_to_the_analyzer_with_the_reason(answer: Any, reason: str) -> None:
    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        fake.answer = answer
        assert await ask() == AdvisorOutcome(FALLBACK, "analyzer", reason)

    run_scenario(scenario)


def test_a_server_error_or_a_body_that_is_not_json_falls_back() -> None:
    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        fake.status = 503
        assert await ask() == AdvisorOutcome(FALLBACK, "analyzer", "http_503")
        fake.status, fake.raw = 200, b"<html>gateway</html>"
        assert await ask() == AdvisorOutcome(FALLBACK, "analyzer", "invalid_json")

    run_scenario(scenario)


def test_a_slow_advisor_times_out_and_the_request_is_not_held_up() -> None:
    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        fake.delay_s = 1.0
        fake.answer = {"structured_output": {"required_gpus": 1, "min_memory_mb": 0, "priority": 5}}
        start = time.monotonic()
        assert await ask() == AdvisorOutcome(FALLBACK, "analyzer", "timeout")
        assert time.monotonic() - start < 0.6

    run_scenario(scenario, timeout_s=0.2)


def test_a_refused_connection_falls_back() -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        assert await ask() == AdvisorOutcome(FALLBACK, "analyzer", "connection_error")

    run_scenario(scenario, url=f"http://127.0.0.1:{port}")


def test_the_breaker_opens_after_repeated_failures_and_then_skips_the_call(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=60.0)

    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        fake.status = 503
        for _ in range(3):
            assert (await ask()).fallback_reason == "http_503"
        assert breaker.state == "open"
        assert len(fake.requests) == 3
        # Open: the advisor is not called at all, even though it would now answer.
        fake.status = 200
        fake.answer = {"structured_output": {"required_gpus": 1, "min_memory_mb": 0, "priority": 5}}
        assert await ask() == AdvisorOutcome(FALLBACK, "analyzer", "circuit_open")
        assert len(fake.requests) == 3

    with caplog.at_level(logging.WARNING, logger="agent.advisor"):
        run_scenario(scenario, breaker=breaker)
    # One warning per kind of fault, not one per request.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "http_503" in warnings[0] and "circuit_open" in warnings[1]


def test_after_the_cool_down_one_good_trial_closes_the_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=0.1)

    async def scenario(fake: FakeAdvisor, ask: Callable[[], Awaitable[AdvisorOutcome]]) -> None:
        fake.status = 500
        assert (await ask()).fallback_reason == "http_500"
        assert (await ask()).fallback_reason == "circuit_open"
        await trio.sleep(0.15)
        fake.status = 200
        fake.answer = {"structured_output": {"required_gpus": 2, "min_memory_mb": 1024, "priority": 6}}
        outcome = await ask()
        assert outcome.decided_by == "advisor"
        assert breaker.state == "closed"
        assert len(fake.requests) == 2

    run_scenario(scenario, breaker=breaker)
