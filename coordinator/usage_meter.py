"""Utilized GPU-seconds from telemetry: what the leader sums between two RecordUsage commands.

Theory of operation
-------------------
Telemetry is not replicated, so utilization is measured where it is seen (the
leader: its own sampler and every member's gossiped figures) and only the sums
go into the log (coordinator/commands.py RecordUsage).

The caller observes each leased GPU now and then (`observe`), with the time,
the utilization it last heard of and the (queue, service) of the lease holding
it. A utilization figure holds until the next observation: the interval between
two observations of the same GPU under the same lease adds
utilization/100 × seconds to the lease's key. An interval is dropped when the
lease changed (a new tenant: the time between belongs to neither for sure), when the
utilization was unknown, or when it is longer than `max_gap_s` (the leader was
not watching: a new leader, a stalled loop). So the figure errs low, never high,
and never above the allocated GPU-seconds.

`take()` hands over the sums and starts afresh. Cost: O(1) per observation,
O(keys) per take; memory: one entry per GPU ever leased (the cluster's GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.model import GpuRef
from coordinator.usage_ledger import UsageKey


@dataclass(slots=True)
class _Last:
    at: float
    utilization_pct: float | None
    allocation_id: str


class UtilizationMeter:
    """Sums utilization × time per (queue, service) from per-GPU observations."""

    def __init__(self, *, max_gap_s: float) -> None:
        # Longest interval between two observations of a GPU that is still counted.
        self.max_gap_s = max_gap_s
        self._last: dict[GpuRef, _Last] = {}
        self._sums: dict[UsageKey, float] = {}

    def observe(self, gpu: GpuRef, at: float, utilization_pct: float | None, allocation_id: str, key: UsageKey) -> None:
        """Leased GPU `gpu` at `at`: its latest utilization (None: unknown), the lease holding it and the lease's key.

        Only leased GPUs are observed; a GPU freed and leased again is seen under
        another allocation id, so the time between counts for nobody.
        """
        last = self._last.get(gpu)
        if last is None:
            self._last[gpu] = _Last(at, utilization_pct, allocation_id)
            return
        gap = at - last.at
        if gap <= 0:
            return  # out of order or repeated: the earlier observation stands
        if allocation_id == last.allocation_id and last.utilization_pct is not None and gap <= self.max_gap_s:
            share = min(100.0, max(0.0, last.utilization_pct)) / 100.0
            if share > 0:
                self._sums[key] = self._sums.get(key, 0.0) + share * gap
        last.at, last.utilization_pct, last.allocation_id = at, utilization_pct, allocation_id

    def take(self) -> list[tuple[str, str, float]]:
        """The sums since the last take as (queue, service, gpu_seconds) rows, sorted; the meter starts afresh."""
        sums, self._sums = self._sums, {}
        return [(queue, service, sums[(queue, service)]) for queue, service in sorted(sums)]
