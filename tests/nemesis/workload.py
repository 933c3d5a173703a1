"""The workload: a few workers that allocate with a request id, hold briefly and release, through random nodes.

Each worker runs in a thread of its own with its own HTTP client and seeded RNG. One
request: allocate (1 or 2 GPUs, `queue: false`, a long TTL so no lease expires during a
run) with a fresh `request_id`; on no answer or a 503, retry the *same* request id
through another random node; on 200, hold for a moment and release the allocation by
id, retrying the same way (a 404 after an unanswered attempt means it is gone). A retry
goes to another agent than the one that just failed, after a short backoff, and goes on
for up to `RETRY_FOR_S`: longer than any fault lasts, so a request is rarely abandoned
with its outcome unknown (an abandoned one may hold GPUs to the end of the run, and
enough of them would leave the workload no capacity). Every loop is bounded: at most
`max_requests` requests per worker, `ATTEMPTS` tries and `RETRY_FOR_S` per call, and
nothing new starts once `stop()` is called or the deadline passes.

Every call is appended to the shared history (`record`), answered or not.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable

import httpx

from tests.nemesis.history import Call

ATTEMPTS = 100  # tries of one allocate or release before the worker moves on ...
RETRY_FOR_S = 60.0  # ... or this long, whichever comes first
BACKOFF_S = (0.05, 1.0)  # the first retry pause, doubling up to the second
CALL_TIMEOUT_S = 20.0  # longer than any bound the agent puts on a request, so its answer is seen
TTL_S = 3600.0  # no lease expires during a run: every acknowledged one must still be there


class Workload:
    def __init__(
        self,
        nodes: dict[str, str],  # name -> base URL
        api_key: str,
        seed: int,
        record: Callable[[Call], None],
        *,
        workers: int = 4,
        max_requests: int = 100_000,
        deadline_s: float = 3600.0,
    ) -> None:
        self.nodes = nodes
        self.api_key = api_key
        self.seed = seed
        self.record = record
        self.workers = workers
        self.max_requests = max_requests
        self.deadline = time.monotonic() + deadline_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(i,), name=f"nemesis-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 2 * (RETRY_FOR_S + CALL_TIMEOUT_S)) -> None:
        """Let each worker finish the request in hand (bounded), then return."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout)

    def _going(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _worker(self, i: int) -> None:
        rng = random.Random(self.seed * 1_000 + i)
        with httpx.Client(headers={"X-API-Key": self.api_key}, timeout=CALL_TIMEOUT_S) as client:
            for n in range(self.max_requests):
                if not self._going():
                    return
                request_id = f"s{self.seed}-w{i}-{n}"
                body = {
                    "service_name": f"nemesis-w{i}",
                    "gpu_count": rng.choice((1, 1, 2)),
                    "min_memory_mb": 1,
                    "priority": 5,
                    "ttl_seconds": TTL_S,
                    "queue": False,
                    "request_id": request_id,
                }
                allocation = self._allocate(client, rng, i, body)
                if allocation is None:
                    time.sleep(rng.uniform(0.05, 0.2))
                    continue
                time.sleep(rng.uniform(0.05, 0.3))  # hold it briefly
                self._release(client, rng, i, request_id, str(allocation["allocation_id"]))

    def _allocate(self, client: httpx.Client, rng: random.Random, i: int, body: dict[str, Any]) -> dict[str, Any] | None:
        call = self._until_answered(client, rng, i, "allocate", "/gpu/allocate", body, str(body["request_id"]), None)
        if call.status == 200 and isinstance(call.body, dict):
            return call.body
        return None  # a definite refusal (409 no_capacity, ...), or given up

    def _release(self, client: httpx.Client, rng: random.Random, i: int, request_id: str, allocation_id: str) -> None:
        # Done on 200 (released) or 404 (already gone: an earlier unanswered attempt was applied).
        self._until_answered(client, rng, i, "release", "/gpu/release", {"allocation_id": allocation_id},
                             request_id, allocation_id)

    def _until_answered(
        self, client: httpx.Client, rng: random.Random, i: int, op: str, path: str, body: dict[str, Any],
        request_id: str, allocation_id: str | None,
    ) -> Call:
        """Send the call until it gets an answer other than 503, through another agent each time (bounded)."""
        give_up = time.monotonic() + RETRY_FOR_S
        pause = BACKOFF_S[0]
        avoid = None
        for _ in range(ATTEMPTS):
            call = self._call(client, rng, i, op, path, body, request_id, allocation_id, avoid)
            if (call.status is not None and call.status != 503) or time.monotonic() > give_up:
                break
            avoid = call.node
            time.sleep(rng.uniform(pause / 2, pause))
            pause = min(2 * pause, BACKOFF_S[1])
        return call

    def _call(
        self, client: httpx.Client, rng: random.Random, i: int, op: str, path: str, body: dict[str, Any],
        request_id: str, allocation_id: str | None, avoid: str | None = None,
    ) -> Call:
        node = rng.choice(sorted(n for n in self.nodes if n != avoid))
        start = time.time()
        status: int | None = None
        answer: Any = None
        error = None
        try:
            resp = client.post(self.nodes[node] + path, json=body)
            status = resp.status_code
            try:
                answer = resp.json()
            except ValueError:
                answer = resp.text
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        call = Call(op=op, node=node, worker=i, request_id=request_id, start=start, end=time.time(),
                    status=status, body=answer, allocation_id=allocation_id, error=error)
        self.record(call)
        return call
