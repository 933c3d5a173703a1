"""Idle reclaim detection: leases whose GPUs all stayed under a queue's utilization floor for its period.

Theory of operation
-------------------
A queue may opt in with `idle_reclaim` (SPEC "Sharing the fleet"): a utilization
percentage N and a period T in minutes. A lease of that queue is a reclaim
candidate (reason `idle`) once every one of its GPUs has been observed under N %
without a break for T minutes. The detector only names candidates; ending the
lease (a replicated Preempt with a grace deadline) is the preemption path's.

The caller (the leader) observes leased GPUs as telemetry arrives (`observe`):
the GPU, the time, its utilization (None when unknown) and the live lease holding
it. Per GPU the detector keeps whether it is under its lease's floor; per lease,
how many of its GPUs are. When the last one goes under, the lease is idle from
that moment and enters a list ordered by (due time, allocation id); any GPU
going over the floor (or unknown: no claim of idleness without data) takes the
lease out again. So an observation costs O(log leases) at most and `due(now)` costs
O(log leases + answer): neither walks all leases.

What the detector cannot see it does not guess: a lease ended is dropped when its
GPUs are observed under another lease, or by `sweep(live)`, which the caller runs
now and then with the table's live allocation ids. Candidates are ids only; the
caller checks each is still live (and not already being preempted) when it acts.

Pure and deterministic: the same observations give the same answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Container, Mapping

from sortedcontainers import SortedList

from coordinator.model import Allocation, GpuRef

@dataclass(frozen=True, slots=True)
class IdlePolicy:
    """A queue's `idle_reclaim`: under `utilization_pct` on every GPU for `minutes` makes a lease idle."""

    utilization_pct: float
    minutes: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.utilization_pct) and 0 < self.utilization_pct <= 100):
            raise ValueError(f"idle_reclaim utilization must be in (0, 100], got {self.utilization_pct}")
        if not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"idle_reclaim minutes must be positive, got {self.minutes}")

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0


@dataclass(slots=True)
class _Lease:
    gpus: int
    policy: IdlePolicy
    # The lease's GPUs that the detector has seen under it, and which of them are under the floor.
    seen: set[GpuRef] = field(default_factory=set)
    under: set[GpuRef] = field(default_factory=set)
    # When the last GPU went under (all of them are since), or None.
    idle_since: float | None = None


class IdleReclaimDetector:
    """Names the leases of opted-in queues that stayed idle long enough (module docstring)."""

    def __init__(self, policies: Mapping[str, IdlePolicy]) -> None:
        self._policies = dict(policies)
        self._leases: dict[str, _Lease] = {}
        self._holder: dict[GpuRef, str] = {}
        self._due: SortedList[tuple[float, str]] = SortedList()

    def set_policies(self, policies: Mapping[str, IdlePolicy]) -> None:
        """Replace the policies (a configuration reload). Idle periods start afresh under the new rules."""
        if dict(policies) != self._policies:
            self._policies = dict(policies)
            self._leases.clear()
            self._holder.clear()
            self._due.clear()

    def observe(self, gpu: GpuRef, at: float, utilization_pct: float | None, lease: Allocation) -> None:
        """GPU `gpu` of the live `lease` at `at`, at `utilization_pct` (None: unknown, never idle)."""
        previous = self._holder.get(gpu)
        if previous is not None and previous != lease.allocation_id:
            self._detach(gpu, previous)
        policy = self._policies.get(lease.request.queue_name)
        if policy is None:
            return  # the queue did not opt in: nothing to track
        state = self._leases.get(lease.allocation_id)
        if state is None:
            state = self._leases[lease.allocation_id] = _Lease(len(lease.gpus), policy)
        self._holder[gpu] = lease.allocation_id
        state.seen.add(gpu)
        under = utilization_pct is not None and utilization_pct < policy.utilization_pct
        if under and gpu not in state.under:
            state.under.add(gpu)
            if len(state.under) == state.gpus:
                state.idle_since = at
                self._due.add((at + policy.seconds, lease.allocation_id))
        elif not under and gpu in state.under:
            self._busy(lease.allocation_id, state)
            state.under.discard(gpu)

    def due(self, now: float) -> list[str]:
        """Allocation ids idle for their queue's whole period by `now`, longest overdue first (then by id)."""
        due: list[str] = []
        for due_at, allocation_id in self._due:
            if due_at > now:
                break
            due.append(allocation_id)
        return due

    def idle_since(self, allocation_id: str) -> float | None:
        """Since when every GPU of the lease has been under its floor, or None."""
        state = self._leases.get(allocation_id)
        return None if state is None else state.idle_since

    def sweep(self, live: Container[str]) -> None:
        """Drop every lease not in `live` (ended since it was last observed). O(leases tracked)."""
        for allocation_id in [a for a in self._leases if a not in live]:
            state = self._leases[allocation_id]
            for gpu in state.seen:
                if self._holder.get(gpu) == allocation_id:
                    del self._holder[gpu]
            self._busy(allocation_id, state)
            del self._leases[allocation_id]

    def _detach(self, gpu: GpuRef, allocation_id: str) -> None:
        """`gpu` is no longer under `allocation_id` (the lease ended and another holds it)."""
        del self._holder[gpu]
        state = self._leases.get(allocation_id)
        if state is None:
            return
        self._busy(allocation_id, state)
        state.under.discard(gpu)
        state.seen.discard(gpu)
        if not state.seen:
            del self._leases[allocation_id]

    def _busy(self, allocation_id: str, state: _Lease) -> None:
        """The lease is no longer idle as a whole."""
        if state.idle_since is not None:
            self._due.remove((state.idle_since + state.policy.seconds, allocation_id))
            state.idle_since = None
