"""Synthetic multi-team GPU-cluster traces for the policy replay (tests/bench/bench_policy.py).

Theory of operation
-------------------
A trace is a list of jobs (team, submit time, GPUs, duration, priority) on a
fleet of identical 8-GPU hosts. Nothing here is measured: every figure is drawn
from distributions shaped after what published studies of shared GPU clusters
report, with the parameters below chosen by us to match those shapes (the
papers' own numbers differ between clusters and years; no trace file is read):

- Jeon et al., "Analysis of Large-Scale Multi-Tenant GPU Clusters for DNN
  Training Workloads", USENIX ATC 2019 (Microsoft Philly): most jobs ask for
  one GPU, a minority for 2, 4 or 8 (one server), and those few large jobs take
  most of the GPU time; run times span minutes to days; virtual clusters of
  very different sizes share the fleet with per-VC quotas.
- Weng et al., "MLaaS in the Wild: Workload Analysis and Scheduling in
  Large-Scale Heterogeneous GPU Clusters", NSDI 2022 (Alibaba PAI): durations
  are heavy-tailed (a log-normal-like body with a long tail of many-hour
  jobs); submissions follow a daily cycle.
- Hu et al., "Characterization and Prediction of Deep Learning Workloads in
  Large-Scale GPU Datacenters", SC 2021 (SenseTime Helios): single-GPU jobs
  dominate the job count, multi-GPU jobs the GPU time; submissions are
  diurnal, and teams submit in bursts (e.g. before deadlines).

So: GPU counts from a per-team mix over {1, 2, 4, 8} (jobs wider than one host
are out of scope: one node per allocation); durations log-normal with a
per-team median of minutes and sigma about 1.7-1.9 (p99 tens of hours),
clamped to [MIN_DURATION_S, MAX_DURATION_S]; arrivals a Poisson process whose
rate follows a sinusoidal day (peak mid-afternoon, trough at night) and, per
team, burst windows (a Poisson number per day, each `burst_hours` long, rate
times `burst_factor`). Priorities fall in three classes, low/normal/high =
2/5/8.

Load is set by the profile: each team's base arrival rate is
`load · capacity · load_share / E[gpus · duration]`, so a profile means the
same thing at any `--hosts`; bursts come on top, which is what makes the
contended trace's demand exceed the fleet for hours at a time.

Determinism: one `random.Random` per stream, seeded by strings derived from the
seed (str seeds hash with SHA-512, not Python's salted hash), so a seed gives
the same trace on every run and machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

GPUS_PER_HOST = 8
DAY_S = 86_400.0
HOUR_S = 3600.0
MIN_DURATION_S = 10.0
# Three days: the longest runs in the studies go on for weeks, but a job longer
# than the replay's busy span only measures how long the replay is.
MAX_DURATION_S = 3 * DAY_S
# Priority classes: (name, priority, share of jobs).
PRIORITY_CLASSES: tuple[tuple[str, int, float], ...] = (("low", 2, 0.3), ("normal", 5, 0.6), ("high", 8, 0.1))


@dataclass(frozen=True, slots=True)
class Team:
    """One tenant: its entitlement, what it submits, and how bursty it is."""

    name: str
    # Fraction of the fleet the team is entitled to (its guarantee and weight).
    share: float
    # Fraction of the profile's base load this team offers (not its share:
    # some teams ask for more than they are entitled to, some for less).
    load_share: float
    # (GPUs, probability) over {1, 2, 4, 8}; probabilities sum to 1.
    gpu_mix: tuple[tuple[int, float], ...]
    # Log-normal duration: median (s) and sigma of the underlying normal.
    median_s: float
    sigma: float

    def mean_gpu_seconds(self) -> float:
        """E[gpus] · E[duration] of one job, before clamping (the load calibration)."""
        mean_gpus = sum(g * p for g, p in self.gpu_mix)
        return mean_gpus * self.median_s * math.exp(self.sigma**2 / 2)


# Four teams of different sizes and habits. Shares sum to 1 (the whole fleet is
# entitled); load shares differ from shares, so in contention some teams borrow
# and others are owed.
TEAMS: tuple[Team, ...] = (
    Team("research", 0.4, 0.45, ((1, 0.50), (2, 0.10), (4, 0.15), (8, 0.25)), 1800.0, 1.8),
    Team("product", 0.3, 0.25, ((1, 0.70), (2, 0.10), (4, 0.10), (8, 0.10)), 1200.0, 1.7),
    Team("vision", 0.2, 0.22, ((1, 0.75), (2, 0.15), (4, 0.05), (8, 0.05)), 900.0, 1.8),
    Team("interns", 0.1, 0.08, ((1, 0.90), (2, 0.05), (4, 0.05)), 600.0, 1.7),
)


@dataclass(frozen=True, slots=True)
class Profile:
    """How hard the trace drives the fleet."""

    name: str
    # Offered load without bursts, as a fraction of capacity (GPU-seconds asked / GPU-seconds there).
    load: float
    # Diurnal modulation: the rate is multiplied by 1 + amplitude · sin(day phase).
    diurnal_amplitude: float
    # Per team: expected burst windows per day, their length, and the rate multiplier inside them.
    bursts_per_day: float
    burst_hours: float
    burst_factor: float


PROFILES: dict[str, Profile] = {
    # Busy, with per-team bursts that push total demand past the fleet for hours.
    "contended": Profile("contended", load=0.75, diurnal_amplitude=0.5, bursts_per_day=1.0, burst_hours=4.0, burst_factor=3.0),
    # A quiet fleet: the same teams at about half the load and no bursts.
    "light": Profile("light", load=0.4, diurnal_amplitude=0.5, bursts_per_day=0.0, burst_hours=0.0, burst_factor=1.0),
}


@dataclass(frozen=True, slots=True)
class Job:
    """One submission of the trace."""

    job_id: str
    team: str
    submit: float
    gpus: int
    duration: float
    priority: int


@dataclass(frozen=True, slots=True)
class Trace:
    """A generated trace and what it was generated from."""

    profile: Profile
    hosts: int
    seed: int
    teams: tuple[Team, ...]
    jobs: tuple[Job, ...]

    @property
    def capacity(self) -> int:
        return self.hosts * GPUS_PER_HOST

    def guarantee(self, team: str) -> int:
        """GPUs `team` is entitled to: its share of the fleet, rounded (the largest team takes the rounding)."""
        guarantees = guarantees_of(self.teams, self.capacity)
        return guarantees[team]

    def offered_load(self) -> float:
        """GPU-seconds asked for / (capacity · span from first to last submission)."""
        span = self.jobs[-1].submit - self.jobs[0].submit
        asked = sum(j.gpus * j.duration for j in self.jobs)
        return asked / (self.capacity * span) if span > 0 else math.inf


def guarantees_of(teams: tuple[Team, ...], capacity: int) -> dict[str, int]:
    """Each team's share of `capacity` in whole GPUs, summing to `capacity` when shares sum to 1."""
    out = {t.name: int(t.share * capacity) for t in teams}
    rest = round(sum(t.share for t in teams) * capacity) - sum(out.values())
    largest = max(teams, key=lambda t: t.share).name
    out[largest] += rest
    return out


def priority_class(priority: int) -> str:
    """The class name ("low", "normal", "high") of a trace priority."""
    for name, value, _ in PRIORITY_CLASSES:
        if value == priority:
            return name
    raise ValueError(f"priority {priority} is not one of the trace's classes")


def generate(profile: Profile, *, jobs: int, hosts: int, seed: int, teams: tuple[Team, ...] = TEAMS) -> Trace:
    """A trace of exactly `jobs` jobs on `hosts` 8-GPU hosts, the same for the same arguments."""
    if jobs < 1 or hosts < 1:
        raise ValueError("a trace needs at least one job and one host")
    capacity = hosts * GPUS_PER_HOST
    rates = [profile.load * capacity * t.load_share / t.mean_gpu_seconds() for t in teams]
    total_rate = sum(rates)
    horizon = 3 * jobs / total_rate + DAY_S
    bursts = [_burst_windows(profile, t, seed, horizon) for t in teams]
    peak = (1 + profile.diurnal_amplitude) * max(profile.burst_factor, 1.0)

    arrivals = random.Random(f"policy-trace/{seed}/{profile.name}/arrivals")
    shapes = random.Random(f"policy-trace/{seed}/{profile.name}/shapes")
    out: list[Job] = []
    now = 0.0
    while len(out) < jobs:
        # Thinning (Lewis-Shedler): candidates at the peak rate, each team's kept
        # with probability rate(t) / peak.
        now += arrivals.expovariate(total_rate * peak)
        k = _choose(arrivals.random() * total_rate, rates)
        rate = _diurnal(profile, now) * (profile.burst_factor if _inside(bursts[k], now) else 1.0)
        if arrivals.random() * peak >= rate:
            continue
        team = teams[k]
        duration = shapes.lognormvariate(math.log(team.median_s), team.sigma)
        out.append(
            Job(
                job_id=f"j{len(out):06d}",
                team=team.name,
                submit=round(now, 3),
                gpus=_pick(shapes.random(), team.gpu_mix),
                duration=round(min(MAX_DURATION_S, max(MIN_DURATION_S, duration)), 3),
                priority=_pick(shapes.random(), tuple((p, w) for _, p, w in PRIORITY_CLASSES)),
            )
        )
    return Trace(profile, hosts, seed, teams, tuple(out))


def _diurnal(profile: Profile, t: float) -> float:
    # Peak at 15:00, trough at 03:00 (the trace starts at midnight).
    return 1.0 + profile.diurnal_amplitude * math.sin(2 * math.pi * (t / DAY_S - 0.375))


def _burst_windows(profile: Profile, team: Team, seed: int, horizon: float) -> list[tuple[float, float]]:
    """(start, end) windows in which `team` submits `burst_factor` times faster."""
    if profile.bursts_per_day <= 0 or profile.burst_hours <= 0:
        return []
    rng = random.Random(f"policy-trace/{seed}/{profile.name}/bursts/{team.name}")
    windows: list[tuple[float, float]] = []
    t = 0.0
    while True:
        t += rng.expovariate(profile.bursts_per_day / DAY_S)
        if t >= horizon:
            return windows
        windows.append((t, t + profile.burst_hours * HOUR_S))


def _inside(windows: list[tuple[float, float]], t: float) -> bool:
    return any(start <= t < end for start, end in windows)


def _choose(x: float, weights: list[float]) -> int:
    for i, w in enumerate(weights):
        if x < w:
            return i
        x -= w
    return len(weights) - 1


def _pick(x: float, mix: tuple[tuple[int, float], ...]) -> int:
    for value, p in mix:
        if x < p:
            return value
        x -= p
    return mix[-1][0]
