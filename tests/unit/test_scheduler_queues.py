"""The scheduler under a queue policy, scenario by scenario (coordinator/queue_pass.py, preemption.py).

Each test builds a small cluster, applies a SetQueuePolicy, drives `admit` and
`tick` with explicit times and applies what they return, as the agent does.
The rules are those of the fair-share issue: guarantees first, borrowing by
weight, caps, preemption with a grace period (borrowed first, then lower
priority, then youngest; the smallest set that makes the request fit), and
the deadline kept in the replicated table.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from coordinator import preemption
from coordinator.commands import Allocate, Command, Enqueue, Preempt, Release, SetQueuePolicy
from coordinator.errors import Conflict
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, Requirements
from coordinator.queue_rules import fair_shares
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.unit.test_scheduler import node

GRACE = 30.0


def request(
    request_id: str,
    queue: str,
    *,
    gpus: int = 1,
    priority: int = 5,
    at: float = 0.0,
    preemptible: bool = True,
    model: str | None = None,
) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=f"svc-{queue}",
        workload_type="training",
        priority=priority,
        requirements=Requirements(gpu_count=gpus, min_memory_mb=1024, gpu_model=model),
        ttl_s=0.0,
        submitted_at=at,
        queue_name=queue,
        preemptible=preemptible,
    )


class Cluster:
    """A table, an inventory and a scheduler, driven like the agent drives them."""

    def __init__(self, nodes: int, gpus_per_node: int, *queues: QueueSpec, gap: int = 3, aging: float = 0.0) -> None:
        self.table = LeaseTable()
        self.inventory = Inventory.of(g for n in range(nodes) for g in node(f"n{n}", gpus_per_node))
        self.scheduler = Scheduler(SchedulerConfig(queue_timeout_s=0), random.Random(7))
        policy = QueuePolicy.of(queues, preemption_priority_gap=gap, age_weight_per_hour=aging)
        assert self.table.apply(SetQueuePolicy(0.0, policy)).ok

    def apply(self, command: Command) -> None:
        result = self.table.apply(command)
        assert result.ok, result.error

    def submit(self, req: AllocationRequest, now: float) -> Command:
        command = self.scheduler.admit(req, self.table, self.inventory, now)
        self.apply(command)
        return command

    def tick(self, now: float) -> list[Command]:
        commands = self.scheduler.tick(self.table, self.inventory, now)
        for command in commands:
            self.apply(command)
        return commands

    def used(self, queue: str) -> int:
        return self.table.queue_ledger.gpus[queue]

    def lease_of(self, request_id: str) -> str:
        record = self.table.record(request_id)
        assert record is not None and record.allocation_id is not None
        return record.allocation_id


def team_a_borrows_everything() -> Cluster:
    """Two 4-GPU nodes; team a (guarantee 2) fills all 8 by borrowing; team b has a guarantee of 4."""
    cluster = Cluster(
        2, 4, QueueSpec("a", guaranteed_gpus=2, preemption_grace_s=GRACE), QueueSpec("b", guaranteed_gpus=4)
    )
    for i in range(8):
        assert isinstance(cluster.submit(request(f"a{i}", "a", at=float(i)), float(i)), Allocate)
    assert cluster.used("a") == 8
    return cluster


def test_a_guaranteed_request_reclaims_borrowed_gpus_after_the_grace_period() -> None:
    cluster = team_a_borrows_everything()
    assert isinstance(cluster.submit(request("b0", "b", gpus=2, at=10.0), 10.0), Enqueue)
    preempts = [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]
    assert len(preempts) == 1
    preempt = preempts[0]
    # The smallest set: two 1-GPU leases of the youngest, on one node, each with a's grace.
    assert len(preempt.victims) == 2
    assert all(deadline == 10.0 + GRACE for _, deadline in preempt.victims)
    assert preempt.request_id == "b0" and preempt.reason == "reclaim"
    victims = {i for i, _ in preempt.victims}
    assert all(cluster.table.allocation(v).node == preempt.node for v in victims)  # type: ignore[union-attr]
    # Youngest first: a7 (and its node-mate a6 or a5), never a0.
    assert cluster.lease_of("a7") in victims or cluster.lease_of("a3") in victims
    # A second pass does not preempt again, and nothing ends before the deadline.
    assert not [c for c in cluster.tick(20.0) if isinstance(c, (Preempt, Release))]
    # A release before the deadline is refused as a preemption.
    assert not cluster.table.apply(Release(25.0, tuple(victims), "preempted")).ok
    ended = cluster.tick(10.0 + GRACE)
    releases = [c for c in ended if isinstance(c, Release)]
    assert releases and set(releases[0].allocation_ids) == victims and releases[0].reason == "preempted"
    # The claim holds the node for b0: it is placed there in the same pass.
    allocs = [c for c in ended if isinstance(c, Allocate)]
    assert [a.allocation.request.request_id for a in allocs] == ["b0"]
    assert allocs[0].allocation.node == preempt.node
    assert cluster.used("a") == 6 and cluster.used("b") == 2


def test_an_early_release_by_the_victim_lets_the_request_in_before_the_deadline() -> None:
    cluster = team_a_borrows_everything()
    cluster.submit(request("b0", "b", gpus=2, at=10.0), 10.0)
    preempt = next(c for c in cluster.tick(10.0) if isinstance(c, Preempt))
    cluster.apply(Release(12.0, tuple(i for i, _ in preempt.victims), "released"))
    allocs = [c for c in cluster.tick(12.0) if isinstance(c, Allocate)]
    assert [a.allocation.request.request_id for a in allocs] == ["b0"]


def test_work_within_its_guarantee_is_never_taken() -> None:
    cluster = team_a_borrows_everything()
    # b asks for all 4 it is guaranteed: a keeps its own 2 guaranteed GPUs whatever happens.
    cluster.submit(request("b0", "b", gpus=4, at=10.0), 10.0)
    preempts = [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]
    assert preempts and sum(len(p.victims) for p in preempts) == 4
    cluster.tick(10.0 + GRACE)
    assert cluster.used("a") == 4 and cluster.used("b") == 4
    # c (no guarantee, borrowing) may not take a's guaranteed GPUs back.
    cluster.submit(request("b1", "b", gpus=2, at=50.0), 50.0)
    cluster.tick(50.0)
    assert cluster.used("a") >= 2


def test_a_queue_never_passes_its_cap_even_with_idle_gpus() -> None:
    cluster = Cluster(1, 8, QueueSpec("a", max_gpus=3))
    for i in range(3):
        assert isinstance(cluster.submit(request(f"a{i}", "a"), 1.0), Allocate)
    assert isinstance(cluster.submit(request("a3", "a"), 2.0), Enqueue)
    assert not [c for c in cluster.tick(3.0) if isinstance(c, Allocate)]
    with pytest.raises(Conflict) as info:
        cluster.scheduler.admit(
            dataclasses.replace(request("a4", "a"), queue=False), cluster.table, cluster.inventory, 4.0
        )
    assert info.value.code == "queue_quota"


def test_a_queue_that_may_not_borrow_stays_at_its_guarantee() -> None:
    cluster = Cluster(1, 8, QueueSpec("a", guaranteed_gpus=2, borrow=False))
    for i in range(2):
        assert isinstance(cluster.submit(request(f"a{i}", "a"), 1.0), Allocate)
    assert isinstance(cluster.submit(request("a2", "a"), 2.0), Enqueue)


def test_not_preemptible_is_allowed_only_within_the_guarantee() -> None:
    cluster = Cluster(1, 8, QueueSpec("a", guaranteed_gpus=2))
    assert isinstance(cluster.submit(request("a0", "a", gpus=2, preemptible=False), 1.0), Allocate)
    assert isinstance(cluster.submit(request("a1", "a", preemptible=False), 2.0), Enqueue)
    assert isinstance(cluster.submit(request("a2", "a"), 3.0), Allocate)


def test_idle_gpus_are_shared_by_weight_among_borrowers() -> None:
    cluster = Cluster(1, 8, QueueSpec("a", weight=1.0), QueueSpec("b", weight=3.0))
    # Both queue 8 one-GPU requests before any pass: the pass shares by weight.
    for i in range(8):
        cluster.apply(Enqueue(0.0, request(f"a{i}", "a", at=float(i)), None))
        cluster.apply(Enqueue(0.0, request(f"b{i}", "b", at=float(i)), None))
    cluster.tick(1.0)
    assert (cluster.used("a"), cluster.used("b")) == (2, 6)


def test_fair_share_water_fills_by_weight_and_demand() -> None:
    policy = QueuePolicy.of([QueueSpec("a", guaranteed_gpus=4), QueueSpec("b", weight=2.0), QueueSpec("c")])
    shares = fair_shares(policy, 16, {"a": 10, "b": 3, "c": 20})
    # a gets its 4, b wants only 3; the remaining 9 go to a and c by weight 1:1.
    assert shares["b"] == pytest.approx(3.0)
    assert shares["a"] == pytest.approx(4.0 + 4.5)
    assert shares["c"] == pytest.approx(4.5)
    assert sum(shares.values()) == pytest.approx(16.0)


def test_a_borrower_below_its_fair_share_reclaims_from_one_above() -> None:
    cluster = Cluster(1, 8, QueueSpec("a", preemption_grace_s=5.0), QueueSpec("b", preemption_grace_s=5.0))
    for i in range(8):
        assert isinstance(cluster.submit(request(f"a{i}", "a", at=float(i)), float(i)), Allocate)
    for i in range(4):
        cluster.submit(request(f"b{i}", "b", at=10.0 + i), 10.0 + i)
    preempted = sum(len(c.victims) for c in cluster.tick(20.0) if isinstance(c, Preempt))
    assert preempted == 4  # b's fair share of 8 contended GPUs is 4
    cluster.tick(25.0)
    assert (cluster.used("a"), cluster.used("b")) == (4, 4)
    # At their fair shares, nobody preempts anybody.
    cluster.submit(request("b9", "b", at=30.0), 30.0)
    assert not [c for c in cluster.tick(31.0) if isinstance(c, Preempt)]


def test_a_higher_priority_request_preempts_lower_priority_work_of_its_own_queue_by_the_gap() -> None:
    cluster = Cluster(1, 4, QueueSpec("a", guaranteed_gpus=4), gap=3)
    for i in range(4):
        cluster.submit(request(f"low{i}", "a", priority=2, at=float(i)), float(i))
    cluster.submit(request("mid", "a", priority=4, at=10.0), 10.0)
    assert not [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]  # gap 2 < 3
    cluster.submit(request("high", "a", priority=5, at=11.0), 11.0)
    preempts = [c for c in cluster.tick(11.0) if isinstance(c, Preempt)]
    assert len(preempts) == 1 and preempts[0].reason == "priority"
    assert [i for i, _ in preempts[0].victims] == [cluster.lease_of("low3")]  # the youngest


def test_no_preemption_without_queues() -> None:
    table = LeaseTable()
    inventory = Inventory.of(node("n0", 2))
    scheduler = Scheduler(SchedulerConfig(queue_timeout_s=0), random.Random(1))
    for i in range(2):
        assert table.apply(scheduler.admit(request(f"x{i}", "default", priority=1), table, inventory, 0.0)).ok
    assert table.apply(scheduler.admit(request("y", "default", priority=10), table, inventory, 1.0)).ok
    assert not [c for c in scheduler.tick(table, inventory, 2.0) if isinstance(c, Preempt)]


def test_preemption_state_survives_a_snapshot() -> None:
    cluster = team_a_borrows_everything()
    cluster.submit(request("b0", "b", gpus=2, at=10.0), 10.0)
    cluster.tick(10.0)
    restored = LeaseTable.restore(cluster.table.snapshot())
    assert restored.snapshot() == cluster.table.snapshot()
    assert restored.claims() == cluster.table.claims()
    assert restored.queue_policy == cluster.table.queue_policy
    # A new leader with the restored table ends the same leases at the same deadline, once.
    cluster.table = restored
    cluster.scheduler = Scheduler(SchedulerConfig(queue_timeout_s=0), random.Random(99))
    assert not [c for c in cluster.tick(11.0) if isinstance(c, Preempt)]
    ended = cluster.tick(10.0 + GRACE)
    assert sum(len(c.allocation_ids) for c in ended if isinstance(c, Release)) == 2
    assert not [c for c in cluster.tick(10.0 + GRACE + 1) if isinstance(c, Release)]


def test_aging_lifts_a_long_waiter_over_newer_higher_priority_work() -> None:
    cluster = Cluster(1, 1, QueueSpec("a"), aging=1.0)
    cluster.submit(request("busy", "a", at=0.0), 0.0)
    cluster.submit(request("old-low", "a", priority=2, at=0.0), 0.0)
    # Five hours later a priority-6 request arrives: old-low is at 2 + 5 = 7 by then.
    cluster.submit(request("new-high", "a", priority=6, at=5 * 3600.0), 5 * 3600.0)
    cluster.apply(Release(5 * 3600.0 + 1, (cluster.lease_of("busy"),), "released"))
    allocs = [c for c in cluster.tick(5 * 3600.0 + 1) if isinstance(c, Allocate)]
    assert [a.allocation.request.request_id for a in allocs] == ["old-low"]


# ---------------------------------------------------------------- why-pending and views


def test_each_waiting_request_says_why_it_waits() -> None:
    from coordinator.pending_reasons import PendingExplainer

    cluster = team_a_borrows_everything()
    cluster.submit(request("b0", "b", gpus=2, at=10.0), 10.0)
    cluster.submit(request("a8", "a", at=10.5), 10.5)
    cluster.tick(11.0)
    explainer = PendingExplainer(cluster.table, cluster.inventory)
    b0 = explainer.explain("b0")
    assert b0 is not None and b0.reason == "preempting" and b0.deadline == 11.0 + GRACE
    a8 = explainer.explain("a8")
    # a borrows 6 of its fair share... a8 waits behind b0 for GPUs.
    assert a8 is not None and a8.reason in ("priority", "resources"), a8
    assert explainer.explain("a0") is None  # allocated, not waiting


def test_the_cap_is_the_reason_when_the_queue_is_full() -> None:
    from coordinator.pending_reasons import why_pending

    cluster = Cluster(1, 8, QueueSpec("a", max_gpus=1))
    cluster.submit(request("a0", "a"), 1.0)
    cluster.submit(request("a1", "a"), 2.0)
    reason = why_pending(cluster.table, cluster.inventory, "a1")
    assert reason is not None and reason.reason == "queue_quota" and "max_gpus 1" in reason.detail


def test_drained_gpus_are_named_as_the_reason() -> None:
    from coordinator.model import GpuView
    from coordinator.pending_reasons import why_pending

    cluster = Cluster(1, 2, QueueSpec("a"))
    views = [GpuView("n0", i, f"G{i}", "NVIDIA H100 80GB HBM3", 81559, drained=(i == 1)) for i in range(2)]
    cluster.inventory.set_node("n0", views)
    cluster.submit(request("a0", "a", gpus=2), 1.0)
    reason = why_pending(cluster.table, cluster.inventory, "a0")
    assert reason is not None and reason.reason == "drained_or_unhealthy"


def test_queue_views_show_terms_use_and_fair_share() -> None:
    from coordinator.queue_views import queue_views

    cluster = team_a_borrows_everything()
    cluster.submit(request("b0", "b", gpus=2, at=10.0), 10.0)
    cluster.tick(10.0)
    views = {v["name"]: v for v in queue_views(cluster.table, cluster.inventory)}
    assert set(views) == {"a", "b", "default"}
    assert views["a"]["in_use_gpus"] == 8 and views["a"]["borrowed_gpus"] == 6
    assert views["a"]["preempting_leases"] == 2
    assert views["b"]["pending_requests"] == 1 and views["b"]["pending_gpus"] == 2
    assert views["a"]["fair_share_gpus"] + views["b"]["fair_share_gpus"] == pytest.approx(8.0)


def test_a_claim_counts_as_its_queue_s_during_the_grace_period() -> None:
    """Victims in their grace period leave their queue's count and the claim joins the claimant's:
    the next requests of the claimant's queue are judged beyond what the claim takes."""
    cluster = team_a_borrows_everything()
    for i, at in enumerate((10.0, 11.0, 12.0)):
        cluster.submit(request(f"b{i}", "b", gpus=2, at=at), at)
    preempts = [c for c in cluster.tick(12.0) if isinstance(c, Preempt)]
    # b0 and b1 fill b's guarantee of 4; b2 would take b to 6, above its fair share of 5
    # (a 2 + b 4 guaranteed, the 2 left split by weight), so it takes nothing.
    assert sorted(p.request_id or "" for p in preempts) == ["b0", "b1"]
    assert sum(len(p.victims) for p in preempts) == 4
    # Every pass of the grace period leaves the decision as it is.
    for now in (15.0, 20.0, 30.0, 41.0):
        assert not [c for c in cluster.tick(now) if isinstance(c, Preempt)]
    assert cluster.used("a") == 8 and cluster.table.queue_ledger.preempting_gpus["a"] == 4


def test_a_victim_set_keeps_the_victim_queue_at_its_guarantee_together() -> None:
    """Each of a's leases alone may be borrowed (a holds 4, guarantee 3), two together may not."""
    cluster = Cluster(1, 4, QueueSpec("a", guaranteed_gpus=3, preemption_grace_s=GRACE), QueueSpec("b", guaranteed_gpus=2))
    for i in range(4):
        cluster.submit(request(f"a{i}", "a", at=float(i)), float(i))
    cluster.submit(request("b0", "b", gpus=2, at=10.0), 10.0)
    # Before, the pass proposed both leases and the table refused the Preempt (guarantee_kept).
    assert not [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]
    # One GPU is owed: a 1-GPU request takes exactly one lease.
    cluster.submit(request("b1", "b", gpus=1, at=11.0), 11.0)
    preempts = [c for c in cluster.tick(11.0) if isinstance(c, Preempt)]
    assert [(p.request_id, len(p.victims)) for p in preempts] == [("b1", 1)]


def test_gpus_a_victim_frees_go_to_its_claimant_before_a_higher_one_still_waiting_for_its_own() -> None:
    cluster = Cluster(
        1,
        2,
        QueueSpec("a", preemption_grace_s=GRACE),
        QueueSpec("b", guaranteed_gpus=1),
        QueueSpec("c", guaranteed_gpus=1),
    )
    cluster.submit(request("a0", "a", at=0.0), 0.0)
    cluster.submit(request("a1", "a", at=1.0), 1.0)
    cluster.submit(request("b0", "b", priority=5, at=10.0), 10.0)
    first = [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]
    assert [(p.request_id, p.victims) for p in first] == [("b0", ((cluster.lease_of("a1"), 40.0),))]
    cluster.submit(request("c0", "c", priority=8, at=20.0), 20.0)
    second = [c for c in cluster.tick(20.0) if isinstance(c, Preempt)]
    assert [(p.request_id, p.victims) for p in second] == [("c0", ((cluster.lease_of("a0"), 50.0),))]
    # At 40 a1 ends: its GPU is b0's, though c0 ranks higher (it still waits for a0).
    placed = [c.allocation.request.request_id for c in cluster.tick(40.0) if isinstance(c, Allocate)]
    assert placed == ["b0"]
    placed = [c.allocation.request.request_id for c in cluster.tick(50.0) if isinstance(c, Allocate)]
    assert placed == ["c0"]


def test_the_table_refuses_a_second_preemption_that_only_together_with_the_first_breaks_a_guarantee() -> None:
    """Checked on the table too: leases in their grace period no longer protect their queue's guarantee."""
    cluster = Cluster(1, 4, QueueSpec("a", guaranteed_gpus=3), QueueSpec("b", guaranteed_gpus=1))
    for i in range(4):
        cluster.submit(request(f"a{i}", "a", at=float(i)), float(i))
    for i in range(2):
        assert isinstance(cluster.submit(request(f"b{i}", "b", at=10.0 + i), 10.0 + i), Enqueue)
    node0 = cluster.table.allocation(cluster.lease_of("a3")).node  # type: ignore[union-attr]
    cluster.apply(Preempt(12.0, ((cluster.lease_of("a3"), 42.0),), "reclaim", "b0", node0))
    second = Preempt(12.0, ((cluster.lease_of("a2"), 42.0),), "reclaim", "b1", node0)
    result = cluster.table.apply(second)
    assert not result.ok and result.error is not None and result.error.code == "guarantee_kept"


def test_a_whole_node_request_counts_the_free_gpus_it_reserved_and_takes_only_the_borrowed_rest() -> None:
    """b's 8-GPU request reserves the node's 6 free GPUs; the 2 borrowed leases of a are all it must take.

    Before, victim search ran after the request had closed those 6 GPUs by its own
    reservation, counted none of them, and found no set: b waited for a's work to end.
    """
    cluster = Cluster(1, 8, QueueSpec("a", preemption_grace_s=GRACE), QueueSpec("b", guaranteed_gpus=8))
    for i in range(2):
        cluster.submit(request(f"a{i}", "a", at=float(i)), float(i))
    assert isinstance(cluster.submit(request("b0", "b", gpus=8, priority=2, at=10.0), 10.0), Enqueue)
    preempts = [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]
    assert [(p.request_id, sorted(v for v, _ in p.victims)) for p in preempts] == [
        ("b0", sorted(cluster.lease_of(f"a{i}") for i in range(2)))
    ]
    placed = [c.allocation.request.request_id for c in cluster.tick(10.0 + GRACE) if isinstance(c, Allocate)]
    assert placed == ["b0"]


def test_free_gpus_reserved_by_a_request_ahead_are_not_counted_by_a_later_one() -> None:
    """c waits for its victims and holds the GPU one of them freed early; b, behind it, must not count that GPU."""
    cluster = Cluster(
        1,
        8,
        QueueSpec("a", preemption_grace_s=GRACE),
        QueueSpec("b", guaranteed_gpus=4),
        QueueSpec("c", guaranteed_gpus=4),
    )
    for i in range(8):
        cluster.submit(request(f"a{i}", "a", at=float(i)), float(i))
    cluster.submit(request("c0", "c", gpus=4, at=10.0), 10.0)
    first = [c for c in cluster.tick(10.0) if isinstance(c, Preempt)]
    assert [(p.request_id, len(p.victims)) for p in first] == [("c0", 4)]
    early = first[0].victims[0][0]
    cluster.apply(Release(15.0, (early,), "released"))
    cluster.submit(request("b0", "b", gpus=4, at=15.0), 15.0)
    second = [c for c in cluster.tick(15.0) if isinstance(c, Preempt)]
    # The freed GPU is c0's (a claim ranks first): b0 takes four leases of its own.
    assert [(p.request_id, len(p.victims)) for p in second] == [("b0", 4)]
    assert not {v for v, _ in second[0].victims} & {v for v, _ in first[0].victims}



def test_between_equal_victim_sets_the_one_that_loses_the_least_work_wins() -> None:
    """One lower-priority lease on each node: the younger one is taken, wherever it runs.

    Before, equal sets (one lease, one GPU) were told apart by node name, so the
    older lease on n0 was taken and its 20 s of work lost where 10 s would do;
    the youngest-first rule held within a node only.
    """
    cluster = Cluster(2, 2, QueueSpec("a", guaranteed_gpus=4, preemption_grace_s=GRACE), gap=3)
    cluster.submit(request("old", "a", priority=2, at=0.0), 0.0)
    cluster.submit(request("mid0", "a", priority=5, at=1.0), 1.0)
    cluster.submit(request("young", "a", priority=2, at=10.0), 10.0)
    cluster.submit(request("mid1", "a", priority=5, at=11.0), 11.0)
    node_of = {r: cluster.table.allocation(cluster.lease_of(r)).node for r in ("old", "young")}  # type: ignore[union-attr]
    assert node_of == {"old": "n0", "young": "n1"}
    assert isinstance(cluster.submit(request("high", "a", priority=5, at=20.0), 20.0), Enqueue)
    preempts = [c for c in cluster.tick(20.0) if isinstance(c, Preempt)]
    assert [[v for v, _ in p.victims] for p in preempts] == [[cluster.lease_of("young")]]


def on(node_name: str, req: AllocationRequest) -> AllocationRequest:
    return dataclasses.replace(req, requirements=dataclasses.replace(req.requirements, node=node_name))


def test_a_queue_s_waiters_beyond_its_guarantee_do_not_reserve_what_another_queue_is_owed() -> None:
    """a is owed 3 GPUs and waits for two 3-GPU jobs; only the first is within a's guarantee.

    Each node has 2 free GPUs, the unused guarantees of a (3) and c (1); b holds its
    whole guarantee, so there is no borrowed work to take. Before, each of a's
    waiters was judged alone (0 + 3 <= 3), both counted as guaranteed, and each
    reserved one node's free GPUs: c's one-GPU job within its guarantee found
    nothing open and nothing to preempt, and waited for b's work to end. Now the
    GPUs reserved for a0 count as a's, so a1 is beyond a's guarantee and reserves
    nothing ahead of c.
    """
    cluster = Cluster(
        2,
        4,
        QueueSpec("a", guaranteed_gpus=3, preemption_grace_s=GRACE),
        QueueSpec("b", guaranteed_gpus=4, preemption_grace_s=GRACE),
        QueueSpec("c", guaranteed_gpus=1, preemption_grace_s=GRACE),
    )
    for i, node_name in enumerate(("n0", "n1")):
        assert isinstance(cluster.submit(on(node_name, request(f"b{i}", "b", gpus=2, at=float(i))), float(i)), Allocate)
    for i in range(2):
        assert isinstance(cluster.submit(request(f"a{i}", "a", gpus=3, at=10.0 + i), 10.0 + i), Enqueue)
    assert not cluster.tick(11.0)
    placed = cluster.submit(request("c0", "c", at=20.0), 20.0)
    # a's first job still holds n0's free GPUs against backfill; b's work is never taken.
    assert isinstance(placed, Allocate) and placed.allocation.node == "n1"
    assert not [c for c in cluster.tick(20.0) if isinstance(c, Preempt)]


def test_victim_search_in_a_large_fleet_weighs_a_bounded_few_nodes_and_takes_one_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 nodes of borrowed one-GPU leases: a one-GPU reclaim weighs at most 2 x MAX_VICTIM_NODES nodes' leases.

    Before the bound, every borrowed lease (1,600 here) was judged for every
    candidate in every pass: victim search grew with the fleet. The lease taken
    is still the one an exhaustive search takes: one GPU, the least work lost
    (the youngest, a1599; a700 is of lower priority but older, and priority
    orders victims within a node, not across).
    """
    cluster = Cluster(200, 8, QueueSpec("a", preemption_grace_s=GRACE), QueueSpec("b", guaranteed_gpus=800))
    for i in range(1600):
        cluster.submit(request(f"a{i}", "a", priority=5 if i != 700 else 1, at=float(i)), float(i))
    judged: list[str] = []
    allowed = preemption._allowed

    def counting(alloc, *args):  # type: ignore[no-untyped-def]
        judged.append(alloc.allocation_id)
        return allowed(alloc, *args)

    monkeypatch.setattr(preemption, "_allowed", counting)
    assert isinstance(cluster.submit(request("b0", "b", at=2000.0), 2000.0), Enqueue)
    preempts = [c for c in cluster.tick(2000.0) if isinstance(c, Preempt)]
    assert [[v for v, _ in p.victims] for p in preempts] == [[cluster.lease_of("a1599")]]
    assert 0 < len(judged) <= 2 * preemption.MAX_VICTIM_NODES * 8
