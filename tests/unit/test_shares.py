"""Shares of a GPU by memory, scenario by scenario (coordinator/share_placement.py).

A share asks for part of one GPU: a memory budget. Shares of one sharing group
(a queue, or every queue that allows cross-queue shares) pack best fit onto a
GPU, never past its memory total; a shared GPU is held for exclusive work and
freed with its last share; a queue counts a shared GPU once. Each test drives
the scheduler as the agent does and applies what it returns to a lease table.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from coordinator.commands import Allocate, Enqueue, MarkHostLost, Preempt, Release, SetQueuePolicy, command_from_wire
from coordinator.gpu_usage import UsageTracker
from coordinator.errors import Conflict, Forbidden, InvalidRequest
from coordinator.fragmentation import cluster_largest_request, largest_requests
from coordinator.inventory import Inventory
from coordinator.lease_snapshot import SNAPSHOT_VERSION, SNAPSHOT_VERSION_WITHOUT_SHAPES
from coordinator.lease_table import LeaseTable
from coordinator.model import Allocation, AllocationRequest, GpuRef, GpuView, Requirements
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.request_parsing import parse_allocate_body, queue_for
from coordinator.scheduler import Scheduler, SchedulerConfig
from coordinator.share_placement import SHARE_GROUP_ANY
from coordinator.views import allocation_view

H100 = "NVIDIA H100 80GB HBM3"
TOTAL_MB = 81_559


def gpus(node: str, count: int) -> list[GpuView]:
    return [GpuView(node, i, f"GPU-{node}-{i}", H100, TOTAL_MB) for i in range(count)]


def share(
    request_id: str, mb: int, *, queue: str = "default", node: str | None = None, ttl_s: float = 0.0
) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=f"svc-{queue}",
        workload_type="inference",
        priority=5,
        requirements=Requirements(1, mb, node=node, share_mb=mb),
        ttl_s=ttl_s,
        submitted_at=0.0,
        queue_name=queue,
    )


def whole(request_id: str, count: int = 1, *, queue: str = "default") -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=f"svc-{queue}",
        workload_type="training",
        priority=5,
        requirements=Requirements(count, 0),
        ttl_s=0.0,
        submitted_at=0.0,
        queue_name=queue,
    )


class Cluster:
    def __init__(self, views: list[GpuView], policy: QueuePolicy | None = None) -> None:
        self.inventory = Inventory.of(views)
        self.table = LeaseTable()
        self.scheduler = Scheduler(SchedulerConfig(), random.Random(1))
        if policy is not None:
            assert self.table.apply(SetQueuePolicy(0.0, policy)).ok

    def admit(self, req: AllocationRequest, now: float = 0.0) -> Allocate | Enqueue:
        command = self.scheduler.admit(req, self.table, self.inventory, now)
        assert isinstance(command, (Allocate, Enqueue))
        result = self.table.apply(command)
        assert result.ok, result.error
        return command

    def placed(self, req: AllocationRequest) -> Allocation:
        command = self.admit(req)
        assert isinstance(command, Allocate), command
        return command.allocation

    def release(self, *allocs: Allocation, at: float = 1.0) -> None:
        assert self.table.apply(Release(at, tuple(a.allocation_id for a in allocs), "released")).ok

    def tick(self, now: float = 2.0) -> list[Allocate]:
        placed = []
        for command in self.scheduler.tick(self.table, self.inventory, now):
            assert self.table.apply(command).ok
            if isinstance(command, Allocate):
                placed.append(command)
        return placed

    def budgets(self) -> dict[GpuRef, int]:
        return {ref: s.budget_mb for ref, s in self.table.shares.gpus.items()}


def ref(node: str, index: int) -> GpuRef:
    return GpuRef(node, index)


# --- the request -----------------------------------------------------------------


def test_a_share_parses_into_a_one_gpu_budget() -> None:
    body = parse_allocate_body({"service_name": "s", "sharing": "shared", "gpu_memory_mb": 20_000})
    assert body.share_mb == 20_000
    assert parse_allocate_body({"service_name": "s"}).share_mb is None
    assert parse_allocate_body({"service_name": "s", "sharing": "exclusive"}).share_mb is None


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"sharing": "shared"}, "gpu_memory_mb"),
        ({"sharing": "shared", "gpu_memory_mb": 0}, "gpu_memory_mb"),
        ({"sharing": "shared", "gpu_memory_mb": "8GB"}, "gpu_memory_mb"),
        ({"sharing": "shared", "gpu_memory_mb": True}, "gpu_memory_mb"),
        ({"gpu_memory_mb": 1000}, "sharing"),
        ({"sharing": "partly", "gpu_memory_mb": 1000}, "sharing"),
        ({"sharing": "shared", "gpu_memory_mb": 1000, "gpu_count": 2}, "gpu_count"),
        ({"sharing": "shared", "gpu_memory_mb": 1000, "nodes": 2, "gpus_per_node": 1}, "gang"),
        ({"sharing": "shared", "gpu_memory_mb": 1000, "gpus_per_node": 1}, "gang"),
        ({"sharing": "shared", "gpu_memory_mb": 1000, "mig_profile": "1g.10gb"}, "mig_profile"),
    ],
)
def test_what_no_single_share_can_be_is_invalid_share(extra: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_allocate_body({"service_name": "s", **extra})
    assert caught.value.code == "invalid_share" and says in str(caught.value)


def test_a_queue_without_shares_answers_sharing_not_allowed() -> None:
    policy = QueuePolicy((QueueSpec("batch", allow_shares=False, services=("s",)),))
    body = parse_allocate_body({"service_name": "s", "sharing": "shared", "gpu_memory_mb": 1000})
    with pytest.raises(Forbidden) as caught:
        queue_for(body, policy)
    assert caught.value.code == "sharing_not_allowed" and "'batch'" in str(caught.value)
    # Whole GPUs are still fine there.
    assert queue_for(parse_allocate_body({"service_name": "s"}), policy).name == "batch"


# --- packing -----------------------------------------------------------------------


def test_shares_pack_best_fit_before_opening_a_fresh_gpu() -> None:
    cluster = Cluster(gpus("a", 3))
    first = cluster.placed(share("s1", 40_000))
    assert first.share_group == "default"
    second = cluster.placed(share("s2", 30_000))
    assert second.gpus[0].ref == first.gpus[0].ref  # joins the shared GPU, leaving two free
    big = cluster.placed(share("s3", 60_000))  # does not fit the 11,559 MB left: opens another
    assert big.gpus[0].ref != first.gpus[0].ref
    # Best fit: 10,000 MB fits both shared GPUs; the one with less left (11,559 < 21,559) takes it.
    assert cluster.placed(share("s4", 10_000)).gpus[0].ref == first.gpus[0].ref
    assert cluster.budgets() == {first.gpus[0].ref: 80_000, big.gpus[0].ref: 60_000}


def test_shares_never_pass_the_memory_total() -> None:
    cluster = Cluster(gpus("a", 1))
    cluster.placed(share("s1", 50_000))
    cluster.placed(share("s2", TOTAL_MB - 50_000))  # exactly full
    assert isinstance(cluster.admit(share("s3", 1)), Enqueue)
    assert cluster.budgets() == {ref("a", 0): TOTAL_MB}


def test_the_table_refuses_a_share_past_the_memory_total_whoever_proposed_it() -> None:
    cluster = Cluster(gpus("a", 1))
    first = cluster.placed(share("s1", 50_000))
    forged = Allocation(
        "forged", share("s2", 40_000), "a", first.gpus, 0.0, None, share_group="default"
    )
    result = cluster.table.apply(Allocate(0.0, forged))
    assert isinstance(result.error, Conflict) and result.error.code == "gpu_busy"
    assert cluster.budgets() == {ref("a", 0): 50_000}


def test_a_shared_gpu_is_held_for_exclusive_work_and_freed_with_its_last_share() -> None:
    cluster = Cluster(gpus("a", 1))
    s1 = cluster.placed(share("s1", 10_000))
    s2 = cluster.placed(share("s2", 10_000))
    assert isinstance(cluster.admit(whole("w")), Enqueue)
    cluster.release(s1)
    assert cluster.table.holder(ref("a", 0)) == s2.allocation_id and cluster.tick() == []
    cluster.release(s2, at=3.0)
    assert cluster.table.holder(ref("a", 0)) is None and not cluster.table.shares.gpus
    [granted] = cluster.tick(now=4.0)
    assert granted.allocation.request.request_id == "w" and granted.allocation.share_group is None


def test_the_largest_share_is_a_free_gpus_memory_or_the_room_left_on_a_shared_one() -> None:
    """What the *_largest_share_bytes metrics and the status summary's share_mb say (coordinator/fragmentation.py)."""
    cluster = Cluster(gpus("a", 1) + gpus("b", 1))

    def largest() -> dict[str, int]:
        found = largest_requests(
            cluster.inventory, lambda ref: cluster.table.holder(ref) is not None, cluster.table.shares.gpus
        )
        return {node: figure.share_mb for node, figure in found.items()} | {
            "cluster": cluster_largest_request(found.values()).share_mb
        }

    assert largest() == {"a": TOTAL_MB, "b": TOTAL_MB, "cluster": TOTAL_MB}
    cluster.placed(share("s1", 60_000, node="a"))
    cluster.placed(whole("w"))  # takes b: a is held by its share
    assert largest() == {"a": TOTAL_MB - 60_000, "b": 0, "cluster": TOTAL_MB - 60_000}
    # A drained shared GPU takes no new share, whatever room it has.
    cluster.inventory.set_node("a", [dataclasses.replace(v, drained=True) for v in gpus("a", 1)])
    assert largest() == {"a": 0, "b": 0, "cluster": 0}


def test_a_waiting_share_packs_at_the_next_tick() -> None:
    cluster = Cluster(gpus("a", 1))
    s1 = cluster.placed(share("s1", 60_000))
    assert isinstance(cluster.admit(share("s2", 30_000)), Enqueue)
    cluster.placed(share("s3", 10_000))  # fits beside s1 now
    cluster.release(s1)
    [packed] = cluster.tick()
    assert packed.allocation.request.request_id == "s2" and packed.allocation.gpus[0].ref == ref("a", 0)
    assert cluster.budgets() == {ref("a", 0): 40_000}


def test_expiry_and_host_loss_end_shares_and_free_their_gpus() -> None:
    cluster = Cluster([*gpus("a", 1), *gpus("b", 1)])
    short = cluster.placed(share("short", 10_000, node="a", ttl_s=5.0))
    long = cluster.placed(share("long", 10_000, node="a"))
    [expiry] = cluster.scheduler.tick(cluster.table, cluster.inventory, 6.0)
    assert isinstance(expiry, Release) and expiry.allocation_ids == (short.allocation_id,)
    assert cluster.table.apply(expiry).ok
    assert cluster.table.holder(ref("a", 0)) == long.allocation_id and cluster.budgets() == {ref("a", 0): 10_000}
    on_b = [cluster.placed(share(f"b{i}", 20_000, node="b")) for i in range(2)]
    assert {s.gpus[0].ref for s in on_b} == {ref("b", 0)}
    assert cluster.table.apply(MarkHostLost(7.0, "b")).ok
    assert cluster.table.holder(ref("b", 0)) is None and ref("b", 0) not in cluster.table.shares.gpus
    assert cluster.table.queue_ledger.gpus["default"] == 1


def test_a_gpu_over_its_shares_budgets_is_flagged_once_per_crossing() -> None:
    usage = UsageTracker()
    assert not usage.observe_shares(0, shares=2, budget_mb=30_000, memory_used_mb=29_000)
    assert usage.shares(0) == (2, 30_000, False)
    assert usage.observe_shares(0, shares=2, budget_mb=30_000, memory_used_mb=31_000)  # went over: log it
    assert not usage.observe_shares(0, shares=2, budget_mb=30_000, memory_used_mb=32_000)  # still over
    assert usage.shares(0) == (2, 30_000, True)
    # An unshared GPU, or one whose memory is unknown, is never over budget.
    assert not usage.observe_shares(1, shares=0, budget_mb=0, memory_used_mb=80_000)
    assert not usage.observe_shares(0, shares=2, budget_mb=30_000, memory_used_mb=None)
    assert usage.shares(0)[2] is False


# --- sharing groups ----------------------------------------------------------------


def test_queues_do_not_mix_unless_both_allow_cross_queue_shares() -> None:
    policy = QueuePolicy(
        (
            QueueSpec("a"),
            QueueSpec("b"),
            QueueSpec("c", cross_queue_shares=True),
            QueueSpec("d", cross_queue_shares=True),
        )
    )
    cluster = Cluster(gpus("n", 4), policy)
    a = cluster.placed(share("a1", 10_000, queue="a"))
    b = cluster.placed(share("b1", 10_000, queue="b"))
    assert a.gpus[0].ref != b.gpus[0].ref  # default: no cross-queue sharing
    c = cluster.placed(share("c1", 10_000, queue="c"))
    d = cluster.placed(share("d1", 10_000, queue="d"))
    assert c.share_group == d.share_group == SHARE_GROUP_ANY and c.gpus[0].ref == d.gpus[0].ref
    assert c.gpus[0].ref not in (a.gpus[0].ref, b.gpus[0].ref)
    # The shared GPU counts for each queue with a share on it.
    assert cluster.table.queue_ledger.gpus["c"] == cluster.table.queue_ledger.gpus["d"] == 1


def test_a_share_pinned_to_a_node_finds_its_shared_gpu_however_many_the_group_holds() -> None:
    nodes = [f"n{i:02d}" for i in range(70)]
    cluster = Cluster([v for node in nodes for v in gpus(node, 1)])
    for node in nodes[:-1]:
        cluster.placed(share(f"s-{node}", 79_000, node=node))  # 2,559 MB left on each
    cluster.placed(share("s-last", 40_000, node=nodes[-1]))
    # Best fit puts the 69 fuller GPUs first; a pinned share reads only its node's.
    packed = cluster.placed(share("pinned", 2_000, node=nodes[-1]))
    assert packed.gpus[0].ref == ref(nodes[-1], 0)


def test_the_table_refuses_to_preempt_a_share() -> None:
    # Its end would free no GPU while other shares stay: victim search never picks
    # one, and no proposal (idle reclaim included) can make one a victim.
    cluster = Cluster(gpus("a", 1), QueuePolicy((QueueSpec("t"),)))
    s1 = cluster.placed(share("s1", 20_000, queue="t"))
    result = cluster.table.apply(Preempt(1.0, ((s1.allocation_id, 31.0),), "idle"))
    assert isinstance(result.error, Conflict) and result.error.code == "not_preemptible"
    assert cluster.table.preempting(s1.allocation_id) is None


# --- quota -------------------------------------------------------------------------


def test_a_queue_counts_a_shared_gpu_once_however_many_shares() -> None:
    cluster = Cluster(gpus("a", 2), QueuePolicy((QueueSpec("t", max_gpus=1),)))
    shares = [cluster.placed(share(f"s{i}", 20_000, queue="t")) for i in range(4)]
    assert {s.gpus[0].ref for s in shares} == {ref("a", 0)}
    assert cluster.table.queue_ledger.gpus["t"] == 1
    cluster.release(*shares[:3])
    assert cluster.table.queue_ledger.gpus["t"] == 1
    cluster.release(shares[3], at=2.0)
    assert cluster.table.queue_ledger.gpus["t"] == 0


def test_a_capped_queue_cannot_pass_max_gpus_through_shares() -> None:
    cluster = Cluster(gpus("a", 3), QueuePolicy((QueueSpec("t", max_gpus=1),)))
    cluster.placed(share("s1", 60_000, queue="t"))
    # Packing beside it would cost nothing, but it does not fit; opening a GPU would pass the cap.
    assert isinstance(cluster.admit(share("s2", 60_000, queue="t")), Enqueue)
    assert cluster.placed(share("s3", 20_000, queue="t")).gpus[0].ref == ref("a", 0)  # costs 0
    assert isinstance(cluster.admit(whole("w", queue="t")), Enqueue)
    assert cluster.table.queue_ledger.gpus["t"] == 1
    assert len(cluster.table.shares.gpus) == 1
    assert cluster.tick() == []  # the waiters stay waiting: the cap holds at every pass
    assert cluster.table.queue_ledger.gpus["t"] == 1


def test_the_table_refuses_a_share_that_would_open_a_gpu_past_the_cap() -> None:
    cluster = Cluster(gpus("a", 2), QueuePolicy((QueueSpec("t", max_gpus=1),)))
    first = cluster.placed(share("s1", 60_000, queue="t"))
    other = next(v for v in cluster.inventory if v.ref != first.gpus[0].ref)
    gpu = first.gpus[0].__class__(other.node, other.index, other.uuid, other.name, other.memory_total_mb)
    forged = Allocation("forged", share("s2", 60_000, queue="t"), "a", (gpu,), 0.0, None, share_group="t")
    result = cluster.table.apply(Allocate(0.0, forged))
    assert isinstance(result.error, Conflict) and result.error.code == "queue_quota"


def test_one_tick_spends_a_queue_s_quota_once_between_packing_and_the_pass() -> None:
    policy = QueuePolicy((QueueSpec("c", max_gpus=1, cross_queue_shares=True), QueueSpec("d", cross_queue_shares=True)))
    cluster = Cluster(gpus("a", 2), policy)
    x = cluster.placed(whole("x", queue="d"))
    d1 = cluster.placed(share("d1", 70_000, queue="d"))
    assert isinstance(cluster.admit(share("c1", 20_000, queue="c")), Enqueue)  # d1 leaves no room
    assert isinstance(cluster.admit(whole("w", queue="c")), Enqueue)
    cluster.placed(share("d2", 10_000, queue="d"))
    cluster.release(d1, x)
    # c1 joins d's shared GPU (one GPU of c's quota) and w could take the freed one
    # (another): with one quota book for the tick only c1 is proposed, and every
    # command the tick returns applies (Cluster.tick asserts it).
    [packed] = cluster.tick()
    assert packed.allocation.request.request_id == "c1"
    assert cluster.table.queue_ledger.gpus["c"] == 1
    assert cluster.table.queued("w") is not None


# --- the answer --------------------------------------------------------------------


def test_the_answer_gives_the_budget_and_with_mps_the_client_environment_to_enforce_it() -> None:
    cluster = Cluster(gpus("a", 1))
    first = cluster.placed(share("s1", 12_000))
    cluster.placed(share("s2", 30_000))
    # Without MPS the tenants time-slice: no environment, and no limit that nothing would enforce.
    assert allocation_view(first, shares=cluster.table.shares)["shared"] == {
        "gpu_memory_mb": 12_000,
        "gpu_memory_total_mb": TOTAL_MB,
        "cross_queue": False,
        "co_tenants": 1,
        "mps": None,
    }
    directories = {"CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps", "CUDA_MPS_LOG_DIRECTORY": "/var/log/nvidia-mps"}
    view = allocation_view(first, shares=cluster.table.shares, mps=directories)
    # With cuda_visible_devices exported the client sees the one GPU, as device ordinal 0.
    assert view["shared"]["mps"] == {**directories, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=12000M"}
    assert view["cuda_visible_devices"] == "GPU-a-0"
    # A whole GPU has no shared object, whatever MPS says.
    cluster.release(*cluster.table.allocations())
    assert allocation_view(cluster.placed(whole("w")), mps=directories)["shared"] is None


# --- replication -------------------------------------------------------------------


def test_shares_travel_as_allocate_share_and_survive_a_snapshot() -> None:
    cluster = Cluster(gpus("a", 2))
    plain = cluster.table.snapshot()
    assert plain["version"] == SNAPSHOT_VERSION_WITHOUT_SHAPES
    command = cluster.admit(share("s1", 30_000))
    assert isinstance(command, Allocate)
    wire = command.to_wire()
    assert wire["op"] == "allocate_share" and command_from_wire(wire) == command
    cluster.placed(share("s2", 30_000))
    snap = cluster.table.snapshot()
    assert snap["version"] == SNAPSHOT_VERSION
    restored = LeaseTable.restore(snap)
    assert restored.snapshot() == snap
    assert {r: s.budget_mb for r, s in restored.shares.gpus.items()} == cluster.budgets()
    assert restored.holder(ref("a", 0)) == cluster.table.holder(ref("a", 0))
    assert restored.queue_ledger.gpus == cluster.table.queue_ledger.gpus
    # An older snapshot (no shares) still restores.
    assert LeaseTable.restore(plain).snapshot() == plain


def test_a_waiting_share_alone_makes_the_snapshot_version_6() -> None:
    # A release before shares would read the waiter as a whole-GPU request.
    cluster = Cluster(gpus("a", 1))
    cluster.placed(whole("w"))
    assert cluster.table.snapshot()["version"] == SNAPSHOT_VERSION_WITHOUT_SHAPES
    assert isinstance(cluster.admit(share("s1", 30_000)), Enqueue)
    snap = cluster.table.snapshot()
    assert snap["version"] == SNAPSHOT_VERSION
    restored = LeaseTable.restore(snap)
    assert [q.request.request_id for q in restored.queued_shares()] == ["s1"]
    assert restored.snapshot() == snap
