"""Properties of Scheduler + LeaseTable under random operation sequences (hypothesis).

The harness drives the cores the way the agent does: `admit` and `tick` return
commands, which are applied to the table in order; callers' releases, renewals
and cancels are commands stamped with the current `now`. Time only moves
forward, in steps that make lease expiries, queue timeouts and record pruning
coincide with ticks. One operation reproduces a race the agent has: a renewal
stamped before a tick but applied after the tick computed its commands.

Checked after every apply:
  (a) no GPU is held by two live allocations, and the table's holder map is
      exactly the union of the live allocations' GPUs (each on one node);
  (d) every request id that has had a lifecycle event is in exactly one state:
      queued, allocated and live, or finished (its record may be pruned);
  that a host marked lost holds no lease afterwards (its leases lost, each
  with an event); and that the scheduler's own proposals are accepted, except for the
  refusals a race or a reused request id explains.
Checked at the end:
  (b) replaying the command log (through its wire form) into a fresh table
      gives the same results and an equal snapshot();
  (c) restoring from the snapshot taken before any entry and replaying the
      rest of the log gives the same final snapshot().

A second run mixes in gangs (`nodes` > 1, coordinator/gang_placement.py):
the same properties hold with a gang counted as one lease of several nodes.

Failures print the falsifying cluster, operations and seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Sequence, Union

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.commands import Allocate, Cancel, Command, Enqueue, MarkHostLost, Release, Renew, command_from_wire
from coordinator.errors import CoordinatorError
from coordinator.inventory import Inventory
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import (
    ALLOCATED,
    HEALTHY,
    QUEUED,
    TERMINAL_STATUSES,
    UNHEALTHY,
    Allocation,
    AllocationRequest,
    GpuView,
    LeaseEvent,
    Requirements,
)
from coordinator.scheduler import Scheduler, SchedulerConfig

RETENTION_S = 15.0
QUEUE_TIMEOUT_S = 12.0
MAX_QUEUE = 4
GPU_MODELS = {23034: "NVIDIA L4", 40960: "NVIDIA A100-SXM4-40GB", 81559: "NVIDIA H100 80GB HBM3"}
STEPS = (0.0, 0.5, 1.0, 3.0, 5.0, 12.0)
TTLS = (0.0, 3.0, 5.0, 20.0)

# ---------------------------------------------------------------- operations


@dataclass(frozen=True)
class Admit:
    gpus: int
    priority: int
    memory_mb: int
    ttl_s: float
    queue: bool
    model: str | None
    node: str | None
    reuse: int | None  # reuse the n-th request id seen so far (a retry), else a new id
    nodes: int = 1  # above 1: a gang of `gpus` on each of that many nodes


@dataclass(frozen=True)
class AdmitPair:
    """Two requests decided back to back, the first one's GPUs pending, then both applied."""

    first: Admit
    second: Admit


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
class Tick:
    step: float


@dataclass(frozen=True)
class RenewRacingTick:
    """A renewal stamped before the tick's `now` but applied after the tick decided."""

    step: float
    pick: int
    ttl_s: float


@dataclass(frozen=True)
class HostLost:
    """The leader marks a node's leases lost; the node stays in the pool (it came back)."""

    pick: int


@dataclass(frozen=True)
class SetHealth:
    pick: int
    healthy: bool
    drained: bool


Op = Union[Admit, AdmitPair, CallerRelease, CallerRenew, CallerCancel, Tick, RenewRacingTick, SetHealth, HostLost]

admits = st.builds(
    Admit,
    gpus=st.sampled_from([1, 1, 1, 2, 2, 3, 4]),
    priority=st.integers(1, 10),
    memory_mb=st.sampled_from([0, 0, 0, 8192, 30000, 90000]),
    ttl_s=st.sampled_from(TTLS),
    queue=st.sampled_from([True, True, True, False]),
    model=st.sampled_from([None] * 6 + ["H100", "a100", "L4"]),
    node=st.sampled_from([None] * 7 + ["n0", "n1", "n9"]),
    reuse=st.none() | st.none() | st.integers(0, 30),
)
gang_admits = st.builds(
    Admit,
    gpus=st.sampled_from([1, 2, 4]),
    priority=st.integers(1, 10),
    memory_mb=st.sampled_from([0, 0, 8192, 90000]),
    ttl_s=st.sampled_from(TTLS),
    queue=st.sampled_from([True, True, False]),
    model=st.sampled_from([None] * 4 + ["H100"]),
    node=st.none(),
    reuse=st.none() | st.none() | st.integers(0, 30),
    nodes=st.sampled_from([2, 2, 3, 5]),
)
picks = st.integers(0, 1000)
operations = st.one_of(
    admits,
    admits,
    admits,
    admits,
    st.builds(AdmitPair, admits, admits),
    st.builds(CallerRelease, picks),
    st.builds(CallerRenew, picks, st.sampled_from(TTLS)),
    st.builds(CallerCancel, picks),
    st.builds(Tick, st.sampled_from(STEPS)),
    st.builds(Tick, st.sampled_from(STEPS)),
    st.builds(RenewRacingTick, st.sampled_from(STEPS[1:]), picks, st.sampled_from(TTLS)),
    st.builds(SetHealth, picks, st.booleans(), st.booleans()),
    st.builds(HostLost, picks),
)


@st.composite
def clusters(draw: st.DrawFn) -> list[GpuView]:
    gpus: list[GpuView] = []
    for n in range(draw(st.integers(1, 3))):
        memory = draw(st.sampled_from([81559, 81559, 40960, 23034]))  # one model per node
        for i in range(draw(st.integers(2, 4))):
            gpus.append(GpuView(f"n{n}", i, f"GPU-n{n}-{i}", GPU_MODELS[memory], memory))
    return gpus


# ---------------------------------------------------------------- the harness


def outcome(result: ApplyResult) -> tuple[Any, ...]:
    return (result.events, result.affected, None if result.error is None else result.error.code)


class Harness:
    """Drives the cores like the agent and checks invariants after every apply."""

    def __init__(self, gpus: list[GpuView], seed: int) -> None:
        self.gpus = gpus
        self.inventory = Inventory.of(gpus)
        self.table = LeaseTable(retention_s=RETENTION_S)
        self.scheduler = Scheduler(SchedulerConfig(QUEUE_TIMEOUT_S, MAX_QUEUE), random.Random(seed))
        self.now = 0.0
        self.log: list[Command] = []
        self.outcomes: list[tuple[Any, ...]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.ids_seen: list[str] = []
        self.state: dict[str, str] = {}  # request id -> queued | allocated | finished, from events

    # -- driving

    def run(self, op: Op) -> None:
        if isinstance(op, Admit):
            self.admit(op)
        elif isinstance(op, AdmitPair):
            self.admit_pair(op)
        elif isinstance(op, CallerRelease):
            live = self.table.allocations()
            target = live[op.pick % len(live)].allocation_id if live else "ghost"
            self.apply(Release(self.now, (target,)), allowed=() if live else ("not_found",))
        elif isinstance(op, CallerRenew):
            self.renew(op.pick, op.ttl_s, self.now)
        elif isinstance(op, CallerCancel):
            queue = self.table.queue()
            target = queue[op.pick % len(queue)].request.request_id if queue else "ghost"
            self.apply(Cancel(self.now, (target,)), allowed=() if queue else ("not_found",))
        elif isinstance(op, Tick):
            self.now += op.step
            for command in self.scheduler.tick(self.table, self.inventory, self.now):
                self.apply(command)
            self.check_tick_done()
        elif isinstance(op, RenewRacingTick):
            stamped = self.now
            self.now += op.step
            commands = self.scheduler.tick(self.table, self.inventory, self.now)
            due = {i for c in commands if isinstance(c, Release) for i in c.allocation_ids}
            renewed = self.renew(op.pick, op.ttl_s, stamped)
            # A gang is renewed, and expired, whole: its members stand or fall together.
            unit = {m.allocation_id for m in self.table.lease_unit(renewed)} if renewed is not None else set()
            raced = renewed is not None and renewed in due
            renewal = self.table.allocation(renewed) if raced and renewed is not None else None
            for command in commands:
                # Only the race explains a refusal: the renewed lease may outlive the
                # expiry proposed for it (alone: not_found), so its GPUs stay busy.
                allowed: tuple[str, ...] = ()
                if raced and isinstance(command, Release):
                    allowed = ("not_found",) if set(command.allocation_ids) <= (unit or {renewed}) else ()
                elif raced and isinstance(command, Allocate):
                    allowed = ("gpu_busy",)
                self.apply(command, allowed=allowed)
            if renewal is not None:
                # The acknowledged renewal wins over the expiry proposed before it was applied.
                expires = renewal.expires_at
                alive = self.table.allocation(renewal.allocation_id) is not None
                assert alive == (expires is None or expires > self.now), (renewal, self.now)
        elif isinstance(op, HostLost):
            nodes = sorted({g.node for g in self.gpus})
            node = nodes[op.pick % len(nodes)]
            holds = any(a.node == node for a in self.table.allocations())
            result = self.apply(MarkHostLost(self.now, node), allowed=() if holds else ("not_found",))
            assert all(a.node != node for a in self.table.allocations())
            # One event per lease ended; a gang's members are one lease.
            assert len(result.events) == len({lease_of(e.allocation) for e in result.events if e.allocation})
            assert len(result.affected) == sum(len(e.gang) or 1 for e in result.events)
        else:
            gpu = self.gpus[op.pick % len(self.gpus)]
            health = HEALTHY if op.healthy else UNHEALTHY
            self.gpus = [
                GpuView(g.node, g.index, g.uuid, g.name, g.memory_total_mb, health=health, drained=op.drained)
                if g.ref == gpu.ref
                else g
                for g in self.gpus
            ]
            self.inventory.set_node(gpu.node, [g for g in self.gpus if g.node == gpu.node])

    def request(self, op: Admit) -> AllocationRequest:
        if op.reuse is not None and self.ids_seen:
            request_id = self.ids_seen[op.reuse % len(self.ids_seen)]
        else:
            request_id = f"r{len(self.ids_seen)}"
            self.ids_seen.append(request_id)
        return AllocationRequest(
            request_id=request_id,
            service_name=f"svc{op.priority % 3}",
            workload_type="generic",
            priority=op.priority,
            requirements=Requirements(op.gpus, op.memory_mb, 100.0, op.model, op.node, op.nodes),
            ttl_s=op.ttl_s,
            submitted_at=self.now,
            queue=op.queue,
        )

    def decide(self, op: Admit, pending: Sequence[Any] = ()) -> tuple[AllocationRequest, Command | None]:
        request = self.request(op)
        try:
            command = self.scheduler.admit(request, self.table, self.inventory, self.now, pending)
        except CoordinatorError as exc:
            self.check_refusal(request, exc)
            return request, None
        if isinstance(command, Allocate):
            assert command.allocation.expires_at == (self.now + op.ttl_s if op.ttl_s > 0 else None)
        else:
            assert isinstance(command, Enqueue) and request.queue
            assert command.deadline == self.now + QUEUE_TIMEOUT_S
        return request, command

    def admit(self, op: Admit) -> None:
        request, command = self.decide(op)
        if command is not None:
            self.apply(command, allowed=self.retry_refusals(request))

    def admit_pair(self, op: AdmitPair) -> None:
        first_request, first = self.decide(op.first)
        pending = [g.ref for m in first.members for g in m.gpus] if isinstance(first, Allocate) else []
        second_request, second = self.decide(op.second, pending)
        if first is not None:
            self.apply(first, allowed=self.retry_refusals(first_request))
        if second is not None:
            # Never gpu_busy: the first one's GPUs were counted as taken.
            self.apply(second, allowed=self.retry_refusals(second_request))

    def retry_refusals(self, request: AllocationRequest) -> tuple[str, ...]:
        """A reused request id that the table still remembers is refused as a duplicate."""
        return ("duplicate_request",) if self.table.record(request.request_id) is not None else ()

    def renew(self, pick: int, ttl_s: float, at: float) -> str | None:
        live = self.table.allocations()
        if not live:
            self.apply(Renew(at, "ghost", None), allowed=("not_found",))
            return None
        alloc = live[pick % len(live)]
        expired = alloc.expires_at is not None and alloc.expires_at <= at
        result = self.apply(
            Renew(at, alloc.allocation_id, at + ttl_s if ttl_s > 0 else None),
            allowed=("lease_expired",) if expired else (),
        )
        return alloc.allocation_id if result.ok else None

    def apply(self, command: Command, allowed: tuple[str, ...] = ()) -> ApplyResult:
        self.snapshots.append(self.table.snapshot())
        result = self.table.apply(command)
        self.log.append(command)
        self.outcomes.append(outcome(result))
        if result.error is not None:
            assert result.error.code in allowed, f"{command} refused: {result.error.code}"
            assert self.table.snapshot() == self.snapshots[-1], "a refused command changed the table"
        self.observe(result.events)
        self.check()
        return result

    def observe(self, events: Sequence[LeaseEvent]) -> None:
        for event in events:
            request_id = event.request.request_id
            if event.kind == "queued":
                assert request_id not in self.state or self.state[request_id] == "finished"
                self.state[request_id] = "queued"
            elif event.kind == "allocated":
                assert self.state.get(request_id, "finished") in ("queued", "finished")
                assert event.was_queued == (self.state.get(request_id) == "queued")
                self.state[request_id] = "allocated"
            elif event.kind == "renewed":
                assert self.state[request_id] == "allocated"
            else:
                assert event.kind in ("released", "expired", "cancelled", "lost")
                was = self.state[request_id]
                assert (event.allocation is not None) == (was == "allocated")
                self.state[request_id] = "finished"

    # -- invariants

    def check(self) -> None:
        # (a) one live allocation per GPU, holder map = union of live allocations.
        union: dict[Any, str] = {}
        inventory = {g.ref for g in self.gpus}
        live_requests: dict[str, str] = {}
        for alloc in self.table.allocations():
            assert alloc.gpus and all(g.node == alloc.node for g in alloc.gpus)
            for g in alloc.gpus:
                assert g.ref in inventory
                assert g.ref not in union, f"{g.ref} held by {union[g.ref]} and {alloc.allocation_id}"
                union[g.ref] = alloc.allocation_id
            lease = lease_of(alloc)
            assert live_requests.get(alloc.request.request_id, lease) == lease
            live_requests[alloc.request.request_id] = lease
            if alloc.gang is not None:
                members = self.table.gang(alloc.gang.gang_id)
                assert members is not None and alloc in members and len(members) == alloc.gang.size
        assert dict(self.table.held_gpus()) == union
        # (d) every request id in exactly one state, agreeing with its record.
        queued = {q.request.request_id for q in self.table.queue()}
        assert queued | set(live_requests) <= set(self.state)
        for request_id, expected in self.state.items():
            record = self.table.record(request_id)
            is_queued = request_id in queued
            is_live = request_id in live_requests
            is_finished = record is None or record.status in TERMINAL_STATUSES
            assert (is_queued, is_live, is_finished).count(True) == 1, request_id
            if expected == "queued":
                assert is_queued and record is not None and record.status == QUEUED
            elif expected == "allocated":
                assert is_live and record is not None and record.status == ALLOCATED
                assert record.allocation_id == live_requests[request_id]
            else:
                assert is_finished

    def check_tick_done(self) -> None:
        """After a tick: nothing overdue remains, and the head of the queue does not fit anywhere."""
        for alloc in self.table.allocations():
            assert alloc.expires_at is None or alloc.expires_at > self.now
        queue = self.table.queue()
        for q in queue:
            assert q.deadline is None or q.deadline > self.now
        if queue:
            req = queue[0].request.requirements
            fitting = 0
            for node in {g.node for g in self.gpus}:
                usable = [
                    g for g in self.gpus
                    if g.node == node and g.schedulable and req.matches_statically(g)
                    and self.table.holder(g.ref) is None
                ]
                fitting += len(usable) >= req.gpu_count
            assert fitting < req.nodes, f"{queue[0].request.request_id} fits on {fitting} node(s)"

    def check_refusal(self, request: AllocationRequest, exc: CoordinatorError) -> None:
        req = request.requirements
        per_node: dict[str, int] = {}
        for g in self.gpus:
            if req.matches_statically(g):
                per_node[g.node] = per_node.get(g.node, 0) + 1
        can_ever_fit = sum(n >= req.gpu_count for n in per_node.values()) >= req.nodes
        if exc.code == "unsatisfiable":
            assert not can_ever_fit
        elif exc.code == "no_capacity":
            assert can_ever_fit and not request.queue
        else:
            assert exc.code == "queue_full" and can_ever_fit and request.queue
            assert self.table.queue_length() >= MAX_QUEUE


def lease_of(alloc: Allocation) -> str:
    """The lease an allocation belongs to: its gang's id, or its own."""
    return alloc.gang.gang_id if alloc.gang is not None else alloc.allocation_id


def replay(table: LeaseTable, log: Sequence[Command], *, wire: bool = False) -> list[tuple[Any, ...]]:
    """Apply `log` (through its JSON wire form, as storage keeps it, when `wire`); return each outcome."""
    if wire:
        log = [command_from_wire(json.loads(json.dumps(c.to_wire()))) for c in log]
    return [outcome(table.apply(c)) for c in log]


@settings(max_examples=200, deadline=None)
@given(gpus=clusters(), ops=st.lists(operations, min_size=10, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_random_operations_keep_the_lease_invariants(gpus: list[GpuView], ops: list[Op], seed: int) -> None:
    """(a)+(d) after every apply, (b) replay equals, (c) restore-then-replay equals, at any cut."""
    check_operations(gpus, ops, seed)


@settings(max_examples=150, deadline=None)
@given(
    gpus=clusters(),
    ops=st.lists(st.one_of(operations, gang_admits, gang_admits), min_size=10, max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_operations_with_gangs_keep_the_lease_invariants(gpus: list[GpuView], ops: list[Op], seed: int) -> None:
    """The same with gangs among the requests: a gang is granted, renewed and ended whole, replays and restores."""
    check_operations(gpus, ops, seed)


def check_operations(gpus: list[GpuView], ops: list[Op], seed: int) -> None:
    harness = Harness(gpus, seed)
    for op in ops:
        harness.run(op)
    final = harness.table.snapshot()
    # (b) the log alone rebuilds the table, refusals and all.
    fresh = LeaseTable(retention_s=RETENTION_S)
    assert replay(fresh, harness.log, wire=True) == harness.outcomes
    assert fresh.snapshot() == final
    # (c) a snapshot taken before any entry, plus the rest of the log, gives the same end.
    for cut, snap in enumerate(harness.snapshots):
        restored = LeaseTable.restore(json.loads(json.dumps(snap)))
        assert restored.snapshot() == snap
        assert replay(restored, harness.log[cut:]) == harness.outcomes[cut:]
        assert restored.snapshot() == final, f"restore at entry {cut} diverged"
