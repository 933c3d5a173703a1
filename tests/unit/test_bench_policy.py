"""The policy trace replay's parts (tests/bench/bench_policy.py): trace, metrics, driver.

The bench's figures are reported, not asserted; what is tested here is that they
mean what docs/benchmarks.md says: the trace is reproducible and shaped as
described, the formulas give known answers on known inputs, and a small replay
of every policy keeps the fleet's invariants and the policy's own rule.
"""

from __future__ import annotations

import statistics

import pytest

from tests.bench import bench_policy
from tests.bench.bench_policy import POLICIES, ReplayError, replay
from tests.bench.policy_metrics import ReplayLog, Sample, Submission, fair_shares, jain, percentile, sample_jain, summarize
from tests.bench.policy_trace import MAX_DURATION_S, PROFILES, TEAMS, Job, Trace, generate, guarantees_of


def small_trace(jobs: int = 200, hosts: int = 4, seed: int = 7) -> Trace:
    return generate(PROFILES["contended"], jobs=jobs, hosts=hosts, seed=seed)


def hand_trace(hosts: int, jobs: list[tuple[str, float, int, float, int]]) -> Trace:
    """A trace of (team, submit, gpus, duration, priority) jobs, in that order."""
    return Trace(
        PROFILES["contended"],
        hosts,
        0,
        TEAMS,
        tuple(Job(f"j{i:06d}", team, submit, gpus, duration, prio) for i, (team, submit, gpus, duration, prio) in enumerate(jobs)),
    )


# ---------------------------------------------------------------------- trace


def test_a_seed_gives_the_same_trace_and_another_seed_another() -> None:
    assert generate(PROFILES["contended"], jobs=500, hosts=10, seed=3) == generate(
        PROFILES["contended"], jobs=500, hosts=10, seed=3
    )
    assert generate(PROFILES["contended"], jobs=500, hosts=10, seed=3).jobs != generate(
        PROFILES["contended"], jobs=500, hosts=10, seed=4
    ).jobs


def test_the_full_size_trace_is_shaped_as_documented() -> None:
    trace = generate(PROFILES["contended"], jobs=20_000, hosts=100, seed=1)
    jobs = trace.jobs
    assert len(jobs) == 20_000 and trace.capacity == 800
    assert [j.submit for j in jobs] == sorted(j.submit for j in jobs)
    gpus = [j.gpus for j in jobs]
    assert set(gpus) <= {1, 2, 4, 8}
    # Mostly one GPU, with tails at 2, 4 and 8; the few wide jobs hold most of the GPU time.
    assert 0.6 < gpus.count(1) / len(gpus) < 0.85
    assert all(gpus.count(n) > 0.03 * len(gpus) for n in (2, 4, 8))
    wide = sum(j.gpus * j.duration for j in jobs if j.gpus >= 4)
    assert wide > 0.5 * sum(j.gpus * j.duration for j in jobs)
    # Log-normal durations: a median of minutes, a p99 of many hours.
    durations = [j.duration for j in jobs]
    assert 5 * 60 < statistics.median(durations) < 60 * 60
    assert percentile(durations, 0.99) > 8 * 3600
    assert max(durations) <= MAX_DURATION_S
    # Every team and priority class submits; low/normal/high near 30/60/10 %.
    assert {j.team for j in jobs} == {t.name for t in TEAMS}
    for priority, share in ((2, 0.3), (5, 0.6), (8, 0.1)):
        assert abs(sum(j.priority == priority for j in jobs) / len(jobs) - share) < 0.02


def test_the_contended_profile_offers_more_load_than_the_light_one() -> None:
    contended = generate(PROFILES["contended"], jobs=5000, hosts=50, seed=2)
    light = generate(PROFILES["light"], jobs=5000, hosts=50, seed=2)
    assert contended.offered_load() > 1.5 * light.offered_load()
    assert light.offered_load() < 0.6


def test_guarantees_split_the_whole_fleet() -> None:
    assert guarantees_of(TEAMS, 800) == {"research": 320, "product": 240, "vision": 160, "interns": 80}
    assert sum(guarantees_of(TEAMS, 33 * 8).values()) == 264


# ---------------------------------------------------------------------- metrics


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([1.0, 2.0], 0.99) == 2.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_jain_on_known_inputs() -> None:
    assert jain([1.0, 1.0, 1.0, 1.0]) == 1.0
    assert jain([1.0, 0.0, 0.0, 0.0]) == 0.25
    assert jain([1.0, 2.0]) == pytest.approx(0.9)
    assert jain([0.5, 0.5]) == 1.0
    assert jain([0.0, 0.0]) == 1.0


def test_fair_shares_fill_water_by_weight() -> None:
    # Demands that fit get what they ask.
    assert fair_shares([10, 20], [1, 1], 100) == [10, 20]
    # Equal weights, both over: half each.
    assert fair_shares([100, 100], [1, 1], 100) == [50, 50]
    # One asks less than its half: the other gets the rest.
    assert fair_shares([10, 100], [1, 1], 100) == [10, 90]
    # Weighted 3:1, both over.
    assert fair_shares([1000, 1000], [0.75, 0.25], 100) == [75, 25]
    # A team with no demand is entitled to nothing.
    assert fair_shares([0, 500, 500], [0.5, 0.25, 0.25], 100) == [0, 50, 50]


def test_a_sample_is_judged_against_entitlements_not_raw_shares() -> None:
    # 100 GPUs; team 0 (weight 0.5) wants 10 and has them, team 1 (0.5) wants 200 and has 90:
    # both have all they are entitled to (10 and 90), so J = 1.
    assert sample_jain(Sample(0.0, (10, 90), (10, 200)), (0.5, 0.5), 100) == 1.0
    # Both want 200; one holds 90, the other 10: x = (1.8, 0.2), J = 4 / (2 * 3.28).
    assert sample_jain(Sample(0.0, (90, 10), (200, 200)), (0.5, 0.5), 100) == pytest.approx(4 / 6.56)


# ---------------------------------------------------------------------- replay


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "fair"])
def test_a_small_replay_keeps_the_invariants(policy: str) -> None:
    trace = small_trace()
    figures, log = replay(trace, policy)
    assert log.peak_allocated <= trace.capacity
    assert figures.jobs_finished == len(trace.jobs)
    assert all(s.started is not None and s.started >= s.submitted for s in log.submissions.values())
    assert figures.preempted == 0 and figures.lost_gpu_hours == 0
    assert figures.refused == {}
    assert 0 < figures.utilization <= 1
    # Passes come only after a batch that freed GPUs: at most one per completion.
    assert figures.ticks <= len(trace.jobs)
    # The small fleet is contended for a while, so Jain is defined.
    assert figures.jain is not None and 0.25 <= figures.jain <= 1.0
    again, _ = replay(trace, policy)
    timings = {"wall_s": 0, "tick_s": 0, "admit_s": 0, "apply_s": 0}
    assert again.to_json() | timings == figures.to_json() | timings


def test_fifo_never_starts_a_job_before_an_earlier_arrival() -> None:
    _, log = replay(small_trace(400), "fifo")
    subs = sorted(log.submissions.values(), key=lambda s: (s.submitted, s.request_id))
    starts = [s.started for s in subs]
    assert starts == sorted(starts)  # type: ignore[type-var]
    assert any(s.started != s.submitted for s in subs), "the trace never made anyone wait"


# One host of 8 GPUs: a 4-GPU job runs 100 s; an 8-GPU job, then a 1-GPU job, arrive meanwhile.
BLOCKED = [("research", 0.0, 4, 100.0, 5), ("research", 1.0, 8, 10.0, 5), ("product", 2.0, 1, 10.0, 5)]


@pytest.mark.parametrize(
    ("policy", "starts"),
    [
        # Head-of-line blocking: the 1-GPU job waits behind the 8-GPU one.
        ("fifo", [0.0, 100.0, 110.0]),
        # Greedy places what fits: the 1-GPU job goes at once, the 8-GPU one waits for both.
        ("greedy", [0.0, 100.0, 2.0]),
        # Conservative backfill: the 8-GPU job reserves the free GPUs, so the 1-GPU job may not take one.
        ("strict", [0.0, 100.0, 110.0]),
    ],
)
def test_each_policy_applies_its_own_rule(policy: str, starts: list[float]) -> None:
    _, log = replay(hand_trace(1, BLOCKED), policy)
    assert [log.submissions[f"j{i:06d}"].started for i in range(3)] == starts


def test_strict_priority_serves_the_higher_priority_first_and_fifo_does_not() -> None:
    # The host is full until t=100; a low job then a high one wait for it.
    jobs = [("research", 0.0, 8, 100.0, 5), ("product", 1.0, 8, 10.0, 2), ("vision", 2.0, 8, 10.0, 8)]
    _, strict = replay(hand_trace(1, jobs), "strict")
    _, fifo = replay(hand_trace(1, jobs), "fifo")
    assert [strict.submissions[f"j{i:06d}"].started for i in (1, 2)] == [110.0, 100.0]
    assert [fifo.submissions[f"j{i:06d}"].started for i in (1, 2)] == [100.0, 110.0]


def test_within_guarantee_is_judged_at_submission() -> None:
    # On 8 GPUs interns are guaranteed int(0.8) = 0; research int(3.2) = 3, plus the 2 GPUs rounding left over.
    assert guarantees_of(TEAMS, 8)["research"] == 5 and guarantees_of(TEAMS, 8)["interns"] == 0
    jobs = [
        ("research", 0.0, 4, 50.0, 5),  # 0 + 4 <= 5
        ("research", 1.0, 1, 10.0, 5),  # 4 + 1 <= 5
        ("research", 2.0, 2, 10.0, 5),  # 5 + 2 > 5
        ("interns", 3.0, 1, 10.0, 5),  # 0 + 1 > 0
    ]
    _, log = replay(hand_trace(1, jobs), "greedy")
    assert [log.submissions[f"j{i:06d}"].within_guarantee for i in range(4)] == [True, True, False, False]


def test_within_guarantee_counts_the_teams_waiting_requests() -> None:
    # One host of 8 GPUs; research (guarantee 5) holds 4 from t=0 and interns the other 4.
    jobs = [
        ("research", 0.0, 4, 100.0, 5),
        ("interns", 0.0, 4, 100.0, 5),
        ("research", 1.0, 1, 10.0, 5),  # 4 held + 0 waiting + 1 <= 5: within, waits (nothing free)
        ("research", 2.0, 1, 10.0, 5),  # 4 held + 1 waiting + 1 > 5: borrowing demand
    ]
    _, log = replay(hand_trace(1, jobs), "greedy")
    assert [log.submissions[f"j{i:06d}"].within_guarantee for i in range(4)] == [True, False, True, False]


class Twice(bench_policy.FifoPolicy):
    """FIFO that returns each command twice: the second is refused."""

    def admit(self, request, table, inventory, now):  # type: ignore[no-untyped-def]
        command = super().admit(request, table, inventory, now)
        if request.request_id == "j000002":
            table.apply(command)
        return command

    def tick(self, table, inventory, now):  # type: ignore[no-untyped-def]
        return [c for c in super().tick(table, inventory, now) for _ in range(2)]


def test_a_pass_command_the_table_refuses_is_counted_as_the_agent_logs_it() -> None:
    trace = hand_trace(1, [("research", 0.0, 8, 10.0, 5), ("research", 1.0, 8, 10.0, 5)])
    run = bench_policy.Replay(trace, "fifo")
    run.policy = Twice(run.inventory)
    log = run.run()
    assert log.refused == {"Allocate: duplicate_allocation": 1}
    assert log.jobs_finished == 2


def test_a_refused_admission_stops_the_replay() -> None:
    trace = hand_trace(1, [("research", 0.0, 8, 10.0, 5), ("research", 1.0, 8, 10.0, 5), ("research", 2.0, 1, 1.0, 5)])
    run = bench_policy.Replay(trace, "fifo")
    run.policy = Twice(run.inventory)
    with pytest.raises(ReplayError, match="Enqueue at t=2.0 refused"):
        run.run()


def test_a_replay_out_of_budget_stops_and_says_where() -> None:
    trace = small_trace()
    figures, log = replay(trace, "strict", budget_s=0.0)
    assert figures.stopped_after_s == 0.0 and log.stopped_at == trace.jobs[0].submit
    assert figures.jobs_finished == 0
    finished, _ = replay(trace, "strict")
    assert finished.stopped_after_s is None


def test_a_stopped_replay_counts_a_waiter_as_waiting_until_the_stop() -> None:
    log = ReplayLog(capacity=8, teams=("research",), weights=(1.0,), guarantees={"research": 8})
    log.submissions["a"] = Submission("a", "a", "research", 5, 1, 10.0, True, started=12.0)
    log.submissions["b"] = Submission("b", "b", "research", 5, 1, 20.0, True)
    log.first_submit, log.window_end = 10.0, 20.0
    with pytest.raises(ValueError):
        summarize("strict", log)
    log.stopped_at = 100.0
    figures = summarize("strict", log)
    assert figures.wait is not None and (figures.wait.mean_s, figures.wait.p99_s) == (41.0, 80.0)
    assert figures.stopped_after_s == 90.0


def test_fair_share_takes_a_guarantee_back_after_the_grace_period() -> None:
    # 2 hosts: research (guarantee 8) holds all 16 GPUs with two long 8-GPU jobs;
    # product (guarantee 4) then asks for 4, within its guarantee.
    assert guarantees_of(TEAMS, 16)["product"] == 4
    jobs = [("research", 0.0, 8, 10_000.0, 5), ("research", 1.0, 8, 10_000.0, 5), ("product", 10.0, 4, 100.0, 5)]
    figures, log = replay(hand_trace(2, jobs), "fair")
    product = log.submissions["j000002"]
    assert product.within_guarantee
    # The borrowed lease keeps its GPUs for the 30 s grace, then the claimant gets them in the same pass.
    assert product.started == 10.0 + bench_policy.PREEMPTION_GRACE_S
    assert figures.preempted == 1 and figures.resubmissions == 1
    # Either research lease would do; the younger one loses less work, j000001:
    # 8 GPUs x 39 s lost, and the job resubmitted when it ended.
    assert log.submissions["j000001-r1"].submitted == 40.0
    assert figures.lost_gpu_hours == pytest.approx(8 * 39.0 / 3600)
    assert figures.jobs_finished == 3 and figures.refused == {}


def test_a_small_fair_share_replay_keeps_the_invariants() -> None:
    trace = small_trace()
    figures, log = replay(trace, "fair")
    assert log.peak_allocated <= trace.capacity
    assert figures.jobs_finished == len(trace.jobs)
    assert all(s.started is not None and s.started >= s.submitted for s in log.submissions.values())
    # Every preempted lease came back as exactly one resubmission.
    assert figures.resubmissions == figures.preempted
