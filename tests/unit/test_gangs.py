"""Gangs: `gpu_count` GPUs on each of `nodes` nodes, granted and ended whole.

Scenarios for the scheduler (coordinator/gang_placement.py: fit, label
preference, reservation against backfill, quotas) and for the lease table
(one Allocate carrying every member, applied all or none; release, renewal,
expiry, preemption and host loss of any member end or change the whole gang;
snapshots). No gang request anywhere else changes nothing, which the rest of
the unit suite checks.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from coordinator import gang_placement
from coordinator.commands import (
    Allocate,
    Command,
    Enqueue,
    MarkHostLost,
    Preempt,
    Release,
    Renew,
    SetQueuePolicy,
    command_from_wire,
)
from coordinator.errors import Unsatisfiable
from coordinator.gang_placement import GangPlacement
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, GpuRef, Requirements
from coordinator.pending_reasons import why_pending
from coordinator.placement import PlanWalk
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.unit.test_scheduler import Cluster, node, req


def gang(request_id: str, nodes: int, per_node: int, *, at: float = 0.0, ttl_s: float = 0.0,
         queue_name: str = "default", priority: int = 5) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name="trainer",
        workload_type="training",
        priority=priority,
        requirements=Requirements(per_node, 1024, nodes=nodes),
        ttl_s=ttl_s,
        submitted_at=at,
        queue_name=queue_name,
    )


def cluster(nodes: int = 3, per_node: int = 4, labels: dict[str, dict[str, str]] | None = None) -> Cluster:
    c = Cluster([g for n in range(nodes) for g in node(f"n{n}", per_node)])
    for n in range(nodes):
        name = f"n{n}"
        c.inventory.set_facts(name, f"10.0.0.{n + 1}", (labels or {}).get(name, {}))
    return c


def members(command: Command) -> list[tuple[str, list[int]]]:
    assert isinstance(command, Allocate), command
    return [(m.node, [g.index for g in m.gpus]) for m in command.members]


def holders(c: Cluster) -> dict[GpuRef, str]:
    return dict(c.table.held_gpus())


# ---------------------------------------------------------------- placement


def test_a_gang_is_granted_on_distinct_nodes_in_one_command_with_a_rendezvous() -> None:
    c = cluster()
    command = c.admit(gang("g", 2, 4))
    assert members(command) == [("n0", [0, 1, 2, 3]), ("n1", [0, 1, 2, 3])]
    assert isinstance(command, Allocate)
    first, second = command.members
    assert first.gang is not None and second.gang is not None
    assert first.gang.gang_id == second.gang.gang_id
    assert (first.gang.rank, second.gang.rank) == (0, 1)
    assert (first.gang.rendezvous_address, first.gang.rendezvous_port) == ("10.0.0.1", 29500)
    assert first.gang.rendezvous_ports == (29500, 29599)
    # One record, naming the gang; every member's GPUs held.
    record = c.table.record("g")
    assert record is not None and record.allocation_id == first.gang.gang_id
    assert len(holders(c)) == 8


def test_a_second_gang_on_the_same_first_node_gets_the_next_port() -> None:
    c = cluster(nodes=2, per_node=4)
    one = c.admit(gang("g1", 2, 2))
    two = c.admit(gang("g2", 2, 2))
    ports = [cmd.allocation.gang.rendezvous_port for cmd in (one, two) if isinstance(cmd, Allocate) and cmd.allocation.gang]
    assert ports == [29500, 29501]


def test_a_gang_prefers_nodes_that_share_a_label_over_a_tighter_fit() -> None:
    # n0 has the fewest free GPUs (best fit's first choice) but is alone in its rack.
    labels = {"n0": {"rack": "r1"}, "n1": {"rack": "r2"}, "n2": {"rack": "r2"}}
    c = cluster(labels=labels)
    c.hold("other", "n0", [0])
    command = c.admit(gang("g", 2, 2))
    assert [n for n, _ in members(command)] == ["n1", "n2"]


def test_nvlink_domain_is_preferred_over_rack() -> None:
    labels = {
        "n0": {"rack": "r1", "nvlink_domain": "d1"},
        "n1": {"rack": "r1", "nvlink_domain": "d2"},
        "n2": {"rack": "r2", "nvlink_domain": "d2"},
    }
    command = cluster(labels=labels).admit(gang("g", 2, 4))
    assert [n for n, _ in members(command)] == ["n1", "n2"]


def test_without_shared_labels_the_best_fitting_nodes_are_taken() -> None:
    c = cluster()
    c.hold("other", "n1", [0, 1])
    command = c.admit(gang("g", 2, 2))
    # n1 has 2 left (fits exactly), then n0 by name.
    assert [n for n, _ in members(command)] == ["n0", "n1"]


def test_a_gang_that_does_not_fit_now_waits_as_one_request() -> None:
    c = cluster()
    c.hold("a", "n0", [0])
    c.hold("b", "n1", [0])
    c.hold("c", "n2", [0])
    command = c.admit(gang("g", 2, 4))
    assert isinstance(command, Enqueue)
    assert len(holders(c)) == 3  # nothing taken for it
    c.release("a", 1.0)
    assert not [x for x in c.tick(2.0) if isinstance(x, Allocate)]
    c.release("b", 3.0)
    placed = [x for x in c.tick(4.0) if isinstance(x, Allocate)]
    assert [members(x) for x in placed] == [[("n0", [0, 1, 2, 3]), ("n1", [0, 1, 2, 3])]]


def test_one_gpu_backfill_cannot_starve_a_waiting_gang() -> None:
    """The gang reserves its two closest nodes; 1-GPU work behind it goes to the third, never to those."""
    c = cluster()
    for i in range(3):
        c.hold(f"old{i}", f"n{i}", [0])
    assert isinstance(c.admit(gang("g", 2, 4, at=1.0)), Enqueue)
    # A stream of small requests, ranked behind the gang, while the old leases end one by one.
    now = 2.0
    for step in range(6):
        command = c.admit(req(f"small{step}", at=now))
        if isinstance(command, Allocate):
            assert command.allocation.node == "n2", "backfill took a GPU the gang reserved"
        now += 1.0
    c.release("old0", now)
    c.release("old1", now)
    placed = [x for x in c.tick(now + 1) if isinstance(x, Allocate)]
    assert [members(x) for x in placed] == [[("n0", [0, 1, 2, 3]), ("n1", [0, 1, 2, 3])]]


def test_a_gang_larger_than_the_cluster_is_unsatisfiable() -> None:
    c = cluster()
    with pytest.raises(Unsatisfiable) as info:
        c.decide(gang("g", 4, 4))
    assert info.value.code == "unsatisfiable"
    with pytest.raises(Unsatisfiable):
        c.decide(gang("g", 2, 5))  # no node has 5 GPUs
    assert c.table.snapshot() == LeaseTable().snapshot()


def test_a_gang_placement_holds_every_member() -> None:
    c = cluster()
    walk = c.scheduler._walk(c.table, c.inventory)
    try:
        placement = walk.best_fit(gang("g", 3, 4))
        assert isinstance(placement, GangPlacement)
        assert [m.node for m in placement.members] == ["n0", "n1", "n2"]
        assert len(placement.gpus) == 12
    finally:
        walk.undo()


def test_queue_caps_count_every_gpu_of_a_gang() -> None:
    table = LeaseTable()
    inventory = Inventory.of(g for n in range(3) for g in node(f"n{n}", 4))
    scheduler = Scheduler(SchedulerConfig(queue_timeout_s=0), random.Random(3))
    policy = QueuePolicy.of([QueueSpec("a", max_gpus=6)])
    assert table.apply(SetQueuePolicy(0.0, policy)).ok
    # 2 × 4 = 8 GPUs: over the cap of 6 though each node's share (4) is under it.
    command = scheduler.admit(gang("g", 2, 4, queue_name="a"), table, inventory, 1.0)
    assert isinstance(command, Enqueue)
    assert table.apply(command).ok
    assert table.queue_ledger.pending_gpus["a"] == 8
    command = scheduler.admit(gang("h", 2, 3, queue_name="a"), table, inventory, 2.0)
    assert isinstance(command, Allocate) and command.gpu_total == 6
    assert table.apply(command).ok
    assert table.queue_ledger.gpus["a"] == 6


# ---------------------------------------------------------------- the lease table


def granted(ttl_s: float = 0.0) -> tuple[Cluster, Allocate]:
    c = cluster()
    command = c.admit(gang("g", 2, 4, ttl_s=ttl_s))
    assert isinstance(command, Allocate)
    return c, command


def test_an_allocate_that_cannot_take_every_member_takes_none() -> None:
    c = cluster()
    command = c.decide(gang("g", 2, 4))
    c.hold("thief", "n1", [3])  # one GPU of the second member, taken meanwhile
    before = c.table.snapshot()
    result = c.table.apply(command)
    assert result.error is not None and result.error.code == "gpu_busy"
    assert c.table.snapshot() == before


def test_a_malformed_gang_is_refused() -> None:
    c = cluster()
    command = c.decide(gang("g", 2, 4))
    assert isinstance(command, Allocate)
    # Only the first member: a part of a gang is never granted.
    part = Allocate(command.at, command.allocation)
    result = c.table.apply(part)
    assert result.error is not None and result.error.code == "invalid_allocation"
    # Two members on one node.
    same = Allocate(command.at, command.allocation, (dataclasses.replace(command.gang_rest[0], node="n0"),))
    assert c.table.apply(same).error is not None
    assert c.table.snapshot() == LeaseTable().snapshot()


@pytest.mark.parametrize("by", ["gang", "member0", "member1"])
def test_releasing_any_member_or_the_gang_releases_it_whole(by: str) -> None:
    c, command = granted()
    gang_id = command.allocation.gang.gang_id if command.allocation.gang else ""
    name = {"gang": gang_id, "member0": command.members[0].allocation_id, "member1": command.members[1].allocation_id}[by]
    result = c.table.apply(Release(5.0, (name,)))
    assert result.ok
    assert holders(c) == {}
    assert [e.kind for e in result.events] == ["released"]  # one event for the gang
    assert len(result.events[0].gang) == 2
    record = c.table.record("g")
    assert record is not None and record.status == "released"


def test_renewal_and_expiry_act_on_the_whole_gang() -> None:
    c, command = granted(ttl_s=10.0)
    assert c.table.apply(Renew(5.0, command.members[1].allocation_id, 50.0)).ok
    assert {m.expires_at for m in c.table.allocations()} == {50.0}
    assert c.tick(20.0) == []
    expired = [x for x in c.tick(51.0) if isinstance(x, Release)]
    assert expired and holders(c) == {}


def test_host_loss_of_one_member_ends_the_gang_on_every_node() -> None:
    c, command = granted()
    c.hold("bystander", "n2", [0])
    result = c.table.apply(MarkHostLost(5.0, "n1"))
    assert result.ok
    assert [e.kind for e in result.events] == ["lost"]
    assert set(holders(c).values()) == {"bystander"}


def test_preempting_one_member_preempts_the_gang_with_one_deadline() -> None:
    c, command = granted()
    result = c.table.apply(Preempt(5.0, ((command.members[1].allocation_id, 35.0),), "priority"))
    assert result.ok
    assert c.table.preempting_ids() == sorted(m.allocation_id for m in command.members)
    assert [e.kind for e in result.events] == ["preempting"]
    assert c.table.apply(Release(35.0, (command.members[0].allocation_id,), "preempted")).ok
    assert holders(c) == {}


def test_a_snapshot_with_a_gang_restores_it_whole() -> None:
    c, command = granted()
    snap = c.table.snapshot()
    assert snap["version"] == 5
    restored = LeaseTable.restore(snap)
    assert restored.snapshot() == snap
    gang_id = command.allocation.gang.gang_id if command.allocation.gang else ""
    assert restored.gang(gang_id) == command.members
    assert restored.apply(Release(9.0, (gang_id,))).ok
    assert restored.held_gpus() == {}
    # Without a live gang the snapshot stays readable by the release before gangs.
    assert restored.snapshot()["version"] == 4


def test_the_gang_command_survives_its_wire_form() -> None:
    _, command = granted()
    assert command_from_wire(command.to_wire()) == command


# ---------------------------------------------------------------- preemption of a gang


def queued_cluster(guarantee_a: int) -> tuple[LeaseTable, Inventory, Scheduler]:
    """Two 4-GPU nodes; team a runs a 2x4 gang by borrowing; team b is guaranteed 4 GPUs."""
    table = LeaseTable()
    inventory = Inventory.of(g for n in range(2) for g in node(f"n{n}", 4))
    scheduler = Scheduler(SchedulerConfig(queue_timeout_s=0), random.Random(5))
    policy = QueuePolicy.of(
        [QueueSpec("a", guaranteed_gpus=guarantee_a, preemption_grace_s=10.0), QueueSpec("b", guaranteed_gpus=4)]
    )
    assert table.apply(SetQueuePolicy(0.0, policy)).ok
    command = scheduler.admit(gang("g", 2, 4, queue_name="a"), table, inventory, 1.0)
    assert isinstance(command, Allocate) and table.apply(command).ok
    wanted = dataclasses.replace(req("b1", gpus=4, at=2.0), queue_name="b")
    command = scheduler.admit(wanted, table, inventory, 2.0)
    assert isinstance(command, Enqueue) and table.apply(command).ok
    return table, inventory, scheduler


def test_a_guarantee_reclaims_a_borrowing_gang_whole() -> None:
    table, inventory, scheduler = queued_cluster(guarantee_a=0)
    (preempt,) = [c for c in scheduler.tick(table, inventory, 3.0) if isinstance(c, Preempt)]
    assert table.apply(preempt).ok
    assert len(table.preempting_ids()) == 2  # one member named, the whole gang taken
    ended = scheduler.tick(table, inventory, 13.0)
    for command in ended:
        assert table.apply(command).ok
    assert not [a for a in table.allocations() if a.gang is not None]
    record = table.record("b1")
    assert record is not None and record.status == "allocated"


def test_a_gang_holding_its_queues_guarantee_is_not_taken() -> None:
    """Taking one member takes all 8 GPUs, below team a's guarantee of 2: no preemption is proposed."""
    table, inventory, scheduler = queued_cluster(guarantee_a=2)
    assert not [c for c in scheduler.tick(table, inventory, 3.0) if isinstance(c, Preempt)]


def test_a_waiting_gang_says_how_many_nodes_it_lacks() -> None:
    c = cluster()
    c.hold("a", "n0", [0])
    c.hold("b", "n1", [0])
    assert isinstance(c.admit(gang("g", 2, 4)), Enqueue)
    reason = why_pending(c.table, c.inventory, "g")
    assert reason is not None and reason.reason == "resources"
    assert "2 nodes with 4 matching GPU(s) each" in reason.detail and "1 node(s)" in reason.detail


def test_a_gang_is_its_own_log_op_so_older_servers_stop_rather_than_keep_part_of_it() -> None:
    _, command = granted()
    assert command.to_wire()["op"] == "allocate_gang"
    assert Allocate(command.at, command.allocation).to_wire()["op"] == "allocate"


def test_two_gangs_placed_in_one_pass_on_the_same_first_node_get_different_ports() -> None:
    c = cluster(nodes=2, per_node=4)
    c.hold("x", "n0", [0, 1, 2, 3])
    assert isinstance(c.admit(gang("g1", 2, 2, at=1.0)), Enqueue)
    assert isinstance(c.admit(gang("g2", 2, 2, at=2.0)), Enqueue)
    c.release("x", 3.0)
    placed = [x for x in c.tick(4.0) if isinstance(x, Allocate)]
    ports = [x.allocation.gang.rendezvous_port for x in placed if x.allocation.gang]
    assert ports == [29500, 29501]


def test_the_node_search_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gang decision reads at most GANG_NODE_SEARCH_LIMIT nodes, whatever the cluster's size."""
    monkeypatch.setattr(gang_placement, "GANG_NODE_SEARCH_LIMIT", 4)
    c = cluster(nodes=10, per_node=2)
    read: list[str] = []
    fit = PlanWalk.member_fit

    def counting(self: PlanWalk, request: AllocationRequest, name: str) -> object:
        read.append(name)
        return fit(self, request, name)

    monkeypatch.setattr(PlanWalk, "member_fit", counting)
    walk = c.scheduler._walk(c.table, c.inventory)
    try:
        placement = walk.best_fit(gang("g", 2, 2))
    finally:
        walk.undo()
    assert isinstance(placement, GangPlacement)
    assert len(read) == 4
