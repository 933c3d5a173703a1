"""The admission core: idempotent request ids, GPUs held by proposals in flight, and answers.

Each scenario drives `Admission` as the lease service and the whole-cluster
simulation do: `begin` claims an id, `decide` returns the command to propose
(registered as pending), the test applies it to a LeaseTable when the log
would, then `settle` and `finish`. No trio, no clock: `now` is passed in.
"""

from __future__ import annotations

import random

import pytest

from coordinator.admission import PROCEED, UNSURE, WAIT, Admission, Repeat
from coordinator.commands import Allocate, Cancel, Enqueue, Release
from coordinator.errors import Conflict, QueueFull
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, GpuView, Requirements
from coordinator.scheduler import Scheduler, SchedulerConfig

H100_MB = 81559


def inventory(nodes: int = 1, per_node: int = 2) -> Inventory:
    return Inventory.of(
        GpuView(f"n{n}", i, f"GPU-n{n}-{i}", "NVIDIA H100 80GB HBM3", H100_MB)
        for n in range(nodes)
        for i in range(per_node)
    )


def request(request_id: str, gpus: int = 1, *, service: str = "svc", queue: bool = True, at: float = 10.0) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=service,
        workload_type="generic",
        priority=5,
        requirements=Requirements(gpu_count=gpus, min_memory_mb=1024),
        ttl_s=3600.0,
        submitted_at=at,
        queue=queue,
    )


def admission(max_queue: int = 10) -> Admission:
    return Admission(Scheduler(SchedulerConfig(max_queue=max_queue), random.Random(7)))


def test_a_new_id_proceeds_once_and_a_concurrent_one_waits() -> None:
    core, table = admission(), LeaseTable()
    assert core.begin("r1", "svc", table) is PROCEED
    assert core.begin("r1", "svc", table) is WAIT  # the first caller still owns it
    core.finish("r1")
    assert core.begin("r1", "svc", table) is PROCEED  # nothing was applied: a fresh decision


def test_two_decisions_in_flight_never_pick_the_same_gpu() -> None:
    core, table, inv = admission(), LeaseTable(), inventory(per_node=2)
    first = core.decide(request("a"), table, inv, 10.0)
    second = core.decide(request("b"), table, inv, 10.0)
    assert isinstance(first, Allocate) and isinstance(second, Allocate)
    assert {g.ref for g in first.allocation.gpus}.isdisjoint(g.ref for g in second.allocation.gpus)
    # Both GPUs are pending: a third request queues rather than double-booking.
    third = core.decide(request("c"), table, inv, 10.0)
    assert isinstance(third, Enqueue)
    assert core.pending_gpus == {g.ref for c in (first, second) for g in c.allocation.gpus}


def test_settling_a_refused_or_lost_proposal_frees_its_gpus() -> None:
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    lost = core.decide(request("a"), table, inv, 10.0)
    core.settle(lost)  # e.g. ProposalLost: never applied
    assert core.pending_gpus == frozenset()
    again = core.decide(request("b"), table, inv, 11.0)
    assert isinstance(again, Allocate) and again.allocation.gpus == lost.allocation.gpus


def test_an_applied_id_repeats_its_answer_and_a_used_one_is_refused() -> None:
    core, table, inv = admission(), LeaseTable(), inventory()
    assert core.begin("r1", "svc", table) is PROCEED
    command = core.decide(request("r1"), table, inv, 10.0)
    result = table.apply(command)
    core.settle(command)
    outcome = core.answer(command, result, table)
    core.finish("r1")
    assert outcome.allocation is not None and not outcome.repeated
    repeat = core.begin("r1", "svc", table)
    assert isinstance(repeat, Repeat) and repeat.outcome.allocation == outcome.allocation and repeat.outcome.repeated
    with pytest.raises(Conflict) as other:
        core.begin("r1", "other-svc", table)
    assert other.value.code == "request_id_conflict"
    table.apply(Release(20.0, (outcome.allocation.allocation_id,)))
    with pytest.raises(Conflict) as used:
        core.begin("r1", "svc", table)
    assert used.value.code == "request_id_used"


def test_a_queued_answer_names_its_position_and_repeats_it() -> None:
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    held = core.decide(request("holder"), table, inv, 10.0)
    table.apply(held)
    core.settle(held)
    waiting = core.decide(request("w1", at=11.0), table, inv, 11.0)
    assert isinstance(waiting, Enqueue) and core.pending_enqueues == 1
    result = table.apply(waiting)
    core.settle(waiting)
    answer = core.answer(waiting, result, table)
    assert answer.queued is not None and answer.position == 1 and core.pending_enqueues == 0
    repeat = core.begin("w1", "svc", table)
    assert isinstance(repeat, Repeat) and repeat.outcome.position == 1


def test_an_enqueue_placed_before_it_is_answered_says_allocated() -> None:
    """The scheduler may place a queued request in the entry right after its Enqueue: the answer follows the table."""
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    held = core.decide(request("holder"), table, inv, 10.0)
    table.apply(held)
    core.settle(held)
    waiting = core.decide(request("w1", at=11.0), table, inv, 11.0)
    result = table.apply(waiting)
    core.settle(waiting)
    table.apply(Release(12.0, (held.allocation.allocation_id,)))
    (place,) = [c for c in core.tick(table, inv, 12.0) if isinstance(c, Allocate)]
    table.apply(place)
    core.settle(place)
    answer = core.answer(waiting, result, table)
    assert answer.allocation is not None and answer.allocation.request.request_id == "w1"


def test_pending_enqueues_count_against_the_queue_bound() -> None:
    core, table, inv = admission(max_queue=1), LeaseTable(), inventory(per_node=1)
    held = core.decide(request("holder"), table, inv, 10.0)
    table.apply(held)
    assert isinstance(core.decide(request("w1"), table, inv, 10.0), Enqueue)  # in flight, not applied
    with pytest.raises(QueueFull):
        core.decide(request("w2"), table, inv, 10.0)


def test_a_refusal_by_the_table_reaches_the_caller() -> None:
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    command = core.decide(request("r1"), table, inv, 10.0)
    # Another entry took the GPU first (it cannot happen on one leader; the table still refuses it).
    assert isinstance(command, Allocate)
    table.apply(Enqueue(9.0, request("r1"), None))
    table.apply(Cancel(9.5, ("r1",)))
    result = table.apply(command)
    core.settle(command)
    with pytest.raises(Conflict):
        core.answer(command, result, table)


def test_tick_holds_the_gpus_it_places_until_settled() -> None:
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    held = core.decide(request("holder"), table, inv, 10.0)
    table.apply(held)
    core.settle(held)
    table.apply(core.decide(request("w1", at=11.0), table, inv, 11.0))
    table.apply(Release(12.0, (held.allocation.allocation_id,)))
    placed = core.tick(table, inv, 12.0)
    assert [type(c) for c in placed] == [Allocate]
    # A decision while the tick's Allocate is in flight must not take the same GPU.
    assert isinstance(core.decide(request("late", at=13.0), table, inv, 13.0), Enqueue)


def test_an_unsure_proposal_holds_its_gpus_until_the_table_records_it() -> None:
    """A caller cut short (request bound, outcome unknown) must not free GPUs its entry may still take."""
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    command = core.decide(request("r1"), table, inv, 10.0)
    assert isinstance(command, Allocate)
    core.unsure(command)
    # Not applied yet: the GPU is still held, so another request queues instead of colliding.
    assert isinstance(core.decide(request("r2"), table, inv, 11.0), Enqueue)
    table.apply(command)  # the entry applies after all
    assert core.tick(table, inv, 12.0) == [] and core.pending_gpus == frozenset()


def test_an_unsure_proposal_that_never_applies_is_held_only_while_its_request_is_unknown() -> None:
    core, table, inv = admission(), LeaseTable(), inventory(per_node=1)
    command = core.decide(request("r1"), table, inv, 10.0)
    core.unsure(command)
    # The caller's retry is cancelled instead: the record settles the unsure Allocate.
    table.apply(Enqueue(11.0, request("r1", at=11.0), None))
    table.apply(Cancel(11.5, ("r1",)))
    again = core.decide(request("r3"), table, inv, 12.0)
    assert isinstance(again, Allocate) and again.allocation.gpus == command.allocation.gpus


def test_a_retry_of_an_unsure_request_waits_for_the_table_and_then_gets_the_original_answer() -> None:
    """Found by the nemesis: a forward given up on was sent again to the same leader, whose first
    call had ended without an answer; deciding again proposed a second Allocate for the id, and
    the caller got the table's refusal (409 duplicate_request) instead of its allocation."""
    core, table, inv = admission(), LeaseTable(), inventory(per_node=2)
    assert core.begin("r1", "svc", table) is PROCEED
    first = core.decide(request("r1"), table, inv, 10.0)
    core.unsure(first)  # the call was cut short: its entry may still apply
    core.finish("r1")
    assert core.begin("r1", "svc", table) is UNSURE  # not PROCEED: no second command for r1
    table.apply(first)  # the first entry applies after all
    again = core.begin("r1", "svc", table)
    assert isinstance(again, Repeat) and again.outcome.allocation == first.allocation
