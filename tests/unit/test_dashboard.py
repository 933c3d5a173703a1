"""The Grafana dashboard in docs/grafana is import-ready and queries only exported series.

Import-ready means: Grafana asks for the Prometheus datasource on import (an
`__inputs` entry that every panel and variable refers to), and the Hostname and
gpu variables exist. Every PromQL expression is reduced to the metric names it
selects (strings, label matchers, ranges, `by (...)`-style label lists,
functions and keywords removed), and each name must be one that the agents
export (SPEC "Metrics"; docs/api.md has the full table). The other direction
holds too: every exported series has a panel, so a new series is not forgotten.
Whether each expression parses is checked against a real Prometheus in
tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "gpu-orchestrator.json"
DATASOURCE_UID = "${DS_PROMETHEUS}"

DCGM_SERIES = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
}
ORCHESTRATOR_SERIES = {
    # per GPU
    "gpu_orchestrator_gpu_allocated",
    "gpu_orchestrator_gpu_health",
    "gpu_orchestrator_gpu_drained",
    "gpu_orchestrator_gpu_unleased_in_use",
    "gpu_orchestrator_lease_idle_seconds",
    # per agent
    "gpu_orchestrator_device_backend_degraded",
    "gpu_orchestrator_leader",
    "gpu_orchestrator_term",
    "gpu_orchestrator_cluster_members",
    "gpu_orchestrator_outbox_pending",
    "gpu_orchestrator_http_requests_total",
    "gpu_orchestrator_scheduling_outcomes_total",
    "gpu_orchestrator_leases_expired_total",
    # leader only
    "gpu_orchestrator_allocations",
    "gpu_orchestrator_queue_depth",
    "gpu_orchestrator_queue_oldest_submitted_timestamp_seconds",
    "gpu_orchestrator_allocations_on_unhealthy_gpus",
}
HISTOGRAMS = {
    "gpu_orchestrator_http_request_duration_seconds",
    "gpu_orchestrator_queue_wait_seconds",
}
EXPORTED = DCGM_SERIES | ORCHESTRATOR_SERIES | HISTOGRAMS
# A histogram is queried through its _bucket, _sum and _count series.
QUERYABLE = DCGM_SERIES | ORCHESTRATOR_SERIES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# Aggregation operators, then the functions a dashboard may reasonably call.
PROMQL_FUNCTIONS = set(
    "sum min max avg count stddev stdvar topk bottomk quantile count_values group "
    "abs absent ceil clamp clamp_max clamp_min changes delta deriv floor histogram_quantile idelta increase "
    "irate label_replace rate resets round scalar sort sort_desc time timestamp vector avg_over_time "
    "max_over_time min_over_time sum_over_time count_over_time last_over_time quantile_over_time".split()
)
PROMQL_KEYWORDS = set("by without on ignoring group_left group_right bool and or unless offset Inf NaN".split())

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier not inside a number (1e6) or a Grafana variable ($gpu); `(` after it makes it a call.
_IDENTIFIER = re.compile(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.*),\s*(?P<label>\w+)\s*\)$")


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects; raises ValueError on a call to an unknown function."""
    stripped = _STRING.sub(" ", expr)
    stripped = _MATCHERS.sub(" ", stripped)
    stripped = _RANGE.sub(" ", stripped)
    stripped = _LABEL_LIST.sub(" ", stripped)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(stripped):
        word, call = match.group(1), match.group(2)
        if call:
            if word not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        elif word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def load() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in query_panels(dashboard) for t in p["targets"]]


def variable_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, the PromQL inside label_values(...)) for each query variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        assert match, f"variable {var['name']}: expected label_values(<expr>, <label>), got {query!r}"
        out.append((var["name"], match.group("expr")))
    return out


def test_metric_name_extraction_ignores_functions_labels_and_numbers() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(x_bucket{route=~"/gpu.*"}[$__rate_interval])))'
        " / on (Hostname, gpu) group_left (UUID) y * 1e6 > bool 3.6e9"
    )
    assert metric_names(expr) == {"x_bucket", "y"}
    assert metric_names('count(a{state!="healthy"} == 1) or vector(0)') == {"a"}
    with pytest.raises(ValueError, match="made_up"):
        metric_names("made_up(a)")


def test_is_an_import_ready_dashboard() -> None:
    dashboard = load()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["id"] is None, "an exported dashboard carries no database id"
    inputs = {i["name"]: i for i in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    panel_types = {p["type"] for p in query_panels(dashboard)}
    required = {r["id"] for r in dashboard["__requires"] if r["type"] == "panel"}
    assert panel_types <= required, f"panel types missing from __requires: {panel_types - required}"


def test_panel_ids_are_unique_and_panels_are_placed() -> None:
    panels = list(all_panels(load()["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        pos = p["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]


def test_every_panel_and_target_uses_the_datasource_input() -> None:
    dashboard = load()
    panels = query_panels(dashboard)
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_hostname_and_gpu_variables_query_the_datasource() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert {"Hostname", "gpu"} <= set(variables)
    for name in ("Hostname", "gpu"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == DATASOURCE_UID
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        assert match and match.group("label") == name, query


def test_exprs_use_only_exported_series() -> None:
    dashboard = load()
    for where, expr in panel_exprs(dashboard) + variable_exprs(dashboard):
        unknown = metric_names(expr) - QUERYABLE
        assert not unknown, f"{where}: {expr!r} uses series the agents do not export: {sorted(unknown)}"


def test_every_exported_series_has_a_panel() -> None:
    used: set[str] = set()
    for _, expr in panel_exprs(load()):
        used |= metric_names(expr)
    used_bases = {name.removesuffix(s) for name in used for s in ("_bucket", "_sum", "_count") if name.endswith(s)}
    missing = EXPORTED - used - used_bases
    assert not missing, f"series without a panel: {sorted(missing)}"


def test_per_gpu_panels_follow_the_variables() -> None:
    """A panel on a per-GPU series filters by the Hostname (and, for DCGM, gpu) variable."""
    per_gpu = {
        "gpu_orchestrator_gpu_allocated",
        "gpu_orchestrator_gpu_health",
        "gpu_orchestrator_gpu_drained",
        "gpu_orchestrator_gpu_unleased_in_use",
        "gpu_orchestrator_lease_idle_seconds",
    }
    for title, expr in panel_exprs(load()):
        for name in metric_names(expr) & (per_gpu | DCGM_SERIES):
            for use in re.finditer(rf"\b{name}\b(\{{[^}}]*\}})?", expr):
                matchers = use.group(1) or ""
                assert 'Hostname=~"$Hostname"' in matchers, f"{title}: {name} ignores $Hostname"
                if name in DCGM_SERIES:
                    assert 'gpu=~"$gpu"' in matchers, f"{title}: {name} ignores $gpu"
