"""The GPU health policy, walked through time without a clock (coordinator/gpu_health.py)."""

from __future__ import annotations

from coordinator.commands import Allocate, ReportGpuHealth, SetDrain
from coordinator.gpu_health import HealthPolicy, HealthTracker
from coordinator.lease_table import LeaseTable
from coordinator.model import (
    DEGRADED,
    HEALTHY,
    UNHEALTHY,
    AllocatedGpu,
    Allocation,
    AllocationRequest,
    GpuRef,
    Requirements,
)

POLICY = HealthPolicy(quiet_period_s=300.0, default_slowdown_c=85.0, temperature_hysteresis_c=5.0)


def test_a_critical_xid_makes_a_gpu_unhealthy_until_a_quiet_period_passes() -> None:
    """XID -> unhealthy -> quiet period -> healthy, on its own (no restart, unlike k8s's plugin)."""
    tracker = HealthTracker(POLICY)
    assert tracker.xid(2, 79, at=100.0) is True
    health = tracker.health(2, now=100.0)
    assert (health.state, health.reasons, health.until) == (UNHEALTHY, ("XID 79",), 400.0)
    assert tracker.health(2, now=399.9).state == UNHEALTHY
    assert tracker.health(2, now=400.0).state == HEALTHY
    assert tracker.health(1, now=400.0).state == HEALTHY


def test_a_new_critical_event_restarts_the_quiet_period() -> None:
    """Each critical event pushes the return to service back by a full quiet period."""
    tracker = HealthTracker(POLICY)
    tracker.xid(0, 48, at=0.0)
    tracker.double_bit_ecc(0, at=250.0)
    health = tracker.health(0, now=350.0)
    assert health.state == UNHEALTHY and health.reasons == ("XID 48", "double-bit ECC error")
    assert health.until == 550.0
    assert tracker.health(0, now=550.0).state == HEALTHY


def test_application_xids_do_not_touch_health() -> None:
    """XID 13, 31, 43, 45, 68 and 109 are the application's faults, not the GPU's."""
    tracker = HealthTracker(POLICY)
    for code in (13, 31, 43, 45, 68, 109):
        assert tracker.xid(0, code, at=1.0) is False
    assert tracker.health(0, now=1.0).state == HEALTHY


def test_a_rising_double_bit_ecc_count_in_readings_counts_as_an_event() -> None:
    """Backends without NVML events still trip the policy through the volatile DBE counter."""
    tracker = HealthTracker(POLICY)
    tracker.reading(0, 1.0, ecc_volatile_dbe=0)
    assert tracker.health(0, now=1.0).state == HEALTHY
    tracker.reading(0, 2.0, ecc_volatile_dbe=1)
    assert tracker.health(0, now=2.0).reasons == ("double-bit ECC error",)
    tracker.reading(0, 3.0, ecc_volatile_dbe=1)
    assert tracker.health(0, now=302.0).state == HEALTHY


def test_a_lost_gpu_is_unhealthy_until_seen_again_and_then_quiet() -> None:
    """Lost from NVML: out while missing, then one quiet period after it comes back."""
    tracker = HealthTracker(POLICY)
    tracker.lost(3, at=10.0)
    assert tracker.health(3, now=1000.0).reasons == ("lost from NVML",)
    tracker.reading(3, 1000.0, temperature_c=40.0)
    health = tracker.health(3, now=1000.0)
    assert (health.state, health.until) == (UNHEALTHY, 1300.0)
    assert tracker.health(3, now=1299.0).state == UNHEALTHY
    assert tracker.health(3, now=1300.0).state == HEALTHY


def test_over_temperature_degrades_with_hysteresis() -> None:
    """At the slowdown point a GPU is degraded; it is healthy again only 5 °C below it."""
    tracker = HealthTracker(POLICY)
    tracker.reading(0, 1.0, temperature_c=87.0, slowdown_c=87.0)
    health = tracker.health(0, now=1.0)
    assert health.state == DEGRADED and health.reasons == ("temperature 87°C at or above slowdown 87°C",)
    tracker.reading(0, 2.0, temperature_c=84.0, slowdown_c=87.0)
    assert tracker.health(0, now=2.0).state == DEGRADED
    tracker.reading(0, 3.0, temperature_c=82.0, slowdown_c=87.0)
    assert tracker.health(0, now=3.0).state == HEALTHY
    tracker.reading(0, 4.0, temperature_c=86.0)  # no NVML threshold: the policy's default 85
    assert tracker.health(0, now=4.0).state == DEGRADED


def test_row_remapping_pending_degrades_and_failed_makes_unhealthy() -> None:
    """A pending remap wants a reset (degraded); a failed one takes the GPU out."""
    tracker = HealthTracker(POLICY)
    tracker.reading(0, 1.0, remapped_rows_pending=True)
    assert tracker.health(0, now=1.0).reasons == ("row remap pending: reset the GPU",)
    tracker.reading(0, 2.0, remapped_rows_failed=True)
    assert tracker.health(0, now=2.0).state == UNHEALTHY
    tracker.reading(0, 3.0, remapped_rows_failed=False)
    assert tracker.health(0, now=3.0).state == UNHEALTHY  # the event's quiet period still runs
    assert tracker.health(0, now=303.0).state == HEALTHY


def _allocation(node: str, index: int) -> Allocation:
    request = AllocationRequest("r1", "svc", "generic", 5, Requirements(1, 0), 0.0, 0.0,
                                webhook_url="http://127.0.0.1:9/hook")
    gpu = AllocatedGpu(node, index, f"GPU-{index}", "H100", 81559)
    return Allocation("a1", request, node, (gpu,), 0.0, None)


def test_a_leased_gpu_turning_unhealthy_is_reported_once_and_the_lease_kept() -> None:
    """ReportGpuHealth on a held GPU emits gpu_unhealthy for its allocation, once per episode."""
    table = LeaseTable()
    table.apply(Allocate(1.0, _allocation("n1", 0)))
    result = table.apply(ReportGpuHealth(2.0, "n1", 0, UNHEALTHY, ("XID 79",)))
    assert [(e.kind, e.reason) for e in result.events] == [("gpu_unhealthy", "GPU n1/0: XID 79")]
    assert [a.allocation_id for a in table.unhealthy_allocations()] == ["a1"]
    again = table.apply(ReportGpuHealth(3.0, "n1", 0, UNHEALTHY, ("XID 79", "double-bit ECC error")))
    assert again.events == () and table.allocation("a1") is not None
    table.apply(ReportGpuHealth(4.0, "n1", 0, HEALTHY))
    assert table.gpu_health(GpuRef("n1", 0)) == (HEALTHY, ()) and table.unhealthy_allocations() == []


def test_drain_and_undrain_survive_a_snapshot() -> None:
    """Drains are replicated state: a restored table knows them, with their reasons."""
    table = LeaseTable()
    table.apply(SetDrain(1.0, "n1", 2, True, "fan noise"))
    table.apply(ReportGpuHealth(1.5, "n1", 3, DEGRADED, ("hot",)))
    restored = LeaseTable.restore(table.snapshot())
    assert dict(restored.drained()) == {GpuRef("n1", 2): "fan noise"}
    assert restored.gpu_health(GpuRef("n1", 3)) == (DEGRADED, ("hot",))
    restored.apply(SetDrain(2.0, "n1", 2, False))
    assert dict(restored.drained()) == {}


def test_a_verdict_restored_after_a_restart_waits_a_full_quiet_period() -> None:
    """The tracker forgets on restart; the table's record resumes the verdict from the restart time."""
    tracker = HealthTracker(POLICY)
    tracker.restore(1, ("XID 79",), at=1000.0)
    health = tracker.health(1, now=1000.0)
    assert (health.state, health.reasons, health.until) == (UNHEALTHY, ("XID 79",), 1300.0)
    assert tracker.health(1, now=1300.0).state == HEALTHY


def test_the_reason_says_when_a_hot_gpu_is_cooling_through_the_hysteresis_band() -> None:
    """Below the slowdown point but not yet 5 °C under it: still degraded, and the reason says cooling."""
    tracker = HealthTracker(POLICY)
    tracker.reading(0, 1.0, temperature_c=90.0, slowdown_c=87.0)
    tracker.reading(0, 2.0, temperature_c=85.0, slowdown_c=87.0)
    assert tracker.health(0, now=2.0).reasons == ("temperature 85°C cooling below slowdown 87°C",)
