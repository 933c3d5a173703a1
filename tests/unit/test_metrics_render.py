"""The agent's own text exposition renderer says exactly what prometheus_client's would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, UnknownMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from agent.metrics import render_text


class _Fixed(Collector):
    def collect(self):  # type: ignore[no-untyped-def]
        gauge = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=["gpu", "modelName"])
        gauge.add_metric(["0", 'NVIDIA "H100" \\ 80GB\nHBM3'], 93.0)
        gauge.add_metric(["1", "plain"], float("nan"))
        yield gauge
        energy = UnknownMetricFamily("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Energy (in mJ).", labels=["gpu"])
        energy.add_metric(["0"], 2.509788e06)
        yield energy
        yield GaugeMetricFamily("gpu_orchestrator_term", "The term.\nSecond line", value=float("inf"))


def _samples(text: str) -> set[tuple[str, str, tuple[tuple[str, str], ...], str]]:
    return {
        (family.name, family.type, tuple(sorted(s.labels.items())), repr(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_render_text_parses_to_the_same_samples_as_generate_latest() -> None:
    """Counters, histograms, gauges, untyped series, escapes, NaN and Inf all survive."""
    registry = CollectorRegistry()
    counter = Counter("gpu_orchestrator_http_requests", "Requests.", ["route", "status"], registry=registry)
    counter.labels("/gpu/allocations/<allocation_id>", "200").inc(3)
    histogram = Histogram("gpu_orchestrator_queue_wait_seconds", "Wait.", buckets=(0.1, 1.0), registry=registry)
    histogram.observe(0.5)
    registry.register(_Fixed())
    ours = render_text(registry).decode()
    theirs = generate_latest(registry).decode()
    assert _samples(ours) == _samples(theirs)
    assert "_created" not in ours and "# TYPE gpu_orchestrator_http_requests_total counter" in ours
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION untyped" in ours
