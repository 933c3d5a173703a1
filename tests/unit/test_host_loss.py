"""Host loss: the MarkHostLost command, its effect on the lease table, and the grace-period policy.

The table scenarios build commands by hand with explicit `at` times, as in
test_lease_table.py. The policy is fed (node, status, now) observations the way
the leader's watcher feeds it (agent/host_loss.py), with no trio and no clock.
"""

from __future__ import annotations

import json
import math

import pytest

from coordinator.commands import Allocate, Enqueue, MarkHostLost, Release, command_from_wire
from coordinator.errors import Conflict, InvalidRequest, NotFound
from coordinator.host_loss import HostLossPolicy
from coordinator.lease_table import LeaseTable
from coordinator.model import LOST, TERMINAL_STATUSES, GpuRef, LeaseEvent, RequestRecord
from coordinator.views import graph_event, record_view, webhook_payload
from tests.unit.test_lease_table import allocation, apply_ok, assert_refused, granted, request

# ---------------------------------------------------------------- the command on the wire


def test_mark_host_lost_round_trips_through_its_wire_form() -> None:
    command = MarkHostLost(12.5, "gpu-host-7")
    wire = json.loads(json.dumps(command.to_wire()))
    assert wire == {"op": "mark_host_lost", "at": 12.5, "node": "gpu-host-7"}
    assert command_from_wire(wire) == command


@pytest.mark.parametrize("node", ["", None, 7, ["n1"]])
def test_mark_host_lost_without_a_node_name_is_refused_on_decode(node: object) -> None:
    """No node name could match an allocation: such an entry is corrupt, not a silent no-op."""
    with pytest.raises(InvalidRequest) as caught:
        command_from_wire({"op": "mark_host_lost", "at": 1.0, "node": node})
    assert caught.value.code == "invalid_command"


# ---------------------------------------------------------------- the lease table


def test_every_live_lease_on_the_node_ends_as_lost_and_its_gpus_are_freed() -> None:
    """Each lease on the node gets a lost event (oldest first), a lost record and free GPUs; others live on."""
    table = LeaseTable()
    a1 = granted(table, "a1", "r1", [0, 1], 1.0, node="gone")
    kept = granted(table, "k1", "rk", [0], 1.5, node="other")
    a2 = granted(table, "a2", "r2", [3], 2.0, node="gone", expires_at=500.0)
    result = apply_ok(table, MarkHostLost(300.0, "gone"))
    assert result.events == (
        LeaseEvent("lost", 300.0, a1.request, allocation=a1, reason="host_lost"),
        LeaseEvent("lost", 300.0, a2.request, allocation=a2, reason="host_lost"),
    )
    assert result.affected == ("a1", "a2")
    assert table.allocations() == [kept]
    assert dict(table.held_gpus()) == {GpuRef("other", 0): "k1"}
    for index in (0, 1, 3):
        assert table.released_at(GpuRef("gone", index)) == 300.0
    assert table.record("r1") == RequestRecord("r1", "svc", LOST, 1.0, 300.0, allocation_id="a1", reason="host_lost")
    assert LOST in TERMINAL_STATUSES


def test_the_freed_gpus_can_be_allocated_again_when_the_host_returns() -> None:
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0, node="gone")
    apply_ok(table, MarkHostLost(300.0, "gone"))
    again = granted(table, "a2", "r2", [0], 400.0, node="gone")
    assert table.holder(GpuRef("gone", 0)) == again.allocation_id


def test_marking_a_host_lost_twice_or_with_nothing_on_it_changes_nothing() -> None:
    """Idempotent: a repeat, or a node holding nothing, is refused with no events and no change, clock included."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0, node="gone")
    granted(table, "k1", "rk", [0], 1.0, node="other")
    apply_ok(table, MarkHostLost(300.0, "gone"))
    assert_refused(table, MarkHostLost(301.0, "gone"), NotFound, "not_found")
    assert_refused(table, MarkHostLost(302.0, "never-seen"), NotFound, "not_found")
    assert table.clock == 300.0


def test_a_lost_lease_cannot_be_released_or_renewed_and_its_request_id_stays_used() -> None:
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0, node="gone")
    apply_ok(table, MarkHostLost(300.0, "gone"))
    assert_refused(table, Release(301.0, ("a1",)), NotFound, "not_found")
    assert_refused(table, Enqueue(302.0, request("r1", submitted_at=302.0), None), Conflict, "duplicate_request")


def test_queued_requests_are_not_touched() -> None:
    """A queued request has no host yet; even one constrained to the lost node waits on."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0, node="gone")
    apply_ok(table, Enqueue(2.0, request("q1", submitted_at=2.0), None))
    apply_ok(table, MarkHostLost(300.0, "gone"))
    assert [q.request.request_id for q in table.queue()] == ["q1"]


def test_lost_records_are_kept_for_retention_then_pruned() -> None:
    """GET /gpu/requests/{id} answers "lost" for retention_s, like any ended request."""
    table = LeaseTable(retention_s=100.0)
    granted(table, "a1", "r1", [0], 0.0, node="gone")
    apply_ok(table, MarkHostLost(10.0, "gone"))
    granted(table, "a2", "r2", [0], 110.0, node="other")
    record = table.record("r1")
    assert record is not None and record.status == LOST
    granted(table, "a3", "r3", [1], 110.5, node="other")
    assert table.record("r1") is None


def test_replay_and_snapshot_restore_agree_across_a_host_loss() -> None:
    """The log alone, or a snapshot taken midway plus the rest, gives the same table and events."""
    history = [
        Allocate(1.0, allocation("a1", request("r1", submitted_at=1.0), [0, 1], node="gone", at=1.0)),
        Allocate(2.0, allocation("a2", request("r2", submitted_at=2.0), [0], node="other", at=2.0)),
        MarkHostLost(300.0, "gone"),
        MarkHostLost(301.0, "gone"),
        Allocate(400.0, allocation("a3", request("r3", submitted_at=400.0), [1], node="gone", at=400.0)),
    ]
    table = LeaseTable()
    outcomes = [table.apply(c) for c in history]
    for cut in range(len(history) + 1):
        first = LeaseTable()
        for command in history[:cut]:
            first.apply(command)
        restored = LeaseTable.restore(json.loads(json.dumps(first.snapshot())))
        rest = [restored.apply(command_from_wire(json.loads(json.dumps(c.to_wire())))) for c in history[cut:]]
        assert [(r.events, r.affected, r.error and r.error.code) for r in rest] == [
            (r.events, r.affected, r.error and r.error.code) for r in outcomes[cut:]
        ]
        assert restored.snapshot() == table.snapshot()


# ---------------------------------------------------------------- what the outside world sees


def test_the_webhook_and_graph_event_say_lost_with_the_host() -> None:
    table = LeaseTable()
    alloc = granted(table, "a1", "r1", [0], 1.0, node="gone")
    (event,) = apply_ok(table, MarkHostLost(300.0, "gone")).events
    payload = webhook_payload(event)
    assert (payload["status"], payload["event"], payload["reason"]) == ("lost", "lost", "host_lost")
    assert payload["node"] == "gone" and payload["allocation"]["id"] == alloc.allocation_id
    assert payload["at"] == "1970-01-01T00:05:00.000Z"
    graph = graph_event(event, "leader-1")
    assert (graph["type"], graph["reason"], graph["allocation_id"]) == ("gpu.allocation.lost", "host_lost", "a1")
    record = table.record("r1")
    assert record is not None
    assert record_view(record, None, None)["status"] == "lost"


# ---------------------------------------------------------------- the grace-period policy


def test_a_dead_host_is_lost_once_the_grace_period_has_passed() -> None:
    policy = HostLossPolicy(300.0, "leader")
    assert policy.observe("h1", "alive", 0.0) is None
    assert policy.observe("h1", "dead", 10.0) == "gone"
    assert policy.observe("h1", "dead", 11.0) is None  # the clock keeps its start
    assert policy.next_deadline() == 310.0
    assert policy.lost(309.9) == []
    assert policy.lost(310.0) == ["h1"]
    assert policy.lost(400.0) == ["h1"]  # asked again (a failed proposal), still lost


@pytest.mark.parametrize("status", ["dead", "left", None])
def test_dead_left_and_forgotten_members_all_count_as_gone(status: str | None) -> None:
    policy = HostLossPolicy(5.0, "leader")
    policy.observe("h1", status, 0.0)
    assert policy.lost(5.0) == ["h1"]


def test_forgetting_a_dead_member_does_not_restart_its_clock() -> None:
    """Gossip drops a dead member after gossip_to_the_dead_time; it is still the same absence."""
    policy = HostLossPolicy(300.0, "leader")
    policy.observe("h1", "dead", 0.0)
    assert policy.observe("h1", None, 30.0) is None
    assert policy.lost(300.0) == ["h1"]


@pytest.mark.parametrize("back", ["alive", "suspect"])
def test_a_host_that_returns_within_the_grace_resets_its_clock(back: str) -> None:
    policy = HostLossPolicy(300.0, "leader")
    policy.observe("h1", "dead", 0.0)
    assert policy.observe("h1", back, 200.0) == "back"
    assert policy.gone_since("h1") is None and policy.next_deadline() is None
    assert policy.lost(300.0) == []
    assert policy.observe("h1", "dead", 250.0) == "gone"  # a second departure: a fresh clock
    assert policy.lost(549.0) == [] and policy.lost(550.0) == ["h1"]


def test_the_leaders_own_node_is_never_lost() -> None:
    policy = HostLossPolicy(1.0, "leader")
    assert policy.observe("leader", "dead", 0.0) is None
    assert policy.observe("leader", None, 0.0) is None
    assert policy.lost(100.0) == [] and policy.tracked() == []


def test_hosts_are_decided_independently_and_reported_sorted() -> None:
    policy = HostLossPolicy(10.0, "leader")
    policy.observe("h2", "dead", 0.0)
    policy.observe("h1", "left", 5.0)
    policy.observe("h3", "alive", 5.0)
    assert policy.next_deadline() == 10.0
    assert policy.lost(10.0) == ["h2"]
    assert policy.lost(15.0) == ["h1", "h2"]
    policy.forget("h2")
    assert policy.tracked() == ["h1"] and policy.lost(15.0) == ["h1"]


@pytest.mark.parametrize("grace", [0.0, -1.0, math.inf, math.nan])
def test_the_policy_refuses_a_grace_that_is_not_a_positive_number(grace: float) -> None:
    """0 is "off" in the config; the policy must never read it as "lost at once"."""
    with pytest.raises(ValueError, match="grace"):
        HostLossPolicy(grace, "leader")


def test_a_lease_placed_after_the_host_was_seen_gone_is_kept() -> None:
    """The host came back just as the decision committed: the new tenant's lease is not lost."""
    table = LeaseTable()
    granted(table, "old", "r-old", [0], 10.0, node="gone")
    granted(table, "new", "r-new", [1], 50.0, node="gone")
    result = apply_ok(table, MarkHostLost(60.0, "gone", allocated_before=40.0))
    assert result.affected == ("old",)
    assert table.allocation("new") is not None and table.allocation("old") is None
    wire = MarkHostLost(60.0, "gone", allocated_before=40.0).to_wire()
    assert command_from_wire(wire) == MarkHostLost(60.0, "gone", 40.0)
    assert "allocated_before" not in MarkHostLost(60.0, "gone").to_wire()
