"""Per-queue indexes of the lease table: what each queue holds and what it waits for.

The queue rules (coordinator/queue_rules.py) ask, per decision, how many GPUs a
queue holds (of each model), which of its leases could be taken back, and which
of its requests wait, in serving order and grouped by requirements. The table
keeps the answers here, changed with every lease and every waiter, so none of
those questions walks the whole table: each change costs O(log n).

Queues are keyed by the name a request carries (`AllocationRequest.queue_name`),
declared or not: the table does not interpret the policy, it only counts.

Shares of a GPU (coordinator/share_placement.py) count by GPU, not by lease: a
queue holds one GPU while any of its shares is on it, so its first share there
adds the GPU and its last takes it away. Shares are not preemption victims (one
share's end frees no GPU while others stay), so they stay out of `leases` and
`by_priority`, and out of `preempting_gpus`.
"""

from __future__ import annotations

from collections import Counter
from typing import Container, Hashable, Iterable, TypeVar

from sortedcontainers import SortedList

_K = TypeVar("_K", bound=Hashable)

from coordinator.model import Allocation, GpuRef, QueuedRequest
from coordinator.wait_queue import WaitQueue


class QueueLedger:
    """Live GPUs, leases and waiting requests per queue name."""

    def __init__(self, age_weight_per_hour: float = 0.0) -> None:
        self.age_weight_per_hour = age_weight_per_hour
        self.waiting: dict[str, WaitQueue] = {}
        self.gpus: Counter[str] = Counter()
        # (queue, GPU name) -> GPUs held: per-model guarantees sum the names matching their model.
        self.gpus_by_name: Counter[tuple[str, str]] = Counter()
        self.leases: dict[str, set[str]] = {}
        # Each queue's leases by (priority, allocation id): lowest first, for priority preemption.
        self.by_priority: dict[str, SortedList[tuple[int, float, str]]] = {}
        self.pending_gpus: Counter[str] = Counter()
        # GPUs of leases in their grace period, per queue: already promised away,
        # so neither a guarantee they protect nor a borrow they make.
        self.preempting_gpus: Counter[str] = Counter()
        # (queue, GPU) -> the queue's shares on that GPU; the GPU counts once while above 0.
        self.shares: Counter[tuple[str, GpuRef]] = Counter()

    def share_cost(self, queue: str, ref: GpuRef) -> int:
        """GPUs a new share of `queue` on `ref` adds to its count: 0 when it has a share there already, else 1."""
        return 0 if self.shares[(queue, ref)] else 1

    def add_lease(self, alloc: Allocation) -> None:
        queue = alloc.request.queue_name
        if alloc.share_group is not None:
            key = (queue, alloc.gpus[0].ref)
            self.shares[key] += 1
            if self.shares[key] == 1:
                self.gpus[queue] += 1
                self.gpus_by_name[(queue, alloc.gpus[0].name)] += 1
            return
        self.gpus[queue] += len(alloc.gpus)
        for gpu in alloc.gpus:
            self.gpus_by_name[(queue, gpu.name)] += 1
        self.leases.setdefault(queue, set()).add(alloc.allocation_id)
        self.by_priority.setdefault(queue, SortedList()).add(_rank(alloc))

    def remove_lease(self, alloc: Allocation, preempting: bool = False) -> None:
        queue = alloc.request.queue_name
        if alloc.share_group is not None:
            key = (queue, alloc.gpus[0].ref)
            _decrement(self.shares, key, 1)
            if key not in self.shares:
                _decrement(self.gpus, queue, 1)
                _decrement(self.gpus_by_name, (queue, alloc.gpus[0].name), 1)
            return
        _decrement(self.gpus, queue, len(alloc.gpus))
        if preempting:
            _decrement(self.preempting_gpus, queue, len(alloc.gpus))
        for gpu in alloc.gpus:
            _decrement(self.gpus_by_name, (queue, gpu.name), 1)
        ids = self.leases[queue]
        ids.discard(alloc.allocation_id)
        if not ids:
            del self.leases[queue]
        ranked = self.by_priority[queue]
        ranked.remove(_rank(alloc))
        if not ranked:
            del self.by_priority[queue]

    def mark_preempting(self, alloc: Allocation) -> None:
        """Count a lease that entered its grace period (a share frees no GPU by itself: not counted)."""
        if alloc.share_group is not None:
            return
        self.preempting_gpus[alloc.request.queue_name] += len(alloc.gpus)

    def kept(self, queue: str) -> int:
        """GPUs `queue` holds and keeps: its leases' less those in their grace period."""
        return self.gpus[queue] - self.preempting_gpus[queue]

    def add_waiting(self, queued: QueuedRequest) -> None:
        queue = queued.request.queue_name
        waiting = self.waiting.get(queue)
        if waiting is None:
            waiting = self.waiting[queue] = WaitQueue(age_weight_per_hour=self.age_weight_per_hour)
        waiting.add(queued)
        self.pending_gpus[queue] += queued.request.requirements.total_gpus

    def remove_waiting(self, queued: QueuedRequest) -> None:
        queue = queued.request.queue_name
        waiting = self.waiting[queue]
        waiting.remove(queued)
        if not len(waiting):
            del self.waiting[queue]
        _decrement(self.pending_gpus, queue, queued.request.requirements.total_gpus)

    def load(
        self, allocs: Iterable[Allocation], queued: Iterable[QueuedRequest], preempting: Container[str] = ()
    ) -> None:
        """Fill an empty ledger at once (a restore or a change of aging): one sort per queue."""
        for alloc in allocs:
            self.add_lease(alloc)
            if alloc.allocation_id in preempting:
                self.mark_preempting(alloc)
        by_queue: dict[str, list[QueuedRequest]] = {}
        for q in queued:
            by_queue.setdefault(q.request.queue_name, []).append(q)
            self.pending_gpus[q.request.queue_name] += q.request.requirements.total_gpus
        self.waiting = {
            name: WaitQueue(items, age_weight_per_hour=self.age_weight_per_hour) for name, items in by_queue.items()
        }

    def lowest_priority(self, queue: str) -> int | None:
        """The lowest priority among `queue`'s leases, or None when it holds none."""
        ranked = self.by_priority.get(queue)
        return ranked[0][0] if ranked else None

    def model_gpus(self, queue: str, model: str) -> int:
        """GPUs `queue` holds whose name contains `model` (case-insensitive)."""
        wanted = model.lower()
        return sum(n for (q, name), n in self.gpus_by_name.items() if q == queue and wanted in name.lower())


def _decrement(counter: Counter[_K], key: _K, by: int) -> None:
    counter[key] -= by
    if counter[key] <= 0:
        del counter[key]


def _rank(alloc: Allocation) -> tuple[int, float, str]:
    """A lease's place in `by_priority`: lowest priority first, then youngest (victim order), then id."""
    return (alloc.request.priority, -alloc.allocated_at, alloc.allocation_id)
