"""Who really uses each GPU: unleased use and idle leases, from telemetry and the lease table.

An operator wants two lists the scheduler cannot see by itself: GPUs busy
without a lease (someone runs outside the orchestrator, so the scheduler may
hand that GPU to a job that then shares it) and leases whose GPUs sit idle
(capacity held for nothing). The tracker is fed one observation per GPU per
sample and answers both, with times passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Usage:
    holder: str | None = None
    in_use_unleased: bool = False
    idle_since: float | None = None
    # Shares on the GPU (coordinator/share_placement.py): their budgets together, and
    # whether the GPU's used memory passed them at the last sample.
    shares: int = 0
    share_budget_mb: int = 0
    over_budget: bool = False


class UsageTracker:
    """Per GPU index: in use without a lease, and how long a leased GPU has been idle."""

    def __init__(self, idle_utilization_pct: float = 5.0) -> None:
        # At or below this utilization (%) a GPU counts as idle.
        self.idle_utilization_pct = idle_utilization_pct
        self._gpus: dict[int, _Usage] = {}

    def observe(
        self,
        index: int,
        at: float,
        *,
        holder: str | None,
        utilization_pct: float | None,
        process_count: int | None,
    ) -> None:
        """One sample of GPU `index`: its lease holder (allocation id or None) and activity.

        A GPU is busy when it has compute processes or, where processes are
        unknown, when its utilization is above the idle threshold.
        """
        gpu = self._gpus.setdefault(index, _Usage())
        if utilization_pct is None and process_count is None:
            # Nothing known (a lost GPU, a failed query): claim neither idleness nor use.
            gpu.holder, gpu.in_use_unleased, gpu.idle_since = holder, False, None
            return
        busy_by_util = utilization_pct is not None and utilization_pct > self.idle_utilization_pct
        busy = bool(process_count) if process_count is not None else busy_by_util
        gpu.in_use_unleased = holder is None and busy
        if holder is None or holder != gpu.holder or busy_by_util:
            # A new lease starts its idle clock afresh; any real work resets it.
            gpu.idle_since = at if holder is not None and not busy_by_util else None
        elif gpu.idle_since is None:
            gpu.idle_since = at
        gpu.holder = holder

    def observe_shares(self, index: int, *, shares: int, budget_mb: int, memory_used_mb: int | None) -> bool:
        """One sample of GPU `index`'s shares (0 and 0 when unshared); True when it just went over budget.

        Over budget: the GPU's used memory is above the sum of its shares'
        budgets. NVML reports memory per GPU, so the GPU is flagged, not one
        share (an unknown reading flags nothing).
        """
        gpu = self._gpus.setdefault(index, _Usage())
        was = gpu.over_budget
        gpu.shares, gpu.share_budget_mb = shares, budget_mb
        gpu.over_budget = shares > 0 and memory_used_mb is not None and memory_used_mb > budget_mb
        return gpu.over_budget and not was

    def shares(self, index: int) -> tuple[int, int, bool]:
        """(shares, their budgets in MB, over budget) of GPU `index` at the last sample."""
        usage = self._gpus.get(index)
        return (0, 0, False) if usage is None else (usage.shares, usage.share_budget_mb, usage.over_budget)

    def unleased_in_use(self, index: int) -> bool:
        usage = self._gpus.get(index)
        return usage is not None and usage.in_use_unleased

    def idle_seconds(self, index: int, now: float) -> float:
        """Seconds a leased GPU has been idle under its current lease (0 when busy or unleased)."""
        usage = self._gpus.get(index)
        if usage is None or usage.idle_since is None:
            return 0.0
        return max(0.0, now - usage.idle_since)
