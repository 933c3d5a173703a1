"""The indexed scheduler decides exactly as the plain walk it replaced (hypothesis).

`reference_scheduler.py` is the scheduler as it was before the indexes: every
request walked over every node and GPU. Both run side by side on random
histories, seeded alike, on the same table, and must return the same
commands (allocation ids included: both draw from their rng in the same
order) or refuse with the same error. The commands of the indexed one are
then applied, so the histories go on.

Histories mix what changes a decision: inventories of mixed models, memory,
health, drains and telemetry (some taken right around a release); allocate,
enqueue, release, renew, cancel, host loss, expiries and queue timeouts;
telemetry and health changes pushed as `set_node` deltas; GPUs pending from
proposals in flight, as a set or as reference counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Union

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.commands import Allocate, Cancel, Command, Enqueue, MarkHostLost, Release, Renew
from coordinator.errors import CoordinatorError
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import DEGRADED, HEALTHY, UNHEALTHY, AllocationRequest, GpuRef, GpuView, Requirements
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.unit import reference_scheduler as reference

MODELS = {23034: "NVIDIA L4", 40960: "NVIDIA A100-SXM4-40GB", 81559: "NVIDIA H100 80GB HBM3"}
STEPS = (0.0, 0.5, 1.0, 2.0, 3.0, 7.0)
TTLS = (0.0, 3.0, 6.0, 30.0)


@st.composite
def gpu_views(draw: st.DrawFn, node: str, index: int, memory: int | None = None) -> GpuView:
    if memory is None:
        memory = draw(st.sampled_from(sorted(MODELS)))
    reports = draw(st.booleans())
    return GpuView(
        node,
        index,
        f"GPU-{node}-{index}",
        MODELS[memory],
        memory,
        memory_free_mb=draw(st.sampled_from([0, 5000, 30000, memory])) if reports else None,
        utilization_pct=draw(st.sampled_from([0.0, 40.0, 90.0, 100.0])) if reports else None,
        health=draw(st.sampled_from([HEALTHY, HEALTHY, HEALTHY, DEGRADED, UNHEALTHY])),
        drained=draw(st.sampled_from([False, False, False, False, True])),
        sampled_at=draw(st.sampled_from([-3.0, -1.0, 0.0, 1.0, 2.5])),
    )


@st.composite
def clusters(draw: st.DrawFn) -> list[GpuView]:
    """1-8 nodes of 1-8 GPUs; a node has one model or a mix (ties between nodes need the former)."""
    views: list[GpuView] = []
    for n in range(draw(st.integers(1, 8))):
        model = draw(st.none() | st.sampled_from(sorted(MODELS)))
        for i in range(draw(st.integers(1, 8))):
            views.append(draw(gpu_views(f"n{n}", i, model)))
    return views


@dataclass(frozen=True)
class Admit:
    requirements: Requirements
    priority: int
    ttl_s: float
    queue: bool
    pending: int  # how many GPUs to mark pending (0: none), as a set when odd, as counts when even


@dataclass(frozen=True)
class Tick:
    step: float
    pending: int


@dataclass(frozen=True)
class CallerRelease:
    pick: int


@dataclass(frozen=True)
class CallerRenew:
    pick: int
    ttl_s: float


@dataclass(frozen=True)
class CallerCancel:
    pick: int


@dataclass(frozen=True)
class HostLost:
    pick: int


@dataclass(frozen=True)
class Resample:
    """A node's telemetry and health change (a sample, a health verdict, a drain): one set_node."""

    pick: int
    seed: int


Op = Union[Admit, Tick, CallerRelease, CallerRenew, CallerCancel, HostLost, Resample]

requirements = st.builds(
    Requirements,
    gpu_count=st.sampled_from([1, 1, 1, 2, 2, 3, 4, 8]),
    min_memory_mb=st.sampled_from([0, 0, 4096, 20000, 40000, 90000]),
    max_utilization=st.sampled_from([100.0, 100.0, 50.0]),
    gpu_model=st.sampled_from([None, None, None, None, "H100", "a100", "L4"]),
    node=st.sampled_from([None] * 8 + ["n0", "n1", "n9"]),
)
pending_counts = st.sampled_from([0, 0, 0, 1, 2, 3])
# Requests ranked behind the whole queue, admitted after every step.
PROBES = (
    Requirements(1, 0),
    Requirements(2, 0),
    Requirements(1, 30000, gpu_model="H100"),
    Requirements(1, 0, gpu_model="a100"),
    Requirements(1, 0, gpu_model="L4"),
)
operations = st.one_of(
    st.builds(Admit, requirements, st.integers(1, 10), st.sampled_from(TTLS), st.sampled_from([True, True, False]), pending_counts),
    st.builds(Admit, requirements, st.integers(1, 10), st.sampled_from(TTLS), st.just(True), pending_counts),
    st.builds(Tick, st.sampled_from(STEPS), pending_counts),
    st.builds(Tick, st.sampled_from(STEPS), pending_counts),
    st.builds(CallerRelease, st.integers(0, 1000)),
    st.builds(CallerRenew, st.integers(0, 1000), st.sampled_from(TTLS)),
    st.builds(CallerCancel, st.integers(0, 1000)),
    st.builds(HostLost, st.integers(0, 1000)),
    st.builds(Resample, st.integers(0, 1000), st.integers(0, 2**32 - 1)),
)


class SideBySide:
    """One table and inventory; the reference and the indexed scheduler decide every step."""

    def __init__(self, views: list[GpuView], seed: int, max_queue: int) -> None:
        config = SchedulerConfig(queue_timeout_s=10.0, max_queue=max_queue)
        self.old = reference.Scheduler(reference.SchedulerConfig(config.queue_timeout_s, max_queue), random.Random(seed))
        self.new = Scheduler(config, random.Random(seed))
        self.table = LeaseTable(retention_s=20.0)
        self.inventory = Inventory.of(views)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.issued = 0

    def pending(self, count: int) -> Any:
        refs = sorted(self.rng.sample([v.ref for v in self.inventory], min(count, len(self.inventory))))
        if count % 2:
            return set(refs)
        return {ref: 1 + i % 2 for i, ref in enumerate(refs)}

    def run(self, op: Op) -> None:
        if isinstance(op, Admit):
            self.admit(op)
        elif isinstance(op, Tick):
            self.now += op.step
            pending = self.pending(op.pending)
            old = self.old.tick(self.table, list(self.inventory), self.now, pending)
            new = self.new.tick(self.table, self.inventory, self.now, pending)
            assert new == old, (pending, old, new)
            for command in new:
                # Pending GPUs are never chosen and nothing else changed: every command applies.
                assert self.table.apply(command).ok, command
        elif isinstance(op, CallerRelease):
            live = self.table.allocations()
            if live:
                self.table.apply(Release(self.now, (live[op.pick % len(live)].allocation_id,)))
        elif isinstance(op, CallerRenew):
            live = self.table.allocations()
            if live:
                ttl = op.ttl_s
                target = live[op.pick % len(live)].allocation_id
                self.table.apply(Renew(self.now, target, self.now + ttl if ttl > 0 else None))
        elif isinstance(op, CallerCancel):
            queue = self.table.queue()
            if queue:
                self.table.apply(Cancel(self.now, (queue[op.pick % len(queue)].request.request_id,)))
        elif isinstance(op, HostLost):
            nodes = self.inventory.nodes()
            self.table.apply(MarkHostLost(self.now, nodes[op.pick % len(nodes)]))
        else:
            nodes = self.inventory.nodes()
            node = nodes[op.pick % len(nodes)]
            fresh = st_random_views(node, len(self.inventory.node_views(node)), op.seed, self.now)
            self.inventory.set_node(node, fresh)

    def admit(self, op: Admit) -> None:
        self.issued += 1
        request = self.request(f"r{self.issued:03d}", op.requirements, op.priority, op.ttl_s, op.queue)
        new = self.compare(request, self.pending(op.pending))
        if isinstance(new, (Allocate, Enqueue)):
            assert self.table.apply(new).ok

    def probe(self) -> None:
        """What a plan of the whole queue leaves free is the same; so are last-ranked admits."""
        views = list(self.inventory)
        taken = set(self.table.held_gpus())
        by_node: dict[str, list[GpuView]] = {}
        for view in views:
            by_node.setdefault(view.node, []).append(view)
        for queued in self.table.queue():  # the reference's _plan, keeping its taken set
            request = queued.request
            placement = self.old._best_fit(request, by_node, taken, self.table, set())
            if placement is not None:
                taken.update(g.ref for g in placement.gpus)
            else:
                taken.update(self.old._reservation(request, by_node, taken, self.table, set()))
        walk = self.new._walk(self.table, self.inventory)
        try:
            walk.walk(self.table.queue_groups())
            left = {v.ref for node_views in walk.open.by_node.values() for v in node_views}
        finally:
            walk.undo()
        assert left == {v.ref for v in views if v.schedulable and v.ref not in taken}
        for i, requirements in enumerate(PROBES):
            self.compare(self.request(f"probe{i}", requirements, 1, 0.0, True), ())

    def request(
        self, request_id: str, requirements: Requirements, priority: int, ttl_s: float, queue: bool
    ) -> AllocationRequest:
        return AllocationRequest(
            request_id=request_id,
            service_name=f"svc{priority % 3}",
            workload_type="generic",
            priority=priority,
            requirements=requirements,
            ttl_s=ttl_s,
            submitted_at=self.now,
            queue=queue,
        )

    def compare(self, request: AllocationRequest, pending: Any) -> Command | tuple[str, str, str]:
        old = decide(lambda: self.old.admit(request, self.table, list(self.inventory), self.now, pending))
        new = decide(lambda: self.new.admit(request, self.table, self.inventory, self.now, pending))
        assert new == old, (request, pending, old, new)
        return new


def st_random_views(node: str, count: int, seed: int, now: float) -> list[GpuView]:
    """`count` fresh views of `node`, drawn from `seed` (a resample may change anything)."""
    rng = random.Random(seed)
    views = []
    for i in range(count):
        memory = rng.choice(sorted(MODELS))
        reports = rng.random() < 0.6
        views.append(
            GpuView(
                node,
                i,
                f"GPU-{node}-{i}",
                MODELS[memory],
                memory,
                memory_free_mb=rng.choice([0, 5000, 30000, memory]) if reports else None,
                utilization_pct=rng.choice([0.0, 40.0, 90.0, 100.0]) if reports else None,
                health=rng.choice([HEALTHY, HEALTHY, HEALTHY, DEGRADED, UNHEALTHY]),
                drained=rng.random() < 0.15,
                sampled_at=now + rng.choice([-3.0, -1.0, 0.0, 1.0, 2.5]),
            )
        )
    return views


def decide(call: Any) -> Command | tuple[str, str, str]:
    """The command, or the refusal as (class, code, message)."""
    try:
        command: Command = call()
        return command
    except CoordinatorError as exc:
        return (type(exc).__name__, exc.code, exc.message)


@settings(max_examples=200, deadline=None)
@given(
    views=clusters(),
    ops=st.lists(operations, min_size=10, max_size=60),
    seed=st.integers(0, 2**32 - 1),
    max_queue=st.sampled_from([3, 1000]),
)
def test_the_indexed_scheduler_decides_as_the_reference_walk(
    views: list[GpuView], ops: list[Op], seed: int, max_queue: int
) -> None:
    """Same commands (ids, nodes, GPUs, enqueue or allocate) or same refusal, at every step."""
    sides = SideBySide(views, seed, max_queue)
    for op in ops:
        sides.run(op)
        sides.probe()
