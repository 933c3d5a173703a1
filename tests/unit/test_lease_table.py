"""The lease table as a state machine: each command's effect, its refusals and its events.

Every scenario builds its commands by hand with explicit `at` times (the table
never reads a clock), applies them in order, and asserts the exact state,
events and error codes. A refused command must leave `snapshot()` untouched,
because every replica refuses it too and must stay identical.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import pytest

from coordinator.commands import Allocate, Cancel, Command, Enqueue, Release, Renew
from coordinator.errors import Conflict, InvalidRequest, NotFound
from coordinator.lease_table import DEFAULT_RETENTION_S, ApplyResult, LeaseTable
from coordinator.model import (
    ALLOCATED,
    CANCELLED,
    EXPIRED,
    QUEUED,
    RELEASED,
    AllocatedGpu,
    Allocation,
    AllocationRequest,
    GpuRef,
    LeaseEvent,
    QueuedRequest,
    RequestRecord,
    Requirements,
)


def request(
    request_id: str,
    *,
    service: str = "svc",
    priority: int = 5,
    gpus: int = 1,
    submitted_at: float = 0.0,
    ttl_s: float = 0.0,
) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=service,
        workload_type="generic",
        priority=priority,
        requirements=Requirements(gpu_count=gpus, min_memory_mb=1024),
        ttl_s=ttl_s,
        submitted_at=submitted_at,
    )


def allocation(
    allocation_id: str,
    req: AllocationRequest,
    indices: Sequence[int],
    *,
    node: str = "n1",
    at: float = 0.0,
    expires_at: float | None = None,
) -> Allocation:
    return Allocation(
        allocation_id=allocation_id,
        request=req,
        node=node,
        gpus=tuple(
            AllocatedGpu(node, i, f"GPU-{node}-{i}", "NVIDIA H100 80GB HBM3", 81559) for i in indices
        ),
        allocated_at=at,
        expires_at=expires_at,
    )


def apply_ok(table: LeaseTable, command: Command) -> ApplyResult:
    result = table.apply(command)
    assert result.ok, result.error
    return result


def assert_refused(table: LeaseTable, command: Command, error: type[Exception], code: str) -> ApplyResult:
    """Apply `command`, expect the given refusal, and check that nothing at all changed."""
    before = table.snapshot()
    result = table.apply(command)
    assert isinstance(result.error, error)
    assert result.error.code == code
    assert result.events == () and result.affected == ()
    assert table.snapshot() == before
    return result


def granted(table: LeaseTable, allocation_id: str, request_id: str, indices: Sequence[int], at: float,
            *, expires_at: float | None = None, node: str = "n1") -> Allocation:
    alloc = allocation(allocation_id, request(request_id, submitted_at=at), indices, node=node, at=at,
                       expires_at=expires_at)
    apply_ok(table, Allocate(at, alloc))
    return alloc


# ---------------------------------------------------------------- Allocate


def test_allocate_holds_its_gpus_records_the_request_and_emits_allocated() -> None:
    """Allocate makes the lease live, maps each GPU to it and records the request as allocated."""
    table = LeaseTable()
    req = request("r1", submitted_at=9.0)
    alloc = allocation("a1", req, [0, 2], at=10.0, expires_at=70.0)
    result = apply_ok(table, Allocate(10.0, alloc))
    assert result.events == (LeaseEvent("allocated", 10.0, req, allocation=alloc, was_queued=False),)
    assert result.affected == ("a1",)
    assert table.allocations() == [alloc]
    assert dict(table.held_gpus()) == {GpuRef("n1", 0): "a1", GpuRef("n1", 2): "a1"}
    assert table.holder(GpuRef("n1", 1)) is None
    assert table.record("r1") == RequestRecord("r1", "svc", ALLOCATED, 9.0, 10.0, allocation_id="a1")
    assert table.clock == 10.0


def test_allocate_refuses_a_duplicate_allocation_id() -> None:
    """A second Allocate with a live allocation id is refused with duplicate_allocation."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0)
    again = allocation("a1", request("r2"), [1], at=2.0)
    assert_refused(table, Allocate(2.0, again), Conflict, "duplicate_allocation")


@pytest.mark.parametrize("ended", [False, True], ids=["live", "released"])
def test_allocate_refuses_a_request_id_already_handled(ended: bool) -> None:
    """A request id that was allocated (live or since released) cannot be allocated again."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0)
    if ended:
        apply_ok(table, Release(2.0, ("a1",)))
    retry = allocation("a2", request("r1"), [1], at=3.0)
    assert_refused(table, Allocate(3.0, retry), Conflict, "duplicate_request")


def test_allocate_refuses_a_gpu_held_by_another_lease() -> None:
    """Allocate of a GPU already held is refused whole: none of its GPUs are taken."""
    table = LeaseTable()
    granted(table, "a1", "r1", [1], 1.0)
    overlapping = allocation("a2", request("r2"), [0, 1], at=2.0)
    assert_refused(table, Allocate(2.0, overlapping), Conflict, "gpu_busy")
    assert table.holder(GpuRef("n1", 0)) is None


@pytest.mark.parametrize(
    "gpus",
    [
        (),
        (AllocatedGpu("n1", 0, "GPU-n1-0", "H100", 81559),) * 2,
        (AllocatedGpu("n1", 0, "GPU-n1-0", "H100", 81559), AllocatedGpu("n2", 1, "GPU-n2-1", "H100", 81559)),
    ],
    ids=["no-gpus", "repeated-gpu", "two-nodes"],
)
def test_allocate_refuses_a_malformed_allocation(gpus: tuple[AllocatedGpu, ...]) -> None:
    """An allocation must name distinct GPUs, all on its node; anything else is refused, not half-applied."""
    table = LeaseTable()
    malformed = Allocation("a1", request("r1"), "n1", gpus, 1.0, None)
    assert_refused(table, Allocate(1.0, malformed), InvalidRequest, "invalid_allocation")


def test_same_index_on_another_node_is_a_different_gpu() -> None:
    """GPUs are keyed by (node, index): n2/0 is free while n1/0 is held."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0, node="n1")
    granted(table, "a2", "r2", [0], 2.0, node="n2")
    assert dict(table.held_gpus()) == {GpuRef("n1", 0): "a1", GpuRef("n2", 0): "a2"}


# ---------------------------------------------------------------- Enqueue


def test_enqueue_queues_the_request_and_emits_queued() -> None:
    """Enqueue adds the request to the queue with its deadline and records it as queued."""
    table = LeaseTable()
    req = request("r1", submitted_at=5.0)
    result = apply_ok(table, Enqueue(5.0, req, 3605.0))
    assert result.events == (LeaseEvent("queued", 5.0, req),)
    assert result.affected == ("r1",)
    assert table.queue() == [QueuedRequest(req, 3605.0)]
    assert table.queued("r1") == QueuedRequest(req, 3605.0)
    assert table.record("r1") == RequestRecord("r1", "svc", QUEUED, 5.0, 5.0)


@pytest.mark.parametrize("state", ["queued", "allocated", "cancelled"])
def test_enqueue_refuses_a_request_id_already_handled(state: str) -> None:
    """A request id that is queued, allocated or finished cannot be queued again."""
    table = LeaseTable()
    if state == "allocated":
        granted(table, "a1", "r1", [0], 1.0)
    else:
        apply_ok(table, Enqueue(1.0, request("r1", submitted_at=1.0), None))
        if state == "cancelled":
            apply_ok(table, Cancel(2.0, ("r1",)))
    assert_refused(table, Enqueue(3.0, request("r1", submitted_at=3.0), None), Conflict, "duplicate_request")


def test_allocating_a_queued_request_takes_it_out_of_the_queue() -> None:
    """Allocate of a queued request id removes it from the queue and marks the event was_queued."""
    table = LeaseTable()
    req = request("r1", submitted_at=1.0)
    apply_ok(table, Enqueue(1.0, req, 100.0))
    alloc = allocation("a1", req, [0], at=7.0)
    result = apply_ok(table, Allocate(7.0, alloc))
    assert result.events == (LeaseEvent("allocated", 7.0, req, allocation=alloc, was_queued=True),)
    assert table.queue() == []
    assert table.record("r1") == RequestRecord("r1", "svc", ALLOCATED, 1.0, 7.0, allocation_id="a1")


def test_queue_is_ordered_by_priority_then_age_then_id() -> None:
    """queue() lists higher priority first, then the older request, then the smaller id."""
    table = LeaseTable()
    reqs = [
        request("b", priority=5, submitted_at=1.0),
        request("a", priority=5, submitted_at=1.0),
        request("old", priority=5, submitted_at=0.5),
        request("low", priority=1, submitted_at=0.0),
        request("high", priority=9, submitted_at=3.0),
    ]
    for r in reqs:
        apply_ok(table, Enqueue(3.0, r, None))
    assert [q.request.request_id for q in table.queue()] == ["high", "old", "a", "b", "low"]
    assert table.queue_length() == 5
    assert [table.queue_position(i) for i in ("high", "old", "a", "b", "low", "gone")] == [1, 2, 3, 4, 5, None]
    apply_ok(table, Cancel(4.0, ("old",)))
    assert [table.queue_position(i) for i in ("high", "old", "a", "b", "low")] == [1, None, 2, 3, 4]


def test_queue_groups_hold_equal_requirements_in_rank_order() -> None:
    """queue_groups() splits the queue by requirements; `before` keeps only those ranked ahead."""
    table = LeaseTable()
    for r in [
        request("one-late", submitted_at=3.0),
        request("two", gpus=2, submitted_at=1.0),
        request("one-early", submitted_at=0.0),
        request("one-urgent", priority=9, submitted_at=5.0),
    ]:
        apply_ok(table, Enqueue(5.0, r, None))
    groups = sorted([q.request.request_id for q in g] for g in table.queue_groups())
    assert groups == [["one-urgent", "one-early", "one-late"], ["two"]]
    ahead = table.queue_groups(before=request("x", submitted_at=2.0).rank_key())
    assert sorted([q.request.request_id for q in g] for g in ahead) == [["one-urgent", "one-early"], ["two"]]


def test_due_expiries_and_queue_deadlines_come_in_table_order() -> None:
    """expiries_due is oldest lease first, queue_due rank order; next_deadline is the earliest of all."""
    table = LeaseTable()
    assert table.next_deadline() is None
    granted(table, "late-made", "r1", [0], at=2.0, expires_at=10.0)
    granted(table, "early-made", "r2", [1], at=1.0, expires_at=12.0)
    granted(table, "forever", "r3", [2], at=0.0)
    apply_ok(table, Enqueue(3.0, request("q-low", priority=1, submitted_at=3.0), 11.0))
    apply_ok(table, Enqueue(3.0, request("q-high", priority=9, submitted_at=3.0), 12.0))
    assert table.next_deadline() == 10.0
    assert [a.allocation_id for a in table.expiries_due(9.9)] == []
    assert [a.allocation_id for a in table.expiries_due(12.0)] == ["early-made", "late-made"]
    assert [q.request.request_id for q in table.queue_due(12.0)] == ["q-high", "q-low"]
    apply_ok(table, Renew(4.0, "late-made", 20.0))
    apply_ok(table, Cancel(4.0, ("q-low",)))
    assert table.next_deadline() == 12.0
    assert [a.allocation_id for a in table.expiries_due(12.0)] == ["early-made"]
    assert [q.request.request_id for q in table.queue_due(12.0)] == ["q-high"]


def test_the_holder_journal_names_nodes_whose_gpus_were_taken_or_freed() -> None:
    """holders_changed_since lists each node whose held GPUs changed, latest first."""
    table = LeaseTable()
    start = table.holder_version
    granted(table, "a1", "r1", [0], at=1.0, node="a")
    granted(table, "b1", "r2", [0], at=1.0, node="b")
    middle = table.holder_version
    apply_ok(table, Enqueue(2.0, request("q", submitted_at=2.0), None))
    assert table.holders_changed_since(middle) == []
    apply_ok(table, Release(3.0, ("a1",)))
    assert table.holders_changed_since(middle) == ["a"]
    assert table.holders_changed_since(start) == ["a", "b"]
    assert [a.allocation_id for a in table.allocations_on("b")] == ["b1"]
    assert table.allocations_on("a") == []


# ---------------------------------------------------------------- Release


def test_release_frees_the_gpus_and_emits_released() -> None:
    """Release ends the lease, frees its GPUs, stamps their release time and records why."""
    table = LeaseTable()
    alloc = granted(table, "a1", "r1", [0, 1], 1.0)
    result = apply_ok(table, Release(4.0, ("a1",)))
    assert result.events == (LeaseEvent("released", 4.0, alloc.request, allocation=alloc, reason="released"),)
    assert result.affected == ("a1",)
    assert table.allocations() == [] and dict(table.held_gpus()) == {}
    assert table.released_at(GpuRef("n1", 0)) == 4.0
    assert table.released_at(GpuRef("n1", 1)) == 4.0
    assert table.released_at(GpuRef("n1", 2)) == 0.0
    assert table.record("r1") == RequestRecord(
        "r1", "svc", RELEASED, 1.0, 4.0, allocation_id="a1", reason="released"
    )


def test_the_record_of_an_allocation_is_found_live_and_after_it_ended() -> None:
    """record_of_allocation finds the request behind an allocation id, live or released; None when unknown."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0)
    live = table.record_of_allocation("a1")
    assert live is not None and (live.request_id, live.status) == ("r1", ALLOCATED)
    apply_ok(table, Release(2.0, ("a1",)))
    ended = table.record_of_allocation("a1")
    assert ended is not None and (ended.status, ended.reason) == (RELEASED, "released")
    assert table.record_of_allocation("a2") is None


def test_release_keeps_an_operators_reason() -> None:
    """A release reason other than "expired" is passed through to the event and the record."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0)
    result = apply_ok(table, Release(2.0, ("a1",), reason="drained"))
    assert [(e.kind, e.reason) for e in result.events] == [("released", "drained")]
    record = table.record("r1")
    assert record is not None and (record.status, record.reason) == (RELEASED, "drained")


def test_expiry_ends_the_lease_as_expired_with_reason_lease_ttl() -> None:
    """Release with reason "expired" emits kind expired / reason lease_ttl and records status expired."""
    table = LeaseTable()
    alloc = granted(table, "a1", "r1", [0], 1.0, expires_at=61.0)
    result = apply_ok(table, Release(61.0, ("a1",), reason="expired"))
    assert result.events == (LeaseEvent("expired", 61.0, alloc.request, allocation=alloc, reason="lease_ttl"),)
    assert table.record("r1") == RequestRecord(
        "r1", "svc", EXPIRED, 1.0, 61.0, allocation_id="a1", reason="lease_ttl"
    )


def test_release_of_unknown_ids_is_not_found_and_changes_nothing() -> None:
    """Release naming no live allocation is NotFound and leaves state and clock untouched."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0)
    assert_refused(table, Release(50.0, ("nope", "gone")), NotFound, "not_found")
    assert table.clock == 1.0
    assert_refused(table, Release(50.0, ()), NotFound, "not_found")


def test_partial_release_skips_ids_already_released_and_repeats() -> None:
    """Release of live, unknown and repeated ids ends each live one once and ignores the rest."""
    table = LeaseTable()
    a1 = granted(table, "a1", "r1", [0], 1.0)
    granted(table, "a0", "r0", [2], 1.5)
    a2 = granted(table, "a2", "r2", [1], 2.0)
    apply_ok(table, Release(3.0, ("a0",)))
    result = apply_ok(table, Release(4.0, ("a2", "a0", "ghost", "a1", "a2")))
    assert result.affected == ("a2", "a1")
    assert [(e.kind, e.allocation) for e in result.events] == [("released", a2), ("released", a1)]
    assert table.allocations() == []
    # a0's record still says when it really ended.
    record = table.record("r0")
    assert record is not None and record.updated_at == 3.0


def test_expiry_spares_a_lease_renewed_after_it_was_proposed() -> None:
    """An expiry whose lease was renewed in between is skipped: the acknowledged renewal wins."""
    table = LeaseTable()
    late = granted(table, "a1", "r1", [0], 1.0, expires_at=10.0)
    renewed = granted(table, "a2", "r2", [1], 1.0, expires_at=10.0)
    forever = granted(table, "a3", "r3", [2], 1.0, expires_at=10.0)
    # The scheduler's tick saw all three expired at 10 and proposed one Release;
    # two renewals got into the log ahead of it.
    apply_ok(table, Renew(9.0, "a2", 100.0))
    apply_ok(table, Renew(9.5, "a3", None))
    result = apply_ok(table, Release(10.0, ("a1", "a2", "a3"), reason="expired"))
    assert result.affected == ("a1",)
    assert [e.allocation for e in result.events] == [late]
    assert [a.allocation_id for a in table.allocations()] == ["a2", "a3"]
    assert table.holder(renewed.gpus[0].ref) == "a2" and table.holder(forever.gpus[0].ref) == "a3"
    # If every lease named was renewed, the expiry finds nothing to end.
    assert_refused(table, Release(11.0, ("a2", "a3"), reason="expired"), NotFound, "not_found")


# ---------------------------------------------------------------- Renew


def test_renew_moves_the_expiry_and_emits_renewed() -> None:
    """Renew replaces expires_at (a time or None = never) and reports the renewed lease."""
    table = LeaseTable()
    alloc = granted(table, "a1", "r1", [0], 1.0, expires_at=61.0)
    result = apply_ok(table, Renew(30.0, "a1", 3630.0))
    renewed = table.allocation("a1")
    assert renewed is not None and renewed.expires_at == 3630.0
    assert renewed.allocated_at == 1.0 and renewed.gpus == alloc.gpus
    assert result.events == (LeaseEvent("renewed", 30.0, alloc.request, allocation=renewed),)
    apply_ok(table, Renew(31.0, "a1", None))
    forever = table.allocation("a1")
    assert forever is not None and forever.expires_at is None
    # A renewal is not a lifecycle end: the record still says allocated.
    record = table.record("r1")
    assert record is not None and record.status == ALLOCATED


@pytest.mark.parametrize("at", [61.0, 62.0], ids=["at-expiry", "after-expiry"])
def test_renew_of_an_expired_lease_is_a_lease_expired_conflict(at: float) -> None:
    """Renew at or after expires_at is refused with lease_expired, even before the tick releases it."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0, expires_at=61.0)
    assert_refused(table, Renew(at, "a1", at + 60.0), Conflict, "lease_expired")


def test_renew_of_an_unknown_or_released_lease_is_not_found() -> None:
    """Renew of an id that is not live is NotFound."""
    table = LeaseTable()
    granted(table, "a1", "r1", [0], 1.0)
    apply_ok(table, Release(2.0, ("a1",)))
    assert_refused(table, Renew(3.0, "a1", 100.0), NotFound, "not_found")
    assert_refused(table, Renew(3.0, "never", 100.0), NotFound, "not_found")


# ---------------------------------------------------------------- Cancel


def test_cancel_withdraws_a_queued_request_and_emits_cancelled() -> None:
    """Cancel removes queued requests, records them cancelled, and tells the waiting caller."""
    table = LeaseTable()
    r1, r2 = request("r1", submitted_at=1.0), request("r2", submitted_at=2.0)
    apply_ok(table, Enqueue(1.0, r1, None))
    apply_ok(table, Enqueue(2.0, r2, None))
    result = apply_ok(table, Cancel(5.0, ("r2", "r1", "r2")))
    assert result.affected == ("r2", "r1")
    assert result.events == (
        LeaseEvent("cancelled", 5.0, r2, reason="cancelled", was_queued=True),
        LeaseEvent("cancelled", 5.0, r1, reason="cancelled", was_queued=True),
    )
    assert table.queue() == []
    assert table.record("r1") == RequestRecord("r1", "svc", CANCELLED, 1.0, 5.0, reason="cancelled")


def test_queue_timeout_expires_the_request() -> None:
    """Cancel with reason queue_timeout emits kind expired / reason queue_timeout and records expired."""
    table = LeaseTable()
    req = request("r1", submitted_at=1.0)
    apply_ok(table, Enqueue(1.0, req, 3601.0))
    result = apply_ok(table, Cancel(3601.0, ("r1",), reason="queue_timeout"))
    assert result.events == (LeaseEvent("expired", 3601.0, req, reason="queue_timeout", was_queued=True),)
    assert table.record("r1") == RequestRecord("r1", "svc", EXPIRED, 1.0, 3601.0, reason="queue_timeout")


def test_cancel_of_a_request_that_is_not_queued_is_not_found() -> None:
    """Cancel of an allocated, already cancelled or unknown request id is NotFound and changes nothing."""
    table = LeaseTable()
    granted(table, "a1", "allocated", [0], 1.0)
    apply_ok(table, Enqueue(1.0, request("done", submitted_at=1.0), None))
    apply_ok(table, Cancel(2.0, ("done",)))
    assert_refused(table, Cancel(3.0, ("allocated", "done", "unknown")), NotFound, "not_found")


# ---------------------------------------------------------------- retention


def test_finished_records_are_kept_for_retention_then_pruned() -> None:
    """A finished request's record lives exactly retention_s past its end, then disappears."""
    table = LeaseTable(retention_s=100.0)
    granted(table, "a1", "r1", [0], 0.0)
    apply_ok(table, Release(10.0, ("a1",)))
    apply_ok(table, Enqueue(10.0, request("q1", submitted_at=10.0), None))
    apply_ok(table, Cancel(20.0, ("q1",)))
    # Time moves only with accepted commands; at 110 r1 ended exactly retention_s ago.
    granted(table, "a2", "live", [1], 110.0)
    assert table.record("r1") is not None and table.record("q1") is not None
    apply_ok(table, Enqueue(110.5, request("waiting", submitted_at=110.5), None))
    assert table.record("r1") is None
    assert table.record("q1") is not None
    apply_ok(table, Renew(120.5, "a2", None))
    assert table.record("q1") is None
    # A pruned id may be used again, as a new request.
    apply_ok(table, Enqueue(121.0, request("r1", submitted_at=121.0), None))
    record = table.record("r1")
    assert record is not None and record.status == QUEUED


def test_live_and_queued_records_are_never_pruned() -> None:
    """However old, a queued or allocated request keeps its record."""
    table = LeaseTable(retention_s=10.0)
    granted(table, "a1", "live", [0], 0.0)
    apply_ok(table, Enqueue(0.0, request("waiting"), None))
    granted(table, "a2", "later", [1], 1_000_000.0)
    apply_ok(table, Release(1_000_001.0, ("a2",)))
    assert {rid: r.status for rid in ("live", "waiting", "later") if (r := table.record(rid))} == {
        "live": ALLOCATED,
        "waiting": QUEUED,
        "later": RELEASED,
    }


def test_default_retention_is_a_day() -> None:
    """Request ids are remembered for a day unless configured otherwise."""
    assert DEFAULT_RETENTION_S == 86_400.0
    assert LeaseTable().retention_s == 86_400.0


# ---------------------------------------------------------------- snapshots


def busy_table() -> tuple[LeaseTable, list[Command]]:
    """A table with live leases, a queue, finished records and release stamps, plus what comes next."""
    table = LeaseTable(retention_s=50.0)
    history: list[Command] = [
        Allocate(1.0, allocation("a1", request("r1", submitted_at=1.0), [0, 1], at=1.0, expires_at=41.0)),
        Allocate(2.0, allocation("a2", request("r2", submitted_at=2.0), [0], node="n2", at=2.0)),
        Enqueue(3.0, request("q1", gpus=2, priority=7, submitted_at=3.0), 3603.0),
        Enqueue(4.0, request("q2", submitted_at=4.0), None),
        Release(5.0, ("a2",)),
        Enqueue(6.0, request("q3", submitted_at=6.0), 600.0),
        Cancel(7.0, ("q3",)),
    ]
    for command in history:
        apply_ok(table, command)
    future: list[Command] = [
        Renew(10.0, "a1", 90.0),
        Allocate(20.0, allocation("a3", request("q2", submitted_at=4.0), [0], node="n2", at=20.0)),
        Release(20.0, ("a2",)),  # refused: already released
        Release(56.0, ("a3",)),  # prunes r2 (ended 5.0) but not q3 (ended 7.0)
        Cancel(57.5, ("q1",), reason="queue_timeout"),  # prunes q3
        Release(90.0, ("a1",), reason="expired"),
        Enqueue(100.0, request("r2", submitted_at=100.0), None),  # a pruned id, reused
    ]
    return table, future


def outcome(result: ApplyResult) -> tuple[Any, ...]:
    return (result.events, result.affected, None if result.error is None else result.error.code)


def test_restore_of_a_snapshot_gives_an_equal_snapshot() -> None:
    """restore(snapshot()) rebuilds every part of the state, even through JSON."""
    table, _ = busy_table()
    snap = table.snapshot()
    restored = LeaseTable.restore(json.loads(json.dumps(snap)))
    assert restored.snapshot() == snap
    assert restored.clock == 7.0 and restored.retention_s == 50.0
    assert dict(restored.held_gpus()) == dict(table.held_gpus())
    assert restored.queue() == table.queue()
    assert restored.released_at(GpuRef("n2", 0)) == 5.0


def test_restored_table_behaves_like_the_original_on_later_commands() -> None:
    """After restore, the same commands give the same events, refusals, pruning and snapshots."""
    table, future = busy_table()
    restored = LeaseTable.restore(table.snapshot())
    for command in future:
        assert outcome(restored.apply(command)) == outcome(table.apply(command))
        assert restored.snapshot() == table.snapshot()
    # Pruning happened on both, by the same rule.
    assert table.record("q3") is None and restored.record("q3") is None
    record = restored.record("r2")
    assert record is not None and record.status == QUEUED
    snap = restored.snapshot()
    assert sorted(row[0] for row in snap["records"] + finished_rows(snap)) == ["q1", "q2", "r1", "r2"]


def finished_rows(snap: dict[str, Any]) -> list[list[Any]]:
    """The finished records of a version-2 snapshot, one row each, in the order they ended."""
    return [row for _, _, text in snap["finished"] for row in json.loads(text)]


def version_1(snap: dict[str, Any]) -> dict[str, Any]:
    """The same state in the version-1 format: every record a dict, sorted by id."""
    fields = ("request_id", "service_name", "status", "submitted_at", "updated_at", "allocation_id", "reason")
    rows = sorted(snap["records"] + finished_rows(snap))
    old = {key: value for key, value in snap.items() if key != "finished"}
    return old | {
        "version": 1,
        "allocations": [json.loads(text) for text in snap["allocations"]],
        "queue": sorted((json.loads(text) for text in snap["queue"]), key=lambda w: w["request"]["request_id"]),
        "records": [dict(zip(fields, row)) for row in rows],
    }


def test_a_version_1_snapshot_restores_to_the_same_table() -> None:
    """Snapshots written before version 2 still restore, and the table goes on the same."""
    table, future = busy_table()
    old_format = version_1(table.snapshot())
    assert "finished" not in old_format
    restored = LeaseTable.restore(json.loads(json.dumps(old_format)))
    assert restored.snapshot() == table.snapshot()
    for command in future:
        assert outcome(restored.apply(command)) == outcome(table.apply(command))
        assert restored.snapshot() == table.snapshot()


def test_finished_records_are_rows_in_the_order_they_ended() -> None:
    """Finished records are compact rows by end time, as JSON texts by hour; live ones rows by id."""
    table, _ = busy_table()
    snap = table.snapshot()
    assert snap["version"] == 4
    assert [(row[0], row[2], row[4]) for row in finished_rows(snap)] == [("r2", RELEASED, 5.0), ("q3", CANCELLED, 7.0)]
    assert [(row[0], row[2]) for row in snap["records"]] == [("q1", QUEUED), ("q2", QUEUED), ("r1", ALLOCATED)]
    record = table.record("r2")
    assert record is not None and (record.status, record.updated_at, record.reason) == (RELEASED, 5.0, "released")


def test_restore_refuses_an_unknown_snapshot_version() -> None:
    """A snapshot written by another format version is refused, not misread."""
    snap = LeaseTable().snapshot()
    with pytest.raises(ValueError, match="version"):
        LeaseTable.restore(snap | {"version": 99})


def test_outbox_progress_only_moves_forward_and_survives_a_snapshot() -> None:
    from coordinator.commands import OutboxDelivered, command_from_wire

    table = LeaseTable()
    assert table.outbox_delivered_through == 0
    assert table.apply(OutboxDelivered(10.0, 40)).ok
    stale = table.apply(OutboxDelivered(11.0, 40))
    assert stale.error is not None and stale.error.code == "stale_outbox_progress"
    assert table.outbox_delivered_through == 40 and table.clock == 10.0  # a refusal changes nothing
    assert table.apply(command_from_wire(OutboxDelivered(12.0, 55).to_wire())).ok
    restored = LeaseTable.restore(table.snapshot())
    assert restored.outbox_delivered_through == 55 and restored.snapshot() == table.snapshot()
def test_finished_records_are_written_one_text_per_hour_and_pruned_alike_after_restore() -> None:
    """Each hour of end times is one [hour, ids, text]; a restored table prunes like the original."""
    table = LeaseTable(retention_s=10_000.0)
    for i, at in enumerate([100.0, 3599.5, 3600.0, 7300.0]):
        apply_ok(table, Enqueue(at, request(f"r{i}", submitted_at=at), None))
        apply_ok(table, Cancel(at, (f"r{i}",)))
    snap = table.snapshot()
    assert [(hour, ids) for hour, ids, _ in snap["finished"]] == [(0, ["r0", "r1"]), (1, ["r2"]), (2, ["r3"])]
    assert [[row[0] for row in json.loads(text)] for _, _, text in snap["finished"]] == [["r0", "r1"], ["r2"], ["r3"]]
    restored = LeaseTable.restore(json.loads(json.dumps(snap)))
    assert restored.snapshot() == snap
    for at in (10_050.0, 13_600.0, 17_000.0):  # prunes r0; then r1 but not r2; then r2
        later = Enqueue(at, request(f"late{at}", submitted_at=at), None)
        assert outcome(restored.apply(later)) == outcome(table.apply(later))
        assert restored.snapshot() == table.snapshot()
    assert [row[0] for row in finished_rows(table.snapshot())] == ["r3"]


def test_a_finished_allocation_is_found_by_its_id_after_a_snapshot_too() -> None:
    """A release retried after its lease ended is answered from the finished records, by index, restored or not."""
    from coordinator.commands import Allocate, Release

    table = LeaseTable()
    ids = []
    for n in range(3):
        alloc = allocation(f"svc-{n}-000{n}", request(f"r{n}", service=f"svc-{n}"), [n], at=10.0 + n)
        table.apply(Allocate(10.0 + n, alloc))
        table.apply(Release(20.0 + n, (alloc.allocation_id,)))
        ids.append(alloc.allocation_id)
    for restored in (table, LeaseTable.restore(table.snapshot())):
        for n, allocation_id in enumerate(ids):
            record = restored.record_of_allocation(allocation_id)
            assert record is not None and (record.request_id, record.status) == (f"r{n}", "released")
        assert restored.record_of_allocation("nobody-0000") is None


def test_a_snapshot_capture_encodes_later_to_the_same_snapshot_and_its_texts_are_kept() -> None:
    """snapshot_capture() leaves the new items' texts to to_wire() (a worker thread, in the agent);
    changes after the capture are not in it, and keep_texts caches only items still unchanged."""
    expected = busy_table()[0].snapshot()  # the same state, in another table
    fresh, future = busy_table()
    capture = fresh.snapshot_capture()
    cold = [x for x in capture.wire["allocations"] + capture.wire["queue"] if not isinstance(x, str)]
    assert cold  # a restored table has made no texts yet: they are left to the capture
    for command in future:
        fresh.apply(command)  # the table moves on while the capture is encoded
    wire = capture.to_wire()
    assert wire == expected
    fresh.keep_texts(capture, wire)
    assert fresh.snapshot() == LeaseTable.restore(fresh.snapshot()).snapshot()
    assert not [x for x in fresh.snapshot_capture().wire["allocations"] if not isinstance(x, str)]
