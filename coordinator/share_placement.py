"""Shares of a GPU: which GPUs hold shares, how much of their memory is promised, and where a new share fits.

Theory of operation
-------------------
A share (`Requirements.share_mb`) is a lease on part of one GPU: a memory budget.
Shares pack onto one GPU beside others of the same *sharing group* and never
beyond its memory total (the sum of the budgets on a GPU is at most its
`memory_total_mb`). The group is the share's queue name, or SHARE_GROUP_ANY for a
queue that allows cross-queue shares: time-slicing puts every tenant of a GPU in
one fault domain (an OOM or an Xid takes them all), so teams must opt in, and
two queues pack together only when both did.

A GPU holding shares is held: the lease table keeps one of its shares as the
GPU's holder, so exclusive placement (coordinator/placement.py) never sees it
open, and the GPU returns to the free pool only when its last share ends.

Best fit: a new share goes to the GPU of its group with the *least* remaining
budget that still holds it, so partly used GPUs fill up before a fresh one is
opened; only when none fits does the scheduler open a whole free GPU (by the
ordinary placement, which is then the share's). Each group keeps its GPUs in
a sorted list by (remaining MB, GPU), so finding the fit is a bisect plus a
walk past the GPUs that constraints (model, node, health) rule out, never a
walk of the cluster.

Quota: a queue counts one whole GPU while any of its shares is on it, whatever
their number (coordinator/queue_ledger.py). So a share that packs onto a GPU
its queue already counts costs no GPU of quota; one that opens a fresh GPU, or
joins another queue's GPU, costs one (`QueueLedger.share_cost`).

This index is derived state: the lease table changes it with every share lease
and rebuilds it from the allocations on a restore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from sortedcontainers import SortedList

from coordinator.errors import Conflict
from coordinator.model import Allocation, GpuRef
from coordinator.queues import QueuePolicy

# The sharing group of queues that allow cross-queue shares: they pack together.
SHARE_GROUP_ANY = "*"


def share_group(policy: QueuePolicy, queue_name: str) -> str:
    """The group a share of `queue_name` packs with: the queue itself, or SHARE_GROUP_ANY when it allows cross-queue shares."""
    return SHARE_GROUP_ANY if policy.spec(queue_name).cross_queue_shares else queue_name


@dataclass(slots=True)
class SharedGpu:
    """One GPU holding shares: its group, its memory, and what its tenants were promised."""

    group: str
    memory_total_mb: int
    budget_mb: int = 0
    # Allocation ids of its shares.
    shares: set[str] = field(default_factory=set)

    @property
    def remaining_mb(self) -> int:
        return self.memory_total_mb - self.budget_mb


class ShareIndex:
    """The shared GPUs of a lease table, and per sharing group the best-fit order of them."""

    def __init__(self) -> None:
        self.gpus: dict[GpuRef, SharedGpu] = {}
        # group -> (remaining MB, GPU) of its shared GPUs: least remaining first.
        self._by_group: dict[str, SortedList[tuple[int, GpuRef]]] = {}

    def __len__(self) -> int:
        return len(self.gpus)

    def check(self, alloc: Allocation) -> None:
        """Raise Conflict unless share lease `alloc` fits its GPU now (group and memory). Changes nothing."""
        budget = _budget(alloc)
        gpu = alloc.gpus[0]
        if budget > gpu.memory_total_mb:
            raise Conflict(
                f"a share of {budget} MB does not fit GPU {gpu.node}/{gpu.index} ({gpu.memory_total_mb} MB)",
                code="gpu_busy",
            )
        shared = self.gpus.get(gpu.ref)
        if shared is None:
            return
        if shared.group != alloc.share_group:
            raise Conflict(
                f"GPU {gpu.node}/{gpu.index} holds shares of group {shared.group!r}, not {alloc.share_group!r}",
                code="gpu_busy",
            )
        if budget > shared.remaining_mb:
            raise Conflict(
                f"GPU {gpu.node}/{gpu.index} has {shared.remaining_mb} MB left to share, not {budget}",
                code="gpu_busy",
            )

    def add(self, alloc: Allocation) -> bool:
        """Record share lease `alloc` (checked already); True when it opened its GPU to sharing."""
        gpu = alloc.gpus[0]
        assert alloc.share_group is not None, "a share lease carries its group"
        shared = self.gpus.get(gpu.ref)
        opened = shared is None
        if shared is None:
            shared = self.gpus[gpu.ref] = SharedGpu(alloc.share_group, gpu.memory_total_mb)
        else:
            self._by_group[shared.group].remove((shared.remaining_mb, gpu.ref))
        shared.budget_mb += _budget(alloc)
        shared.shares.add(alloc.allocation_id)
        self._by_group.setdefault(shared.group, SortedList()).add((shared.remaining_mb, gpu.ref))
        return opened

    def remove(self, alloc: Allocation) -> bool:
        """Forget share lease `alloc`; True when its GPU holds no share any more (it is free again)."""
        ref = alloc.gpus[0].ref
        shared = self.gpus[ref]
        entries = self._by_group[shared.group]
        entries.remove((shared.remaining_mb, ref))
        shared.budget_mb -= _budget(alloc)
        shared.shares.discard(alloc.allocation_id)
        if shared.shares:
            entries.add((shared.remaining_mb, ref))
            return False
        del self.gpus[ref]
        if not entries:
            del self._by_group[shared.group]
        return True

    def fits(self, group: str, budget_mb: int) -> Iterator[GpuRef]:
        """GPUs of `group` with at least `budget_mb` MB left to share, least left first (best fit first)."""
        entries = self._by_group.get(group)
        if entries is None:
            return
        start = entries.bisect_left((budget_mb, GpuRef("", -1)))
        for _, ref in entries.islice(start):
            yield ref

    def tenants(self, ref: GpuRef) -> list[str]:
        """Allocation ids of the shares on `ref`, sorted (none for an unshared GPU)."""
        shared = self.gpus.get(ref)
        return sorted(shared.shares) if shared is not None else []


def _budget(alloc: Allocation) -> int:
    budget = alloc.request.requirements.share_mb
    assert budget is not None, "only share leases enter the share index"
    return budget
