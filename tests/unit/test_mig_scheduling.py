"""MIG slices as schedulable units, scenario by scenario (coordinator/mig.py).

A GPU in MIG mode enters the inventory as one view per GPU instance, each with
its own unit index; whole-GPU requests never see them, slice requests see
nothing else. Each test builds such a cluster, drives the scheduler as the
agent does, and applies what it returns to a lease table.
"""

from __future__ import annotations

import random

import pytest

from coordinator.commands import Allocate, Enqueue, Release, ReportGpuHealth, SetDrain
from coordinator.errors import InvalidRequest, Unsatisfiable
from coordinator.fragmentation import LargestRequest, cluster_largest_request, largest_requests
from coordinator.inventory import Inventory
from coordinator.lease_snapshot import SNAPSHOT_VERSION_WITHOUT_SHAPES, SNAPSHOT_VERSION_WITHOUT_SHARES
from coordinator.lease_table import LeaseTable
from coordinator.mig import gpu_of_slice, slice_index
from coordinator.model import MIG_ANY, Allocation, AllocationRequest, GpuView, Requirements
from coordinator.request_parsing import build_request, parse_allocate_body
from coordinator.scheduler import Scheduler, SchedulerConfig
from coordinator.views import allocation_view
from coordinator.workload import analyze_workload

from agent.inventory_feed import overlay

A100 = "NVIDIA A100-SXM4-80GB"
SLICE_MB = {"1g.10gb": 9728, "2g.20gb": 19968, "3g.40gb": 40192, "7g.80gb": 80896}


def slices(node: str, gpu: int, layout: list[str]) -> list[GpuView]:
    """The views a MIG-mode GPU gives the inventory: one per instance."""
    return [
        GpuView(
            node,
            slice_index(gpu, i),
            f"MIG-{node}-{gpu}-{i}",
            f"{A100} MIG {profile}",
            SLICE_MB[profile],
            mig_profile=profile,
            parent_uuid=f"GPU-{node}-{gpu}",
        )
        for i, profile in enumerate(layout)
    ]


def whole(node: str, gpu: int) -> GpuView:
    return GpuView(node, gpu, f"GPU-{node}-{gpu}", A100, 81920)


def request(request_id: str, *, mig: str | None = None, memory_mb: int = 0, gpus: int = 1,
            node: str | None = None, priority: int = 5) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name="svc",
        workload_type="generic",
        priority=priority,
        requirements=Requirements(gpus, memory_mb, node=node, mig_profile=mig),
        ttl_s=0.0,
        submitted_at=0.0,
    )


class Cluster:
    def __init__(self, views: list[GpuView]) -> None:
        self.inventory = Inventory.of(views)
        self.table = LeaseTable()
        self.scheduler = Scheduler(SchedulerConfig(), random.Random(1))

    def admit(self, req: AllocationRequest, now: float = 0.0) -> Allocate | Enqueue:
        command = self.scheduler.admit(req, self.table, self.inventory, now)
        assert isinstance(command, (Allocate, Enqueue))
        assert self.table.apply(command).ok
        return command

    def placed(self, req: AllocationRequest) -> Allocation:
        command = self.admit(req)
        assert isinstance(command, Allocate), command
        return command.allocation


MIXED = [
    *slices("a", 0, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]),
    whole("a", 1),
    *slices("b", 0, ["7g.80gb"]),
]


def test_unit_indices_keep_slices_apart_from_whole_gpus() -> None:
    assert slice_index(0, 0) == 1000 and slice_index(2, 3) == 1203
    assert gpu_of_slice(1203) == 2 and gpu_of_slice(7) is None
    with pytest.raises(ValueError):
        slice_index(0, 100)


def test_named_profile_gets_that_slice_and_its_uuid() -> None:
    cluster = Cluster(MIXED)
    alloc = cluster.placed(request("r1", mig="1g.10gb"))
    assert (alloc.node, [g.index for g in alloc.gpus]) == ("a", [1002])
    view = allocation_view(alloc)
    assert view["cuda_visible_devices"] == "MIG-a-0-2"
    assert view["mig"] == {"profile": "1g.10gb", "instance_uuids": ["MIG-a-0-2"], "gpu_uuids": ["GPU-a-0"]}
    # The second 1g.10gb next, then none is left: it waits, never taking a bigger profile.
    assert [g.index for g in cluster.placed(request("r2", mig="1g.10gb")).gpus] == [1003]
    assert isinstance(cluster.admit(request("r3", mig="1g.10gb")), Enqueue)


def test_auto_takes_the_smallest_slice_with_the_memory() -> None:
    cluster = Cluster(MIXED)
    assert cluster.placed(request("small", mig=MIG_ANY, memory_mb=8000)).gpus[0].mig_profile == "1g.10gb"
    assert cluster.placed(request("mid", mig=MIG_ANY, memory_mb=15000)).gpus[0].mig_profile == "2g.20gb"
    assert cluster.placed(request("big", mig=MIG_ANY, memory_mb=60000)).gpus[0].mig_profile == "7g.80gb"


def test_whole_gpu_requests_never_take_a_slice() -> None:
    cluster = Cluster(MIXED)
    alloc = cluster.placed(request("w", memory_mb=1024))
    assert [g.index for g in alloc.gpus] == [1] and allocation_view(alloc)["mig"] is None
    # The only whole GPU is held: a whole-GPU request waits though seven slices are free.
    assert isinstance(cluster.admit(request("w2", memory_mb=1024)), Enqueue)
    # Two whole GPUs: node a has one, b none; slices do not count.
    with pytest.raises(Unsatisfiable):
        cluster.scheduler.check_satisfiable(request("w3", gpus=2), cluster.inventory)


def test_slice_requests_never_take_a_whole_gpu() -> None:
    cluster = Cluster([whole("a", 0), whole("a", 1)])
    with pytest.raises(Unsatisfiable, match="no MIG slices"):
        cluster.admit(request("m", mig=MIG_ANY))


def test_unknown_profile_names_the_profiles_that_exist() -> None:
    cluster = Cluster(MIXED)
    with pytest.raises(Unsatisfiable) as raised:
        cluster.admit(request("m", mig="4g.40gb"))
    message = str(raised.value)
    assert "'4g.40gb'" in message
    assert message.index("1g.10gb") < message.index("2g.20gb") < message.index("3g.40gb") < message.index("7g.80gb")
    assert not cluster.table.allocations() and not cluster.table.queue()


def test_too_much_memory_for_any_slice_is_unsatisfiable() -> None:
    cluster = Cluster(MIXED)
    with pytest.raises(Unsatisfiable):
        cluster.admit(request("m", mig=MIG_ANY, memory_mb=90000))


def test_a_released_slice_serves_the_waiting_request() -> None:
    cluster = Cluster(slices("a", 0, ["1g.10gb"]))
    first = cluster.placed(request("first", mig="1g.10gb"))
    assert isinstance(cluster.admit(request("second", mig="1g.10gb")), Enqueue)
    assert cluster.table.apply(Release(1.0, (first.allocation_id,))).ok
    commands = cluster.scheduler.tick(cluster.table, cluster.inventory, 2.0)
    (placed,) = [c for c in commands if isinstance(c, Allocate)]
    assert placed.allocation.request.request_id == "second" and placed.allocation.gpus[0].index == 1000


# ---- fragmentation: free slices by profile, apart from whole GPUs


def free_units(cluster: Cluster) -> dict[str, LargestRequest]:
    """Each node's largest request, as the leader's metrics and status summary work it out."""
    return largest_requests(
        cluster.inventory, lambda ref: cluster.table.holder(ref) is not None, cluster.table.shares.gpus
    )


def test_fragmentation_counts_free_slices_by_profile_and_whole_gpus_apart() -> None:
    cluster = Cluster(MIXED)
    before = free_units(cluster)
    # Slices are no whole GPU: "b" is one GPU in MIG mode, so no whole-GPU request nor share fits there.
    assert (before["a"].gpus, before["a"].share_mb, before["b"].gpus, before["b"].share_mb) == (1, 81920, 0, 0)
    assert before["a"].mig == (("1g.10gb", 2), ("2g.20gb", 1), ("3g.40gb", 1))
    assert before["b"].mig == (("7g.80gb", 1),)

    cluster.placed(request("small", mig="1g.10gb"))
    cluster.placed(request("big", mig="7g.80gb"))
    after = free_units(cluster)

    assert after["a"].mig == (("1g.10gb", 1), ("2g.20gb", 1), ("3g.40gb", 1))
    assert after["b"].mig == (("7g.80gb", 0),)  # all taken: listed at 0, not left out
    assert after["a"].gpus == 1  # a slice lease holds no whole GPU
    assert cluster_largest_request(after.values()).mig == (
        ("1g.10gb", 1), ("2g.20gb", 1), ("3g.40gb", 1), ("7g.80gb", 0),
    )
    assert cluster_largest_request([after["a"]]).mig == after["a"].mig


def test_a_drained_gpus_slices_are_not_free() -> None:
    """Draining a MIG-mode GPU drains its slices: the agent lays the drain over them (agent/inventory_feed.py)."""
    cluster = Cluster(MIXED)
    assert cluster.table.apply(SetDrain(0.0, "a", 0, True, "layout change")).ok
    cluster.inventory.set_node("a", [overlay(v, cluster.table, local=True) for v in cluster.inventory.node_views("a")])

    found = free_units(cluster)

    assert found["a"].mig == (("1g.10gb", 0), ("2g.20gb", 0), ("3g.40gb", 0))
    assert found["a"].gpus == 1  # GPU 1 is not drained
    assert cluster_largest_request(found.values()).mig == (
        ("1g.10gb", 0), ("2g.20gb", 0), ("3g.40gb", 0), ("7g.80gb", 1),
    )


def test_a_cluster_without_slices_has_no_mig_figure() -> None:
    cluster = Cluster([whole("a", 0)])
    found = free_units(cluster)
    assert found["a"].mig is None and cluster_largest_request(found.values()).mig is None
    assert found["a"].to_wire() == {"gpus": 1, "nvlink": None, "mig": None, "share_mb": 81920}


def test_inventory_kinds_leave_slices_out() -> None:
    inventory = Inventory.of(MIXED)
    assert sorted(inventory.kinds()) == [(), ((A100, 81920),)]
    assert inventory.smallest_memory_at_least(0) == 81920
    assert [k[0] for k in inventory.slice_kinds()] == ["1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"]
    inventory.set_node("b", [])
    assert [k[0] for k in inventory.slice_kinds()] == ["1g.10gb", "2g.20gb", "3g.40gb"]


# ---- the request edge


def build(body: dict[str, object]) -> AllocationRequest:
    parsed = parse_allocate_body(body)
    estimate = analyze_workload(parsed.workload_type, parsed.workload_data)
    return build_request(parsed, estimate, decided_by="analyzer", request_id="r", now=0.0,
                         default_ttl_s=0.0, max_ttl_s=0.0)


def test_request_fields() -> None:
    named = build({"service_name": "s", "mig_profile": "1g.10gb"})
    # A named profile fixes the memory: the analyzer's default does not narrow it.
    assert named.requirements == Requirements(1, 0, 80.0, mig_profile="1g.10gb")
    auto = build({"service_name": "s", "mig_profile": "auto", "min_memory_mb": 15000})
    assert auto.requirements.min_memory_mb == 15000 and auto.requirements.mig_profile == MIG_ANY
    # Training "large" counts 4 GPUs; a slice request is one slice whatever the analyzer says.
    trained = build({"service_name": "s", "workload_type": "training", "workload_data": {"model_size": "large"},
                     "mig_profile": "3g.40gb"})
    assert trained.requirements.gpu_count == 1
    assert build({"service_name": "s"}).requirements.mig_profile is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mig_profile": "1g.10gb", "gpu_count": 2}, "exactly one slice"),
        ({"mig_profile": "1g.10gb", "required_gpus": 4}, "required_gpus must be 1"),
        ({"mig_profile": "big"}, "MIG profile name"),
        ({"mig_profile": 7}, "MIG profile name"),
        ({"mig_profile": ""}, "MIG profile name"),
    ],
)
def test_bad_mig_fields_are_refused(body: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_allocate_body({"service_name": "s", **body})


# ---- replication


def test_snapshot_version_five_only_while_mig_is_in_use() -> None:
    cluster = Cluster(MIXED)
    cluster.placed(request("w"))
    assert cluster.table.snapshot()["version"] == SNAPSHOT_VERSION_WITHOUT_SHAPES
    alloc = cluster.placed(request("m", mig="2g.20gb"))
    snap = cluster.table.snapshot()
    assert snap["version"] == SNAPSHOT_VERSION_WITHOUT_SHARES
    restored = LeaseTable.restore(snap)
    assert restored.snapshot() == snap
    assert restored.allocation(alloc.allocation_id) == alloc
    assert restored.holder(alloc.gpus[0].ref) == alloc.allocation_id


def test_wire_of_whole_gpu_records_is_unchanged() -> None:
    req = request("w")
    assert "mig_profile" not in req.requirements.to_wire()
    assert Requirements.from_wire(request("m", mig="1g.10gb").requirements.to_wire()).mig_profile == "1g.10gb"


def test_equal_slices_go_to_the_node_with_fewest_open_units() -> None:
    # Packing: the slice on the fuller node is taken, leaving node "a"'s room whole.
    cluster = Cluster([*slices("a", 0, ["1g.10gb"] * 7), *slices("b", 0, ["1g.10gb", "3g.40gb"])])
    assert cluster.placed(request("m", mig="1g.10gb")).node == "b"


def test_a_healthy_bigger_slice_is_not_traded_for_a_smaller_degraded_one() -> None:
    degraded = [v if v.mig_profile != "1g.10gb" else GpuView(v.node, v.index, v.uuid, v.name, v.memory_total_mb,
                health="degraded", mig_profile=v.mig_profile, parent_uuid=v.parent_uuid) for v in MIXED]
    cluster = Cluster(degraded)
    assert cluster.placed(request("m", mig=MIG_ANY, memory_mb=1000)).gpus[0].mig_profile == "2g.20gb"


def test_an_unhealthy_gpu_tells_the_holders_of_its_slices() -> None:
    cluster = Cluster(MIXED)
    first = cluster.placed(request("m1", mig="1g.10gb"))
    second = cluster.placed(request("m2", mig="3g.40gb"))
    on_b = cluster.placed(request("m3", mig="7g.80gb"))
    result = cluster.table.apply(ReportGpuHealth(1.0, "a", 0, "unhealthy", ("XID 79",)))
    assert result.ok and set(result.affected) == {first.allocation_id, second.allocation_id}
    assert {e.kind for e in result.events} == {"gpu_unhealthy"}
    assert {a.allocation_id for a in cluster.table.unhealthy_allocations()} == {first.allocation_id, second.allocation_id}
    assert on_b.allocation_id not in result.affected
