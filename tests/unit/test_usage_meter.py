"""The leader's utilization meter: utilized GPU-seconds per (queue, service) between two RecordUsage commands."""

from __future__ import annotations

from coordinator.model import GpuRef
from coordinator.usage_meter import UtilizationMeter

G0, G1 = GpuRef("n1", 0), GpuRef("n1", 1)
KEY = ("default", "train")


def test_a_figure_holds_until_the_next_observation() -> None:
    """50 % for 10 s then 100 % for 10 s on one GPU, 20 % for 20 s on another: 5 + 10 + 4 GPU-seconds."""
    meter = UtilizationMeter(max_gap_s=30.0)
    meter.observe(G0, 0.0, 50.0, "a", KEY)
    meter.observe(G1, 0.0, 20.0, "a", KEY)
    meter.observe(G0, 10.0, 100.0, "a", KEY)
    meter.observe(G0, 20.0, 0.0, "a", KEY)
    meter.observe(G1, 20.0, 20.0, "a", KEY)
    assert meter.take() == [("default", "train", 19.0)]
    assert meter.take() == []


def test_unknown_figures_long_gaps_and_a_new_tenant_count_for_nobody() -> None:
    meter = UtilizationMeter(max_gap_s=30.0)
    meter.observe(G0, 0.0, None, "a", KEY)
    meter.observe(G0, 10.0, 100.0, "a", KEY)  # 0-10 s: unknown
    meter.observe(G0, 60.0, 100.0, "a", KEY)  # 10-60 s: longer than max_gap_s
    meter.observe(G0, 70.0, 100.0, "b", ("q", "other"))  # 60-70 s: the lease changed
    meter.observe(G0, 75.0, 100.0, "b", ("q", "other"))
    assert meter.take() == [("q", "other", 5.0)]


def test_figures_are_clamped_and_out_of_order_observations_ignored() -> None:
    meter = UtilizationMeter(max_gap_s=30.0)
    meter.observe(G0, 10.0, 250.0, "a", KEY)
    meter.observe(G0, 5.0, 0.0, "a", KEY)
    meter.observe(G0, 20.0, -5.0, "a", KEY)
    meter.observe(G0, 30.0, 0.0, "a", KEY)
    assert meter.take() == [("default", "train", 10.0)]
