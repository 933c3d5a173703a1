"""Victim choice: the smallest set of leases whose GPUs make a waiting request fit.

Theory of operation
-------------------
A candidate from the queue pass (queue_pass.py) is entitled to GPUs it cannot
get from what is free: it is within its queue's guarantee, or borrowing below
its queue's fair share. A running lease may be taken for it when the lease is
preemptible, not already in its grace period, and either

- **borrowed**: its queue holds more than its guarantee even without it (and
  so does its parent, when the parent has a guarantee), and the candidate is
  within guarantee, or the lease's queue stays at or above its own fair share
  without it (reclaim toward fair share) - so work within a guarantee is
  never taken by borrowed work; or
- **lower priority** by at least `preemption_priority_gap`, when it is
  borrowed, or when it is of the candidate's own queue and the candidate is
  within guarantee (priority order inside a queue).

Victim search weighs a bounded few nodes (`_nodes_to_probe`): the node where
the pass reserved free GPUs for the candidate, up to MAX_VICTIM_NODES with the
most open GPUs (for a multi-GPU request), and the nodes of the first
MAX_VICTIM_NODES-worth of leases in victim order - reclaimable queues first,
then lowest priority, then youngest - read lazily from the ledger's per-queue
index. On each such node, its leases that may be taken are added in order -
borrowed first, then lower priority, then youngest (least work lost) - until
the node's free eligible GPUs plus theirs make the request fit. Free GPUs are
those still open after the pass plus those the pass reserved for the
candidate itself or for requests after it (`PlanWalk.yielding`): a whole-node
request that reserved a node's 6 free GPUs needs only the 2 borrowed leases
there, and a free GPU held for a request ahead of it is never counted; then
any lease whose removal keeps the fit is dropped again, so the set is
minimal. Among the nodes weighed, the one with the fewest victims wins, then
fewest GPUs taken, then least work lost (GPU-seconds since each victim
started), then name. A fleet where the only set lies on a node none of the
sources names (no open GPU there, no early lease in victim order) finds none
in that pass; the pass after it weighs the nodes again as leases come and go.
No set, no
preemption: nothing is ever taken that would not make the request fit.

Each victim gets its own queue's `preemption_grace_s`. The free GPUs counted
on that node are closed in the walk (and no longer yield to anyone), and the victims counted as gone from
their queues (`QueueBook.give_back`), so a later candidate of the same pass
neither counts them again nor takes a queue below its guarantee.

A lease that is a gang's member (coordinator/gang_placement.py) is taken
with its whole gang (the lease table widens the victims): it counts with all
the gang's GPUs against its queue's floor, and all its members are taken.

Cost: at most 2 x MAX_VICTIM_NODES + 1 nodes and their leases per candidate,
whatever the fleet (python -m tests.bench.bench_victim_search: flat from 100 to
1,000 hosts, where reading every borrowed lease grew 2x per doubling), plus
the leases passed over in the index as already going or not preemptible. A
node whose free GPUs plus its leases' cannot reach the request is passed on a
count, before any lease on it is judged.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from coordinator.commands import Preempt
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import Allocation, AllocationRequest, GpuRef
from coordinator.placement import PlanWalk
from coordinator.queue_rules import QueueBook, Standing

# Nodes victim search weighs per source (see _nodes_to_probe): enough that a set is
# found where one exists in all but rare fleets, few enough that one search costs
# the same at 1,000 hosts as at 100.
MAX_VICTIM_NODES = 32


@dataclass(frozen=True, slots=True)
class _Candidate:
    alloc: Allocation
    reclaim: bool
    # GPUs of the lease that could serve the request.
    useful: int
    # GPUs its queue must keep after the set is taken (its guarantee, or its fair
    # share for a reclaim toward fair share); None for the claimant's own queue.
    floor: float | None
    # Every lease taken with it: itself, or its whole gang.
    unit: tuple[Allocation, ...]

    @property
    def gpus(self) -> int:
        """GPUs its queue loses when it is taken (a gang's on every node)."""
        return sum(len(m.gpus) for m in self.unit)

    def work(self, now: float) -> float:
        """GPU-seconds of work lost when it is taken (every lease of its unit, since each started)."""
        return sum(len(m.gpus) * max(0.0, now - m.allocated_at) for m in self.unit)

    def order(self) -> tuple[int, int, float, str]:
        return (0 if self.reclaim else 1, self.alloc.request.priority, -self.alloc.allocated_at, self.alloc.allocation_id)


def choose_victims(
    request: AllocationRequest,
    standing: Standing,
    table: LeaseTable,
    inventory: Inventory,
    walk: PlanWalk,
    book: QueueBook,
    now: float,
    taken: set[str],
) -> Preempt | None:
    """A Preempt that makes `request` fit, or None when no allowed set of victims does."""
    policy = book.policy
    gap = policy.preemption_priority_gap
    effective = request.effective_priority(now, policy.age_weight_per_hour)
    own = request.queue_name
    need = request.requirements.gpu_count
    below_fair = book.used[own] + need <= book.fair_share(own) + 1e-9
    queues = _victim_queues(book, own, standing, gap)
    threshold = effective - gap if gap > 0 else None
    if _too_few(book, queues, own, standing, below_fair, threshold, walk, need):
        return None
    reclaimable = {q for q in queues if _may_reclaim(book, q, own, standing, below_fair)}
    victim_queues = set(queues)

    def looked_at(alloc: Allocation) -> bool:
        """Whether `alloc` is a lease victim search may weigh for `request` (the checks that need no node)."""
        queue = alloc.request.queue_name
        if queue not in victim_queues or alloc.allocation_id not in book.ledger.leases.get(queue, ()):
            return False
        if queue not in reclaimable and (threshold is None or alloc.request.priority > math.floor(threshold)):
            return False
        if alloc.allocation_id in taken or not alloc.request.preemptible:
            return False
        if table.preempting(alloc.allocation_id) is not None:
            return False
        return alloc.gang is None or not any(m.allocation_id in taken for m in table.lease_unit(alloc.allocation_id))

    leases_by_node: dict[str, list[tuple[Allocation, tuple[Allocation, ...]]]] = {}
    for node in _nodes_to_probe(request, book, queues, reclaimable, threshold, table, walk, looked_at):
        leases_by_node[node] = [
            (alloc, table.lease_unit(alloc.allocation_id) if alloc.gang is not None else (alloc,))
            for alloc in table.allocations_on(node)
            if looked_at(alloc)
        ]
    best: tuple[tuple[int, int, float, str], list[_Candidate]] | None = None
    for node in sorted(leases_by_node):
        # GPUs the request's own reservation (or a later request's) closed in this pass are its own to count.
        have = sum(1 for g in walk.open.by_node.get(node, ()) if walk.eligible(g, request))
        have += len(walk.yielding(node, request))
        if have >= need or have + sum(len(alloc.gpus) for alloc, _ in leases_by_node[node]) < need:
            continue  # fits without preemption (the pass places it), or cannot fit even with every lease here
        candidates = _candidates(leases_by_node[node], request, standing, book, inventory, effective, gap, below_fair)
        chosen = _minimal_set(sorted(candidates, key=_Candidate.order), need - have, book)
        if chosen is None:
            continue
        score = (len(chosen), sum(c.gpus for c in chosen), sum(c.work(now) for c in chosen), node)
        if best is None or score < best[0]:
            best = (score, chosen)
    if best is None:
        return None
    chosen = best[1]
    node = chosen[0].alloc.node
    for c in chosen:
        for member in c.unit:
            taken.add(member.allocation_id)
        book.give_back(c.alloc.request.queue_name, tuple(g.name for m in c.unit for g in m.gpus))
    walk.close_open(node, request)
    victims = tuple(
        sorted(
            (c.alloc.allocation_id, now + policy.spec(c.alloc.request.queue_name).preemption_grace_s) for c in chosen
        )
    )
    reason = "reclaim" if any(c.reclaim for c in chosen) else "priority"
    return Preempt(now, victims, reason, request.request_id, node)


def _candidates(
    leases: list[tuple[Allocation, tuple[Allocation, ...]]],
    request: AllocationRequest,
    standing: Standing,
    book: QueueBook,
    inventory: Inventory,
    effective: float,
    gap: int,
    below_fair: bool,
) -> list[_Candidate]:
    """The leases of one node that may be taken for `request` and free a GPU that serves it."""
    out: list[_Candidate] = []
    for alloc, unit in leases:
        gpus = sum(len(m.gpus) for m in unit)
        reclaim, allowed, floor = _allowed(alloc, gpus, request, standing, book, effective, gap, below_fair)
        if not allowed:
            continue
        useful = sum(1 for g in alloc.gpus if _serves(inventory, g.node, g.index, request))
        if useful:
            out.append(_Candidate(alloc, reclaim, useful, floor, unit))
    return out


def _may_reclaim(book: QueueBook, queue: str, own: str, standing: Standing, below_fair: bool) -> bool:
    """Whether any lease of `queue` may be taken whatever its priority (a reclaim), not only lower ones."""
    if queue == own or standing is Standing.PRIORITY:
        return False
    return standing is Standing.GUARANTEED or (below_fair and book.held[queue] - book.fair_share(queue) >= 1 - 1e-9)


def _nodes_to_probe(
    request: AllocationRequest,
    book: QueueBook,
    queues: list[str],
    reclaimable: set[str],
    threshold: float | None,
    table: LeaseTable,
    walk: PlanWalk,
    looked_at: Callable[[Allocation], bool],
) -> set[str]:
    """The nodes victim search weighs for `request`: a bounded few, wherever the cluster grows.

    A node-pinned request: its node. Else the node where the pass reserved GPUs
    for it (its best host, where those count as its own), and up to
    MAX_VICTIM_NODES of each: the nodes with the most open GPUs (a multi-GPU
    request there needs the fewest victims), and the nodes of the first leases
    in victim order - reclaimable queues first, then lowest priority, then
    youngest - read from the ledger's per-queue priority index, so the first
    ones are found without reading the rest.
    """
    if request.requirements.node is not None:
        return {request.requirements.node}
    nodes = {view.node for view in walk.reserved_for(request.request_id)}
    if request.requirements.gpu_count > 1:
        most_open: list[str] = []
        for count in sorted(walk.open.buckets, reverse=True):
            most_open.extend(walk.open.buckets[count][: MAX_VICTIM_NODES - len(most_open)])
            if len(most_open) >= MAX_VICTIM_NODES:
                break
        nodes.update(most_open)
    streams = []
    for queue in queues:
        ranked = book.ledger.by_priority.get(queue)
        if not ranked:
            continue
        rank = 0 if queue in reclaimable else 1
        if rank == 1:
            if threshold is None:
                continue
            entries = ranked.irange(maximum=(math.floor(threshold), math.inf, "\uffff"))
        else:
            entries = iter(ranked)
        streams.append(_ranked(rank, entries))
    by_leases: set[str] = set()
    for *_, allocation_id in heapq.merge(*streams):
        alloc = table.allocation(allocation_id)
        if alloc is None or alloc.node in by_leases or not looked_at(alloc):
            continue
        by_leases.add(alloc.node)
        if len(by_leases) >= MAX_VICTIM_NODES:
            break
    return nodes | by_leases


def _ranked(rank: int, entries: Iterator[tuple[int, float, str]]) -> Iterator[tuple[int, int, float, str]]:
    """`entries` of the ledger's priority index, each led by `rank` (bound here, not late as in a loop's generator)."""
    for priority, age, allocation_id in entries:
        yield rank, priority, age, allocation_id


def _too_few(
    book: QueueBook,
    queues: list[str],
    own: str,
    standing: Standing,
    below_fair: bool,
    threshold: float | None,
    walk: PlanWalk,
    need: int,
) -> bool:
    """Whether no node can possibly reach `need` GPUs: a bound read from counts, before any lease is looked at.

    Every other queue can give at most what it holds beyond its guarantee; the
    claimant's own queue (priority order) can give only when it has lower work.
    The most open GPUs on any node is added as if they all could serve.
    """
    most_open = max(walk.open.buckets, default=0) + walk.most_reserved
    if most_open >= need:
        return False
    givable = 0
    for queue in queues:
        if queue == own:
            ranked = book.ledger.by_priority.get(queue)
            if ranked and threshold is not None and ranked[0][0] <= threshold:
                return False  # its lower work is not counted here: look
            continue
        if not _may_reclaim(book, queue, own, standing, below_fair) and threshold is None:
            continue
        givable += max(0, book.held[queue] - book.policy.spec(queue).guarantee)
        if most_open + givable >= need:
            return False
    return True


def _victim_queues(book: QueueBook, own: str, standing: Standing, gap: int) -> list[str]:
    """Queues a lease may be taken from: those beyond their guarantee, and the own queue for priority."""
    queues = {q for q in book.ledger.leases if book.held[q] > book.policy.spec(q).guarantee}
    if gap > 0 and standing in (Standing.GUARANTEED, Standing.PRIORITY):
        queues.add(own)
    return sorted(queues)


def _allowed(
    alloc: Allocation,
    gpus: int,
    request: AllocationRequest,
    standing: Standing,
    book: QueueBook,
    effective: float,
    gap: int,
    below_fair: bool,
) -> tuple[bool, bool, float | None]:
    """(is it a reclaim, may it be taken, what its queue must keep) for lease `alloc` (taking `gpus` with it) and the candidate `request`."""
    queue = alloc.request.queue_name
    spec = book.policy.spec(queue)
    guarantee = float(spec.guarantee)
    borrowed = book.held[queue] - gpus >= spec.guarantee
    if borrowed and spec.parent is not None:
        parent = book.policy.spec(spec.parent)
        borrowed = parent.guarantee == 0 or book.parent_held(parent.name) - gpus >= parent.guarantee
    lower = gap > 0 and alloc.request.priority <= effective - gap
    if queue == request.queue_name:
        return False, standing in (Standing.GUARANTEED, Standing.PRIORITY) and lower, None
    if not borrowed:
        return False, False, guarantee
    if standing is Standing.PRIORITY:
        return False, lower, guarantee
    if standing is Standing.GUARANTEED:
        return True, True, guarantee
    fair = book.fair_share(queue)
    if below_fair and book.held[queue] - gpus >= fair - 1e-9:
        return True, True, max(guarantee, fair)
    return False, lower, guarantee


def _minimal_set(ordered: list[_Candidate], short: int, book: QueueBook) -> list[_Candidate] | None:
    """The first leases of `ordered` that give `short` useful GPUs, with any that is not needed dropped.

    A lease is passed over when, with the ones already in the set, it would take
    its queue below its floor (or its parent below the parent's guarantee): each
    lease alone may be borrowed while two of them together are not.
    """
    if short <= 0:
        return None  # it fits without preemption: the pass will place it
    chosen: list[_Candidate] = []
    taken: Counter[str] = Counter()
    got = 0
    for candidate in ordered:
        if not _keeps_floor(candidate, taken, book):
            continue
        chosen.append(candidate)
        taken[candidate.alloc.request.queue_name] += candidate.gpus
        got += candidate.useful
        if got >= short:
            break
    else:
        return None
    for candidate in reversed(list(chosen)):
        if got - candidate.useful >= short:
            chosen.remove(candidate)
            got -= candidate.useful
    return chosen


def _keeps_floor(candidate: _Candidate, taken: Counter[str], book: QueueBook) -> bool:
    """Whether taking `candidate` as well as `taken` (GPUs per queue) leaves its queue at its floor."""
    if candidate.floor is None:
        return True
    queue = candidate.alloc.request.queue_name
    gpus = candidate.gpus
    if book.held[queue] - taken[queue] - gpus < candidate.floor - 1e-9:
        return False
    parent_name = book.policy.spec(queue).parent
    if parent_name is None:
        return True
    parent = book.policy.spec(parent_name)
    siblings = sum(taken[c] for c in book.policy.children(parent_name))
    return parent.guarantee == 0 or book.parent_held(parent_name) - siblings - gpus >= parent.guarantee


def _serves(inventory: Inventory, node: str, index: int, request: AllocationRequest) -> bool:
    """Whether the GPU could serve `request` once freed: schedulable and matching it."""
    view = inventory.get(GpuRef(node, index))
    return view is not None and view.schedulable and request.requirements.matches_statically(view)
