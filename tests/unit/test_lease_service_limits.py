"""LeaseService bounds how many allocates decide and wait for their entry at once.

A burst of hundreds in flight all became runnable together whenever a Ready
applied their entries, and trio runs a whole batch of runnable tasks before
it looks at its timers: the Raft ticker (the leader's heartbeats) waited
behind them (tests/bench/bench_heartbeat.py). Past ADMISSION_CONCURRENCY,
callers wait their turn, first come first served.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio
import trio.testing

from agent.lease_service import ADMISSION_CONCURRENCY, LeaseService
from agent.workload_analysis import WorkloadAnalysis
from coordinator.admission import Admission
from coordinator.commands import Command
from coordinator.inventory import Inventory
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import GpuView
from coordinator.request_parsing import parse_allocate_body
from coordinator.scheduler import Scheduler, SchedulerConfig


class HeldLog:
    """A command log whose proposals are applied only when the test lets them through."""

    def __init__(self) -> None:
        self.table = LeaseTable()
        self.waiting = 0
        self.most_waiting = 0
        self.go = trio.Event()

    async def read_barrier(self) -> None:
        return None

    async def propose(self, command: Command, *, term: int | None = None) -> ApplyResult:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        await self.go.wait()
        self.waiting -= 1
        return self.table.apply(command)

    async def propose_many(self, commands: Sequence[Command], *, term: int | None = None) -> list[ApplyResult]:
        return [await self.propose(c, term=term) for c in commands]


def test_allocates_past_the_limit_wait_their_turn_and_all_are_answered() -> None:
    inventory = Inventory.of(GpuView("n1", i, f"GPU-{i}", "NVIDIA H100 80GB HBM3", 81559) for i in range(8))
    log = HeldLog()
    service = LeaseService(
        log,
        Admission(Scheduler(SchedulerConfig(), random.Random(1))),
        lambda: inventory,
        WorkloadAnalysis(lambda: inventory),
        default_ttl_s=3600.0,
        max_ttl_s=86400.0,
        clock=lambda: 1000.0,
    )
    calls = ADMISSION_CONCURRENCY + 20
    answers: list[str] = []

    async def one(n: int) -> None:
        body = parse_allocate_body({"service_name": "svc", "gpu_count": 1, "request_id": f"r{n}"})
        outcome = await service.allocate(body)
        answers.append("allocated" if outcome.allocation is not None else "queued")

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(calls):
                nursery.start_soon(one, n)
            await trio.testing.wait_all_tasks_blocked()
            assert log.waiting == ADMISSION_CONCURRENCY  # the rest wait at the limiter, not in the log
            log.go.set()

    trio.run(scenario)
    assert log.most_waiting == ADMISSION_CONCURRENCY
    assert sorted(answers) == sorted(["allocated"] * 8 + ["queued"] * (calls - 8))
