"""The checker against small hand-made histories: clean ones pass, each planted violation is caught."""

from __future__ import annotations

from typing import Any

from tests.nemesis.checker import check, no_leader_but_applied
from tests.nemesis.history import Call, Fault, FinalState, History
from tests.nemesis.report import report
from tests.nemesis.run import RunConfig

SERVERS = ("srv-81", "srv-82", "srv-83")
CLIENTS = ("cli-84", "cli-85")
EVERY = (*SERVERS, *CLIENTS)


def allocation(aid: str, rid: str, gpus: list[int], node: str = "srv-81") -> dict[str, Any]:
    return {"id": aid, "allocation_id": aid, "status": "allocated", "request_id": rid, "service_name": "svc",
            "node": node, "gpu_ids": gpus, "expires_at": "2026-12-04T17:00:00.000Z"}


def allocate(rid: str, start: float, end: float, status: int | None = 200, body: Any = None, node: str = "cli-84") -> Call:
    return Call("allocate", node, 0, rid, start, end, status, body)


def release(rid: str, aid: str, start: float, end: float, status: int | None = 200, body: Any = None,
            node: str = "srv-82") -> Call:
    if status == 200 and body is None:
        body = {"status": "released", "released": [aid], "cancelled": []}
    return Call("release", node, 0, rid, start, end, status, body, allocation_id=aid)


def error(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": "..."}}


def final(*allocations: dict[str, Any], per_node: dict[str, list[dict[str, Any]]] | None = None) -> FinalState:
    listed = {n: list(allocations) for n in EVERY}
    listed.update(per_node or {})
    return FinalState(SERVERS, CLIENTS, listed, end=100.0)


A = allocation("svc-a", "r-a", [0])
B = allocation("svc-b", "r-b", [0])  # the same GPU as A


def clean() -> History:
    """A holds GPU 0, releases it, then B takes it and keeps it: nothing wrong."""
    return History(seed=1, calls=[
        allocate("r-a", 0.0, 1.0, 503, error("no_leader")),
        allocate("r-a", 1.1, 1.5, body=A),
        release("r-a", "svc-a", 2.0, 3.0),
        allocate("r-b", 3.5, 4.0, body=B),
    ], final=final(B))


def kinds(history: History) -> list[str]:
    return sorted({v.kind for v in check(history).violations})


def test_a_clean_history_passes() -> None:
    verdict = check(clean())
    assert verdict.safe, verdict.violations
    assert "safety violations:                                    0" in report(clean(), verdict)


def test_a_gpu_granted_while_its_holder_had_not_begun_to_release_is_caught() -> None:
    h = clean()
    h.calls[3] = allocate("r-b", 1.6, 1.8, body=B)  # acknowledged before A's release began at 2.0
    assert kinds(h) == ["gpu_double_allocated"]


def test_a_gpu_granted_while_its_release_was_in_flight_is_not_a_violation() -> None:
    h = clean()
    h.calls[3] = allocate("r-b", 2.2, 2.5, body=B)  # A's release started at 2.0: A may be gone already
    assert check(h).safe


def test_an_unreleased_gpu_that_never_answered_its_release_stays_held() -> None:
    h = clean()
    h.calls[2] = release("r-a", "svc-a", 2.0, 3.0, status=None)  # no answer: A surely held until 2.0 only
    h.calls[3] = allocate("r-b", 1.7, 1.9, body=B)
    assert kinds(h) == ["gpu_double_allocated"]


def test_an_acknowledged_allocation_missing_on_one_node_is_caught() -> None:
    h = clean()
    h.final = final(B, per_node={"srv-82": []})
    assert kinds(h) == ["acknowledged_lost", "replicas_disagree"]


def test_an_allocation_listed_differently_is_caught() -> None:
    h = clean()
    h.final = final(B, per_node={"srv-83": [allocation("svc-b", "r-b", [1])]})
    assert kinds(h) == ["replica_differs", "replicas_disagree"]


def test_an_acknowledged_release_still_listed_is_caught() -> None:
    h = clean()
    h.final = final(B, allocation("svc-a", "r-a", [1]))
    assert "released_still_present" in kinds(h)


def test_one_request_id_with_two_allocations_is_caught() -> None:
    h = clean()
    h.calls.append(allocate("r-b", 5.0, 5.5, body=allocation("svc-b2", "r-b", [1])))
    h.final = final(B, allocation("svc-b2", "r-b", [1]))
    assert "request_id_two_allocations" in kinds(h)


def test_two_gpus_in_one_replica_is_caught_even_without_the_calls() -> None:
    h = clean()
    h.final = final(B, allocation("svc-c", "r-c", [0]))  # svc-c never acknowledged, but it shares GPU 0
    assert "gpu_double_allocated" in kinds(h)


def test_undocumented_answers_are_caught_and_documented_ones_are_not() -> None:
    h = clean()
    documented = [
        allocate("r-x", 6.0, 6.1, 409, error("no_capacity")),
        allocate("r-y", 6.0, 6.1, 503, error("outcome_unknown")),
        allocate("r-y", 6.2, 6.3, 503, error("timeout")),
        allocate("r-z", 6.0, 6.1, None),
        release("r-a", "svc-a", 6.0, 6.1, 404, error("not_found")),
    ]
    h.calls += documented
    assert check(h).safe
    for planted in (
        allocate("r-q", 7.0, 7.1, 500, error("internal_error")),
        allocate("r-q", 7.0, 7.1, 503, error("bogus")),
        allocate("r-q", 7.0, 7.1, 404, error("not_found")),
        allocate("r-q", 7.0, 7.1, 200, allocation("svc-q", "r-other", [3])),
        release("r-b", "svc-b", 7.0, 7.1, 409, error("conflict")),
        release("r-b", "svc-b", 7.0, 7.1, 200, {"status": "released", "released": [], "cancelled": []}),
    ):
        bad = clean()
        bad.calls.append(planted)
        assert "undocumented_answer" in kinds(bad), planted


def test_no_final_state_is_a_violation() -> None:
    h = clean()
    h.final = None
    assert "no_final_state" in kinds(h)


def test_a_no_leader_answer_to_a_write_applied_during_the_call_is_counted() -> None:
    h = clean()
    # r-a's allocate was submitted (the leader's clock) during the no_leader call at [0, 1] ...
    assert h.final is not None
    h.final.requests = {"r-a": {"request_id": "r-a", "status": "released", "submitted_at": "1970-01-01T00:00:00.500Z",
                                "updated_at": "1970-01-01T00:00:02.500Z"}}
    assert [c.request_id for c in no_leader_but_applied(h)] == ["r-a"]
    # ... and not when it was submitted by the retry after it.
    h.final.requests["r-a"]["submitted_at"] = "1970-01-01T00:00:01.200Z"
    assert no_leader_but_applied(h) == []
    # A release answered no_leader whose request ended released while it ran.
    h.calls.append(release("r-a", "svc-a", 2.0, 3.0, 503, error("no_leader")))
    assert [c.op for c in no_leader_but_applied(h)] == ["release"]


def test_fault_figures_measure_from_the_fault_and_leave_out_calls_to_stopped_nodes() -> None:
    h = clean()
    fault = Fault("kill_leader", ("srv-81",), ("srv-81",), "srv-81", start=10.0, heal=13.0, settled=14.0,
                  serving_after_heal={n: 13.5 for n in EVERY} | {"srv-81": 13.9})
    h.faults.append(fault)
    h.calls += [
        allocate("r-k", 10.0, 19.0, None, node="srv-81"),  # to the killed node: not counted as a long call
        allocate("r-k", 10.1, 11.0, 200, allocation("svc-k", "r-k", [1]), node="srv-81"),  # the killed node: no survivor
        allocate("r-k", 11.0, 11.6, 200, allocation("svc-k", "r-k", [1]), node="srv-82"),
        allocate("r-m", 11.0, 12.0, 200, allocation("svc-m", "r-m", [1], node="cli-84"), node="cli-85"),
    ]
    h.final = final(B, allocation("svc-k", "r-k", [1]), allocation("svc-m", "r-m", [1], node="cli-84"))
    verdict = check(h)
    assert verdict.safe, verdict.violations
    figures = verdict.figures[0]
    assert round(figures.first_200_server or 0, 3) == 1.6
    assert round(figures.first_200_client or 0, 3) == 2.0
    assert round(figures.heal_all_serving or 0, 3) == 0.9
    assert round(figures.old_leader_serving or 0, 3) == 0.9
    assert round(figures.longest_call or 0, 3) == 1.0
    assert figures.no_answer == 1
    assert "kill_leader" in report(h, verdict)


def test_a_history_survives_its_json() -> None:
    h = clean()
    h.faults.append(Fault("pause", ("srv-82",), ("srv-82",), "srv-81", 1.0, 2.0, 3.0, {"srv-82": 2.5}, "srv-82"))
    assert History.load(h.dump()) == h


def test_a_failing_run_names_the_command_that_replays_it() -> None:
    assert RunConfig.long_run(7).replay == "python -m tests.nemesis.run --long --seed 7"
    assert RunConfig.short(3).replay == "python -m tests.nemesis.run --seed 3"


def test_an_agent_that_exited_by_itself_is_caught() -> None:
    h = clean()
    h.faults.append(Fault("loss", (), (), "srv-81", 1.0, 2.0, 3.0, {n: 2.5 for n in EVERY}, "servers", crashed=("srv-83",)))
    assert kinds(h) == ["agent_crashed"]
