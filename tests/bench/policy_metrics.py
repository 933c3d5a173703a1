"""Figures of one policy replay: waits, utilization, fairness, preemption losses.

The replay (tests/bench/bench_policy.py) fills a `ReplayLog` as it goes; `summarize`
turns it into `Figures`. Definitions, as docs/benchmarks.md states them:

- **Wait** of a submission: start − submit, in simulated seconds. A job
  preempted and resubmitted counts as a new submission (its own wait from the
  moment it was resubmitted); the work it lost is counted apart.
- **p99**: nearest rank, the value at rank ⌈0.99·n⌉ of the sorted sample.
- **Within guarantee**: a submission whose team held, at that moment,
  allocated GPUs + the job's GPUs ≤ the team's guarantee.
- **Utilization**: GPU-seconds allocated (preempted work included: the GPUs
  were held) / (capacity · span), over the *submission window*, from the first
  submission to the last. After the last submission the fleet only drains the
  long jobs still running (up to three days of them), the same work under
  every policy; counting that tail would pull every policy towards the same
  low figure. `drained_utilization` is the same ratio up to the last lease's end.
- **Lost**: GPU-seconds of leases ended by preemption (the job restarts from
  scratch), in GPU-hours and as a share of every GPU-second allocated: the
  part of the utilization that did no lasting work.
- **Jain's index**, over the *contended* samples only. Every `sample_s` of
  simulated time the replay records, per team i, its allocated GPUs a_i and its
  demand d_i (allocated + waiting GPUs). A sample is contended when Σ d_i >
  capacity C. The team's entitlement e_i is its weighted max-min fair share of
  C given the demands (water-filling: e_i = min(d_i, θ·w_i), θ such that
  Σ e_i = C, w_i the team's share), so a team asking for less than its share is
  entitled only to what it asks. With x_i = a_i / e_i over teams with d_i > 0,
  J = (Σ x_i)² / (n · Σ x_i²): 1 when every team gets the same fraction of its
  entitlement, 1/n when one team gets everything. The figure is the mean of J
  over the contended samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from tests.bench.policy_trace import PRIORITY_CLASSES, priority_class


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q ≤ 1) of `values`; raises ValueError when empty."""
    if not values:
        raise ValueError("no values")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def jain(xs: Sequence[float]) -> float:
    """Jain's fairness index (Σx)² / (n·Σx²) of non-negative `xs`; 1.0 when all are zero."""
    if not xs:
        raise ValueError("no values")
    squares = sum(x * x for x in xs)
    if squares == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * squares)


def fair_shares(demands: Sequence[float], weights: Sequence[float], capacity: float) -> list[float]:
    """Weighted max-min fair split of `capacity` among `demands` (water-filling).

    Each gets min(demand, θ·weight) with θ as large as capacity allows; when the
    demands fit, each gets its demand.
    """
    shares = [0.0] * len(demands)
    active = [i for i, d in enumerate(demands) if d > 0]
    left = float(capacity)
    while active:
        level = left / sum(weights[i] for i in active)
        capped = [i for i in active if demands[i] <= level * weights[i]]
        if not capped:
            for i in active:
                shares[i] = level * weights[i]
            return shares
        for i in capped:
            shares[i] = demands[i]
            left -= demands[i]
        active = [i for i in active if i not in capped]
    return shares


@dataclass(slots=True)
class Submission:
    """One request of the replay: a job's first submission or a resubmission after preemption."""

    request_id: str
    job_id: str
    team: str
    priority: int
    gpus: int
    submitted: float
    within_guarantee: bool
    started: float | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """Per team (in the trace's team order): allocated GPUs and demand (allocated + waiting)."""

    at: float
    allocated: tuple[int, ...]
    demand: tuple[int, ...]


@dataclass(slots=True)
class ReplayLog:
    """What a replay records as it goes."""

    capacity: int
    teams: tuple[str, ...]
    weights: tuple[float, ...]
    guarantees: dict[str, int]
    submissions: dict[str, Submission] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    gpu_seconds: float = 0.0
    # GPU-seconds allocated between the first and the last submission (window_end).
    window_gpu_seconds: float = 0.0
    window_end: float = 0.0
    # The trace's first submission (set by the replay when it starts).
    first_submit: float = 0.0
    last_end: float = 0.0
    # Most GPUs allocated at once (an invariant: never above capacity).
    peak_allocated: int = 0
    # Leases told to give their GPUs back (Preempt victims), and those that ended preempted.
    preempt_notices: int = 0
    preempted: int = 0
    lost_gpu_seconds: float = 0.0
    jobs_finished: int = 0
    # Commands a pass returned that the table refused, by "Command: error code".
    refused: dict[str, int] = field(default_factory=dict)
    ticks: int = 0
    admits: int = 0
    # Simulated time at which the replay ran out of its wall-clock budget (None: it finished).
    stopped_at: float | None = None
    # Wall seconds of the whole replay, and inside policy.tick, policy.admit and LeaseTable.apply.
    wall_s: float = 0.0
    tick_s: float = 0.0
    admit_s: float = 0.0
    apply_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WaitFigures:
    count: int
    mean_s: float
    p99_s: float

    @classmethod
    def of(cls, waits: Sequence[float]) -> WaitFigures | None:
        if not waits:
            return None
        return cls(len(waits), sum(waits) / len(waits), percentile(waits, 0.99))


@dataclass(frozen=True, slots=True)
class Figures:
    """A policy's figures on one trace."""

    policy: str
    # Simulated seconds into the trace at which the replay was stopped (None: it ran to the end);
    # a stopped replay's other figures cover only what happened until then.
    stopped_after_s: float | None
    utilization: float
    drained_utilization: float
    wait: WaitFigures | None
    by_class: dict[str, WaitFigures | None]
    by_team: dict[str, WaitFigures | None]
    within_guarantee: dict[str, WaitFigures | None]
    jain: float | None
    contended_fraction: float
    preempt_notices: int
    preempted: int
    lost_gpu_hours: float
    # Share of all allocated GPU-seconds that preemption threw away (work redone after resubmission).
    lost_fraction: float
    jobs_finished: int
    # Requests submitted: the trace's jobs that arrived, plus every resubmission after a preemption.
    submissions: int
    resubmissions: int
    refused: dict[str, int]
    peak_allocated: int
    ticks: int
    admits: int
    wall_s: float
    tick_s: float
    admit_s: float
    apply_s: float

    def to_json(self) -> dict[str, Any]:
        def waits(w: WaitFigures | None) -> dict[str, float] | None:
            return None if w is None else {"count": w.count, "mean_s": w.mean_s, "p99_s": w.p99_s}

        return {
            "policy": self.policy,
            "stopped_after_s": self.stopped_after_s,
            "utilization": self.utilization,
            "drained_utilization": self.drained_utilization,
            "wait": waits(self.wait),
            "by_class": {k: waits(v) for k, v in self.by_class.items()},
            "by_team": {k: waits(v) for k, v in self.by_team.items()},
            "within_guarantee": {k: waits(v) for k, v in self.within_guarantee.items()},
            "jain": self.jain,
            "contended_fraction": self.contended_fraction,
            "preempt_notices": self.preempt_notices,
            "preempted": self.preempted,
            "lost_gpu_hours": self.lost_gpu_hours,
            "lost_fraction": self.lost_fraction,
            "jobs_finished": self.jobs_finished,
            "submissions": self.submissions,
            "resubmissions": self.resubmissions,
            "refused": dict(self.refused),
            "peak_allocated": self.peak_allocated,
            "ticks": self.ticks,
            "admits": self.admits,
            "wall_s": self.wall_s,
            "tick_s": self.tick_s,
            "admit_s": self.admit_s,
            "apply_s": self.apply_s,
        }


def contended(sample: Sample, capacity: int) -> bool:
    return sum(sample.demand) > capacity


def sample_jain(sample: Sample, weights: Sequence[float], capacity: int) -> float:
    """Jain's index of one sample's allocations against the teams' fair entitlements (module docstring)."""
    entitled = fair_shares(sample.demand, weights, capacity)
    xs = [a / e for a, e, d in zip(sample.allocated, entitled, sample.demand) if d > 0 and e > 0]
    return jain(xs) if xs else 1.0


def summarize(policy: str, log: ReplayLog) -> Figures:
    """The figures of a replay.

    Of a stopped one (`log.stopped_at` set), over what happened until the stop;
    a submission still waiting then counts as having waited until the stop, so
    its waits are lower bounds.
    """
    stop = log.stopped_at
    if stop is None and any(s.started is None for s in log.submissions.values()):
        raise ValueError("a finished replay left submissions that never started")
    started = list(log.submissions.values())

    def waits(subs: Iterable[Submission]) -> WaitFigures | None:
        return WaitFigures.of([(stop if s.started is None else s.started) - s.submitted for s in subs])  # type: ignore[operator]

    span = log.last_end - log.first_submit
    end = log.window_end if log.stopped_at is None else min(log.window_end, log.stopped_at)
    window = end - log.first_submit
    hot = [s for s in log.samples if contended(s, log.capacity)]
    return Figures(
        policy=policy,
        stopped_after_s=None if log.stopped_at is None else log.stopped_at - log.first_submit,
        utilization=log.window_gpu_seconds / (log.capacity * window) if window > 0 else 0.0,
        drained_utilization=log.gpu_seconds / (log.capacity * span) if span > 0 else 0.0,
        wait=waits(started),
        by_class={name: waits(s for s in started if priority_class(s.priority) == name) for name, _, _ in PRIORITY_CLASSES},
        by_team={team: waits(s for s in started if s.team == team) for team in log.teams},
        within_guarantee={
            team: waits(s for s in started if s.team == team and s.within_guarantee) for team in log.teams
        },
        jain=sum(sample_jain(s, log.weights, log.capacity) for s in hot) / len(hot) if hot else None,
        contended_fraction=len(hot) / len(log.samples) if log.samples else 0.0,
        preempt_notices=log.preempt_notices,
        preempted=log.preempted,
        lost_gpu_hours=log.lost_gpu_seconds / 3600.0,
        lost_fraction=log.lost_gpu_seconds / log.gpu_seconds if log.gpu_seconds > 0 else 0.0,
        jobs_finished=log.jobs_finished,
        submissions=len(log.submissions),
        resubmissions=sum(1 for s in log.submissions.values() if s.request_id != s.job_id),
        refused=dict(log.refused),
        peak_allocated=log.peak_allocated,
        ticks=log.ticks,
        admits=log.admits,
        wall_s=log.wall_s,
        tick_s=log.tick_s,
        admit_s=log.admit_s,
        apply_s=log.apply_s,
    )
