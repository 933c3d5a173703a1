"""Usage accounting in the lease table: GPU-seconds allocated and utilized, per queue and service, by the hour.

Scenarios in the style of test_lease_table.py: commands with explicit times,
the exact figures they must leave, and refusals that change nothing. Times are
chosen on hour boundaries (H = 3600) so the splits are easy to check by eye.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import pytest

from coordinator.commands import (
    MAX_USAGE_ROWS,
    Allocate,
    Command,
    MarkHostLost,
    RecordUsage,
    Release,
    command_from_wire,
    decode_command,
    encode_command,
)
from coordinator.errors import InvalidRequest
from coordinator.lease_table import LeaseTable
from coordinator.lease_usage import DEFAULT_USAGE_RETENTION_S, usage_window
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, Requirements
from tests.unit.test_lease_table import apply_ok, assert_refused

H = 3600.0
DAY = 86_400.0


def lease(
    allocation_id: str,
    indices: Sequence[int],
    at: float,
    *,
    service: str = "svc",
    queue: str = "default",
    node: str = "n1",
    expires_at: float | None = None,
) -> Allocation:
    req = AllocationRequest(
        request_id=f"req-{allocation_id}",
        service_name=service,
        workload_type="generic",
        priority=5,
        requirements=Requirements(gpu_count=len(indices), min_memory_mb=1024),
        ttl_s=0.0,
        submitted_at=at,
        queue_name=queue,
    )
    gpus = tuple(AllocatedGpu(node, i, f"GPU-{node}-{i}", "H100", 81559) for i in indices)
    return Allocation(allocation_id, req, node, gpus, at, expires_at)


def grant(table: LeaseTable, alloc: Allocation) -> None:
    apply_ok(table, Allocate(alloc.allocated_at, alloc))


def by(table: LeaseTable, since: float, until: float, key: str, now: float) -> dict[str, tuple[float, float]]:
    return {name: (a, u) for name, a, u in table.usage(since, until, key, now)}


# ---------------------------------------------------------------- allocated


def test_a_released_lease_is_credited_gpus_times_seconds_over_the_hours_it_was_held() -> None:
    """Two GPUs from 10:30 to 12:15 are 2 × 1.75 h, split 1800 s / 3600 s / 900 s per GPU over three hours."""
    table = LeaseTable()
    grant(table, lease("a", [0, 1], 10.5 * H, service="train"))
    apply_ok(table, Release(12.25 * H, ("a",)))
    assert by(table, 10 * H, 11 * H, "service", now=13 * H) == {"train": (2 * 1800.0, 0.0)}
    assert by(table, 11 * H, 12 * H, "service", now=13 * H) == {"train": (2 * 3600.0, 0.0)}
    assert by(table, 12 * H, 13 * H, "service", now=13 * H) == {"train": (2 * 900.0, 0.0)}
    assert by(table, 0, 24 * H, "queue", now=13 * H) == {"default": (2 * 1.75 * H, 0.0)}
    assert table.usage_totals(now=13 * H) == {("default", "train"): (2 * 1.75 * H, 0.0)}


@pytest.mark.parametrize("end", ["expired", "lost", "operator"])
def test_every_end_reason_credits_the_lease(end: str) -> None:
    """Expiry, a lost host and an operator's release end the lease and credit it like a release."""
    table = LeaseTable()
    grant(table, lease("a", [0], 1 * H, expires_at=2 * H))
    command: Command = {
        "expired": Release(3 * H, ("a",), reason="expired"),
        "lost": MarkHostLost(3 * H, "n1"),
        "operator": Release(3 * H, ("a",), reason="drained by ops"),
    }[end]
    apply_ok(table, command)
    assert table.usage_totals(now=9 * H) == {("default", "svc"): (2 * H, 0.0)}


def test_live_leases_count_on_read_up_to_now() -> None:
    """A live lease is not in the ledger; a query adds its share held within the range and before `now`."""
    table = LeaseTable()
    grant(table, lease("a", [0, 1, 2, 3], 1 * H, service="inf", queue="prod"))
    assert by(table, 0, 10 * H, "service", now=1.5 * H) == {"inf": (4 * 1800.0, 0.0)}
    assert by(table, 2 * H, 3 * H, "queue", now=5 * H) == {"prod": (4 * H, 0.0)}
    assert by(table, 6 * H, 7 * H, "queue", now=5 * H) == {}
    # Lifetime totals grow with `now`, and the amount credited at the end is the running share at that time.
    running = table.usage_totals(now=4 * H)[("prod", "inf")][0]
    apply_ok(table, Release(4 * H, ("a",)))
    assert table.usage_totals(now=4 * H)[("prod", "inf")][0] == running == 4 * 3 * H


def test_queries_cover_whole_hours_and_group_by_queue_or_service() -> None:
    """[since, until) widens to whole hours; services in two queues sum under `by=service`."""
    assert usage_window(10 * H + 5, 11 * H) == (10, 11)
    assert usage_window(10 * H + 5, 11 * H + 1) == (10, 12)
    assert usage_window(5 * H, 5 * H) == (5, 5)
    table = LeaseTable()
    grant(table, lease("a", [0], 0, service="s1", queue="q1"))
    grant(table, lease("b", [1], 0, service="s1", queue="q2"))
    grant(table, lease("c", [2], 0, service="s2", queue="q2"))
    apply_ok(table, Release(H, ("a", "b", "c")))
    assert table.usage(0, H, "service", now=H) == [("s1", 2 * H, 0.0), ("s2", H, 0.0)]
    assert table.usage(0, H, "queue", now=H) == [("q1", H, 0.0), ("q2", 2 * H, 0.0)]
    with pytest.raises(ValueError):
        table.usage(0, H, "node", now=H)


# ---------------------------------------------------------------- utilized


def test_record_usage_credits_utilized_seconds_to_the_hour_it_was_stamped_in() -> None:
    table = LeaseTable()
    grant(table, lease("a", [0], 0, service="s1"))
    apply_ok(table, RecordUsage(0.5 * H, (("default", "s1", 600.0),), DEFAULT_USAGE_RETENTION_S))
    apply_ok(table, RecordUsage(1.5 * H, (("default", "s1", 60.0), ("other", "s2", 30.0)), DEFAULT_USAGE_RETENTION_S))
    assert by(table, 0, H, "service", now=2 * H) == {"s1": (H, 600.0)}
    assert by(table, H, 2 * H, "service", now=2 * H) == {"s1": (H, 60.0), "s2": (0.0, 30.0)}
    assert table.usage_totals(now=2 * H) == {("default", "s1"): (2 * H, 660.0), ("other", "s2"): (0.0, 30.0)}


@pytest.mark.parametrize(
    "rows, retention_s",
    [
        ((("default", "s1", -1.0),), DEFAULT_USAGE_RETENTION_S),
        ((("default", "s1", float("nan")),), DEFAULT_USAGE_RETENTION_S),
        ((("", "s1", 1.0),), DEFAULT_USAGE_RETENTION_S),
        ((("default", "s1", 1.0),), 60.0),
        (tuple(("default", f"s{i}", 1.0) for i in range(MAX_USAGE_ROWS + 1)), DEFAULT_USAGE_RETENTION_S),
    ],
)
def test_a_malformed_usage_record_is_refused_whole(rows: tuple[tuple[str, str, float], ...], retention_s: float) -> None:
    table = LeaseTable()
    apply_ok(table, RecordUsage(H, (("default", "s0", 5.0),), DEFAULT_USAGE_RETENTION_S))
    assert_refused(table, RecordUsage(2 * H, (("default", "ok", 1.0), *rows), retention_s), InvalidRequest, "invalid_command")


def test_record_usage_travels_as_a_log_entry() -> None:
    command = RecordUsage(12.5, (("q", "s", 1.25),), 30 * DAY)
    assert decode_command(encode_command(command)) == command
    assert command_from_wire(json.loads(json.dumps(command.to_wire()))) == command


def test_a_request_without_queue_name_on_the_wire_is_in_the_default_queue() -> None:
    wire = lease("a", [0], 0, queue="batch").request.to_wire()
    assert wire["queue_name"] == "batch" and AllocationRequest.from_wire(wire).queue_name == "batch"
    del wire["queue_name"]
    assert AllocationRequest.from_wire(wire).queue_name == "default"


# ---------------------------------------------------------------- retention


def test_hours_past_retention_are_pruned_by_the_tables_clock() -> None:
    """With 2 days' retention, an hour goes once the clock is 2 days past it; a total goes once its key is idle that long."""
    table = LeaseTable()
    retention = 2 * DAY
    apply_ok(table, RecordUsage(0.5 * H, (("q", "old", 10.0),), retention))
    apply_ok(table, RecordUsage(24.5 * H, (("q", "new", 10.0),), retention))
    apply_ok(table, RecordUsage(48.9 * H, (), retention))
    assert by(table, 0, 100 * H, "service", now=49 * H) == {"old": (0.0, 10.0), "new": (0.0, 10.0)}
    apply_ok(table, RecordUsage(49 * H, (), retention))  # the 0:00 hour is now 2 days old
    assert by(table, 0, 100 * H, "service", now=49 * H) == {"new": (0.0, 10.0)}
    assert set(table.usage_totals(now=49 * H)) == {("q", "new")}


def test_a_long_lease_is_credited_only_within_retention_yet_its_total_is_whole() -> None:
    """A lease held 5 days under 2 days' retention credits the last 2 days' hours; its lifetime total is all 5."""
    table = LeaseTable()
    apply_ok(table, RecordUsage(0, (), 2 * DAY))
    grant(table, lease("a", [0], 0))
    apply_ok(table, Release(5 * DAY, ("a",)))
    assert table.usage_totals(now=5 * DAY) == {("default", "svc"): (5 * DAY, 0.0)}
    assert by(table, 0, 10 * DAY, "service", now=5 * DAY) == {"svc": (2 * DAY, 0.0)}


def test_the_total_of_a_key_with_a_live_lease_is_kept_however_long_it_runs() -> None:
    table = LeaseTable()
    apply_ok(table, RecordUsage(0, (("default", "svc", 7.0),), 2 * DAY))
    grant(table, lease("a", [0], 0))
    apply_ok(table, RecordUsage(10 * DAY, (), 2 * DAY))
    assert table.usage_totals(now=10 * DAY) == {("default", "svc"): (10 * DAY, 7.0)}


def test_default_usage_retention_is_90_days() -> None:
    assert LeaseTable().usage_retention_s == DEFAULT_USAGE_RETENTION_S == 90 * DAY


# ---------------------------------------------------------------- snapshots


def usage_history() -> tuple[list[Command], list[Command]]:
    """Commands over four days with 2 days' retention: leases ending across hours, usage records, pruning."""
    first: list[Command] = [RecordUsage(0, (), 2 * DAY)]
    later: list[Command] = []
    for i in range(8):
        at = i * 11 * H + 0.25 * H
        alloc = lease(f"a{i}", [i % 4], at, service=f"s{i % 3}", queue=f"q{i % 2}", node=f"n{i}")
        first.append(Allocate(at, alloc))
        target = first if i < 4 else later
        target.append(RecordUsage(at + 0.5 * H, ((f"q{i % 2}", f"s{i % 3}", 100.0 + i),), 2 * DAY))
        target.append(Release(at + 9.5 * H, (f"a{i}",)))
    later.append(RecordUsage(4 * DAY, (("q0", "s0", 1.0),), 2 * DAY))
    return first, later


def test_a_restored_table_accounts_and_prunes_exactly_like_one_that_replayed() -> None:
    first, later = usage_history()
    table = LeaseTable()
    for command in first:
        apply_ok(table, command)
    snap = table.snapshot()
    assert snap["version"] == 4
    restored = LeaseTable.restore(json.loads(json.dumps(snap)))
    assert restored.snapshot() == snap
    for command in later:
        assert table.apply(command).ok == restored.apply(command).ok
        assert restored.snapshot() == table.snapshot()
    assert restored.usage(0, 5 * DAY, "service", now=4 * DAY) == table.usage(0, 5 * DAY, "service", now=4 * DAY)
    assert table.usage(0, 5 * DAY, "service", now=4 * DAY) != []


def test_a_version_2_snapshot_restores_with_no_usage() -> None:
    """Snapshots written before accounting restore with an empty ledger and the default retention."""
    first, _ = usage_history()
    table = LeaseTable()
    for command in first:
        apply_ok(table, command)
    snap: dict[str, Any] = dict(table.snapshot())
    del snap["usage"], snap["usage_retention_s"]
    snap["version"] = 2
    restored = LeaseTable.restore(snap)
    # Only the live leases' running shares: nothing ended before is known.
    live = restored.allocations()
    assert len(live) == 4
    assert restored.usage_totals(now=restored.clock) == {
        (a.request.queue_name, a.request.service_name): (restored.clock - a.allocated_at, 0.0)
        for a in live
        if a.allocated_at < restored.clock
    }
    assert restored.usage_retention_s == DEFAULT_USAGE_RETENTION_S
    assert restored.snapshot()["version"] == 4


def test_a_snapshot_reencodes_only_the_hours_that_changed() -> None:
    """Unchanged hours keep their text object, so a snapshot copies references rather than re-encoding."""
    first, _ = usage_history()
    table = LeaseTable()
    for command in first:
        apply_ok(table, command)
    before = {hour: text for hour, text in table.snapshot()["usage"]["hours"]}
    last_hour = max(before)
    apply_ok(table, RecordUsage(last_hour * H + 1, (("q0", "s0", 1.0),), 2 * DAY))
    after = {hour: text for hour, text in table.snapshot()["usage"]["hours"]}
    assert after.keys() == before.keys()
    assert [h for h in after if after[h] is not before[h]] == [last_hour]


def test_a_restored_table_answers_usage_to_the_last_bit() -> None:
    """Float sums depend on their order: reads add in one order (by key, oldest lease first), not dict order.

    The original table's hour holds its keys in the order they were credited and
    its leases in the order granted; the restored one in sorted order. 0.1 + 0.2 + 0.3
    differs from 0.3 + 0.2 + 0.1 in the last bit, so any dict-order sum shows here.
    """
    table = LeaseTable()
    for queue, amount in (("q3", 0.3), ("q2", 0.2), ("q1", 0.1)):
        apply_ok(table, RecordUsage(10.0, ((queue, "svc", amount),), DEFAULT_USAGE_RETENTION_S))
    # Three live leases of one key, granted out of age order: held 0.3, 0.2 and 0.9 s at `now`.
    for i, (aid, at) in enumerate((("z", 0.7), ("m", 0.8), ("a", 0.1))):
        grant(table, lease(aid, [i], at, queue="q1"))
    restored = LeaseTable.restore(json.loads(json.dumps(table.snapshot())))
    for key in ("service", "queue"):
        assert restored.usage(0, H, key, now=1.0) == table.usage(0, H, key, now=1.0)
    assert restored.usage_totals(1.0) == table.usage_totals(1.0)
