"""gpuctl's rendering of queues and of why requests wait: pure functions of the API's JSON and `now`."""

from __future__ import annotations

import re
from typing import Any

from agent.gpuctl import allocate_body, build_parser
from agent.gpuctl_render import render_list, render_queued, render_queues, render_request

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def rows(out: str) -> list[dict[str, str]]:
    """The first table in `out` as dicts by header (cells two or more spaces apart)."""
    lines = out.strip().splitlines()
    headers = re.split(r"\s{2,}", lines[0].strip())
    table = []
    for line in lines[1:]:
        if not line.strip():
            break
        table.append(dict(zip(headers, re.split(r"\s{2,}", line.strip()))))
    return table


def queued(request_id: str, reason: str | None, detail: str | None = None, deadline: str | None = None) -> dict[str, Any]:
    return {
        "status": "queued", "request_id": request_id, "service_name": "svc", "workload_type": "training",
        "priority": 5, "position": 1, "submitted_at": "2027-01-15T07:59:00Z", "queue_deadline": None,
        "queue_name": "batch", "preemptible": True, "reason": reason, "reason_detail": detail,
        "preempting_deadline": deadline, "requirements": {"gpu_count": 2, "min_memory_mb": 40960},
    }


def test_list_shows_each_waiting_requests_queue_and_reason_with_the_detail_below() -> None:
    out = render_list(
        {
            "allocations": [],
            "queue": [
                queued("r1", "preempting", "2 lease(s) on n1 are being preempted for it", "2027-01-15T08:00:25Z"),
                queued("r2", "queue_quota", "queue batch is at its cap (max_gpus 8)"),
                queued("r3", None),  # an agent that does not say (an older leader): shown as -
            ],
        },
        NOW,
    )
    table = out.split("QUEUE (3)\n", 1)[1]
    assert [(r["REQUEST"], r["QUEUE"], r["REASON"]) for r in rows(table)] == [
        ("r1", "batch", "preempting (in 25s)"),
        ("r2", "batch", "queue_quota"),
        ("r3", "batch", "-"),
    ]
    assert out.endswith(
        "why:\n  r1: 2 lease(s) on n1 are being preempted for it\n  r2: queue batch is at its cap (max_gpus 8)"
    )


def test_a_queued_allocate_and_a_request_say_what_they_wait_for() -> None:
    waiting = queued("r1", "resources", "no node has 2 free GPUs of 40 GiB (n1 has 1)")
    assert "waiting_for     resources: no node has 2 free GPUs of 40 GiB (n1 has 1)" in render_queued(waiting, NOW)
    record = {"request_id": "r1", "service_name": "svc", "status": "queued", "queue": waiting}
    out = render_request(record, NOW)
    assert re.search(r"^queue\s+batch$", out, re.M)
    assert re.search(r"^waiting_for\s+resources: no node has 2 free GPUs", out, re.M)


QUEUES = {
    "queues": [
        {"name": "batch", "declared": True, "parent": None, "children": [], "guaranteed_gpus": 0,
         "guaranteed_by_model": {}, "weight": 1.0, "max_gpus": 8, "max_priority": 6, "borrow": True, "lend": True,
         "preemption_grace_s": 30.0, "idle_reclaim": {"utilization_pct": 5.0, "minutes": 30.0}, "services": ["etl"],
         "in_use_gpus": 8, "borrowed_gpus": 8, "fair_share_gpus": 2.5, "pending_requests": 2, "pending_gpus": 4,
         "preempting_leases": 1},
        {"name": "default", "declared": False, "parent": None, "children": [], "guaranteed_gpus": 0,
         "guaranteed_by_model": {}, "weight": 1.0, "max_gpus": None, "max_priority": 10, "borrow": True,
         "lend": True, "preemption_grace_s": 30.0, "idle_reclaim": None, "services": [], "in_use_gpus": 0,
         "borrowed_gpus": 0, "fair_share_gpus": 2.5, "pending_requests": 0, "pending_gpus": 0,
         "preempting_leases": 0},
        {"name": "research", "declared": True, "parent": None, "children": ["vision"], "guaranteed_gpus": 8,
         "guaranteed_by_model": {}, "weight": 2.0, "max_gpus": None, "max_priority": 10, "borrow": True,
         "lend": False, "preemption_grace_s": 30.0, "idle_reclaim": None, "services": [], "in_use_gpus": 4,
         "borrowed_gpus": 0, "fair_share_gpus": 11.0, "pending_requests": 0, "pending_gpus": 0,
         "preempting_leases": 0},
        {"name": "vision", "declared": True, "parent": "research", "children": [], "guaranteed_gpus": 4,
         "guaranteed_by_model": {"H100": 4}, "weight": 1.0, "max_gpus": None, "max_priority": 10, "borrow": False,
         "lend": True, "preemption_grace_s": 30.0, "idle_reclaim": None, "services": ["detector"],
         "in_use_gpus": 4, "borrowed_gpus": 0, "fair_share_gpus": 4.0, "pending_requests": 0, "pending_gpus": 0,
         "preempting_leases": 0},
    ]
}


def test_queues_are_a_table_with_children_under_their_parent() -> None:
    out = render_queues(QUEUES, NOW)
    table = rows(out)
    assert [r["QUEUE"] for r in table] == ["batch", "default", "research", "vision"]
    assert out.splitlines()[4].startswith("  vision")  # indented under research
    batch, default, research, vision = table
    assert (batch["GUARANTEED"], batch["MAX"], batch["IN USE"], batch["BORROWED"], batch["FAIR SHARE"]) == (
        "0", "8", "8", "8", "2.5"
    )
    assert (batch["PENDING"], batch["PREEMPTING"], batch["TERMS"]) == ("2 (4 GPUs)", "1", "prio<=6,idle<5%/30m")
    assert (default["MAX"], default["TERMS"]) == ("-", "-")
    assert (research["WEIGHT"], research["TERMS"]) == ("2", "no-lend")
    assert (vision["GUARANTEED"], vision["TERMS"]) == ("H100:4", "no-borrow")
    assert "no queue is configured" not in out


def test_without_queues_the_table_says_how_to_declare_them() -> None:
    only_default = {"queues": [QUEUES["queues"][1]]}
    out = render_queues(only_default, NOW)
    assert [r["QUEUE"] for r in rows(out)] == ["default"]
    assert out.endswith("no queue is configured: one default queue, strict priority ([queues.<name>] in the config)")
    assert render_queues({"queues": []}, NOW) == "no queues"


def test_not_preemptible_becomes_the_request_field() -> None:
    args = build_parser().parse_args(["allocate", "--service", "svc", "--gpus", "1", "--not-preemptible"])
    assert allocate_body(args) == {"service_name": "svc", "gpu_count": 1, "preemptible": False}
    args = build_parser().parse_args(["allocate", "--service", "svc"])
    assert "preemptible" not in allocate_body(args)
