"""Outbox delivery against real HTTP receivers on loopback.

Each scenario starts Hypercorn serving a small Quart-trio app on an ephemeral
127.0.0.1 port, an in-memory outbox store, and the deliverer, then watches what
the receivers saw and what the store recorded.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

from agent.outbox import OutboxDeliverer, OutboxItem


@dataclass
class Row:
    item: OutboxItem
    delivered_at: float | None = None
    given_up: bool = False
    errors: list[str] = field(default_factory=list)


class MemoryOutbox:
    """An OutboxStore in a dict, with a hook to fail reads on demand."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.failing_reads = 0
        self.changed = trio.Event()

    def add(self, item_id: str, url: str, *, payload: bytes = b'{"kind": "allocated"}') -> None:
        now = time.time()
        self.rows[item_id] = Row(OutboxItem(item_id, "webhook", url, payload, 0, now, now))

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        if self.failing_reads:
            self.failing_reads -= 1
            raise OSError("database is locked")
        due = [
            r.item
            for r in self.rows.values()
            if r.delivered_at is None and not r.given_up and r.item.next_attempt_at <= now
        ]
        return sorted(due, key=lambda i: (i.created_at, i.id))[:limit]

    async def next_outbox_due(self) -> float | None:
        pending = [r.item.next_attempt_at for r in self.rows.values() if r.delivered_at is None and not r.given_up]
        return min(pending, default=None)

    async def mark_delivered(self, item_id: str, at: float) -> None:
        self.rows[item_id].delivered_at = at
        self._changed()

    async def mark_failed(self, item_id: str, attempts: int, next_attempt_at: float | None, error: str) -> None:
        row = self.rows[item_id]
        row.errors.append(error)
        if next_attempt_at is None:
            row.given_up = True
            next_attempt_at = row.item.next_attempt_at
        row.item = OutboxItem(
            row.item.id, row.item.kind, row.item.url, row.item.payload, attempts, next_attempt_at, row.item.created_at
        )
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.changed.wait()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receivers:
    """Webhook receivers on one app: /ok accepts, /flaky fails twice then accepts,
    /dead always answers 503, /slow sleeps past any test timeout."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.in_handler = 0
        self.most_in_handler = 0
        self.app = QuartTrio("receivers")
        self.app.add_url_rule("/<name>", view_func=self._handle, methods=["POST"])

    async def _handle(self, name: str) -> tuple[str, int]:
        body = await request.get_data()
        assert isinstance(body, bytes)
        self.seen.append(Seen("/" + name, dict(request.headers), body, time.monotonic()))
        self.in_handler += 1
        self.most_in_handler = max(self.most_in_handler, self.in_handler)
        try:
            if name == "flaky":
                return ("", 500) if sum(s.path == "/flaky" for s in self.seen) <= 2 else ("", 204)
            if name == "dead":
                return "", 503
            if name == "slow":
                await trio.sleep(30)
            if name == "paced":
                await trio.sleep(0.1)
            return "", 204
        finally:
            self.in_handler -= 1

    def hits(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


@asynccontextmanager
async def serving(receivers: Receivers) -> AsyncIterator[str]:
    """Serve the receivers on an ephemeral loopback port; yields the base URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, receivers.app, config))
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()


Scenario = Callable[[MemoryOutbox, OutboxDeliverer, str, Receivers, list[tuple[str, str]]], Awaitable[None]]


def run_scenario(scenario: Scenario, *, limit_s: float = 5.0, **settings: float) -> None:
    """Run `scenario` with a running deliverer, then stop everything cleanly."""

    async def main() -> None:
        receivers = Receivers()
        store = MemoryOutbox()
        outcomes: list[tuple[str, str]] = []
        options: dict[str, float] = {"timeout_s": 1.0, "retry_base_s": 0.02, "retry_cap_s": 0.1} | settings
        with trio.fail_after(limit_s):
            async with serving(receivers) as base, httpx.AsyncClient() as client:
                deliverer = OutboxDeliverer(
                    store,
                    client,
                    rng=random.Random(7),
                    on_outcome=lambda kind, outcome: outcomes.append((kind, outcome)),
                    timeout_s=options["timeout_s"],
                    retry_base_s=options["retry_base_s"],
                    retry_cap_s=options["retry_cap_s"],
                    max_attempts=int(options.get("max_attempts", 10)),
                    concurrency=int(options.get("concurrency", 8)),
                    store_retry_s=options.get("store_retry_s", 1.0),
                )
                async with trio.open_nursery() as nursery:
                    await nursery.start(deliverer.run)
                    await scenario(store, deliverer, base, receivers, outcomes)
                    nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_event_written_later_is_delivered_after_two_500s_with_its_event_id() -> None:
    async def scenario(
        store: MemoryOutbox, deliverer: OutboxDeliverer, base: str, receivers: Receivers, outcomes: list[tuple[str, str]]
    ) -> None:
        # The deliverer is idle on an empty store; a new row and wake() start it.
        await trio.sleep(0.05)
        store.add("evt-1", base + "/flaky", payload=b'{"event": "allocated", "allocation_id": "a1"}')
        deliverer.wake()
        await store.wait_until(lambda: store.rows["evt-1"].delivered_at is not None)

        hits = receivers.hits("/flaky")
        assert len(hits) == 3
        for hit in hits:
            assert hit.headers["X-Event-Id"] == "evt-1"
            assert hit.headers["Content-Type"] == "application/json"
            assert hit.headers["User-Agent"] == "gpu-orchestrator"
            assert hit.body == b'{"event": "allocated", "allocation_id": "a1"}'
        assert store.rows["evt-1"].errors == ["http_500", "http_500"]
        assert store.rows["evt-1"].item.attempts == 2
        assert outcomes == [("webhook", "retry"), ("webhook", "retry"), ("webhook", "delivered")]

    run_scenario(scenario)


def test_a_dead_target_is_given_up_while_another_target_still_gets_its_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(
        store: MemoryOutbox, deliverer: OutboxDeliverer, base: str, receivers: Receivers, outcomes: list[tuple[str, str]]
    ) -> None:
        store.add("to-dead", base + "/dead")
        store.add("to-ok", base + "/ok")
        deliverer.wake()
        await store.wait_until(lambda: store.rows["to-dead"].given_up and store.rows["to-ok"].delivered_at is not None)

        assert len(receivers.hits("/dead")) == 3
        assert store.rows["to-dead"].errors == ["http_503"] * 3
        assert store.rows["to-dead"].item.attempts == 3
        assert len(receivers.hits("/ok")) == 1
        assert sorted(outcomes) == sorted(
            [("webhook", "retry"), ("webhook", "retry"), ("webhook", "gave_up"), ("webhook", "delivered")]
        )
        # Nothing more is sent for a row that was given up.
        await trio.sleep(0.2)
        assert len(receivers.hits("/dead")) == 3

    with caplog.at_level(logging.WARNING, logger="agent.outbox"):
        run_scenario(scenario, max_attempts=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "/dead" in warnings[0] and "http_503" in warnings[0] and "to-dead" in warnings[0]


def test_a_slow_target_does_not_hold_up_a_fast_one() -> None:
    async def scenario(
        store: MemoryOutbox, deliverer: OutboxDeliverer, base: str, receivers: Receivers, outcomes: list[tuple[str, str]]
    ) -> None:
        start = time.monotonic()
        store.add("to-slow", base + "/slow")  # older, so fetched first
        store.add("to-fast", base + "/ok")
        deliverer.wake()
        await store.wait_until(lambda: store.rows["to-fast"].delivered_at is not None)
        assert time.monotonic() - start < 0.4  # well inside the slow POST's 0.5 s timeout
        assert store.rows["to-slow"].errors == []  # still in flight

        await store.wait_until(lambda: bool(store.rows["to-slow"].errors))
        assert store.rows["to-slow"].errors == ["timeout"]
        assert 0.5 <= time.monotonic() - start < 1.5

    run_scenario(scenario, timeout_s=0.5, retry_base_s=10.0)


def test_no_more_than_concurrency_posts_are_in_flight() -> None:
    async def scenario(
        store: MemoryOutbox, deliverer: OutboxDeliverer, base: str, receivers: Receivers, outcomes: list[tuple[str, str]]
    ) -> None:
        for n in range(6):
            store.add(f"evt-{n}", base + "/paced")
        deliverer.wake()
        await store.wait_until(lambda: all(r.delivered_at is not None for r in store.rows.values()))
        assert len(receivers.hits("/paced")) == 6  # each sent once
        assert receivers.most_in_handler == 2
        # Oldest first: the first two rows were sent before the last two.
        order = [s.headers["X-Event-Id"] for s in receivers.hits("/paced")]
        assert set(order[:2]) == {"evt-0", "evt-1"} and set(order[4:]) == {"evt-4", "evt-5"}

    run_scenario(scenario, concurrency=2)


def test_a_store_error_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(
        store: MemoryOutbox, deliverer: OutboxDeliverer, base: str, receivers: Receivers, outcomes: list[tuple[str, str]]
    ) -> None:
        store.failing_reads = 1
        store.add("evt-1", base + "/ok")
        deliverer.wake()
        await store.wait_until(lambda: store.rows["evt-1"].delivered_at is not None)
        assert outcomes == [("webhook", "delivered")]

    with caplog.at_level(logging.ERROR, logger="agent.outbox"):
        run_scenario(scenario, store_retry_s=0.05)
    failures = [r for r in caplog.records if r.getMessage().startswith("outbox store failed")]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and isinstance(failures[0].exc_info[1], OSError)
