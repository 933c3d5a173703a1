"""Unleased use and idle leases (coordinator/gpu_usage.py)."""

from __future__ import annotations

from coordinator.gpu_usage import UsageTracker


def test_processes_on_an_unleased_gpu_mean_in_use_without_a_lease() -> None:
    """Compute processes on a GPU nobody leased: flagged; once leased or gone, not."""
    usage = UsageTracker(idle_utilization_pct=5.0)
    usage.observe(0, 1.0, holder=None, utilization_pct=0.0, process_count=1)
    assert usage.unleased_in_use(0)
    usage.observe(0, 2.0, holder="a1", utilization_pct=0.0, process_count=1)
    assert not usage.unleased_in_use(0)
    usage.observe(0, 3.0, holder=None, utilization_pct=0.0, process_count=0)
    assert not usage.unleased_in_use(0)


def test_without_process_lists_utilization_decides() -> None:
    """Where NVML cannot list processes, utilization above the idle threshold means busy."""
    usage = UsageTracker(idle_utilization_pct=5.0)
    usage.observe(1, 1.0, holder=None, utilization_pct=40.0, process_count=None)
    assert usage.unleased_in_use(1)
    usage.observe(1, 2.0, holder=None, utilization_pct=5.0, process_count=None)
    assert not usage.unleased_in_use(1)


def test_an_idle_lease_accrues_idle_seconds_until_work_starts() -> None:
    """Idle time counts from the first idle sample of the lease, and resets on work or a new lease."""
    usage = UsageTracker(idle_utilization_pct=5.0)
    usage.observe(0, 10.0, holder="a1", utilization_pct=0.0, process_count=0)
    usage.observe(0, 20.0, holder="a1", utilization_pct=3.0, process_count=0)
    assert usage.idle_seconds(0, now=25.0) == 15.0
    usage.observe(0, 30.0, holder="a1", utilization_pct=80.0, process_count=1)
    assert usage.idle_seconds(0, now=31.0) == 0.0
    usage.observe(0, 40.0, holder="a1", utilization_pct=0.0, process_count=1)
    assert usage.idle_seconds(0, now=50.0) == 10.0
    usage.observe(0, 60.0, holder="a2", utilization_pct=0.0, process_count=0)
    assert usage.idle_seconds(0, now=61.0) == 1.0
    usage.observe(0, 70.0, holder=None, utilization_pct=0.0, process_count=0)
    assert usage.idle_seconds(0, now=80.0) == 0.0
    assert usage.idle_seconds(7, now=80.0) == 0.0


def test_a_gpu_with_no_activity_figures_is_neither_idle_nor_in_use() -> None:
    """Unknown utilization and processes (a lost GPU) claim nothing: no idle time, no unleased use."""
    usage = UsageTracker(idle_utilization_pct=5.0)
    usage.observe(0, 10.0, holder="a1", utilization_pct=0.0, process_count=0)
    usage.observe(0, 20.0, holder="a1", utilization_pct=None, process_count=None)
    assert usage.idle_seconds(0, now=30.0) == 0.0 and not usage.unleased_in_use(0)
