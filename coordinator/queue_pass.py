"""One scheduling pass under a queue policy: claims, guarantees, then borrowing by fair share.

Theory of operation
-------------------
Where scheduler.py's strict-priority pass walks one queue in rank order, a
pass with queues configured walks in three rounds over the same `PlanWalk`
(placement.py: best fit, reservations against backfill, undo):

0. **Claims.** A request that victims are being preempted for is placed on
   the node it claimed, before anything else, or reserves what is open there:
   the GPUs its victims free go to it, not to backfill.
1. **Guarantees.** Requests within their queue's guarantee (queue_rules.py),
   all queues merged in rank order (priority with aging, then age). The GPUs
   one reserves when it does not fit count as its queue's for the rest of the
   pass (`QueueBook.count_reserved`): the queue's later waiters are judged
   with them, so its waiters together never reserve more than its unused
   guarantee, and the free GPUs other queues are owed stay open to them.
2. **Borrowing.** Requests beyond their guarantee, one at a time from the queue
   that borrows least per unit of weight, each queue's in rank order, while
   the lendable capacity lasts.

Requests that stay unplaced while entitled - within guarantee, or borrowing
below their queue's fair share - are returned as preemption candidates
(bounded per pass), in the order preemption.py should serve them.

Cost: each queue's waiters are walked by groups of equal requirements (the
lease table's per-queue WaitQueues), and a group is dropped as soon as its
requirements are dead for the pass (placement.py) or its queue's standing
rules it out (standings only get worse as a pass plans more), so a pass looks
at each group once plus the requests it places or reserves for. Round 2
stops when no GPU is open; round 1 goes on only to find preemption candidates,
at most MAX_CANDIDATES of them.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Collection, Iterable, Iterator

from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, QueuedRequest
from coordinator.placement import AnyPlacement, PlanWalk
from coordinator.queue_rules import QueueBook, Standing
from coordinator.wait_queue import RankKey

# Preemption candidates one pass hands on: enough to reclaim for a burst of
# guaranteed work in one pass, few enough that victim search stays cheap.
MAX_CANDIDATES = 32


@dataclass(slots=True)
class QueuePlan:
    """What a pass decided: placements in order, and entitled requests left waiting."""

    placements: list[tuple[AllocationRequest, AnyPlacement]] = field(default_factory=list)
    candidates: list[tuple[AllocationRequest, Standing]] = field(default_factory=list)


class _Merge:
    """Waiting requests of some groups, merged in rank order; a group can be dropped whole."""

    def __init__(self, table: LeaseTable, groups: Iterable[Iterable[QueuedRequest]]) -> None:
        self._table = table
        self._heap: list[tuple[RankKey, int, QueuedRequest, Iterator[QueuedRequest]]] = []
        for seq, group in enumerate(groups):
            members = iter(group)
            head = next(members, None)
            if head is not None:
                self._heap.append((table.rank_key(head.request), seq, head, members))
        heapq.heapify(self._heap)

    def peek(self) -> QueuedRequest | None:
        return self._heap[0][2] if self._heap else None

    def advance(self) -> None:
        """Move past the head request."""
        _, seq, _, members = self._heap[0]
        following = next(members, None)
        if following is None:
            heapq.heappop(self._heap)
        else:
            heapq.heapreplace(self._heap, (self._table.rank_key(following.request), seq, following, members))

    def drop_group(self) -> None:
        """Drop the head request's whole group."""
        heapq.heappop(self._heap)


def plan(
    walk: PlanWalk,
    book: QueueBook,
    now: float,
    skip: Collection[str] = (),
    extra: QueuedRequest | None = None,
    find_candidates: bool = True,
) -> QueuePlan:
    """Plan a pass on `walk` with the rules of `book`; `extra` is a request not queued yet (admission).

    With `extra`, the pass stops as soon as it has decided `extra`.
    """
    table = walk.table
    result = QueuePlan()
    handled: set[str] = set(skip)
    extra_id = None if extra is None else extra.request.request_id

    def groups_of(queue: str) -> list[Iterable[QueuedRequest]]:
        waiting = table.queue_ledger.waiting.get(queue)
        groups: list[Iterable[QueuedRequest]] = list(waiting.groups()) if waiting is not None else []
        if extra is not None and extra.request.queue_name == queue:
            groups.append((extra,))
        return groups

    def place(request: AllocationRequest, as_request: AllocationRequest | None = None) -> bool:
        placement = walk.step(as_request or request)
        handled.add(request.request_id)
        if placement is None:
            return False
        result.placements.append((request, placement))
        book.take(request, tuple(g.name for g in placement.gpus))
        return True

    def done() -> bool:
        return extra_id is not None and extra_id in handled

    # Round 0: claims, in rank order. The book counts each claimant as holding its
    # GPUs already (queue_rules.py); it is uncounted here and counted again by
    # `take` when placed, or by `claim` while it still waits for its victims.
    # Claimants whose victims are all gone come first: the GPUs those victims freed
    # are theirs, not a higher-ranked claimant's on the same node that still waits
    # for its own victims (it would leave the first to preempt all over again).
    def waits_for_victims(request_id: str) -> bool:
        return any(_still_held(walk, v) for v in table.claims()[request_id][1])

    claimed = sorted(
        (w for w in (table.queued(i) for i in table.claims()) if w is not None),
        key=lambda q: (waits_for_victims(q.request.request_id), table.rank_key(q.request)),
    )
    for claimant in claimed:
        request = claimant.request
        book.unclaim(request.request_id)
        if request.request_id in handled:
            continue
        node, _ = table.claims()[request.request_id]
        waiting_for_victims = waits_for_victims(request.request_id)
        if not waiting_for_victims and not _fits_on(walk, request, node):
            continue  # every victim is gone and it still does not fit there: an ordinary waiter again
        if book.classify(request).standing is Standing.QUOTA:
            continue  # its queue filled up meanwhile (the cap): it waits like any other
        pinned = dataclasses.replace(request, requirements=dataclasses.replace(request.requirements, node=node))
        if not place(request, pinned) and waiting_for_victims:
            book.claim(request)

    queues = sorted({*table.queue_ledger.waiting, *([extra.request.queue_name] if extra else [])})

    # Round 1: guaranteed requests of every queue, merged in rank order.
    merge = _Merge(table, [g for q in queues if book.policy.spec(q).guarantee > 0 for g in groups_of(q)])
    while not done():
        queued = merge.peek()
        if queued is None:
            break
        request = queued.request
        if request.request_id in handled:
            merge.advance()
            continue
        if walk.is_dead(request.requirements) or book.classify(request).standing is not Standing.GUARANTEED:
            merge.drop_group()
            continue
        if walk.open.total:
            if not place(request):
                reserved = walk.reserved_for(request.request_id)
                if reserved:
                    book.count_reserved(request, tuple(g.name for g in reserved))
                if find_candidates and len(result.candidates) < MAX_CANDIDATES:
                    result.candidates.append((request, Standing.GUARANTEED))
        elif find_candidates and len(result.candidates) < MAX_CANDIDATES:
            handled.add(request.request_id)
            walk.take_turn(request.request_id)
            result.candidates.append((request, Standing.GUARANTEED))
        else:
            break
        merge.advance()

    # Round 2: borrowing, least borrowed per weight first.
    heap: list[tuple[float, str]] = []
    merges: dict[str, _Merge] = {}
    for queue in queues:
        spec = book.policy.spec(queue)
        if spec.borrow:
            merges[queue] = _Merge(table, groups_of(queue))
            heap.append((book.borrowed(queue) / spec.weight, queue))
    heapq.heapify(heap)
    while heap and walk.open.total and not done():
        _, queue = heapq.heappop(heap)
        merge = merges[queue]
        queued = merge.peek()
        if queued is None:
            continue
        request = queued.request
        if request.request_id in handled:
            merge.advance()
        elif walk.is_dead(request.requirements):
            merge.drop_group()
        else:
            verdict = book.classify(request)
            if verdict.standing is not Standing.BORROW or not book.may_borrow(request.requirements.total_gpus):
                # GUARANTEED here was left by round 1 for want of candidates' room: later.
                merge.drop_group()
            else:
                if not place(request) and _below_fair_share(book, request):
                    _add_candidate(result, request, find_candidates)
                merge.advance()
        heapq.heappush(heap, (book.borrowed(queue) / book.policy.spec(queue).weight, queue))

    if find_candidates and extra is None:
        _late_candidates(table, book, queues, handled, result, now)
    book.forget_reserved()
    return result


def _late_candidates(
    table: LeaseTable, book: QueueBook, queues: list[str], handled: set[str], result: QueuePlan, now: float
) -> None:
    """Waiters the rounds did not reach that may still preempt: below fair share, or by priority.

    Queues furthest below their fair share first; in each, requests in rank
    order while the queue, with the ones already picked, stays within its fair
    share, then one that outranks some running work by the priority gap.
    At most MAX_CANDIDATES looked at per queue.
    """
    gap = book.policy.preemption_priority_gap
    lowest_borrowed = min(
        (p for q in table.queue_ledger.by_priority if book.borrowed(q) > 0 if (p := table.queue_ledger.lowest_priority(q)) is not None),
        default=None,
    )
    for queue in sorted(queues, key=lambda q: (book.used[q] / max(book.fair_share(q), 1e-9), q)):
        waiting = table.queue_ledger.waiting.get(queue)
        if waiting is None:
            continue
        planned = 0
        for looked, queued in enumerate(waiting):
            if looked >= MAX_CANDIDATES or len(result.candidates) >= MAX_CANDIDATES:
                break
            request = queued.request
            if request.request_id in handled:
                continue
            standing = book.classify(request).standing
            need = request.requirements.total_gpus
            if standing is Standing.QUOTA:
                continue
            if standing is Standing.GUARANTEED:
                result.candidates.append((request, standing))
            elif book.used[queue] + planned + need <= book.fair_share(queue) + 1e-9:
                result.candidates.append((request, Standing.BORROW))
                planned += need
            else:
                if gap > 0:
                    effective = request.effective_priority(now, book.policy.age_weight_per_hour)
                    own = table.queue_ledger.lowest_priority(queue)
                    lowest = min((p for p in (own, lowest_borrowed) if p is not None), default=None)
                    if lowest is not None and lowest <= effective - gap:
                        result.candidates.append((request, Standing.PRIORITY))
                break
            handled.add(request.request_id)


def _below_fair_share(book: QueueBook, request: AllocationRequest) -> bool:
    """Whether the request's queue, with the request, stays within its fair share."""
    return book.used[request.queue_name] + request.requirements.total_gpus <= book.fair_share(request.queue_name) + 1e-9


def _add_candidate(result: QueuePlan, request: AllocationRequest, find_candidates: bool) -> None:
    if find_candidates and len(result.candidates) < MAX_CANDIDATES:
        result.candidates.append((request, Standing.BORROW))


def _still_held(walk: PlanWalk, allocation_id: str) -> bool:
    """Whether a victim still holds its GPUs in this pass (not ended, not ending in this tick)."""
    alloc = walk.table.allocation(allocation_id)
    return alloc is not None and not all(g.ref in walk.released for g in alloc.gpus)


def _fits_on(walk: PlanWalk, request: AllocationRequest, node: str) -> bool:
    views = walk.open.by_node.get(node, ())
    return sum(1 for g in views if walk.eligible(g, request)) >= request.requirements.gpu_count
