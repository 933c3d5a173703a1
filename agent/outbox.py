"""At-least-once delivery of lifecycle events (webhooks, the graph service).

Theory of operation
-------------------
Whoever produces an event writes it as a row in a durable outbox in the same
step that records the state change, then calls `OutboxDeliverer.wake()`. The
deliverer, one trio task, POSTs due rows and records each outcome back in the
store, so an event survives a crash between "decided" and "sent": after a
restart the row is still due and is sent again. Delivery is therefore at least
once; every POST carries the row's stable id as `X-Event-Id` so a receiver can
drop duplicates.

A failed POST (non-2xx status, timeout, connection error) is retried after
`retry_delay(attempts)` (exponential backoff with full jitter), until
`max_attempts` tries have failed; the row is then given up (dead-lettered in
the store) and a warning names the URL and the last error.

Resource handling: at most `concurrency` POSTs are in flight, each bounded by
`timeout_s` (a trio deadline around the whole request, plus httpx's own
timeouts), so one slow or dead receiver holds at most one slot for at most
`timeout_s` and never stops the others. Rows in flight are remembered so the
next fetch does not start them twice.

Error handling: delivery problems are outcomes, never exceptions out of `run`.
A failing store (the SQLite file is locked, the disk is full) is logged and
retried after `store_retry_s`; a row whose outcome could not be recorded stays
due and is sent again, which at-least-once allows.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import httpx
import trio

from coordinator.backoff import retry_delay

logger = logging.getLogger(__name__)

WEBHOOK = "webhook"
GRAPH = "graph"

DELIVERED = "delivered"
RETRY = "retry"
GAVE_UP = "gave_up"

USER_AGENT = "gpu-orchestrator"

# The deliverer re-reads the store at least this often even without wake(),
# so a row written by a path that forgot to wake it is still sent.
MAX_IDLE_S = 30.0


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One event waiting to be POSTed."""

    # Stable across retries and restarts; sent as X-Event-Id for receivers to dedupe.
    id: str
    kind: str  # WEBHOOK | GRAPH
    url: str
    payload: bytes  # the JSON body, ready to POST
    attempts: int  # failed attempts so far
    next_attempt_at: float  # wall-clock seconds
    created_at: float


class OutboxStore(Protocol):
    """The durable side of the outbox (agent/storage.py implements it over SQLite)."""

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        """Undelivered rows not given up with next_attempt_at <= now, oldest first."""
        ...

    async def next_outbox_due(self) -> float | None:
        """The earliest next_attempt_at of pending rows; None when there are none."""
        ...

    async def mark_delivered(self, item_id: str, at: float) -> None:
        """Record that the receiver accepted the row; it is never sent again."""
        ...

    async def mark_failed(self, item_id: str, attempts: int, next_attempt_at: float | None, error: str) -> None:
        """Record a failed attempt; next_attempt_at None means give up (dead letter)."""
        ...


class OutboxDeliverer:
    """Sends due outbox rows until cancelled (see the module doc)."""

    def __init__(
        self,
        store: OutboxStore,
        client: httpx.AsyncClient,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 10,
        concurrency: int = 8,
        rng: random.Random,
        clock: Callable[[], float] = time.time,
        on_outcome: Callable[[str, str], None] = lambda kind, outcome: None,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 300.0,
        store_retry_s: float = 1.0,
    ) -> None:
        if timeout_s <= 0 or max_attempts < 1 or concurrency < 1 or store_retry_s <= 0:
            raise ValueError("timeout_s and store_retry_s must be > 0, max_attempts and concurrency >= 1")
        self._store = store
        self._client = client
        # Bound on one POST, connect to last byte of the response.
        self._timeout_s = timeout_s
        # Failed tries after which a row is given up (so at most this many POSTs).
        self._max_attempts = max_attempts
        # POSTs in flight at once: a slow receiver takes one slot, not the deliverer.
        self._concurrency = concurrency
        self._rng = rng
        # Wall clock for the store's times (next_attempt_at survives restarts).
        self._clock = clock
        # Metrics hook: (kind, "delivered" | "retry" | "gave_up").
        self._on_outcome = on_outcome
        # Backoff window: retry n waits up to min(cap, base * 2**(n-1)) seconds.
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        # Pause after a store error, so a broken disk is not hammered.
        self._store_retry_s = store_retry_s
        self._in_flight: set[str] = set()
        self._wakeup = trio.Event()

    def wake(self) -> None:
        """Look at the store now: new rows were written. Call from the trio thread."""
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver forever; returns only by cancellation. Reports started() once running."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                # Swap the event before reading the store: a wake() that lands
                # while we read sets the new event, so it is never lost.
                wakeup = self._wakeup = trio.Event()
                try:
                    sleep_s = await self._start_due(nursery)
                except Exception:
                    logger.exception("outbox store failed; retrying in %.1f s", self._store_retry_s)
                    sleep_s = self._store_retry_s
                with trio.move_on_after(sleep_s):
                    await wakeup.wait()

    async def _start_due(self, nursery: trio.Nursery) -> float:
        """Start POSTs for due rows into free slots; return how long to sleep if not woken."""
        free = self._concurrency - len(self._in_flight)
        if free > 0:
            # Rows in flight are still due in the store and at most `concurrency`
            # minus `free` of them sit ahead in the page, so a page of
            # `concurrency` rows holds every new row that the free slots can take.
            for item in await self._store.due_outbox(self._clock(), self._concurrency):
                if free == 0:
                    break
                if item.id not in self._in_flight:
                    self._in_flight.add(item.id)
                    nursery.start_soon(self._deliver, item)
                    free -= 1
        if free == 0:
            # Every slot is busy; a finishing delivery wakes us.
            return MAX_IDLE_S
        due = await self._store.next_outbox_due()
        if due is None:
            return MAX_IDLE_S
        wait = due - self._clock()
        if wait <= 0:
            # The earliest due row is one in flight (anything else due was just
            # started); its delivery wakes us within timeout_s. (Or a row fell
            # due between our two clock reads: it waits at most timeout_s.)
            return self._timeout_s
        return min(wait, MAX_IDLE_S)

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            error = await self._post(item)
            if error is None:
                await self._store.mark_delivered(item.id, self._clock())
                outcome = DELIVERED
            else:
                outcome = await self._record_failure(item, error)
        except Exception:
            # The outcome is not recorded, so the row stays due. Keep it in
            # flight for a pause so a broken store is not met with a resend loop.
            logger.exception("outbox store failed recording event %s; it will be sent again", item.id)
            await trio.sleep(self._store_retry_s)
        else:
            self._on_outcome(item.kind, outcome)
        finally:
            self._in_flight.discard(item.id)
            self.wake()

    async def _post(self, item: OutboxItem) -> str | None:
        """POST one row; None when the receiver accepted it, else why not."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Event-Id": item.id,
        }
        with trio.move_on_after(self._timeout_s):
            try:
                response = await self._client.post(
                    item.url, content=item.payload, headers=headers, timeout=self._timeout_s
                )
            except httpx.TimeoutException:
                return "timeout"
            except Exception as exc:
                # Connection refused, DNS, TLS, a malformed webhook_url: all are
                # the receiver's problem, reported and retried, never raised.
                return f"{type(exc).__name__}: {exc}"
            if 200 <= response.status_code < 300:
                return None
            return f"http_{response.status_code}"
        return "timeout"

    async def _record_failure(self, item: OutboxItem, error: str) -> str:
        attempts = item.attempts + 1
        if attempts >= self._max_attempts:
            await self._store.mark_failed(item.id, attempts, None, error)
            logger.warning(
                "giving up on %s event %s to %s after %d attempts: %s", item.kind, item.id, item.url, attempts, error
            )
            return GAVE_UP
        delay = retry_delay(attempts, self._rng, base_s=self._retry_base_s, cap_s=self._retry_cap_s)
        await self._store.mark_failed(item.id, attempts, self._clock() + delay, error)
        logger.debug(
            "%s event %s to %s failed (%s); retry %d in %.2f s", item.kind, item.id, item.url, error, attempts, delay
        )
        return RETRY
