"""What a preempted lease's holder and the graph service hear: `lease_preempting` with its deadline, then `preempted`.

The events come from a real LeaseTable applying Preempt and the Release at the
deadline; `deliveries` turns them into the outbox rows every server derives.
"""

from __future__ import annotations

from dataclasses import replace

from coordinator.commands import Allocate, Preempt, Release
from coordinator.lease_table import LeaseTable
from coordinator.notifications import deliveries
from coordinator.views import graph_event, webhook_payload
from tests.unit.test_lease_table import allocation, apply_ok, request

HOOK = "https://hooks.example/gpu"


def leased(table: LeaseTable) -> None:
    req = replace(request("r1", submitted_at=1.0), webhook_url=HOOK, queue_name="batch")
    apply_ok(table, Allocate(1.0, allocation("a1", req, [0], at=1.0)))


def test_the_holder_hears_lease_preempting_with_the_deadline_then_preempted() -> None:
    table = LeaseTable()
    leased(table)
    (preempting,) = apply_ok(table, Preempt(100.0, (("a1", 130.0),), "priority")).events
    payload = webhook_payload(preempting)
    assert (payload["event"], payload["status"], payload["reason"]) == ("lease_preempting", "lease_preempting", "priority")
    assert payload["deadline"] == "1970-01-01T00:02:10.000Z"
    assert payload["allocation"]["allocation_id"] == "a1"
    (ended,) = apply_ok(table, Release(130.0, ("a1",), "preempted")).events
    payload = webhook_payload(ended)
    assert (payload["event"], payload["reason"]) == ("preempted", "preempted") and "deadline" not in payload
    # Both go to the webhook (the holder cannot see them in any answer of its own) and to the graph service.
    rows = deliveries(7, (preempting, ended), "leader-1", "https://graph.example/events")
    assert [(d.kind, d.payload["event"]) for d in rows] == [
        ("webhook", "lease_preempting"),
        ("graph", "lease_preempting"),
        ("webhook", "preempted"),
        ("graph", "preempted"),
    ]


def test_idle_reclaim_ends_with_reason_idle_and_the_graph_event_carries_the_deadline() -> None:
    table = LeaseTable()
    leased(table)
    (preempting,) = apply_ok(table, Preempt(100.0, (("a1", 160.0),), "idle")).events
    graph = graph_event(preempting, "leader-1")
    assert (graph["type"], graph["event"], graph["reason"]) == ("gpu.allocation.lease_preempting", "lease_preempting", "idle")
    assert graph["deadline"] == "1970-01-01T00:02:40.000Z"
    (ended,) = apply_ok(table, Release(160.0, ("a1",), "idle")).events
    assert (webhook_payload(ended)["event"], webhook_payload(ended)["reason"]) == ("preempted", "idle")
    assert graph_event(ended, "leader-1")["type"] == "gpu.allocation.preempted"
