"""Trace replay of the scheduling policies: FIFO, greedy, strict priority, fair share.

Run it with `python -m tests.bench.bench_policy` (see docs/benchmarks.md, "Fair
share: trace replay"); it is not part of the test suite. Pure and in simulated
time: the lease table, the inventory and a policy, driven by a discrete-event
loop over a synthetic multi-team trace (tests/bench/policy_trace.py); figures
are computed by tests/bench/policy_metrics.py.

Theory of operation
-------------------
Events are job arrivals and job completions, kept in a heap by simulated time.
All events at one instant form a batch, applied in this order:

1. completions: `Release(at, (id,), "released")` of the job's lease;
2. arrivals: `policy.admit(request, ...)`, whose command (Allocate or Enqueue)
   is applied at once, as the agent applies its decision before answering.

Then one scheduling pass, `policy.tick(table, inventory, now)`, every command
of which is applied, when the batch freed GPUs while requests wait, when a
policy that preempts queued a request (the waiter may be owed GPUs others
borrow), or when the table's next deadline (`policy.next_deadline`: a
preempted lease's end) is due; the loop also stops at that deadline when no
event comes first. A pass that released leases is followed by another at the
same instant. Otherwise `tick` is not called: with no GPU freed, nobody new
waiting and nothing due, a pass could only repeat the last one's answer (the
agent's idle passes, every `SCHEDULING_PASS_S`, its `[scheduler]
tick_interval_s` of 0.5 s, return nothing for the same reason). The agent is
woken at once by a release, so a pass at the instant of the event is what it
does, give or take one pass: the targets allow that much.

A job starts when its Allocate is applied and completes `duration` later. No
lease expires (`ttl_s` 0) and nobody stops waiting (queue timeout 0). Under
fair share the scheduler may preempt: the victim keeps its GPUs for its
queue's grace period (it does not release early: the worst case for the
claimant) and the scheduler ends it with `Release(..., "preempted")` at the
deadline. The job's GPU-seconds since its start are counted as lost (no
checkpoint), and it is resubmitted at that instant as a new request (same team,
GPUs, priority and whole duration; request id `<job>-r<n>`) with a new
`submitted_at`: the table ranks it as the client's new request would be
ranked, and its wait is a new sample counted from the resubmission.

Policies:

- **fifo**: arrival order, head-of-line blocking, priorities ignored; first fit.
- **greedy**: the seed's scheduler. Each pass walks the waiting jobs in
  arrival order and places any that fits, first fit, nothing reserved.
- **strict**: `coordinator.Scheduler` as it is without queues: strict priority,
  best fit, conservative backfill.
- **fair**: the same `Scheduler`, with a `QueuePolicy` of one queue per team
  (guarantee and weight = the team's share) applied by `SetQueuePolicy`.

fifo and greedy are bench-local classes that return the same commands
(Allocate, Enqueue) the real scheduler does, applied to the real LeaseTable.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import json
import math
import platform
import pstats
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from coordinator.commands import Allocate, Command, Enqueue, Preempt, Release, SetQueuePolicy
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, GpuView, Requirements
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.bench.policy_metrics import Figures, ReplayLog, Sample, Submission, contended, summarize
from tests.bench.policy_trace import GPUS_PER_HOST, PRIORITY_CLASSES, PROFILES, Job, Trace, generate, guarantees_of

H100 = "NVIDIA H100 80GB HBM3"
H100_MB = 81559
# The agent's scheduling pass interval ([scheduler] tick_interval_s).
SCHEDULING_PASS_S = 0.5
# Each team queue's grace period under fair share (QueueSpec's default).
PREEMPTION_GRACE_S = 30.0
# How often the replay records each team's allocation and demand.
SAMPLE_S = 60.0
# Passes at one instant before the replay calls the policy stuck.
MAX_PASSES_PER_INSTANT = 50
POLICIES = ("fifo", "greedy", "strict", "fair")
# Wall seconds one replay may take before it is stopped and reported as such: the
# default run (eight replays) must stay within 90 s on a shared 2-core machine
# (fair share on the contended trace alone takes about 50 s there), and a policy
# that has not finished by then is not going to be quick.
BUDGET_S = 60.0
# Targets, from the issue.
TARGET_JAIN = 0.95


class ReplayError(Exception):
    """The replay broke an invariant: a refused command, a stuck deadline, a job never run."""


class ReplayPolicy(Protocol):
    """What the replay drives: the Scheduler's decision calls, and its setup commands."""

    name: str
    # Whether it may preempt, so a pass is due after a request is queued.
    preempts: bool

    def setup(self, at: float) -> list[Command]: ...

    def admit(self, request: AllocationRequest, table: LeaseTable, inventory: Inventory, now: float) -> Command: ...

    def tick(self, table: LeaseTable, inventory: Inventory, now: float) -> list[Command]: ...

    def next_deadline(self, table: LeaseTable) -> float | None: ...


# ---------------------------------------------------------------------- policies


class CorePolicy:
    """coordinator.Scheduler, with a QueuePolicy applied to the table first when given one."""

    def __init__(self, name: str, seed: int, queues: QueuePolicy | None = None) -> None:
        self.name = name
        self.preempts = queues is not None
        self._queues = queues
        self._scheduler = Scheduler(SchedulerConfig(queue_timeout_s=0, max_queue=10**9), random.Random(seed))

    def setup(self, at: float) -> list[Command]:
        return [] if self._queues is None else [SetQueuePolicy(at, self._queues)]

    def admit(self, request: AllocationRequest, table: LeaseTable, inventory: Inventory, now: float) -> Command:
        return self._scheduler.admit(request, table, inventory, now)

    def tick(self, table: LeaseTable, inventory: Inventory, now: float) -> list[Command]:
        return self._scheduler.tick(table, inventory, now)

    def next_deadline(self, table: LeaseTable) -> float | None:
        return self._scheduler.next_deadline(table)


class FreeGpus:
    """Each node's free GPUs, current with the table's holder journal; first-fit placement.

    The bench applies every command a policy returns, so a GPU `take`n in a
    pass is held in the table before the next refresh.
    """

    def __init__(self, inventory: Inventory) -> None:
        self._nodes = sorted(inventory.nodes())
        self._views = {n: sorted(inventory.node_views(n), key=lambda v: v.index) for n in self._nodes}
        self._free: dict[str, list[GpuView]] = {}
        self._version: int | None = None

    def refresh(self, table: LeaseTable) -> None:
        changed = self._nodes if self._version is None else table.holders_changed_since(self._version)
        for node in changed:
            self._free[node] = [v for v in self._views[node] if table.holder(v.ref) is None]
        self._version = table.holder_version

    def largest(self) -> int:
        """The most free GPUs on one node: no job wider than that fits anywhere."""
        return max(map(len, self._free.values()), default=0)

    def take(self, gpus: int) -> tuple[str, list[GpuView]] | None:
        """The first node (by name) with `gpus` free, and its lowest-index free GPUs, now taken."""
        for node in self._nodes:
            free = self._free[node]
            if len(free) >= gpus:
                self._free[node] = free[gpus:]
                return node, free[:gpus]
        return None


class _LocalPolicy:
    """Shared by fifo and greedy: a free-GPU index, arrival-ordered waiters, allocation ids."""

    preempts = False

    def __init__(self, inventory: Inventory) -> None:
        self._free = FreeGpus(inventory)
        self._issued = 0

    def setup(self, at: float) -> list[Command]:
        return []

    def next_deadline(self, table: LeaseTable) -> float | None:
        return None

    def _allocate(self, request: AllocationRequest, now: float) -> Allocate | None:
        taken = self._free.take(request.requirements.gpu_count)
        if taken is None:
            return None
        node, views = taken
        self._issued += 1
        gpus = tuple(AllocatedGpu(v.node, v.index, v.uuid, v.name, v.memory_total_mb) for v in views)
        return Allocate(now, Allocation(f"{request.service_name}-{self._issued:016x}", request, node, gpus, now, None))


class FifoPolicy(_LocalPolicy):
    """First come, first served: the oldest waiter blocks every later one until it fits."""

    name = "fifo"

    def __init__(self, inventory: Inventory) -> None:
        super().__init__(inventory)
        self._waiting: deque[AllocationRequest] = deque()

    def admit(self, request: AllocationRequest, table: LeaseTable, inventory: Inventory, now: float) -> Command:
        self._free.refresh(table)
        placed = None if self._waiting else self._allocate(request, now)
        if placed is not None:
            return placed
        self._waiting.append(request)
        return Enqueue(now, request, None)

    def tick(self, table: LeaseTable, inventory: Inventory, now: float) -> list[Command]:
        self._free.refresh(table)
        commands: list[Command] = []
        while self._waiting:
            placed = self._allocate(self._waiting[0], now)
            if placed is None:
                break
            self._waiting.popleft()
            commands.append(placed)
        return commands


class GreedyPolicy(_LocalPolicy):
    """The seed's scheduler: every pass places, in arrival order, every waiter that fits.

    Waiters are kept per GPU count, each list in arrival order. The walk in
    arrival order places a waiter exactly when its count fits on some node;
    so a pass repeatedly takes the oldest head among the counts that fit
    (≤ the largest free block), and stops when none does.
    """

    name = "greedy"

    def __init__(self, inventory: Inventory) -> None:
        super().__init__(inventory)
        self._waiting: dict[int, deque[AllocationRequest]] = {}

    def admit(self, request: AllocationRequest, table: LeaseTable, inventory: Inventory, now: float) -> Command:
        self._free.refresh(table)
        # An older waiter that fits goes first; the pass after this batch places it.
        placed = None if self._oldest_fitting() is not None else self._allocate(request, now)
        if placed is not None:
            return placed
        self._waiting.setdefault(request.requirements.gpu_count, deque()).append(request)
        return Enqueue(now, request, None)

    def tick(self, table: LeaseTable, inventory: Inventory, now: float) -> list[Command]:
        self._free.refresh(table)
        commands: list[Command] = []
        while (gpus := self._oldest_fitting()) is not None:
            placed = self._allocate(self._waiting[gpus].popleft(), now)
            assert placed is not None, "a count no larger than the largest free block fits"
            commands.append(placed)
        return commands

    def _oldest_fitting(self) -> int | None:
        """The GPU count of the oldest waiter that fits somewhere now, or None."""
        room = self._free.largest()
        heads = [(q[0].submitted_at, q[0].request_id, gpus) for gpus, q in self._waiting.items() if q and gpus <= room]
        return min(heads)[2] if heads else None


def fair_share_queues(trace: Trace, grace_s: float = PREEMPTION_GRACE_S) -> QueuePolicy:
    """One queue per team: guarantee = its share of the fleet, weight = its share, borrow and lend."""
    guarantees = guarantees_of(trace.teams, trace.capacity)
    return QueuePolicy.of(
        [
            QueueSpec(
                t.name,
                guaranteed_gpus=guarantees[t.name],
                weight=t.share,
                preemption_grace_s=grace_s,
                services=(t.name,),
            )
            for t in trace.teams
        ],
        preemption_priority_gap=3,
    )


def make_policy(name: str, trace: Trace, inventory: Inventory) -> ReplayPolicy:
    """The policy called `name` (one of POLICIES) for `trace`."""
    if name == "fifo":
        return FifoPolicy(inventory)
    if name == "greedy":
        return GreedyPolicy(inventory)
    if name == "strict":
        return CorePolicy("strict", trace.seed)
    if name == "fair":
        return CorePolicy("fair", trace.seed, fair_share_queues(trace))
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


# ---------------------------------------------------------------------- replay


def fleet(hosts: int) -> Inventory:
    """`hosts` identical nodes of 8 H100-80GB."""
    return Inventory.of(
        GpuView(f"host-{h:04d}", i, f"GPU-{h:04d}-{i}", H100, H100_MB, H100_MB, 0.0)
        for h in range(hosts)
        for i in range(GPUS_PER_HOST)
    )


@dataclass(slots=True)
class _Run:
    job: Job
    start: float


# Event kinds, in the order they apply at one instant.
_COMPLETION, _ARRIVAL = 0, 1


class Replay:
    """One policy over one trace; `run()` returns the log the metrics are computed from."""

    def __init__(
        self, trace: Trace, policy_name: str, *, sample_s: float = SAMPLE_S, budget_s: float = math.inf
    ) -> None:
        self.trace = trace
        self.budget_s = budget_s
        self.table = LeaseTable()
        self.inventory = fleet(trace.hosts)
        self.policy = make_policy(policy_name, trace, self.inventory)
        self.sample_s = sample_s
        self.team_index = {t.name: i for i, t in enumerate(trace.teams)}
        self.log = ReplayLog(
            capacity=trace.capacity,
            teams=tuple(t.name for t in trace.teams),
            weights=tuple(t.share for t in trace.teams),
            guarantees=guarantees_of(trace.teams, trace.capacity),
        )
        self._allocated = [0] * len(trace.teams)
        self._waiting = [0] * len(trace.teams)
        self._live: dict[str, _Run] = {}
        self._queued_ids: set[str] = set()
        self._attempts: dict[str, int] = {}
        self._jobs: dict[str, Job] = {}
        self._events: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self._now = 0.0
        self._next_sample = 0.0
        # Set by applying commands; read (and cleared) by the loop.
        self._freed = False
        self._queued = False

    # ------------------------------------------------------------------ loop

    def run(self) -> ReplayLog:
        started = time.perf_counter()
        for job in self.trace.jobs:
            self._jobs[job.job_id] = job
            self._push(job.submit, _ARRIVAL, job.job_id)
        self._now = self._next_sample = self.trace.jobs[0].submit
        self.log.first_submit, self.log.window_end = self._now, self.trace.jobs[-1].submit
        for command in self.policy.setup(self._now):
            self._apply(command)
        passes_here = 0
        again = False
        while True:
            if time.perf_counter() - started > self.budget_s:
                # Stopped, not failed: the figures say how far it got (ReplayLog.stopped_at).
                self.log.stopped_at = self._now
                break
            deadline = self.policy.next_deadline(self.table)
            next_event = self._events[0][0] if self._events else math.inf
            t = max(self._now, min(next_event, math.inf if deadline is None else deadline))
            if again:
                t = self._now
            if t == math.inf:
                break
            passes_here = passes_here + 1 if t == self._now else 0
            if passes_here > MAX_PASSES_PER_INSTANT:
                raise ReplayError(f"more than {MAX_PASSES_PER_INSTANT} passes at t={t}: a deadline that never clears?")
            self._sample_until(t)
            self._integrate_until(t)
            self._now = t
            self._freed = self._queued = False
            while self._events and self._events[0][0] == t:
                _, kind, _, key = heapq.heappop(self._events)
                if kind == _COMPLETION:
                    self._complete(key, t)
                else:
                    self._arrive(key, t)
            due = deadline is not None and deadline <= t
            waiters = self.table.queue_length() > 0
            if again or (self._freed and waiters) or (self._queued and self.policy.preempts) or due:
                self._freed = False
                self.log.ticks += 1
                clock = time.perf_counter()
                commands = self.policy.tick(self.table, self.inventory, t)
                self.log.tick_s += time.perf_counter() - clock
                for command in commands:
                    self._apply(command, from_pass=True)
                # A pass that ended leases (preemptions) is followed by another at this instant.
                again = self._freed
            else:
                again = False
        if self.log.stopped_at is None and (self.table.queue_length() or self._live):
            raise ReplayError(f"replay ended with {self.table.queue_length()} waiting and {len(self._live)} running")
        self.log.wall_s = time.perf_counter() - started
        return self.log

    def _push(self, at: float, kind: int, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, kind, self._seq, key))

    def _integrate_until(self, t: float) -> None:
        """Add the GPU-seconds allocated from now to `t` that fall in the submission window."""
        end = self.log.window_end
        held = min(t, end) - min(self._now, end)
        if held > 0:
            self.log.window_gpu_seconds += sum(self._allocated) * held

    def _sample_until(self, t: float) -> None:
        """Record the state (constant since the last batch) at every sample time before `t`."""
        while self._next_sample < t:
            demand = tuple(a + w for a, w in zip(self._allocated, self._waiting))
            self.log.samples.append(Sample(self._next_sample, tuple(self._allocated), demand))
            self._next_sample += self.sample_s

    # ------------------------------------------------------------------ events

    def _arrive(self, request_id: str, now: float) -> None:
        job_id = request_id.split("-r")[0]
        job = self._jobs[job_id]
        team = self.team_index[job.team]
        request = AllocationRequest(
            request_id=request_id,
            service_name=job.team,
            workload_type="training",
            priority=job.priority,
            requirements=Requirements(job.gpus, 1024),
            ttl_s=0.0,
            submitted_at=now,
            queue_name=job.team,
        )
        # Held and already waiting count: earlier waiters draw on the guarantee first (policy_metrics.py).
        within = self._allocated[team] + self._waiting[team] + job.gpus <= self.log.guarantees[job.team]
        self.log.submissions[request_id] = Submission(
            request_id, job_id, job.team, job.priority, job.gpus, now, within
        )
        self.log.admits += 1
        clock = time.perf_counter()
        command = self.policy.admit(request, self.table, self.inventory, now)
        self.log.admit_s += time.perf_counter() - clock
        self._apply(command)

    def _complete(self, allocation_id: str, now: float) -> None:
        if allocation_id in self._live:
            self._apply(Release(now, (allocation_id,), "released"))

    # ------------------------------------------------------------------ commands

    def _apply(self, command: Command, from_pass: bool = False) -> None:
        """Apply `command`; a refused one stops the replay, unless a pass returned it.

        The agent applies a pass's commands one by one and logs a refused one
        ("scheduler command refused"); the replay does the same, counting them
        by command and error code, so a policy that proposes what the table
        refuses shows in the figures instead of ending the run.
        """
        clock = time.perf_counter()
        result = self.table.apply(command)
        self.log.apply_s += time.perf_counter() - clock
        if not result.ok:
            if not from_pass or result.error is None:
                raise ReplayError(f"{type(command).__name__} at t={command.at} refused: {result.error}")
            key = f"{type(command).__name__}: {result.error.code}"
            self.log.refused[key] = self.log.refused.get(key, 0) + 1
            return
        if isinstance(command, Allocate):
            self._started(command.allocation, command.at)
        elif isinstance(command, Enqueue):
            request = command.request
            self._waiting[self.team_index[request.service_name]] += request.requirements.gpu_count
            self._queued_ids.add(request.request_id)
            self._queued = True
        elif isinstance(command, Release):
            for allocation_id in result.affected:
                self._ended(allocation_id, command.at, command.reason)
        elif isinstance(command, Preempt):
            self.log.preempt_notices += len(command.victims)
        elif not isinstance(command, SetQueuePolicy):
            raise ReplayError(f"unexpected command in a replay: {command!r}")

    def _started(self, allocation: Allocation, now: float) -> None:
        request = allocation.request
        submission = self.log.submissions[request.request_id]
        team = self.team_index[request.service_name]
        gpus = len(allocation.gpus)
        if request.request_id in self._queued_ids:
            self._queued_ids.remove(request.request_id)
            self._waiting[team] -= gpus
        submission.started = now
        self._allocated[team] += gpus
        self.log.peak_allocated = max(self.log.peak_allocated, sum(self._allocated))
        if self.log.peak_allocated > self.trace.capacity:
            raise ReplayError(f"{self.log.peak_allocated} GPUs allocated on a fleet of {self.trace.capacity}")
        job = self._jobs[submission.job_id]
        self._live[allocation.allocation_id] = _Run(job, now)
        self._push(now + job.duration, _COMPLETION, allocation.allocation_id)

    def _ended(self, allocation_id: str, now: float, reason: str) -> None:
        run = self._live.pop(allocation_id)
        gpus = run.job.gpus
        self._allocated[self.team_index[run.job.team]] -= gpus
        self.log.gpu_seconds += gpus * (now - run.start)
        self.log.last_end = max(self.log.last_end, now)
        self._freed = True
        if reason == "released":
            self.log.jobs_finished += 1
            return
        if reason != "preempted":
            raise ReplayError(f"lease {allocation_id} ended with reason {reason!r}")
        self.log.preempted += 1
        self.log.lost_gpu_seconds += gpus * (now - run.start)
        attempt = self._attempts.get(run.job.job_id, 0) + 1
        self._attempts[run.job.job_id] = attempt
        self._push(now, _ARRIVAL, f"{run.job.job_id}-r{attempt}")


def replay(
    trace: Trace, policy_name: str, *, sample_s: float = SAMPLE_S, budget_s: float = math.inf
) -> tuple[Figures, ReplayLog]:
    """Replay `trace` under the policy called `policy_name`: its figures and the raw log.

    A replay still running after `budget_s` wall seconds stops where it is; its
    figures then carry `stopped_at` and cover only what had started.
    """
    log = Replay(trace, policy_name, sample_s=sample_s, budget_s=budget_s).run()
    return summarize(policy_name, log), log


# ---------------------------------------------------------------------- report


def fmt_s(seconds: float) -> str:
    """A duration as the unit that reads best: 12.3s, 45.0m, 3.2h."""
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _wait_cell(w: Any) -> str:
    return "-" if w is None else f"{fmt_s(w.mean_s)} / {fmt_s(w.p99_s)}"


def print_trace(trace: Trace, results: Sequence[Figures]) -> None:
    load = trace.offered_load()
    days = (trace.jobs[-1].submit - trace.jobs[0].submit) / 86_400
    print()
    print(
        f"trace {trace.profile.name}: {trace.hosts} hosts x {GPUS_PER_HOST} GPUs, {len(trace.jobs):,} jobs "
        f"submitted over {days:.1f} days, offered load {load:.2f}, seed {trace.seed}"
    )
    classes = [name for name, _, _ in PRIORITY_CLASSES]
    header = ["policy", "util", "wait mean / p99", *(f"{c} mean / p99" for c in classes)]
    header += ["demand > cap", "Jain", "preempted", "GPU-h lost (share)", "passes", "run s (tick / admit / apply)"]
    rows = []
    for f in results:
        if f.stopped_after_s is None:
            figures = [
                f"{f.utilization:.3f}",
                _wait_cell(f.wait),
                *(_wait_cell(f.by_class[c]) for c in classes),
                f"{f.contended_fraction:.0%}",
                "-" if f.jain is None else f"{f.jain:.3f}",
            ]
        else:
            figures = ["stopped", "-", *("-" for _ in classes), "-", "-"]
        rows.append(
            [
                f.policy,
                *figures,
                f"{f.preempted:,}",
                f"{f.lost_gpu_hours:,.0f} ({f.lost_fraction:.0%})",
                f"{f.ticks:,}",
                f"{f.wall_s:.1f} ({f.tick_s:.1f} / {f.admit_s:.1f} / {f.apply_s:.1f})",
            ]
        )
    _table(header, rows)
    span = trace.jobs[-1].submit - trace.jobs[0].submit
    for f in results:
        if f.stopped_after_s is not None:
            print(
                f"{f.policy}: STOPPED after {f.wall_s:.0f} s of wall time, at simulated hour "
                f"{f.stopped_after_s / 3600:.1f} of the trace's {span / 3600:.1f}: {f.jobs_finished:,} of "
                f"{len(trace.jobs):,} jobs finished, {f.submissions - f.resubmissions:,} submitted, "
                f"{f.resubmissions:,} resubmissions after preemption, {f.preempt_notices:,} leases told to yield"
            )
        if f.refused:
            counts = ", ".join(f"{n:,} {key}" for key, n in sorted(f.refused.items()))
            print(f"{f.policy}: the table refused commands a pass returned: {counts}")
    teams = [t.name for t in trace.teams]
    guarantees = guarantees_of(trace.teams, trace.capacity)
    print()
    header = ["policy", *(f"{t} mean / p99" for t in teams), *(f"{t} ≤{guarantees[t]} p99" for t in teams)]
    rows = []
    for f in results:
        if f.stopped_after_s is not None:
            continue
        within = [f.within_guarantee[t] for t in teams]
        rows.append(
            [
                f.policy,
                *(_wait_cell(f.by_team[t]) for t in teams),
                *("-" if w is None else f"{fmt_s(w.p99_s)} ({w.count:,})" for w in within),
            ]
        )
    _table(header, rows)
    finished = [f for f in results if f.stopped_after_s is None]
    sizes = sorted({g for f in finished for g in f.within_guarantee_by_gpus})
    if finished and sizes:
        print()
        header = ["policy", *(f"≤G p99, {g} GPU{'s' if g > 1 else ''} (n)" for g in sizes)]
        rows = []
        for f in finished:
            cells = [f.within_guarantee_by_gpus.get(g) for g in sizes]
            rows.append([f.policy, *("-" if w is None else f"{fmt_s(w.p99_s)} ({w.count:,})" for w in cells)])
        _table(header, rows)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def targets(trace: Trace, results: Sequence[Figures]) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when it cannot be judged, the figures) for this trace."""
    by_name = {f.policy: f for f in results}
    fair, strict = by_name.get("fair"), by_name.get("strict")
    partial = ""
    if fair is not None and fair.stopped_after_s is not None:
        partial = f"; partial: fair stopped at hour {fair.stopped_after_s / 3600:.1f}, waits are lower bounds"
    out: list[tuple[str, bool | None, str]] = []
    name = "fair utilization >= strict priority's"
    if fair is None or strict is None:
        out.append((name, None, "needs both policies"))
    elif fair.stopped_after_s is not None:
        out.append((name, None, "fair did not finish" + partial))
    else:
        out.append((name, fair.utilization >= strict.utilization, f"{fair.utilization:.3f} vs {strict.utilization:.3f}"))
    bound = PREEMPTION_GRACE_S + SCHEDULING_PASS_S
    for team in (t.name for t in trace.teams):
        name = f"fair: {team} within-guarantee p99 wait <= grace + one pass ({bound:g}s)"
        w = None if fair is None else fair.within_guarantee[team]
        if fair is None:
            out.append((name, None, "fair not run"))
        elif w is None:
            out.append((name, None, "no submission within guarantee" + partial))
        elif fair.stopped_after_s is not None and w.p99_s <= bound:
            out.append((name, None, f"{w.p99_s:.1f}s over {w.count:,}" + partial))
        else:
            out.append((name, w.p99_s <= bound, f"{w.p99_s:.1f}s over {w.count:,}" + partial))
    if trace.profile.name == "contended":
        name = f"fair: Jain >= {TARGET_JAIN} over contended samples"
        if fair is None or fair.jain is None:
            out.append((name, None, "fair not run" if fair is None else "no contended sample" + partial))
        elif fair.stopped_after_s is not None:
            out.append((name, None, f"{fair.jain:.3f}" + partial))
        else:
            out.append((name, fair.jain >= TARGET_JAIN, f"{fair.jain:.3f}"))
    return out


def print_targets(checks: list[tuple[str, bool | None, str]]) -> None:
    for name, met, detail in checks:
        verdict = "n/a" if met is None else "PASS" if met else "FAIL"
        print(f"target: {name}: {verdict} ({detail})")


def plot_shares(trace: Trace, log: ReplayLog, path: Path) -> None:
    """A PNG of each team's share of the fleet over time (stacked), its entitlement dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [(s.at - log.samples[0].at) / 3600 for s in log.samples]
    fig, ax = plt.subplots(figsize=(12, 5), constrained_layout=True)
    series = [[s.allocated[i] / log.capacity for s in log.samples] for i in range(len(log.teams))]
    ax.stackplot(hours, series, labels=log.teams, alpha=0.85)
    level = 0.0
    for team in log.teams:
        level += log.guarantees[team] / log.capacity
        ax.axhline(level, color="black", linestyle="--", linewidth=0.6)
    step = log.samples[1].at - log.samples[0].at if len(log.samples) > 1 else 0.0
    for h, sample in zip(hours, log.samples):
        if contended(sample, log.capacity):
            ax.axvspan(h, h + step / 3600, color="red", alpha=0.06, linewidth=0)
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("share of the fleet's GPUs")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"fair share, trace {trace.profile.name}: each team's GPUs (dashed: cumulative entitlements; red: demand > capacity)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trace", choices=("contended", "light", "both"), default="both")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=SAMPLE_S, help="simulated seconds between share samples")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, help="PNG of each team's share over time under fair share (needs matplotlib)")
    parser.add_argument("--profile", action="store_true", help="cProfile each replay and print what dominates")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="wall seconds one replay may run before it is stopped (0: no limit)"
    )
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            parser.error(f"unknown policy {p!r}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e '.[bench]'")

    print(f"python {platform.python_version()} on {platform.machine()}; simulated time, wall times below are this machine's")
    started = time.perf_counter()
    dump: dict[str, Any] = {"seed": args.seed, "hosts": args.hosts, "jobs": args.jobs, "traces": {}}
    names = ["contended", "light"] if args.trace == "both" else [args.trace]
    for name in names:
        trace = generate(PROFILES[name], jobs=args.jobs, hosts=args.hosts, seed=args.seed)
        results: list[Figures] = []
        for policy in policies:
            budget = args.budget_s if args.budget_s > 0 else math.inf
            figures, log = _run(trace, policy, args.sample_s, budget, args.profile)
            results.append(figures)
            if policy == "fair" and args.plot is not None and name == names[0] and log.samples:
                plot_shares(trace, log, args.plot)
        print_trace(trace, results)
        checks = targets(trace, results)
        print_targets(checks)
        dump["traces"][name] = {
            "offered_load": trace.offered_load(),
            "capacity": trace.capacity,
            "policies": [f.to_json() for f in results],
            "targets": [{"target": n, "met": m, "detail": d} for n, m, d in checks],
        }
    print(f"\ntotal run time {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=2) + "\n")
    return 0


def _run(trace: Trace, policy: str, sample_s: float, budget_s: float, profile: bool) -> tuple[Figures, ReplayLog]:
    if not profile:
        return replay(trace, policy, sample_s=sample_s, budget_s=budget_s)
    profiler = cProfile.Profile()
    result: list[tuple[Figures, ReplayLog]] = []
    profiler.runcall(lambda: result.append(replay(trace, policy, sample_s=sample_s, budget_s=budget_s)))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("cumulative").print_stats(25)
    print(f"\n--- profile: {policy} on {trace.profile.name} (by cumulative time) ---")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:4000])
    return result[0]


if __name__ == "__main__":
    sys.exit(main())
