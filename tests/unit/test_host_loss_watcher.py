"""The leader's host-loss watcher, driven by hand: which nodes it watches and when it proposes.

A fake lease service records proposals and applies them to a real LeaseTable;
gossip is a dict the test edits. `trio.testing.MockClock` makes the grace pass
without waiting.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from agent.host_loss import HostLossWatcher
from coordinator.commands import MarkHostLost
from coordinator.host_loss import HostLossPolicy
from coordinator.lease_table import ApplyResult, LeaseTable
from tests.unit.test_lease_table import granted


class FakeService:
    def __init__(self) -> None:
        self.table = LeaseTable()
        self.proposed: list[str] = []
        self.before: list[float | None] = []

    async def mark_host_lost(self, node: str, allocated_before: float | None = None) -> ApplyResult:
        self.proposed.append(node)
        self.before.append(allocated_before)
        return self.table.apply(MarkHostLost(1000.0, node))


def watcher(service: FakeService, gossip: dict[str, str], grace_s: float = 10.0) -> HostLossWatcher:
    fake: Any = service
    return HostLossWatcher(fake, lambda: gossip, node="leader", grace_s=grace_s)


def test_only_nodes_holding_leases_are_watched_and_absence_counts_as_gone() -> None:
    service = FakeService()
    granted(service.table, "a1", "r1", [0], 1.0, node="h1")
    gossip = {"leader": "alive", "h1": "dead", "h2": "dead"}
    w, policy = watcher(service, gossip), HostLossPolicy(10.0, "leader")
    assert w.observe(policy, 0.0) == []
    assert policy.tracked() == ["h1"]  # h2 holds nothing: no decision wanted
    del gossip["h1"]  # forgotten by gossip: still the same absence
    assert w.observe(policy, 9.0) == [] and w.observe(policy, 10.0) == ["h1"]


def test_a_node_whose_leases_ended_otherwise_is_dropped() -> None:
    service = FakeService()
    granted(service.table, "a1", "r1", [0], 1.0, node="h1")
    w, policy = watcher(service, {"h1": "dead"}), HostLossPolicy(10.0, "leader")
    w.observe(policy, 0.0)
    service.table.apply(MarkHostLost(5.0, "h1"))
    assert w.observe(policy, 20.0) == [] and policy.tracked() == []


def test_run_proposes_once_after_the_grace_and_a_new_run_starts_its_clock_afresh() -> None:
    service = FakeService()
    granted(service.table, "a1", "r1", [0], 1.0, node="h1")
    gossip = {"leader": "alive", "h1": "dead"}
    w = watcher(service, gossip)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run)
            await trio.sleep(9.5)
            assert service.proposed == []
            await trio.sleep(1.0)
            assert service.proposed == ["h1"]
            await trio.sleep(30.0)  # nothing left on h1: no second proposal
            assert service.proposed == ["h1"]
            nursery.cancel_scope.cancel()
        # Leadership lost and regained: a host already gone long ago waits a whole grace again.
        granted(service.table, "a2", "r2", [1], 2000.0, node="h1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run)
            await trio.sleep(9.5)
            assert service.proposed == ["h1"]
            await trio.sleep(1.0)
            assert service.proposed == ["h1", "h1"]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_leader_that_sees_most_members_dead_marks_nothing_until_its_view_recovers() -> None:
    """Its own gossip is the likelier fault: ending every lease in the cluster would be worse."""
    service = FakeService()
    for n, node in enumerate(("h1", "h2", "h3")):
        granted(service.table, f"a{n}", f"r{n}", [0], 1.0, node=node)
    gossip = {"leader": "alive", "h1": "dead", "h2": "dead", "h3": "dead", "h4": "alive"}
    w = watcher(service, gossip)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run)
            await trio.sleep(60.0)
            assert service.proposed == []  # 2 of 5 alive: not trusted
            gossip.update(h2="alive", h3="alive")  # the view heals: h1 really is gone
            await trio.sleep(1.5)
            assert service.proposed == ["h1"]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_proposal_spares_leases_placed_after_the_host_was_seen_gone() -> None:
    service = FakeService()
    granted(service.table, "a1", "r1", [0], 1.0, node="h1")
    w = watcher(service, {"leader": "alive", "h1": "dead"})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.run)
            await trio.sleep(10.5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    (before,) = service.before
    assert before is not None  # the wall-clock moment the host was first seen gone
