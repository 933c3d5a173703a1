"""Idle reclaim on the leader: the usage recorder's looks feed the detector, and due leases are preempted.

A fake lease service applies Preempt to a real LeaseTable whose queue policy
opts queue "batch" in (under 10 % for 30 minutes, 60 s of grace); "prod" does
not. `trio.testing.MockClock` runs the recorder's loop through the half hour
without waiting; the inventory is the test's to change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import trio
import trio.testing

from agent.usage_recorder import UsageRecorder, idle_policies
from coordinator.commands import Allocate, Preempt, RecordUsage, Release, SetQueuePolicy
from coordinator.idle_reclaim import IdlePolicy
from coordinator.inventory import Inventory
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import GangMembership
from coordinator.queues import QueuePolicy, QueueSpec
from tests.unit.test_usage_accounting import grant, lease
from tests.unit.test_usage_recorder import views

M = 60.0
GRACE_S = 60.0
POLICY = QueuePolicy.of(
    [
        QueueSpec("batch", idle_reclaim=IdlePolicy(10.0, 30.0), preemption_grace_s=GRACE_S),
        QueueSpec("prod", guaranteed_gpus=2),
    ]
)


class FakeService:
    def __init__(self) -> None:
        self.table = LeaseTable()
        assert self.table.apply(SetQueuePolicy(0.0, POLICY)).ok
        self.table.apply(RecordUsage(0.0, (), 30 * 86_400.0))  # the recorder's retention: no empty records
        self.preempts: list[tuple[float, tuple[tuple[str, float], ...], str]] = []

    async def record_usage(self, rows: Sequence[tuple[str, str, float]], retention_s: float) -> None:
        if rows:
            assert self.table.apply(RecordUsage(trio.current_time(), tuple(rows), retention_s)).ok

    async def preempt(self, victims: Sequence[tuple[str, float]], reason: str) -> ApplyResult:
        now = trio.current_time()
        self.preempts.append((now, tuple(victims), reason))
        return self.table.apply(Preempt(now, tuple(victims), reason))


def recorder(service: FakeService, inventory: list[Inventory]) -> UsageRecorder:
    fake: Any = service
    return UsageRecorder(
        fake, lambda: inventory[0], record_interval_s=60.0, retention_s=30 * 86_400.0, clock=trio.current_time, poll_s=5.0
    )


def run_for(r: UsageRecorder, steps: Sequence[tuple[float, Callable[[], None]]], until: float) -> None:
    """Run the recorder's loop from 0 to `until`, doing each step's action at its time."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(r.run)
            for at, action in steps:
                await trio.sleep_until(at)
                action()
            await trio.sleep_until(until)
            nursery.cancel_scope.cancel()

    run: Callable[[], Awaitable[None]] = main
    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


def test_only_queues_that_opt_in_have_an_idle_policy() -> None:
    assert idle_policies(POLICY) == {"batch": IdlePolicy(10.0, 30.0)}


def test_a_lease_idle_for_its_queues_period_is_preempted_once_with_its_grace() -> None:
    """Four leases from minute 0: only the idle, preemptible one of the opted-in queue is reclaimed, once."""
    service = FakeService()
    grant(service.table, lease("idle", [0], 0.0, queue="batch"))
    grant(service.table, lease("prod", [1], 0.0, queue="prod"))  # its queue did not opt in
    kept = lease("kept", [2], 0.0, queue="batch")
    grant(service.table, replace(kept, request=replace(kept.request, preemptible=False)))
    grant(service.table, lease("busy", [3], 0.0, queue="batch"))
    r = recorder(service, [views({0: 2.0, 1: 0.0, 2: 1.0, 3: 95.0})])
    run_for(r, [], until=45 * M)
    # Not before minute 30; the first look from then finds it due: one Preempt, its deadline the grace after.
    assert len(service.preempts) == 1
    at, victims, reason = service.preempts[0]
    assert 30 * M <= at < 30 * M + 5.0 and victims == (("idle", at + GRACE_S),) and reason == "idle"
    assert service.table.preempting("idle") == at + GRACE_S


def test_a_gpu_that_gets_busy_restarts_the_period() -> None:
    service = FakeService()
    grant(service.table, lease("a", [0, 1], 0.0, queue="batch"))
    inventory = [views({0: 2.0, 1: 2.0})]
    r = recorder(service, inventory)

    def busy() -> None:
        inventory[0] = views({0: 2.0, 1: 60.0})

    def quiet() -> None:
        inventory[0] = views({0: 2.0, 1: 3.0})

    # Busy from minute 20 to minute 25: idle again from 25, due at 55.
    run_for(r, [(20 * M, busy), (25 * M, quiet)], until=54 * M)
    assert service.preempts == []
    assert r.idle.idle_since("a") is not None and 25 * M <= r.idle.idle_since("a") <= 25 * M + 5.0  # type: ignore[operator]


def test_a_lease_released_or_already_preempting_is_left_alone() -> None:
    service = FakeService()
    grant(service.table, lease("gone", [0], 0.0, queue="batch"))
    grant(service.table, lease("taken", [1], 0.0, queue="batch"))
    # The scheduler already preempts "taken" (a reclaim for a waiting request).
    assert service.table.apply(Preempt(1.0, (("taken", 10_000.0),), "reclaim")).ok
    inventory = [views({0: 2.0, 1: 2.0})]
    r = recorder(service, inventory)

    def release() -> None:
        assert service.table.apply(Release(trio.current_time(), ("gone",))).ok

    run_for(r, [(10 * M, release)], until=45 * M)
    assert service.preempts == []
    assert r.idle.idle_since("gone") is None  # swept once it ended


def test_a_policy_change_is_picked_up_from_the_table() -> None:
    """The leader's sync sets a new policy: the detector follows it (here: the queue opts out)."""
    service = FakeService()
    grant(service.table, lease("a", [0], 0.0, queue="batch"))
    r = recorder(service, [views({0: 2.0})])

    def opt_out() -> None:
        policy = QueuePolicy.of([QueueSpec("batch"), QueueSpec("prod", guaranteed_gpus=2)])
        assert service.table.apply(SetQueuePolicy(trio.current_time(), policy)).ok

    run_for(r, [(20 * M, opt_out)], until=60 * M)
    assert service.preempts == []


def gang_of_two(service: FakeService) -> None:
    """A 2-node gang of queue batch: GPU 0 on n1 and GPU 0 on n2."""
    first, second = (
        replace(
            lease(f"g.{rank}", [0], 0.0, queue="batch", node=node),
            request=lease("g", [0], 0.0, queue="batch").request,
            gang=GangMembership("g", rank, 2, "10.0.0.1", 29500, (29500, 29599)),
        )
        for rank, node in enumerate(("n1", "n2"))
    )
    assert service.table.apply(Allocate(0.0, first, (second,))).ok


def two_nodes(n1: float, n2: float) -> Inventory:
    return Inventory.of([*views({0: n1}, node="n1"), *views({0: n2}, node="n2")])


def test_a_gang_is_reclaimed_only_when_every_node_of_it_idles() -> None:
    service = FakeService()
    gang_of_two(service)
    r = recorder(service, [two_nodes(2.0, 95.0)])
    run_for(r, [], until=45 * M)
    assert service.preempts == []  # one member busy: the gang works on


def test_an_idle_gang_is_reclaimed_whole_once() -> None:
    service = FakeService()
    gang_of_two(service)
    r = recorder(service, [two_nodes(2.0, 1.0)])
    run_for(r, [], until=45 * M)
    assert len(service.preempts) == 1
    assert service.table.preempting_ids() == ["g.0", "g.1"]
