"""The priority scheduler's policy, scenario by scenario.

Each test builds a small cluster of GpuViews, drives `Scheduler.admit` and
`Scheduler.tick` with explicit `now` values and a seeded `random.Random`, and
applies the commands they return to a LeaseTable in order, as the agent does.
The rules checked are those of scheduler.py's theory of operation: strict
priority, best fit on one node, health and telemetry, reservations against
starvation, and leases and queued requests that end by time.
"""

from __future__ import annotations

import random
import re
from typing import Collection, Iterable, Sequence

import pytest

from coordinator.commands import Allocate, Cancel, Command, Enqueue, Release
from coordinator.errors import Conflict, QueueFull, Unsatisfiable
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import (
    DEGRADED,
    HEALTHY,
    UNHEALTHY,
    AllocatedGpu,
    Allocation,
    AllocationRequest,
    GpuRef,
    GpuView,
    Requirements,
)
from coordinator.scheduler import Scheduler, SchedulerConfig

H100 = "NVIDIA H100 80GB HBM3"
H100_MB = 81559
A100_40 = "NVIDIA A100-SXM4-40GB"
A100_40_MB = 40960


def gpu(
    node_name: str,
    index: int,
    *,
    name: str = H100,
    memory_mb: int = H100_MB,
    memory_free_mb: int | None = None,
    utilization_pct: float | None = None,
    health: str = HEALTHY,
    drained: bool = False,
    sampled_at: float = 0.0,
) -> GpuView:
    return GpuView(
        node_name, index, f"GPU-{node_name}-{index}", name, memory_mb,
        memory_free_mb, utilization_pct, health, drained, sampled_at,
    )


def node(node_name: str, count: int, *, name: str = H100, memory_mb: int = H100_MB,
         health: str = HEALTHY) -> list[GpuView]:
    return [gpu(node_name, i, name=name, memory_mb=memory_mb, health=health) for i in range(count)]


def req(
    request_id: str,
    *,
    gpus: int = 1,
    priority: int = 5,
    memory_mb: int = 1024,
    at: float = 0.0,
    ttl_s: float = 0.0,
    queue: bool = True,
    model: str | None = None,
    on_node: str | None = None,
    max_utilization: float = 100.0,
    service: str = "svc",
) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=service,
        workload_type="generic",
        priority=priority,
        requirements=Requirements(gpus, memory_mb, max_utilization, model, on_node),
        ttl_s=ttl_s,
        submitted_at=at,
        queue=queue,
    )


class Cluster:
    """A lease table, a seeded scheduler and an inventory, driven the way the agent drives them."""

    def __init__(
        self,
        gpus: Iterable[GpuView],
        *,
        seed: int = 1,
        queue_timeout_s: float = 3600.0,
        max_queue: int = 1000,
    ) -> None:
        self.inventory = Inventory.of(gpus)
        self.table = LeaseTable()
        self.scheduler = Scheduler(SchedulerConfig(queue_timeout_s, max_queue), random.Random(seed))

    def decide(self, request: AllocationRequest, now: float | None = None,
               pending: Collection[GpuRef] = ()) -> Command:
        at = request.submitted_at if now is None else now
        return self.scheduler.admit(request, self.table, self.inventory, at, pending)

    def admit(self, request: AllocationRequest, now: float | None = None) -> Command:
        command = self.decide(request, now)
        self.apply(command)
        return command

    def tick(self, now: float, pending: Collection[GpuRef] = ()) -> list[Command]:
        commands = self.scheduler.tick(self.table, self.inventory, now, pending)
        for command in commands:
            self.apply(command)
        return commands

    def apply(self, command: Command) -> None:
        result = self.table.apply(command)
        assert result.ok, result.error

    def hold(self, allocation_id: str, node_name: str, indices: Sequence[int], at: float = 0.0,
             *, expires_at: float | None = None, priority: int = 5) -> Allocation:
        """Grant a lease by hand, to set the scene."""
        views = [self.view(node_name, i) for i in indices]
        alloc = Allocation(
            allocation_id=allocation_id,
            request=req(f"req-{allocation_id}", gpus=len(indices), priority=priority, at=at),
            node=node_name,
            gpus=tuple(AllocatedGpu(g.node, g.index, g.uuid, g.name, g.memory_total_mb) for g in views),
            allocated_at=at,
            expires_at=expires_at,
        )
        self.apply(Allocate(at, alloc))
        return alloc

    def view(self, node_name: str, index: int) -> GpuView:
        found = self.inventory.get(GpuRef(node_name, index))
        assert found is not None, (node_name, index)
        return found

    def release(self, allocation_id: str, now: float) -> None:
        self.apply(Release(now, (allocation_id,)))

    def set_gpu(self, view: GpuView) -> None:
        others = [g for g in self.inventory.node_views(view.node) if g.index != view.index]
        self.inventory.set_node(view.node, [*others, view])


def placed(command: Command) -> tuple[str, list[int]]:
    """The node and GPU indices of an Allocate."""
    assert isinstance(command, Allocate), command
    return command.allocation.node, [g.index for g in command.allocation.gpus]


def placed_request(command: Command) -> str:
    assert isinstance(command, Allocate), command
    return command.allocation.request.request_id


# ---------------------------------------------------------------- strict priority


@pytest.mark.parametrize(
    ("waiting", "served"),
    [
        ([("low", 3, 1.0), ("high", 7, 2.0)], "high"),
        ([("young", 5, 2.0), ("old", 5, 1.0)], "old"),
        ([("b", 5, 1.0), ("a", 5, 1.0)], "a"),
    ],
    ids=["priority-first", "then-oldest", "then-id"],
)
def test_the_freed_gpu_goes_to_the_highest_ranked_waiter(
    waiting: list[tuple[str, int, float]], served: str
) -> None:
    """Strict priority: higher priority, then older submission, then smaller id."""
    cluster = Cluster(node("n1", 1))
    cluster.hold("lease", "n1", [0])
    for request_id, priority, at in waiting:
        assert isinstance(cluster.admit(req(request_id, priority=priority, at=at)), Enqueue)
    cluster.release("lease", 3.0)
    commands = cluster.tick(3.0)
    assert [placed_request(c) for c in commands] == [served]


# ---------------------------------------------------------------- best fit


def test_best_fit_picks_the_node_that_strands_the_fewest_free_gpus() -> None:
    """A 2-GPU request goes to the node with exactly 2 free, not the one with 4."""
    cluster = Cluster(node("a", 4) + node("b", 2))
    assert placed(cluster.admit(req("two", gpus=2))) == ("b", [0, 1])
    assert placed(cluster.admit(req("one", at=1.0))) == ("a", [0])


def test_among_equal_fits_the_smaller_memory_gpus_win_over_the_node_name() -> None:
    """Equal stranding: the node whose chosen GPUs have less memory wins, even if its name sorts later."""
    cluster = Cluster(node("a-h100", 2) + node("b-a100", 2, name=A100_40, memory_mb=A100_40_MB))
    assert placed(cluster.admit(req("r", gpus=2, memory_mb=10_000))) == ("b-a100", [0, 1])


def test_identical_nodes_are_tie_broken_by_name() -> None:
    """With equal stranding and memory, the node whose name sorts first is chosen."""
    cluster = Cluster(node("n2", 2) + node("n1", 2))
    assert placed(cluster.admit(req("r"))) == ("n1", [0])


def test_within_a_node_the_smallest_adequate_gpus_are_chosen() -> None:
    """Inside the node, the smallest GPUs that meet min_memory_mb are taken, lowest index first."""
    mixed = [
        gpu("n1", 0),
        gpu("n1", 1, name=A100_40, memory_mb=A100_40_MB),
        gpu("n1", 2, name=A100_40, memory_mb=A100_40_MB),
        gpu("n1", 3),
    ]
    cluster = Cluster(mixed)
    assert placed(cluster.admit(req("big-mem", memory_mb=50_000))) == ("n1", [0])
    assert placed(cluster.admit(req("pair", gpus=2, at=1.0))) == ("n1", [1, 2])
    assert placed(cluster.admit(req("last", at=2.0))) == ("n1", [3])


def test_an_allocation_never_spans_nodes() -> None:
    """Three GPUs free on two nodes (2 + 2) do not make a 3-GPU allocation: it waits."""
    cluster = Cluster(node("a", 4) + node("b", 2))
    cluster.hold("busy", "a", [0, 1])
    assert isinstance(cluster.admit(req("three", gpus=3, at=1.0)), Enqueue)
    cluster.release("busy", 2.0)
    assert [placed(c) for c in cluster.tick(2.0)] == [("a", [0, 1, 2])]


# ---------------------------------------------------------------- constraints, health, telemetry


@pytest.mark.parametrize(
    ("model", "on_node", "expected"),
    [
        (None, None, "b"),
        ("h100", None, "a"),
        ("A100", None, "b"),
        ("80GB", None, "b"),
        (None, "a", "a"),
        ("A100", "b", "b"),
    ],
)
def test_constraints_restrict_the_nodes(model: str | None, on_node: str | None, expected: str) -> None:
    """gpu_model matches a case-insensitive substring of the GPU name; node pins the node."""
    cluster = Cluster(node("a", 4) + node("b", 2, name="NVIDIA A100-SXM4-80GB", memory_mb=81920))
    assert placed(cluster.admit(req("r", model=model, on_node=on_node)))[0] == expected


def test_unhealthy_and_drained_gpus_are_never_chosen_and_degraded_ones_last() -> None:
    """Unhealthy and drained GPUs are never placed on; a degraded one only when no healthy one fits."""
    cluster = Cluster([
        gpu("n1", 0, health=UNHEALTHY),
        gpu("n1", 1, health=DEGRADED),
        gpu("n1", 2, drained=True),
        gpu("n1", 3),
    ])
    assert placed(cluster.admit(req("first"))) == ("n1", [3])
    assert placed(cluster.admit(req("second", at=1.0))) == ("n1", [1])
    assert isinstance(cluster.admit(req("third", at=2.0)), Enqueue)
    assert cluster.tick(3.0) == []
    cluster.set_gpu(gpu("n1", 2))  # undrained
    assert [placed(c) for c in cluster.tick(4.0)] == [("n1", [2])]


def test_a_degraded_gpu_loses_to_a_healthy_one_on_another_node() -> None:
    """Best fit prefers healthy GPUs over a tighter fit on a degraded one."""
    cluster = Cluster([gpu("a", 0, health=DEGRADED), gpu("b", 0), gpu("b", 1)])
    assert placed(cluster.admit(req("one"))) == ("b", [0])


def test_a_fresh_sample_showing_unleased_use_makes_a_gpu_ineligible() -> None:
    """Too little free memory, or utilization above max_utilization, in a fresh sample skips the GPU."""
    cluster = Cluster([
        gpu("n1", 0, memory_free_mb=1000, utilization_pct=0.0, sampled_at=5.0),
        gpu("n1", 1, memory_free_mb=80_000, utilization_pct=95.0, sampled_at=5.0),
        gpu("n1", 2, memory_free_mb=80_000, utilization_pct=80.0, sampled_at=5.0),
        gpu("n1", 3, memory_free_mb=None, utilization_pct=None, sampled_at=5.0),
    ])
    request = req("r", memory_mb=4096, max_utilization=80.0, at=6.0)
    assert placed(cluster.admit(request)) == ("n1", [2])  # 80% is not above 80%
    assert placed(cluster.admit(req("r2", memory_mb=4096, max_utilization=80.0, at=7.0))) == ("n1", [3])
    assert isinstance(cluster.admit(req("r3", memory_mb=4096, max_utilization=80.0, at=8.0)), Enqueue)
    # The same GPUs serve a request that tolerates their state.
    assert placed(cluster.admit(req("r4", memory_mb=512, at=9.0))) == ("n1", [0])


@pytest.mark.parametrize(
    ("sampled_at", "chosen"), [(49.0, True), (50.0, True), (50.5, True), (52.0, True), (52.5, False)]
)
def test_telemetry_from_around_the_last_release_is_ignored(sampled_at: float, chosen: bool) -> None:
    """A sample up to RELEASE_GRACE_S (2 s) after the GPU's last release describes the old tenant."""
    cluster = Cluster(node("n1", 1))
    cluster.hold("old", "n1", [0], at=0.0)
    cluster.release("old", 50.0)
    cluster.set_gpu(gpu("n1", 0, memory_free_mb=0, utilization_pct=100.0, sampled_at=sampled_at))
    command = cluster.admit(req("new", memory_mb=4096, max_utilization=50.0, at=60.0))
    assert isinstance(command, Allocate) is chosen


def test_pending_gpus_are_not_chosen() -> None:
    """GPUs that in-flight proposals are about to take are treated as taken."""
    cluster = Cluster(node("n1", 2))
    first = cluster.decide(req("first"))
    assert placed(first) == ("n1", [0])
    assert isinstance(first, Allocate)
    in_flight = [g.ref for g in first.allocation.gpus]
    assert placed(cluster.decide(req("second", at=0.5), pending=in_flight)) == ("n1", [1])
    both = [GpuRef("n1", 0), GpuRef("n1", 1)]
    assert isinstance(cluster.decide(req("third", at=0.5), pending=both), Enqueue)
    cluster.hold("h0", "n1", [0])
    cluster.hold("h1", "n1", [1])
    cluster.admit(req("waiting", at=1.0))
    cluster.release("h1", 2.0)
    assert cluster.tick(2.0, pending=[GpuRef("n1", 1)]) == []
    assert [placed(c) for c in cluster.tick(2.5)] == [("n1", [1])]


# ---------------------------------------------------------------- admit's answers


@pytest.mark.parametrize(
    "request_",
    [
        req("too-many", gpus=5),
        req("too-big", memory_mb=81920 + 1),
        req("no-such-model", model="MI300X"),
        req("no-such-node", on_node="n9"),
        req("wrong-model-there", model="A100", on_node="a"),
    ],
    ids=lambda r: r.request_id,
)
def test_a_request_that_can_never_fit_is_unsatisfiable(request_: AllocationRequest) -> None:
    """Unsatisfiable when no node has enough matching GPUs, even though 8 GPUs exist in all."""
    cluster = Cluster(node("a", 4) + node("b", 4, name="NVIDIA A100-SXM4-80GB", memory_mb=81920))
    before = cluster.table.snapshot()
    with pytest.raises(Unsatisfiable) as info:
        cluster.decide(request_)
    assert info.value.code == "unsatisfiable"
    assert cluster.table.snapshot() == before


def test_a_request_larger_than_any_node_is_told_how_to_become_a_gang() -> None:
    """The refusal names gpus_per_node, bounded by the best node, where nodes could share the work."""
    cluster = Cluster(node("a", 4) + node("b", 4))
    with pytest.raises(Unsatisfiable, match=r"ask gpus_per_node \(at most 4\) to split it into a gang"):
        cluster.decide(req("too-many", gpus=8))
    with pytest.raises(Unsatisfiable) as pinned:
        cluster.decide(req("too-many-there", gpus=8, on_node="a"))
    assert "gpus_per_node" not in pinned.value.message


def test_sick_gpus_do_not_make_a_request_unsatisfiable() -> None:
    """Health and drain are not counted against satisfiability: a sick GPU may recover."""
    cluster = Cluster(node("n1", 2, health=UNHEALTHY))
    assert isinstance(cluster.admit(req("r", gpus=2)), Enqueue)


def test_no_room_with_queue_false_is_a_no_capacity_conflict() -> None:
    """queue=false: placed when it fits now, else Conflict no_capacity and nothing queued."""
    cluster = Cluster(node("n1", 1))
    assert placed(cluster.admit(req("now", queue=False))) == ("n1", [0])
    with pytest.raises(Conflict) as info:
        cluster.decide(req("later", queue=False, at=1.0))
    assert info.value.code == "no_capacity"
    assert cluster.table.queue_length() == 0


def test_a_full_queue_refuses_new_waiters_but_not_placements() -> None:
    """At max_queue, a request that must wait gets QueueFull; one that fits now is still placed."""
    cluster = Cluster(node("a", 1) + node("b", 1), max_queue=2)
    cluster.hold("busy", "a", [0])
    cluster.admit(req("w1", on_node="a", at=1.0))
    cluster.admit(req("w2", on_node="a", at=2.0))
    with pytest.raises(QueueFull) as info:
        cluster.decide(req("w3", on_node="a", at=3.0))
    assert info.value.code == "queue_full"
    assert placed(cluster.admit(req("fits", at=4.0))) == ("b", [0])


@pytest.mark.parametrize(("timeout", "deadline"), [(3600.0, 3605.0), (0.0, None)])
def test_enqueue_carries_a_deadline_of_now_plus_queue_timeout(timeout: float, deadline: float | None) -> None:
    """A waiting request gives up at now + queue_timeout_s; 0 means it waits forever."""
    cluster = Cluster(node("n1", 1), queue_timeout_s=timeout)
    cluster.hold("busy", "n1", [0])
    request = req("r", at=5.0)
    assert cluster.decide(request) == Enqueue(5.0, request, deadline)


@pytest.mark.parametrize(("ttl", "expires_at"), [(60.0, 70.0), (0.0, None)])
def test_allocate_expires_at_now_plus_ttl(ttl: float, expires_at: float | None) -> None:
    """An allocation made at now expires at now + ttl_s; a ttl of 0 never expires."""
    cluster = Cluster(node("n1", 1))
    command = cluster.decide(req("r", ttl_s=ttl, at=9.0), now=10.0)
    assert isinstance(command, Allocate)
    assert command.at == 10.0
    assert (command.allocation.allocated_at, command.allocation.expires_at) == (10.0, expires_at)


def test_allocation_ids_come_from_the_injected_rng() -> None:
    """Ids are the service name plus 64 random bits: the same seed gives the same commands."""
    first = Cluster(node("n1", 2), seed=42).decide(req("r", service="trainer"))
    again = Cluster(node("n1", 2), seed=42).decide(req("r", service="trainer"))
    other = Cluster(node("n1", 2), seed=43).decide(req("r", service="trainer"))
    assert isinstance(first, Allocate) and isinstance(other, Allocate)
    assert first == again
    assert re.fullmatch(r"trainer-[0-9a-f]{16}", first.allocation.allocation_id)
    assert other.allocation.allocation_id != first.allocation.allocation_id


def test_admitting_the_same_request_id_twice_leaves_one_allocation() -> None:
    """The scheduler proposes a retry again; the table refuses the duplicate request id."""
    cluster = Cluster(node("n1", 2))
    request = req("idem")
    cluster.admit(request)
    retry = cluster.decide(request, now=1.0)
    assert isinstance(retry, Allocate)
    result = cluster.table.apply(retry)
    assert result.error is not None and result.error.code == "duplicate_request"
    assert [a.request.request_id for a in cluster.table.allocations()] == ["idem"]


# ---------------------------------------------------------------- tick


def test_tick_expires_leases_times_out_waiters_and_places_on_the_freed_gpus() -> None:
    """Release(expired) first, then Cancel(queue_timeout), then placements on the freed GPUs."""
    cluster = Cluster(node("n1", 2), queue_timeout_s=9.0)
    short = cluster.admit(req("short", ttl_s=10.0))
    cluster.admit(req("forever", at=0.0))
    cluster.admit(req("gives-up", at=1.0))  # deadline 10
    cluster.admit(req("patient", at=2.0))  # deadline 11
    # The expiring tenant left the GPU busy in its last sample: that is not held against it.
    cluster.set_gpu(gpu("n1", 0, memory_free_mb=0, utilization_pct=100.0, sampled_at=9.5))
    assert cluster.tick(9.9) == []
    assert isinstance(short, Allocate)
    commands = cluster.tick(10.0)
    assert commands[:2] == [
        Release(10.0, (short.allocation.allocation_id,), "expired"),
        Cancel(10.0, ("gives-up",), "queue_timeout"),
    ]
    assert len(commands) == 3
    assert (placed_request(commands[2]), placed(commands[2])) == ("patient", ("n1", [0]))
    assert commands[2].at == 10.0


def test_tick_places_waiters_in_rank_order() -> None:
    """Placements in one tick come out in rank order, each on its own GPUs."""
    cluster = Cluster(node("n1", 3))
    cluster.hold("all", "n1", [0, 1, 2], expires_at=50.0)
    cluster.admit(req("low", priority=2, at=1.0))
    cluster.admit(req("mid", priority=5, at=2.0))
    cluster.admit(req("high", priority=9, at=3.0))
    commands = cluster.tick(50.0)
    assert commands[0] == Release(50.0, ("all",), "expired")
    assert [placed_request(c) for c in commands[1:]] == ["high", "mid", "low"]
    assert [placed(c)[1] for c in commands[1:]] == [[0], [1], [2]]


def test_tick_with_nothing_due_proposes_nothing() -> None:
    """No expired lease, no timed-out waiter, nothing placeable: no commands."""
    cluster = Cluster(node("n1", 1))
    cluster.hold("l", "n1", [0], expires_at=100.0)
    cluster.admit(req("w", at=1.0))
    assert cluster.tick(99.9) == []


def test_next_deadline_is_the_earliest_expiry_or_queue_deadline() -> None:
    """next_deadline is the soonest lease expiry or queue deadline, None when nothing is timed."""
    cluster = Cluster(node("n1", 2), queue_timeout_s=0.0)
    assert Scheduler.next_deadline(cluster.table) is None
    cluster.hold("forever", "n1", [0])
    cluster.admit(req("waits-forever", gpus=2, at=1.0))
    assert Scheduler.next_deadline(cluster.table) is None
    cluster.hold("timed", "n1", [1], expires_at=70.0)
    assert Scheduler.next_deadline(cluster.table) == 70.0
    cluster.apply(Enqueue(2.0, req("timed-wait", at=2.0), 40.0))
    assert Scheduler.next_deadline(cluster.table) == 40.0


# ---------------------------------------------------------------- reservations: no starvation


def test_a_big_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    """A waiting 4-GPU request reserves its node's freed GPUs; small ones only backfill elsewhere."""
    rng = random.Random(20240611)
    cluster = Cluster(node("big", 4) + node("side", 2), seed=7)
    # The big node is full of earlier leases that end one by one.
    old_leases = {f"old{i}": 20.0 * (i + 1) for i in range(4)}
    for i, lease in enumerate(old_leases):
        cluster.hold(lease, "big", [i], priority=1)
    assert isinstance(cluster.admit(req("BIG", gpus=4, priority=5, at=10.0)), Enqueue)

    small_ends: dict[str, float] = {}
    backfilled_on_side = 0
    big_placed_at: float | None = None
    for step in range(11, 101):
        now = float(step)
        for lease, end in old_leases.items():
            if end == now:
                cluster.release(lease, now)
        for alloc_id, end in list(small_ends.items()):
            if end <= now:
                cluster.release(alloc_id, now)
                del small_ends[alloc_id]
        commands: list[Command] = []
        if step % 2:
            commands.append(cluster.admit(req(f"small{step}", priority=1, at=now)))
        commands += cluster.tick(now)
        for command in commands:
            if not isinstance(command, Allocate):
                continue
            if command.allocation.request.request_id == "BIG":
                big_placed_at = now
                assert placed(command) == ("big", [0, 1, 2, 3])
                continue
            if big_placed_at is None:
                assert command.allocation.node == "side", f"small request took a reserved GPU at {now}"
                backfilled_on_side += 1
            small_ends[command.allocation.allocation_id] = now + rng.uniform(1.0, 6.0)
        if big_placed_at is None:
            on_big = {a.allocation_id for a in cluster.table.allocations() if a.node == "big"}
            assert on_big <= set(old_leases)
    # Placed in the very tick that freed the last of the node's earlier leases.
    assert big_placed_at == 80.0
    assert backfilled_on_side >= 10
    record = cluster.table.record("BIG")
    assert record is not None and record.status == "allocated"


def test_a_new_request_cannot_jump_an_equal_priority_waiter() -> None:
    """A GPU reserved by a queued request is not given to a later request of equal or lower priority."""
    cluster = Cluster(node("n1", 2))
    cluster.hold("busy", "n1", [0])
    assert isinstance(cluster.admit(req("waiter", gpus=2, priority=5, at=1.0)), Enqueue)
    assert isinstance(cluster.admit(req("same", priority=5, at=2.0)), Enqueue)
    assert isinstance(cluster.admit(req("lower", priority=4, at=3.0)), Enqueue)
    # Strictly higher priority outranks the waiter and may take the free GPU.
    assert placed(cluster.admit(req("urgent", priority=6, at=4.0))) == ("n1", [1])


def test_a_reservation_does_not_block_other_nodes() -> None:
    """A waiter reserves GPUs only on the node where it is closest to fitting."""
    cluster = Cluster(node("a", 2) + node("b", 2))
    cluster.hold("a0", "a", [0])
    cluster.hold("b0", "b", [0])
    cluster.hold("b1", "b", [1])
    assert isinstance(cluster.admit(req("pair", gpus=2, at=1.0)), Enqueue)
    # a/1 is reserved for the pair; b has nothing free, so the single waits...
    assert isinstance(cluster.admit(req("single", at=2.0)), Enqueue)
    cluster.release("b1", 3.0)
    # ...until b frees a GPU that the pair (closer to fitting on a) did not reserve.
    assert [(placed_request(c), placed(c)) for c in cluster.tick(3.0)] == [("single", ("b", [1]))]


def test_a_reservation_ties_on_eligible_gpus_go_to_the_node_name() -> None:
    """The waiter reserves where it has the most eligible free GPUs, not the most free GPUs."""
    l4 = gpu("b", 3, name="NVIDIA L4", memory_mb=23034)
    cluster = Cluster(node("a", 3) + node("b", 3) + [l4])
    cluster.hold("a0", "a", [0])
    cluster.hold("b0", "b", [0])
    # a and b both have two free H100s (b also a free L4): the tie goes to a.
    assert isinstance(cluster.admit(req("three", gpus=3, model="H100", at=1.0)), Enqueue)
    assert placed(cluster.admit(req("one", model="H100", priority=4, at=2.0))) == ("b", [1])
