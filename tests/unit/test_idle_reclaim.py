"""The idle reclaim detector: which leases of opted-in queues stayed under their floor on every GPU long enough.

Each scenario feeds observations with explicit times (minutes, M = 60) and asks
`due(now)`; the detector is pure, so the same feed gives the same answer.
"""

from __future__ import annotations

import random
from typing import Sequence

import pytest

from coordinator.idle_reclaim import IdlePolicy, IdleReclaimDetector
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, GpuRef, Requirements

M = 60.0
# Queue "batch" opts in: under 10 % for 30 minutes. "prod" does not.
POLICIES = {"batch": IdlePolicy(utilization_pct=10.0, minutes=30.0)}


def lease(allocation_id: str, indices: Sequence[int], *, queue: str = "batch", node: str = "n1") -> Allocation:
    req = AllocationRequest(
        request_id=f"r-{allocation_id}",
        service_name="svc",
        workload_type="generic",
        priority=5,
        requirements=Requirements(gpu_count=len(indices), min_memory_mb=1),
        ttl_s=0.0,
        submitted_at=0.0,
        queue_name=queue,
    )
    gpus = tuple(AllocatedGpu(node, i, f"GPU-{node}-{i}", "H100", 81559) for i in indices)
    return Allocation(allocation_id, req, node, gpus, 0.0, None)


def feed(detector: IdleReclaimDetector, alloc: Allocation, at: float, *utilizations: float | None) -> None:
    for gpu, util in zip(alloc.gpus, utilizations, strict=True):
        detector.observe(gpu.ref, at, util, alloc)


def test_a_lease_idle_on_every_gpu_for_the_period_is_due() -> None:
    detector = IdleReclaimDetector(POLICIES)
    a = lease("a", [0, 1])
    feed(detector, a, 0, 3.0, 2.0)
    assert detector.idle_since("a") == 0
    assert detector.due(29 * M) == []
    assert detector.due(30 * M) == ["a"]


def test_one_busy_gpu_keeps_the_lease_and_its_period_restarts_when_it_quiets() -> None:
    detector = IdleReclaimDetector(POLICIES)
    a = lease("a", [0, 1])
    feed(detector, a, 0, 3.0, 50.0)
    assert detector.due(60 * M) == [] and detector.idle_since("a") is None
    feed(detector, a, 10 * M, 3.0, 4.0)  # the second GPU quiets at minute 10
    assert detector.due(39 * M) == [] and detector.due(40 * M) == ["a"]
    feed(detector, a, 35 * M, 3.0, 10.0)  # exactly the floor is not under it
    assert detector.due(100 * M) == []


def test_unknown_utilization_is_never_idle() -> None:
    detector = IdleReclaimDetector(POLICIES)
    a = lease("a", [0])
    feed(detector, a, 0, None)
    assert detector.due(100 * M) == []
    feed(detector, a, 1 * M, 0.0)
    feed(detector, a, 2 * M, None)
    assert detector.due(100 * M) == []


def test_a_gpu_never_observed_keeps_the_lease_from_being_idle() -> None:
    detector = IdleReclaimDetector(POLICIES)
    a = lease("a", [0, 1])
    detector.observe(a.gpus[0].ref, 0, 0.0, a)
    assert detector.due(100 * M) == []


def test_queues_that_did_not_opt_in_are_never_candidates() -> None:
    detector = IdleReclaimDetector(POLICIES)
    feed(detector, lease("p", [0], queue="prod"), 0, 0.0)
    assert detector.due(1000 * M) == [] and detector.idle_since("p") is None


def test_candidates_come_longest_overdue_first_then_by_id() -> None:
    detector = IdleReclaimDetector(POLICIES)
    feed(detector, lease("late", [0]), 5 * M, 0.0)
    feed(detector, lease("b", [1]), 0, 0.0)
    feed(detector, lease("a", [2]), 0, 0.0)
    assert detector.due(60 * M) == ["a", "b", "late"]


def test_a_gpu_seen_under_a_new_lease_drops_the_old_one() -> None:
    """The old lease ended (the table freed the GPU and granted it again): it is no candidate any more."""
    detector = IdleReclaimDetector(POLICIES)
    old, new = lease("old", [0]), lease("new", [0])
    feed(detector, old, 0, 0.0)
    feed(detector, new, 10 * M, 90.0)
    assert detector.due(100 * M) == [] and detector.idle_since("old") is None


def test_sweep_drops_leases_that_ended_unobserved() -> None:
    detector = IdleReclaimDetector(POLICIES)
    feed(detector, lease("a", [0]), 0, 0.0)
    feed(detector, lease("b", [1]), 0, 0.0)
    detector.sweep({"b"})
    assert detector.due(100 * M) == ["b"]


def test_new_policies_start_every_period_afresh() -> None:
    detector = IdleReclaimDetector(POLICIES)
    a = lease("a", [0])
    feed(detector, a, 0, 0.0)
    detector.set_policies({"batch": IdlePolicy(utilization_pct=10.0, minutes=5.0)})
    assert detector.due(100 * M) == []
    feed(detector, a, 100 * M, 0.0)
    assert detector.due(105 * M) == ["a"]


@pytest.mark.parametrize("pct, minutes", [(0.0, 5.0), (101.0, 5.0), (10.0, 0.0), (float("nan"), 5.0)])
def test_a_nonsensical_policy_is_refused(pct: float, minutes: float) -> None:
    with pytest.raises(ValueError):
        IdlePolicy(pct, minutes)


def test_the_answer_matches_a_walk_over_all_observations() -> None:
    """Seeded random feeds: the indexed answer equals a brute-force replay of each lease's history."""
    for seed in range(20):
        rng = random.Random(seed)
        detector = IdleReclaimDetector(POLICIES)
        leases = [lease(f"l{i}", [2 * i, 2 * i + 1], queue=rng.choice(["batch", "prod"])) for i in range(6)]
        history: dict[GpuRef, list[tuple[float, float | None]]] = {}
        for step in range(200):
            at = step * M
            alloc = rng.choice(leases)
            gpu = rng.choice(alloc.gpus).ref
            util = rng.choice([None, 0.0, 5.0, 9.9, 10.0, 80.0])
            detector.observe(gpu, at, util, alloc)
            history.setdefault(gpu, []).append((at, util))
            now = at + rng.choice([0.0, 20 * M, 40 * M])
            assert detector.due(now) == expected_due(leases, history, now), f"seed {seed} step {step}"


def expected_due(leases: list[Allocation], history: dict[GpuRef, list[tuple[float, float | None]]], now: float) -> list[str]:
    due: list[tuple[float, str]] = []
    for alloc in leases:
        policy = POLICIES.get(alloc.request.queue_name)
        if policy is None:
            continue
        since: list[float] = []
        for gpu in alloc.gpus:
            samples = history.get(gpu.ref, [])
            if not samples or samples[-1][1] is None or samples[-1][1] >= policy.utilization_pct:  # type: ignore[operator]
                break
            # The start of the GPU's latest unbroken run under the floor.
            start = samples[-1][0]
            for at, util in reversed(samples):
                if util is None or util >= policy.utilization_pct:
                    break
                start = at
            since.append(start)
        else:
            idle_from = max(since)
            if idle_from + policy.seconds <= now:
                due.append((idle_from + policy.seconds, alloc.allocation_id))
    return [a for _, a in sorted(due)]
