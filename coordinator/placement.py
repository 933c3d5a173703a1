"""One planning pass of the scheduler, on indexes instead of the whole cluster.

Theory of operation
-------------------
The policy is scheduler.py's: walk requests in rank order; each is placed by
best fit or reserves GPUs against lower-ranked work. What this module changes
is only how much of the cluster each step looks at.

`OpenGpus` keeps, for every node, its *open* GPUs (in the inventory,
schedulable, held by no lease), and buckets the nodes by how many they have.
Only open GPUs can be candidates, reserved, or counted as "free left", so a
node with none is never looked at, and best fit reads nodes in increasing
order of open GPUs, which is its second sort key. The scheduler keeps one
`OpenGpus` current from the table's and the inventory's change journals.

A `PlanWalk` borrows it for one pass: pending GPUs are closed, GPUs of leases
expiring in this tick are opened, every placement or reservation closes more,
and `undo()` puts back the nodes it touched. Answers stay exact because of
three facts about a pass:

- The set of open GPUs only shrinks while requests are walked, and which GPU
  is eligible for which requirements does not change. So requirements that
  failed best fit once fail it for the rest of the pass, and requirements
  that failed and reserved nothing will do exactly that again: such
  requirements are *dead*, and the walk drops every later request with them.
- Once no GPU is open, every later request fails and reserves nothing, so
  the walk stops.
- Best fit's score starts with (degraded GPUs chosen, free GPUs left), and
  "free GPUs left" is the node's open count minus the need: a node with a
  healthy fit in a lower bucket beats every node in higher buckets, and
  inside a bucket nodes come in name order, so the first one reaching the
  lowest possible memory sum wins.

Which GPUs on the chosen node: best fit's rules say which are interchangeable
(equal health and memory, at the edge of the smallest adequate ones); where
the node has reported its topology, coordinator/topology.py picks among those
the best-connected set, leaving the rest best connected. By default that
only happens for the winning node, so the node choice and its cost are best
fit's alone.

NVLink first (`nvlink_first_gpus` = k, off by default): when a request of k
or more GPUs gets a set on best fit's node that is not all-NVLink, the nodes
that strand as many GPUs are asked too, and the first (least memory, then
name) with as few degraded GPUs where the set is all-NVLink wins. `OpenGpus`
files each node under its largest NVLink-joined set of open GPUs
(`nvlink_nodes`, kept with the rest of the index while the rule is on), so
only nodes filed under k or more with best fit's open count are looked at: at
most one bucket, and only for requests best fit left off NVLink. Stranding
stays before links: a
4-GPU job never takes a whole HGX host to leave an exact fit free
(docs/benchmarks.md has the cost and why it is off).

A gang (several nodes at once) is placed and reserves by the same walk, with
its own node search (coordinator/gang_placement.py, bounded per request).

Each request stepped gets a *turn*, its precedence in the pass, and the walk
remembers which GPUs each turn reserved. Victim search (preemption.py) runs
after the whole pass, when a candidate's own reservation has closed the free
GPUs it could use: `yielding` gives them back to it, with those reserved by
later turns (lower precedence: the reservation is only this pass's), never
those of a turn ahead of it.

MIG slices (coordinator/mig.py) are open units like GPUs, and `OpenGpus`
also files each node under every kind of slice it has open. A slice request
(`Requirements.mig_profile`) wants the smallest adequate slice first, so it
walks those kinds smallest first instead of the count buckets, stopping at
the first healthy fit (`PlanWalk._slice_fit`): its cost is the few kinds it
matches plus the nodes it looks at, never the cluster. Whole-GPU requests
never match a slice; on a cluster without MIG the slice index stays empty
and nothing else changes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator

from sortedcontainers import SortedList

from coordinator.gang_placement import GangPlacement, best_gang_fit, gang_reservation
from coordinator.inventory import Inventory
from coordinator.mig import profile_memory_order
from coordinator.topology import NodeTopology
from coordinator.lease_table import LeaseTable
from coordinator.model import (
    HEALTHY,
    AllocationRequest,
    AllocationTopology,
    GpuRef,
    GpuView,
    QueuedRequest,
    Requirements,
)

# Seconds after a release during which a GPU's telemetry still speaks of the previous
# tenant: the release is stamped when proposed, before the device layer hears of it,
# and a job's memory and activity take a moment to drain. Two default sample
# intervals cover both.
RELEASE_GRACE_S = 2.0

# A kind of open MIG slice, as OpenGpus indexes it: (total memory, profile, name).
SliceKind = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one request goes: a node and the GPUs chosen there (with how they are wired, when known)."""

    node: str
    gpus: tuple[GpuView, ...]
    topology: AllocationTopology | None = None


# What a step places: one node's GPUs, or a gang's on several nodes.
AnyPlacement = Placement | GangPlacement


class OpenGpus:
    """Each node's open GPUs (index order), the nodes bucketed by how many they have, by kind of open MIG
    slice, and by how many open GPUs NVLink joins."""

    def __init__(self, index_nvlink: bool = True) -> None:
        """`index_nvlink`: keep `nvlink_nodes` (only NVLink first reads it; off, a change costs no set search)."""
        self._index_nvlink_sets = index_nvlink
        self.by_node: dict[str, tuple[GpuView, ...]] = {}
        # count -> node names with exactly that many open GPUs (never 0), sorted.
        self.buckets: dict[int, SortedList[str]] = {}
        self.total = 0
        # Kind of MIG slice -> (open units, name) of the nodes with an open slice of it, sorted.
        self.slice_nodes: dict[SliceKind, SortedList[tuple[int, str]]] = {}
        # n >= 2 -> (open GPUs, name) of the nodes whose largest set of open whole GPUs joined
        # pair by pair by NVLink has exactly n GPUs (topology.largest_nvlink_set), sorted.
        self.nvlink_nodes: dict[int, SortedList[tuple[int, str]]] = {}
        self._nvlink: dict[str, tuple[int, int]] = {}

    def set(self, node: str, views: tuple[GpuView, ...], topology: NodeTopology | None) -> None:
        """Make `views` the open GPUs of `node` (empty: none), wired as `topology` says (None: unknown)."""
        old = self.by_node.get(node, ())
        if self._index_nvlink_sets:
            # Before the early return: a node's wiring may change while its open GPUs stay.
            self._index_nvlink(node, views, topology)
        if old == views:
            return
        self._index_slices(node, old, views)
        if len(old) != len(views):
            if old:
                bucket = self.buckets[len(old)]
                bucket.remove(node)
                if not bucket:
                    del self.buckets[len(old)]
            if views:
                self.buckets.setdefault(len(views), SortedList()).add(node)
            self.total += len(views) - len(old)
        if views:
            self.by_node[node] = views
        else:
            self.by_node.pop(node, None)

    def _index_nvlink(self, node: str, views: tuple[GpuView, ...], topology: NodeTopology | None) -> None:
        """File `node` in `nvlink_nodes` under its largest NVLink-joined set of open whole GPUs (if 2 or more)."""
        joined = 0
        if topology is not None and len(views) > 1:
            joined = topology.largest_nvlink_set([v.index for v in views if v.mig_profile is None])
        entry = (joined, len(views)) if joined > 1 else None
        old = self._nvlink.get(node)
        if old == entry:
            return
        if old is not None:
            entries = self.nvlink_nodes[old[0]]
            entries.remove((old[1], node))
            if not entries:
                del self.nvlink_nodes[old[0]]
            del self._nvlink[node]
        if entry is not None:
            self.nvlink_nodes.setdefault(entry[0], SortedList()).add((entry[1], node))
            self._nvlink[node] = entry

    def _index_slices(self, node: str, old: tuple[GpuView, ...], views: tuple[GpuView, ...]) -> None:
        """Move `node` in `slice_nodes` from what `old` gave it to what `views` does (nothing without slices)."""
        for kind in {_slice_key(v) for v in old if v.mig_profile is not None}:
            entries = self.slice_nodes[kind]
            entries.remove((len(old), node))
            if not entries:
                del self.slice_nodes[kind]
        for kind in {_slice_key(v) for v in views if v.mig_profile is not None}:
            self.slice_nodes.setdefault(kind, SortedList()).add((len(views), node))

    def refresh(self, node: str, table: LeaseTable, inventory: Inventory) -> None:
        """Recompute `node`'s open GPUs from the inventory and the table's holders."""
        self.set(
            node,
            tuple(v for v in inventory.node_views(node) if v.schedulable and table.holder(v.ref) is None),
            inventory.topology(node),
        )


@dataclass(slots=True)
class _Shape:
    """What one pass has learnt about a set of requirements."""

    failed_fit: bool = False
    dead: bool = False
    # Lowest possible memory sum of a placement (best fit's third key), or None: not worked out yet.
    memory_bound: int | None = None


@dataclass(slots=True)
class PlanWalk:
    """One planning pass over `open`, undone by `undo()`."""

    open: OpenGpus
    table: LeaseTable
    inventory: Inventory
    released: frozenset[GpuRef] = frozenset()
    # Requests of this many GPUs or more (at least 2; 0: none) take, among the
    # nodes best fit finds equal in health and GPUs stranded, one where their
    # set is all-NVLink (SchedulerConfig.nvlink_first_gpus).
    nvlink_first_gpus: int = 0
    # Each request's turn in this pass: the order it was stepped (or passed over
    # as a preemption candidate) in, which is the order of precedence.
    turns: dict[str, int] = field(default_factory=dict)
    # Open GPUs reserved in this pass, per node, with the turn of the request
    # that reserved them: a preemption candidate may count those of its own turn
    # and later ones (`yielding`), never those of a request ahead of it.
    _reserved: dict[str, dict[GpuRef, tuple[int, GpuView]]] = field(default_factory=dict)
    # The most GPUs reserved on one node: a bound for victim search.
    most_reserved: int = 0
    # The open GPUs each request that failed best fit reserved in this pass, by request id.
    _reserved_for: dict[str, list[GpuView]] = field(default_factory=dict)
    _next_turn: int = 0
    _saved: dict[str, tuple[GpuView, ...]] = field(default_factory=dict)
    _shapes: dict[Requirements, _Shape] = field(default_factory=dict)

    # ------------------------------------------------------------------ setup and undo

    def close_pending(self, pending: Collection[GpuRef]) -> None:
        """Treat `pending` GPUs as taken (their proposals are in flight)."""
        for ref in pending:
            views = self.open.by_node.get(ref.node, ())
            if any(v.ref == ref for v in views):
                self._set(ref.node, tuple(v for v in views if v.ref != ref))

    def open_released(self, pending: Collection[GpuRef]) -> None:
        """Treat `released` GPUs (expiring in this tick) as free, unless pending."""
        for ref in sorted(self.released):
            view = self.inventory.get(ref)
            if view is None or not view.schedulable or ref in pending:
                continue
            views = self.open.by_node.get(ref.node, ())
            if view not in views:
                self._set(ref.node, tuple(sorted((*views, view), key=lambda v: v.index)))

    def undo(self) -> None:
        """Give `open` back as it was before this pass."""
        for node, views in self._saved.items():
            self.open.set(node, views, self.inventory.topology(node))
        self._saved.clear()
        self._reserved.clear()
        self._reserved_for.clear()
        self.turns.clear()
        self.most_reserved = 0
        self._next_turn = 0

    def _set(self, node: str, views: tuple[GpuView, ...]) -> None:
        if node not in self._saved:
            self._saved[node] = self.open.by_node.get(node, ())
        self.open.set(node, views, self.inventory.topology(node))

    def _take(self, node: str, refs: Collection[GpuRef]) -> None:
        self._set(node, tuple(v for v in self.open.by_node[node] if v.ref not in refs))

    # ------------------------------------------------------------------ walking

    def walk(
        self, groups: Iterable[Iterable[QueuedRequest]], skip: Collection[str] = ()
    ) -> list[tuple[AllocationRequest, AnyPlacement]]:
        """Place or reserve for each request of `groups`, merged in rank order.

        Each group holds requests with equal requirements, in rank order, so a
        group whose requirements die is dropped whole. Requests in `skip` are
        passed over. Returns the placements, in rank order.
        """
        heap: list[tuple[tuple[float, float, str], int, QueuedRequest, Iterator[QueuedRequest]]] = []
        for seq, group in enumerate(groups):
            members = iter(group)
            head = next(members, None)
            if head is not None:
                heap.append((self.table.rank_key(head.request), seq, head, members))
        heapq.heapify(heap)
        placements: list[tuple[AllocationRequest, AnyPlacement]] = []
        while heap and self.open.total:
            _, seq, queued, members = heap[0]
            request = queued.request
            shape = self._shape(request.requirements)
            if shape.dead:
                heapq.heappop(heap)
                continue
            if request.request_id not in skip:
                placement = self.step(request)
                if placement is not None:
                    placements.append((request, placement))
            following = next(members, None)
            if following is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (self.table.rank_key(following.request), seq, following, members))
        return placements

    def step(self, request: AllocationRequest) -> AnyPlacement | None:
        """Place `request` (taking its GPUs) or let it reserve; returns the placement or None."""
        req = request.requirements
        shape = self._shape(req)
        if shape.dead:
            return None
        turn = self.take_turn(request.request_id)
        placement = None if shape.failed_fit else self.best_fit(request)
        if placement is not None:
            for member in placement.members if isinstance(placement, GangPlacement) else (placement,):
                self._take(member.node, {g.ref for g in member.gpus})
            return placement
        shape.failed_fit = True
        reserved = gang_reservation(self, request) if req.is_gang else [self._reservation(request)]
        if not any(node is not None for node, _ in reserved):
            shape.dead = True
        for node, refs in reserved:
            if node is not None:
                held = self._reserved.setdefault(node, {})
                mine = self._reserved_for.setdefault(request.request_id, [])
                for view in self.open.by_node[node]:
                    if view.ref in refs:
                        held[view.ref] = (turn, view)
                        mine.append(view)
                self.most_reserved = max(self.most_reserved, len(held))
                self._take(node, refs)
        return None

    def reserved_for(self, request_id: str) -> list[GpuView]:
        """The open GPUs `request_id` reserved when it failed best fit in this pass (empty when none)."""
        return self._reserved_for.get(request_id, [])

    def take_turn(self, request_id: str) -> int:
        """Give `request_id` the next turn of this pass (see `turns`) and return it."""
        turn = self.turns[request_id] = self._next_turn
        self._next_turn += 1
        return turn

    def yielding(self, node: str, request: AllocationRequest) -> list[GpuView]:
        """GPUs on `node` reserved in this pass by `request` or by requests after it, eligible for it.

        Open GPUs at `request`'s turn that only its own reservation or a
        lower-precedence one closed: a preemption for it may count them as its
        own. Empty for a request that had no turn in this pass.
        """
        turn = self.turns.get(request.request_id)
        held = self._reserved.get(node)
        if turn is None or not held:
            return []
        return [view for at, view in held.values() if at >= turn and self._eligible(view, request)]

    def is_dead(self, req: Requirements) -> bool:
        """Whether `req` has failed and reserved nothing in this pass (so it always will)."""
        return self._shape(req).dead

    def _shape(self, req: Requirements) -> _Shape:
        shape = self._shapes.get(req)
        if shape is None:
            shape = self._shapes[req] = _Shape()
        return shape

    # ------------------------------------------------------------------ one request

    def best_fit(self, request: AllocationRequest) -> AnyPlacement | None:
        """The best-fit placement of `request` on the open GPUs, or None when it fits nowhere.

        A gang's is a GangPlacement (gang_placement.py); every other request's a Placement.
        """
        req = request.requirements
        if req.is_gang:
            return best_gang_fit(self, request, self.inventory.labels())
        need = req.gpu_count
        best: tuple[tuple[int, int, int, str], Placement] | None = None
        if req.node is not None:
            views = self.open.by_node.get(req.node, ())
            if len(views) >= need:
                best = self._fit(request, req.node, views)
            return None if best is None else self._wired(request, best[1])
        if req.mig_profile is not None:
            return self._slice_fit(request)
        shape = self._shape(req)
        if shape.memory_bound is None:
            smallest = self.inventory.smallest_memory_at_least(req.min_memory_mb)
            shape.memory_bound = need * (smallest or 0)
        for count in sorted(c for c in self.open.buckets if c >= need):
            for node in self.open.buckets[count]:
                fit = self._fit(request, node, self.open.by_node[node])
                if fit is not None and (best is None or fit[0] < best[0]):
                    best = fit
                    if fit[0][0] == 0 and fit[0][2] <= shape.memory_bound:
                        # Nothing later in this bucket can beat it: same first two keys at
                        # best, the least memory possible, and later names.
                        break
            if best is not None and best[0][0] == 0:
                # No degraded GPU: every node in a later bucket leaves more GPUs free.
                break
        if best is None:
            return None
        chosen = self._wired(request, best[1])
        if not 1 < self.nvlink_first_gpus <= need or self._is_all_nvlink(chosen):
            return chosen
        linked = self._nvlink_fit(request, best[0], shape.memory_bound)
        return chosen if linked is None else linked

    def _nvlink_fit(
        self, request: AllocationRequest, score: tuple[int, int, int, str], memory_bound: int | None
    ) -> Placement | None:
        """An all-NVLink placement of `request` as good for best fit's first keys as `score`, or None.

        The candidates are the nodes filed in `OpenGpus.nvlink_nodes` under
        `gpu_count` or more whose open count strands as many GPUs as `score`'s
        node does, read in name order; among those where the set `_wired`
        takes is all-NVLink, best fit's key decides (the same health, then the
        least memory, the name), so the first reaching `memory_bound` wins.
        """
        need = request.requirements.gpu_count
        count = need + score[1]
        streams = [
            nodes.irange((count, ""), (count + 1, ""), inclusive=(True, False))
            for joined, nodes in self.open.nvlink_nodes.items()
            if joined >= need
        ]
        best: tuple[tuple[int, int, int, str], Placement] | None = None
        for _, node in heapq.merge(*streams):
            fit = self._fit(request, node, self.open.by_node[node])
            if fit is None or fit[0][0] > score[0] or (best is not None and fit[0] >= best[0]):
                continue
            wired = self._wired(request, fit[1])
            if self._is_all_nvlink(wired):
                best = (fit[0], wired)
                if fit[0][2] <= (memory_bound or 0):
                    break  # later names can at most tie on memory
        return None if best is None else best[1]

    def _is_all_nvlink(self, placement: Placement) -> bool:
        topology = self.inventory.topology(placement.node)
        return topology is not None and topology.all_nvlink([g.index for g in placement.gpus])

    def member_fit(self, request: AllocationRequest, node: str) -> tuple[tuple[int, int, int, str], Placement] | None:
        """Best fit's (score, placement) of `request`'s GPUs on `node` alone (one gang member), or None."""
        return self._fit(request, node, self.open.by_node.get(node, ()))

    def wired(self, request: AllocationRequest, placement: Placement) -> Placement:
        """`placement` with its GPUs chosen by its node's topology (see `_wired`)."""
        return self._wired(request, placement)

    def capable(self, req: Requirements, node: str) -> bool:
        """Whether `node` has enough schedulable GPUs matching `req` (one node's share), free or not."""
        return self._capable(req, node)

    def eligible_refs(self, request: AllocationRequest, node: str) -> set[GpuRef]:
        """`node`'s open GPUs eligible for `request` now."""
        return self._eligible_refs(request, node)

    def _slice_fit(self, request: AllocationRequest) -> Placement | None:
        """The best MIG slice for `request`: healthy first, then the smallest, then on the node with the fewest open units.

        Walks the kinds of open slice `request` matches, smallest first, and in
        each the nodes with one open, fewest open units first: the first healthy
        fit found is the best (a smaller slice on the same node would have
        matched an earlier kind, which found none). A degraded fit is kept only
        while no healthy one turns up. Cost: the matching kinds (a handful) plus
        the nodes looked at, which end at the first healthy fit.
        """
        req = request.requirements
        kinds = sorted(
            (k for k in self.open.slice_nodes if req.matches_unit(k[1]) and _kind_matches(req, k)),
            key=lambda k: (k[0], profile_memory_order(k[1]), k[2]),
        )
        best: tuple[tuple[int, int, int, str], Placement] | None = None
        seen: set[str] = set()
        for kind in kinds:
            for count, node in self.open.slice_nodes[kind]:
                if node in seen:
                    continue
                seen.add(node)
                fit = self._fit(request, node, self.open.by_node[node])
                if fit is None:
                    continue
                degraded, free_left, memory, name = fit[0]
                score = (degraded, memory, free_left, name)
                if best is None or score < best[0]:
                    best = (score, fit[1])
                if degraded == 0:
                    return best[1]
        return None if best is None else best[1]

    def _fit(
        self, request: AllocationRequest, node: str, views: tuple[GpuView, ...]
    ) -> tuple[tuple[int, int, int, str], Placement] | None:
        need = request.requirements.gpu_count
        candidates = [g for g in views if self._eligible(g, request)]
        if len(candidates) < need:
            return None
        candidates.sort(key=lambda g: (_fit_key(g), g.index))
        chosen = tuple(sorted(candidates[:need], key=lambda g: g.index))
        degraded = sum(1 for g in chosen if g.health != HEALTHY)
        free_left = len(views) - need
        score = (degraded, free_left, sum(g.memory_total_mb for g in chosen), node)
        return score, Placement(node, chosen)

    def _wired(self, request: AllocationRequest, placement: Placement) -> Placement:
        """`placement` with its GPUs chosen by the node's topology, where the node reported one.

        Best fit's GPUs are the smallest adequate ones: those strictly below the
        edge (the largest fit key chosen) must be taken, and any GPUs at the edge
        may serve for the rest. The topology picks among those, so the degraded
        count and the memory sum, and with them the node's score, stay the same.
        """
        topology = self.inventory.topology(placement.node)
        if topology is None or request.requirements.mig_profile is not None:
            # A slice is one unit inside one GPU: there are no links to weigh.
            return placement
        views = self.open.by_node[placement.node]
        edge = max(_fit_key(g) for g in placement.gpus)
        candidates = [g for g in views if self._eligible(g, request)]
        forced = [g.index for g in candidates if _fit_key(g) < edge]
        ties = [g.index for g in candidates if _fit_key(g) == edge]
        chosen = topology.best_set(forced, ties, len(placement.gpus), [g.index for g in views])
        by_index = {g.index: g for g in candidates}
        return Placement(placement.node, tuple(by_index[i] for i in chosen), topology.describe(chosen))

    def _reservation(self, request: AllocationRequest) -> tuple[str | None, set[GpuRef]]:
        """The node where `request` is closest to fitting and its eligible open GPUs there.

        Closest: the most eligible open GPUs, then the node name, among the nodes
        with enough schedulable GPUs matching it (taken or not). (None, empty set)
        when no such node has an eligible open GPU.
        """
        req = request.requirements
        if req.node is not None:
            refs = self._eligible_refs(request, req.node)
            return (req.node, refs) if refs and self._capable(req, req.node) else (None, set())
        best_node: str | None = None
        best_refs: set[GpuRef] = set()
        for count in sorted(self.open.buckets, reverse=True):
            if count < len(best_refs):
                break
            for node in self.open.buckets[count]:
                refs = self._eligible_refs(request, node)
                if not refs or len(refs) < len(best_refs):
                    continue
                if best_node is not None and len(refs) == len(best_refs) and node > best_node:
                    continue
                if self._capable(req, node):
                    best_node, best_refs = node, refs
                    if len(refs) == count:
                        break  # later names in this bucket can at most tie
        return best_node, best_refs

    def _capable(self, req: Requirements, node: str) -> bool:
        """Whether `node` has enough schedulable GPUs matching `req`, free or not."""
        capable = sum(
            1 for g in self.inventory.node_views(node) if g.schedulable and req.matches_statically(g)
        )
        return capable >= req.gpu_count

    def _eligible_refs(self, request: AllocationRequest, node: str) -> set[GpuRef]:
        return {g.ref for g in self.open.by_node.get(node, ()) if self._eligible(g, request)}

    def eligible(self, gpu: GpuView, request: AllocationRequest) -> bool:
        """Whether open `gpu` may serve `request` now."""
        return self._eligible(gpu, request)

    def close_open(self, node: str, request: AllocationRequest) -> None:
        """Close `node`'s open GPUs eligible for `request`, and those `yielding` to it: held for it until its victims leave."""
        held = self._reserved.get(node)
        if held:
            for view in self.yielding(node, request):
                del held[view.ref]
        refs = self._eligible_refs(request, node)
        if refs:
            self._take(node, refs)

    def _eligible(self, gpu: GpuView, request: AllocationRequest) -> bool:
        """Whether `gpu`, known to be open, may serve `request` now."""
        req = request.requirements
        if not gpu.schedulable or not req.matches_statically(gpu):
            return False
        # Telemetry from before (or just after) the last release describes the previous tenant.
        last_release = self.table.released_at(gpu.ref)
        stale = gpu.ref in self.released or (
            last_release > 0 and gpu.sampled_at <= last_release + RELEASE_GRACE_S
        )
        if stale:
            return True
        if gpu.memory_free_mb is not None and gpu.memory_free_mb < req.min_memory_mb:
            return False
        if gpu.utilization_pct is not None and gpu.utilization_pct > req.max_utilization:
            return False
        return True


def _slice_key(view: GpuView) -> SliceKind:
    """An open slice's kind in `OpenGpus.slice_nodes`: memory first, so kinds sort smallest first."""
    return (view.memory_total_mb, view.mig_profile or "", view.name)


def _kind_matches(req: Requirements, kind: SliceKind) -> bool:
    """Requirements.matches_statically for any slice of `kind`, leaving the node aside."""
    memory, _, name = kind
    if req.gpu_model is not None and req.gpu_model.lower() not in name.lower():
        return False
    return memory >= req.min_memory_mb


def _fit_key(gpu: GpuView) -> tuple[bool, int]:
    """Best fit's order of GPUs within a node: healthy first, then the least memory."""
    return (gpu.health != HEALTHY, gpu.memory_total_mb)
