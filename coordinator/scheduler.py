"""The priority scheduler: decides which commands the leader proposes.

Theory of operation
-------------------
The scheduler is a pure function of the lease table, the cluster's GPUs (with
their latest telemetry), `now`, and the GPUs that in-flight proposals are about
to take. It never mutates the table: it returns commands, and the table changes
only when those commands are applied in log order.

Policy, in the order it is applied:

1. **Strict priority.** Requests are served in rank order: priority 10 before 1,
   then the oldest, then by request id (a total order, so ties are stable).
2. **One node per allocation, best fit.** Among the nodes where the request fits,
   prefer placements on healthy GPUs over degraded ones (unhealthy and drained
   GPUs are never chosen); then the node that leaves the fewest free GPUs stranded; then the one whose
   chosen GPUs have the least total memory (keep big GPUs for big jobs); then the
   node name; with `nvlink_first_gpus` = k set, a request of k or more GPUs
   prefers, among nodes equal in health and GPUs stranded, one where its set
   is all-NVLink, before memory and name. Within a node, the smallest adequate GPUs; among equally
   adequate ones, the best-connected set where the node reported its
   topology (coordinator/topology.py), else the lowest indices.
   A GPU is eligible when it is not unhealthy, not drained, free, matches the model and
   node constraints, has `min_memory_mb` of total memory, and - when its telemetry
   was sampled more than RELEASE_GRACE_S after its last release - has that much free
   memory and runs under `max_utilization` (busy, unleased GPUs are somebody else's).
3. **No starvation (conservative backfill).** A request that cannot be placed
   reserves, on the node where it is closest to fitting (most eligible free GPUs,
   among nodes that have enough matching GPUs at all), every eligible free GPU
   there. Requests ranked below it may not take reserved GPUs; they may only
   backfill GPUs that no higher-ranked request reserved. So the count of free
   GPUs a waiting request can use never shrinks because of lower-ranked work:
   each release brings it closer until it fits. A new request is ranked against
   the queue the same way, so it cannot jump ahead of equal or higher waiters.
   A gang (`nodes` > 1) is one request: it is placed on all its nodes at once
   or reserves on the nodes closest to fitting it (coordinator/gang_placement.py),
   and is granted by one Allocate carrying every member.
4. **Shares pack, best fit.** A share of a GPU (`share_mb`) first joins the GPU
   of its sharing group with the least budget left that holds it
   (coordinator/share_placement.py), which takes no free GPU from anyone; only
   when none does is it placed like a one-GPU request (rules 2 and 3), opening
   that GPU to sharing. A waiting share is packed at each tick before the pass,
   at most one per GPU per pass (the next waits for the first to apply), from
   the same quota book as the pass. A share reads at most MAX_SHARE_PROBES of
   its group's GPUs (its node's, when pinned to one), and a tick does not look
   again for a budget at least as large as one that found nothing.
5. **Leases and the queue end by time.** A lease whose `expires_at` has passed is
   released with reason "expired"; a queued request past its deadline is
   withdrawn with reason "queue_timeout". Both are commands with `at = now`, so
   a new leader simply continues them.

Cost
----
The answers are those of walking every queued request over every GPU, but the
walk is done on indexes (placement.py): the lease table keeps the queue in rank
order (per set of requirements too), deadlines and expiries in time order; the
scheduler keeps each node's open GPUs, bucketed by count, current from the
table's and the inventory's change journals, and rebuilds them only when handed
another table or inventory object (after a snapshot restore). A pass stops as
soon as no open GPU is left, drops requirements that can no longer change
anything, and looks only at nodes with open GPUs. `admit` first asks whether the
request fits at all before walking the queue ahead of it, so a full cluster
answers in a lookup.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

from coordinator import queue_pass
from coordinator.commands import Allocate, Cancel, Command, Enqueue, Preempt, Release
from coordinator.errors import Conflict, QueueFull, Unsatisfiable
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.mig import profile_memory_order
from coordinator.model import (
    MIG_ANY,
    AllocatedGpu,
    Allocation,
    AllocationRequest,
    GangMembership,
    GpuRef,
    QueuedRequest,
    Requirements,
)
from coordinator.placement import AnyPlacement, OpenGpus, Placement, PlanWalk
from coordinator.preemption import choose_victims
from coordinator.queue_rules import QueueBook, Standing
from coordinator.share_placement import share_group

# Shared GPUs a waiting or new share reads, best fit first, before it opens a
# fresh GPU instead: constraints (model, node, health) rarely rule out the best
# fits and then every one after them, and the read stays bounded however many
# GPUs a sharing group holds.
MAX_SHARE_PROBES = 64

@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Scheduling limits; the defaults are SPEC.md's `[scheduler]` defaults."""

    # How long a queued request waits before it is withdrawn (0 = forever).
    queue_timeout_s: float = 3600.0
    # Bound on waiting requests: past it new requests get 503 queue_full rather
    # than an ever-growing queue that no one will serve.
    max_queue: int = 10_000
    # The ports a gang's rendezvous hint is chosen from, both ends included: each
    # gang gets the lowest one no live gang with the same first node holds
    # (torch.distributed's default, 29500, first).
    rendezvous_ports: tuple[int, int] = (29500, 29599)
    # Requests of at least this many GPUs (2 or more; 0 = off) take, among the
    # nodes best fit finds equal in health and GPUs stranded, one where their set
    # is all-NVLink (placement.py). Off by default: it moves 4-GPU work onto the
    # NVSwitch hosts that 8-GPU jobs and gangs need (docs/benchmarks.md, bench_shapes).
    nvlink_first_gpus: int = 0


class Scheduler:
    """Proposes allocations, queueing, expiries and queue timeouts."""

    def __init__(self, config: SchedulerConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        # The open-GPU index and what it was last brought up to date with.
        self._open = OpenGpus(index_nvlink=config.nvlink_first_gpus > 0)
        self._table: LeaseTable | None = None
        self._inventory: Inventory | None = None
        self._table_version = 0
        self._inventory_version = 0

    # ------------------------------------------------------------------ decisions

    def admit(
        self,
        request: AllocationRequest,
        table: LeaseTable,
        inventory: Inventory,
        now: float,
        pending: Collection[GpuRef] = (),
        pending_enqueues: int = 0,
        pending_queues: Mapping[str, int] | None = None,
    ) -> Command:
        """Decide a new request: Allocate when it fits now, else Enqueue.

        `pending` are GPUs that proposals in flight are about to take (a set, or
        a mapping keyed by GPU), and `pending_enqueues` the Enqueues in flight
        (they count against max_queue), `pending_queues` the GPUs of in-flight
        Allocates per queue (they count against caps and guarantees). Raises Unsatisfiable when no node could
        ever hold it, Conflict when it does not fit now and the caller asked not
        to queue, QueueFull when the queue is at its bound.
        """
        self.check_satisfiable(request, inventory)
        if request.requirements.is_share:
            book = self._book(table, inventory, pending, pending_queues)
            packed = self._pack_share(request, table, inventory, now, book, pending)
            if packed is not None:
                return packed
        walk = self._walk(table, inventory)
        quota = ""
        try:
            walk.close_pending(pending)
            if table.queue_policy.configured:
                placement, quota = self._place_with_queues(walk, request, pending, pending_queues, now)
            else:
                placement = self._place_behind_queue(walk, request)
        finally:
            walk.undo()
        if placement is not None:
            return self._grant(request, placement, now, table, walk.inventory, {})
        if not request.queue:
            if quota:
                raise Conflict(f"the request's queue allows no more now: {quota} (queue=false)", code="queue_quota")
            raise Conflict("no GPUs free that fit the request now (queue=false)", code="no_capacity")
        if table.queue_length() + pending_enqueues >= self.config.max_queue:
            raise QueueFull(f"the wait queue is full ({self.config.max_queue} requests)")
        timeout = self.config.queue_timeout_s
        return Enqueue(now, request, now + timeout if timeout > 0 else None)

    def _place_behind_queue(self, walk: PlanWalk, request: AllocationRequest) -> AnyPlacement | None:
        """Where `request` goes once the queued requests ranked ahead of it are planned."""
        # Ahead-of-it work only ever takes GPUs: a request that fits nowhere on
        # what is open now fits nowhere after it, and no walk is needed.
        if walk.best_fit(request) is None:
            return None
        walk.walk(walk.table.queue_groups(before=walk.table.rank_key(request)))
        if not walk.open.total or walk.is_dead(request.requirements):
            return None
        return walk.best_fit(request)

    def _place_with_queues(
        self,
        walk: PlanWalk,
        request: AllocationRequest,
        pending: Collection[GpuRef],
        pending_queues: Mapping[str, int] | None,
        now: float,
    ) -> tuple[AnyPlacement | None, str]:
        """Where the queue pass would place `request` now, or (None, why when its queue forbids it)."""
        book = self._book(walk.table, walk.inventory, pending, pending_queues)
        verdict = book.classify(request)
        if verdict.standing is Standing.QUOTA:
            return None, verdict.detail
        if walk.best_fit(request) is None:
            return None, ""
        result = queue_pass.plan(walk, book, now, extra=QueuedRequest(request, None), find_candidates=False)
        for placed, placement in result.placements:
            if placed.request_id == request.request_id:
                return placement, ""
        return None, ""

    def _book(
        self,
        table: LeaseTable,
        inventory: Inventory,
        pending: Collection[GpuRef],
        pending_queues: Mapping[str, int] | None,
    ) -> QueueBook:
        """The queue counts of a pass: the table's, with in-flight placements' GPUs counted too.

        An Allocate in flight is in neither the table nor its queue's count yet;
        counting it here keeps two quick decisions from passing a cap together.
        (Between its apply and its settle it is counted twice: a moment of
        caution, never an excess.)
        """
        claimants = (table.queued(i) for i in table.claims())
        claims = {q.request.request_id: q.request for q in claimants if q is not None}
        book = QueueBook(table.queue_policy, table.queue_ledger, len(inventory), claims)
        for queue, gpus in (pending_queues or {}).items():
            book.used[queue] += gpus
        book.total_used += len(pending)
        return book

    def tick(
        self,
        table: LeaseTable,
        inventory: Inventory,
        now: float,
        pending: Collection[GpuRef] = (),
        pending_queues: Mapping[str, int] | None = None,
    ) -> list[Command]:
        """Commands due at `now`: expiries, queue timeouts, preemption deadlines, then placements and preemptions."""
        commands: list[Command] = []
        expired = table.expiries_due(now)
        if expired:
            commands.append(Release(now, tuple(a.allocation_id for a in expired), "expired"))
        timed_out = [q.request.request_id for q in table.queue_due(now)]
        if timed_out:
            commands.append(Cancel(now, tuple(timed_out), "queue_timeout"))
        ending = [table.allocation(i) for i, _ in table.preemptions_due(now)]
        preempted = [a for a in ending if a is not None and a not in expired]
        for reason in ("preempted", "idle"):
            ids = tuple(
                a.allocation_id
                for a in preempted
                if ("idle" if table.preempting_reason(a.allocation_id) == "idle" else "preempted") == reason
            )
            if ids:
                commands.append(Release(now, ids, reason))
        skip = set(timed_out)
        # One book for the whole tick: what packing shares takes of a queue's quota,
        # the queue pass after it must see, or the two could spend it twice.
        book: QueueBook | None = None
        if table.shares and table.queued_share_count():
            book = self._book(table, inventory, pending, pending_queues)
            packed = self._pack_queued_shares(table, inventory, now, pending, book, skip)
            commands.extend(packed)
            skip.update(c.allocation.request.request_id for c in packed)
        if table.queue_length() > len(skip):
            # GPUs of expired and preempted leases count as free: their Release is ahead in the log.
            released = frozenset(g.ref for a in (*expired, *preempted) for g in a.gpus)
            walk = self._walk(table, inventory, released)
            try:
                walk.close_pending(pending)
                walk.open_released(pending)
                if table.queue_policy.configured:
                    if book is None:
                        book = self._book(table, inventory, pending, pending_queues)
                    commands.extend(self._queue_pass(walk, book, skip, now))
                else:
                    placements = walk.walk(table.queue_groups(), skip=skip)
                    ports: dict[str, set[int]] = {}
                    for request, placement in placements:
                        commands.append(self._grant(request, placement, now, table, inventory, ports))
            finally:
                walk.undo()
        return commands

    def _queue_pass(self, walk: PlanWalk, book: QueueBook, skip: set[str], now: float) -> list[Command]:
        """Placements of a pass under the queue policy, then preemptions for entitled requests left waiting."""
        table = walk.table
        # Leases whose grace ends now are already out of their queues' counts (the
        # book counts leases in their grace period as gone), and their GPUs open.
        result = queue_pass.plan(walk, book, now, skip)
        ports: dict[str, set[int]] = {}
        commands: list[Command] = [
            self._grant(request, placement, now, table, walk.inventory, ports)
            for request, placement in result.placements
        ]
        taken: set[str] = set()
        # Candidates alike in everything victim choice reads, one of which found no
        # victims: the others find none either, as a pass only ever takes victims
        # away (taken, closed GPUs, claims raising the claimant queue's use).
        hopeless: set[tuple[object, ...]] = set()
        for request, planned in result.candidates:
            if request.requirements.is_gang:
                continue  # a gang waits for GPUs to free; it never preempts (docs/shapes.md)
            claim = table.claim(request.request_id)
            if claim is not None and any(table.allocation(v) is not None for v in claim[1]):
                continue  # its victims are in their grace period already
            # Judged again: earlier candidates of this pass may have claimed what it was owed.
            standing = _still_entitled(book, request, planned)
            if standing is None:
                continue
            alike = (
                request.queue_name,
                request.requirements,
                standing,
                request.effective_priority(now, table.queue_policy.age_weight_per_hour),
            )
            if alike in hopeless:
                continue
            preempt = choose_victims(request, standing, table, walk.inventory, walk, book, now, taken)
            if preempt is None:
                hopeless.add(alike)
            else:
                commands.append(preempt)
                book.claim(request)
        return commands

    def _pack_share(
        self,
        request: AllocationRequest,
        table: LeaseTable,
        inventory: Inventory,
        now: float,
        book: QueueBook,
        closed: Collection[GpuRef],
        dead: dict[tuple[object, ...], int] | None = None,
    ) -> Allocate | None:
        """The Allocate that packs share `request` onto a GPU its group shares already, best fit; None when none holds it.

        GPUs in `closed` (in-flight proposals) are passed over: their budget is
        about to change. Joining a GPU the queue counts already costs no quota;
        joining another queue's (cross-queue shares) costs one GPU, so it is
        taken only where the queue rules let the queue have one more.

        Bounded: a share pinned to a node reads that node's GPUs; any other reads
        at most MAX_SHARE_PROBES of its group's GPUs, best fit first, and opens a
        fresh GPU (the ordinary placement) when none of those serves it. `dead`
        (one tick's memo) remembers, per group and constraints, the smallest
        budget that found no GPU: a larger one with the same constraints is not
        looked for again in that tick.
        """
        req = request.requirements
        assert req.share_mb is not None
        queue = request.queue_name
        group = share_group(table.queue_policy, queue)
        # Everything the search reads but the budget; the queue too, for cross-queue quota.
        alike = (group, queue, req.gpu_model, req.min_memory_mb, req.node)
        if dead is not None and req.share_mb >= dead.get(alike, math.inf):
            return None
        may_grow: bool | None = None
        for ref in self._share_fits(table, inventory, group, req):
            view = inventory.get(ref)
            if ref in closed or view is None or not view.schedulable or not req.matches_statically(view):
                continue
            if table.queue_ledger.share_cost(queue, ref):
                if may_grow is None:
                    may_grow = not table.queue_policy.configured or book.classify(request).standing is not Standing.QUOTA
                if not may_grow:
                    continue
                book.used[queue] += 1
                book.total_used += 1
            return self._grant(request, Placement(view.node, (view,)), now, table, inventory, {})
        if dead is not None:
            dead[alike] = min(dead.get(alike, req.share_mb), req.share_mb)
        return None

    @staticmethod
    def _share_fits(table: LeaseTable, inventory: Inventory, group: str, req: Requirements) -> Iterable[GpuRef]:
        """Shared GPUs of `group` with room for `req.share_mb`, best fit first (a bounded read, see `_pack_share`)."""
        assert req.share_mb is not None
        if req.node is None:
            return itertools.islice(table.shares.fits(group, req.share_mb), MAX_SHARE_PROBES)
        shared = table.shares.gpus
        on_node = (
            (gpu.remaining_mb, view.ref)
            for view in inventory.node_views(req.node)
            if (gpu := shared.get(view.ref)) is not None and gpu.group == group and gpu.remaining_mb >= req.share_mb
        )
        return [ref for _, ref in sorted(on_node)]

    def _pack_queued_shares(
        self,
        table: LeaseTable,
        inventory: Inventory,
        now: float,
        pending: Collection[GpuRef],
        book: QueueBook,
        skip: Collection[str],
    ) -> list[Allocate]:
        """Allocates packing waiting shares onto shared GPUs, in rank order, at most one per GPU this pass."""
        closed = set(pending)
        dead: dict[tuple[object, ...], int] = {}
        commands: list[Allocate] = []
        for queued in table.queued_shares():
            if queued.request.request_id in skip:
                continue
            packed = self._pack_share(queued.request, table, inventory, now, book, closed, dead)
            if packed is not None:
                commands.append(packed)
                closed.add(packed.allocation.gpus[0].ref)
        return commands

    @staticmethod
    def next_deadline(table: LeaseTable) -> float | None:
        """The earliest lease expiry or queue deadline, or None when nothing is timed."""
        return table.next_deadline()

    @staticmethod
    def check_satisfiable(request: AllocationRequest, inventory: Inventory) -> None:
        """Raise Unsatisfiable unless some node has enough GPUs matching the request.

        Health and drain are ignored here: a sick GPU may recover, a missing model never appears.
        """
        req = request.requirements
        if req.is_gang:
            _check_gang_satisfiable(req, inventory)
            return
        if req.mig_profile is not None:
            _check_slice_satisfiable(req, inventory)
            return
        if req.node is not None:
            counts = [sum(1 for g in inventory.node_views(req.node) if req.matches_statically(g))]
        else:
            # Nodes of one kind match alike: count per kind, not per node.
            counts = [
                sum(1 for name, memory in kind if _matches_kind(req, name, memory))
                for kind in inventory.kinds()
            ]
        if any(count >= req.gpu_count for count in counts):
            return
        wanted = f"{req.gpu_count} GPU(s) with at least {req.min_memory_mb} MB"
        if req.gpu_model:
            wanted += f" of model {req.gpu_model!r}"
        if req.node:
            wanted += f" on node {req.node!r}"
        largest = max(counts, default=0)
        hint = ""
        if largest and req.node is None:
            # Enough GPUs may exist over several nodes: say how to ask for them.
            hint = f"; to run over several nodes, ask gpus_per_node (at most {largest}) to split it into a gang"
        raise Unsatisfiable(
            f"no node can ever hold {wanted}: the best node has {largest} matching GPU(s){hint}",
            code="unsatisfiable",
        )

    # ------------------------------------------------------------------ planning

    def _walk(
        self, table: LeaseTable, inventory: Inventory, released: frozenset[GpuRef] = frozenset()
    ) -> PlanWalk:
        """A planning pass on the open-GPU index, brought up to date with `table` and `inventory`."""
        if table is not self._table or inventory is not self._inventory:
            self._open = OpenGpus(index_nvlink=self.config.nvlink_first_gpus > 0)
            for node in inventory.nodes():
                self._open.refresh(node, table, inventory)
            self._table, self._inventory = table, inventory
        else:
            changed = set(table.holders_changed_since(self._table_version))
            changed.update(inventory.changed_since(self._inventory_version))
            for node in changed:
                self._open.refresh(node, table, inventory)
        self._table_version, self._inventory_version = table.holder_version, inventory.version
        return PlanWalk(self._open, table, inventory, released, self.config.nvlink_first_gpus)

    def _grant(
        self,
        request: AllocationRequest,
        placement: AnyPlacement,
        now: float,
        table: LeaseTable,
        inventory: Inventory,
        ports: dict[str, set[int]],
    ) -> Allocate:
        """The Allocate for `placement`: one lease, or every member of a gang in one command.

        `ports` holds the rendezvous ports this pass gave out so far, by address
        (the table knows only applied gangs); the gang's is added to it.
        """
        if isinstance(placement, Placement):
            alloc = self._allocation(request, placement, now)
            if request.requirements.is_share:
                alloc = dataclasses.replace(alloc, share_group=share_group(table.queue_policy, request.queue_name))
            return Allocate(now, alloc)
        gang_id = f"{request.service_name}-{self._rng.getrandbits(64):016x}"
        first = placement.members[0].node
        address = inventory.address(first) or first
        low, high = self.config.rendezvous_ports
        in_use = ports.setdefault(address, set())
        in_use |= table.gang_ports_in_use(address)
        # The lowest port no live gang at that address holds; when all are, the lowest (a hint only).
        port = next((p for p in range(low, high + 1) if p not in in_use), low)
        in_use.add(port)
        members = tuple(
            dataclasses.replace(
                self._allocation(request, member, now),
                allocation_id=f"{gang_id}.{rank}",
                gang=GangMembership(gang_id, rank, len(placement.members), address, port, (low, high)),
            )
            for rank, member in enumerate(placement.members)
        )
        return Allocate(now, members[0], members[1:])

    def _allocation(self, request: AllocationRequest, placement: Placement, now: float) -> Allocation:
        ttl = request.ttl_s
        return Allocation(
            allocation_id=f"{request.service_name}-{self._rng.getrandbits(64):016x}",
            request=request,
            node=placement.node,
            gpus=tuple(
                AllocatedGpu(g.node, g.index, g.uuid, g.name, g.memory_total_mb, g.mig_profile, g.parent_uuid)
                for g in placement.gpus
            ),
            allocated_at=now,
            expires_at=now + ttl if ttl > 0 else None,
            topology=placement.topology,
        )


def _still_entitled(book: QueueBook, request: AllocationRequest, planned: Standing) -> Standing | None:
    """The standing a preemption candidate has now, or None when it no longer may preempt."""
    standing = book.classify(request).standing
    if standing is Standing.QUOTA:
        return None
    if standing is Standing.GUARANTEED:
        return standing
    if planned is Standing.PRIORITY:
        return planned
    if book.used[request.queue_name] + request.requirements.gpu_count <= book.fair_share(request.queue_name) + 1e-9:
        return Standing.BORROW
    return None


def _check_gang_satisfiable(req: Requirements, inventory: Inventory) -> None:
    """Raise Unsatisfiable unless `req.nodes` nodes could each ever hold `req.gpu_count` matching GPUs.

    Counted per node kind (a handful), never per node.
    """
    capable = sum(
        nodes
        for kind, nodes in inventory.kind_counts().items()
        if sum(1 for name, memory in kind if _matches_kind(req, name, memory)) >= req.gpu_count
    )
    if capable >= req.nodes:
        return
    wanted = f"{req.nodes} nodes with {req.gpu_count} GPU(s) of at least {req.min_memory_mb} MB each"
    if req.gpu_model:
        wanted += f" of model {req.gpu_model!r}"
    raise Unsatisfiable(
        f"the cluster can never hold a gang of {wanted}: {capable} node(s) could hold one member",
        code="unsatisfiable",
    )


def _check_slice_satisfiable(req: Requirements, inventory: Inventory) -> None:
    """Raise Unsatisfiable unless some MIG slice could serve `req` (one slice: no count to reach).

    Looks at the cluster's kinds of slice, not its nodes, unless `req` names a node.
    """
    if req.node is not None:
        if any(req.matches_statically(g) for g in inventory.node_views(req.node)):
            return
    elif any(
        req.matches_unit(profile) and _matches_kind(req, name, memory) for profile, name, memory in inventory.slice_kinds()
    ):
        return
    kinds = inventory.slice_kinds()
    profiles = sorted({p for p, _, _ in kinds}, key=profile_memory_order)
    exists = (
        "the cluster has no MIG slices (no GPU in MIG mode with instances)"
        if not profiles
        else "MIG slices that exist: " + ", ".join(
            f"{p} ({', '.join(sorted({f'{n}, {m} MB' for q, n, m in kinds if q == p}))})" for p in profiles
        )
    )
    wanted = "a MIG slice" if req.mig_profile == MIG_ANY else f"a MIG slice of profile {req.mig_profile!r}"
    if req.min_memory_mb:
        wanted += f" with at least {req.min_memory_mb} MB"
    if req.gpu_model:
        wanted += f" of model {req.gpu_model!r}"
    if req.node:
        wanted += f" on node {req.node!r}"
    raise Unsatisfiable(f"no node can ever hold {wanted}: {exists}", code="unsatisfiable")


def _matches_kind(req: Requirements, name: str, memory_mb: int) -> bool:
    """Requirements.matches_statically for a GPU known by name and memory, on a node `req` allows."""
    if req.gpu_model is not None and req.gpu_model.lower() not in name.lower():
        return False
    return memory_mb >= req.min_memory_mb
