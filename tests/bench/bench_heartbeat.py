"""Heartbeat benchmark: does a loaded leader keep its Raft heartbeat period?

Run it with `python -m tests.bench.bench_heartbeat` (see docs/benchmarks.md,
"Scale"); it is not part of the test suite. Figures are reported, never
asserted: the exit status is 0 unless the run itself crashed.

What runs, in one trio process, once per cluster size N (hosts of 8 H100s):

- three `RaftLog`s (agent/raft_log.py) with the production `lan()` timing
  (100 ms ticks, a heartbeat every tick, 1 s election timeout, a snapshot every
  10,000 entries), each with its own SQLite state file in a temporary dir
  (WAL, synchronous=FULL: every durable Ready is fsync'd), wired by an
  in-memory transport that hands each message to the addressee's `receive`
  (what `RaftTransport` does after TCP, minus the socket and the sealing);
- on the leader, once it is ready, a real `LeaseService` built as agent/app.py's
  `_build_lease_service` builds it (`Admission(Scheduler(...))`, a
  `WorkloadAnalysis` with no advisor, the `[scheduler]` defaults except
  `max_queue`), whose inventory function returns ONE `Inventory` of N×8 GPUs,
  the same object at every call as the agent's `InventoryFeed` does, and its
  scheduler loop (`run_scheduler`).

The load, after an idle second (the reference period):

1. burst: `--requests` allocates (1 GPU, queue=true, each with its own
   request_id), `--in-flight` at a time. The first 8·N fill the cluster (200),
   the rest queue (202): at N = 1,000 with 10,000 requests, 8,000 leases and
   2,000 waiters, the state of the issue;
2. releases: `--releases` of the granted leases are released, `--in-flight` at
   a time; each wakes the scheduler, which places waiters on the freed GPUs;
   the phase ends when the queue has shrunk by as many (or after 60 s).

Measured on the leader: every HEARTBEAT and APP message it sends, per
follower, timestamped with `trio.current_time()` where it is handed to the
transport. The heartbeat period is the gap between successive HEARTBEATs to
one follower (nominal: one tick); the silence is the gap between successive
messages of either kind (what a follower's election timer sees). Term changes
on any server during the run are spurious elections: nothing failed. Also the
allocate and release latencies (call to answer), the request rate, the
fsync'd persists of the leader, and where the trio loop spent its time
(a trio Instrument timing every task step, and a probe task that sleeps 10 ms
and records how late it wakes).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence

import trio
import trio.lowlevel

from coordinator.admission import Admission
from coordinator.inventory import Inventory
from coordinator.model import GpuView
from coordinator.raft import Ready
from coordinator.raft_config import lan
from coordinator.raft_messages import Message, MessageKind
from coordinator.request_parsing import parse_allocate_body
from coordinator.scheduler import Scheduler, SchedulerConfig
from agent import gc_policy
from agent.config import SchedulerSection
from agent.lease_service import LeaseService
from agent.raft_log import Applied, RaftLog, RoleState
from agent.raft_storage import AsyncRaftStorage, RaftStorage
from agent.workload_analysis import WorkloadAnalysis

NAMES = ("n1", "n2", "n3")
GPUS_PER_HOST = 8
H100 = "NVIDIA H100 80GB HBM3"  # agent/devices/simulated.py's H100-80GB
H100_MB = 81559
# Leader election, the idle reference period and the settling of placements are bounded.
ELECTION_TIMEOUT_S = 10.0
IDLE_S = 1.0
PLACEMENT_TIMEOUT_S = 60.0
LAG_PROBE_S = 0.010
# The target: the heartbeat period stays within 2× nominal during the burst.
TARGET_RATIO = 2.0


# ---------------------------------------------------------------------- the in-memory network


class Wire:
    """Delivers each message to its addressee's `receive` at once; logs what the leader sends."""

    def __init__(self) -> None:
        self.logs: dict[str, RaftLog] = {}
        self.leader: str | None = None
        self.recording = False
        # follower -> [(time sent, kind)] of the leader's HEARTBEAT and APP messages
        self.sent: dict[str, list[tuple[float, MessageKind]]] = defaultdict(list)

    def sink(self, node: str) -> "Sink":
        return Sink(self, node)

    def deliver(self, message: Message) -> None:
        if (
            self.recording
            and message.sender == self.leader
            and message.kind in (MessageKind.HEARTBEAT, MessageKind.APP)
        ):
            self.sent[message.to].append((trio.current_time(), message.kind))
        target = self.logs.get(message.to)
        if target is not None:
            target.receive(message)


@dataclass
class Sink:
    """One server's transport (a `MessageSink`)."""

    wire: Wire
    node: str

    def send(self, message: Message) -> None:
        self.wire.deliver(message)


class TimedStorage(AsyncRaftStorage):
    """The real storage, with every persisted Ready's duration noted (fsync included)."""

    def __init__(self, storage: RaftStorage) -> None:
        super().__init__(storage)
        self.persists: list[float] = []

    async def persist_ready(self, rd: Ready) -> None:
        started = trio.current_time()
        await super().persist_ready(rd)
        self.persists.append(trio.current_time() - started)


# ---------------------------------------------------------------------- where the loop's time goes


class StepTimer(trio.abc.Instrument):
    """Wall time of every task step, by task name: which task holds the loop, and for how long at most."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.longest: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        self._started = 0.0
        self.enabled = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self.enabled:
            return
        spent = time.perf_counter() - self._started
        name = short_name(task.name)
        self.total[name] += spent
        self.steps[name] += 1
        if spent > self.longest[name]:
            self.longest[name] = spent

    def reset(self) -> None:
        self.total.clear()
        self.longest.clear()
        self.steps.clear()


def short_name(name: str) -> str:
    """`agent.raft_log.RaftLog._loop` → `RaftLog._loop`; names given by the bench stay as they are."""
    if "(bench)" in name:
        return name
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else name


async def lag_probe(lags: list[float]) -> None:
    """Sleep LAG_PROBE_S over and over; note how late each wake-up is (the loop was busy meanwhile)."""
    while True:
        started = trio.current_time()
        await trio.sleep(LAG_PROBE_S)
        lags.append(trio.current_time() - started - LAG_PROBE_S)


# ---------------------------------------------------------------------- one run


@dataclass
class Run:
    """What one cluster size produced."""

    hosts: int
    requests: int
    releases: int
    idle_window: tuple[float, float] = (0.0, 0.0)
    burst_window: tuple[float, float] = (0.0, 0.0)
    release_window: tuple[float, float] = (0.0, 0.0)
    sent: dict[str, list[tuple[float, MessageKind]]] = field(default_factory=dict)
    allocate_ms: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    release_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first_error: str = ""
    placed_from_queue: int = 0
    queue_at_peak: int = 0
    leases_at_peak: int = 0
    term_changes: list[str] = field(default_factory=list)
    leader_term: int = 0
    persists_ms: list[float] = field(default_factory=list)
    entries: int = 0
    snapshots: int = 0
    lags_ms: list[float] = field(default_factory=list)
    steps: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    load_before: float = 0.0
    load_after: float = 0.0

    def note_error(self, what: str, error: BaseException) -> None:
        self.errors[what] += 1
        self.first_error = self.first_error or f"{what}: {type(error).__name__}: {error}"


def role_listener(roles: list[tuple[float, str, RoleState]], name: str) -> Callable[[RoleState], None]:
    """An `on_role` listener noting (time, server, state)."""

    def listen(state: RoleState) -> None:
        roles.append((trio.current_time(), name, state))

    return listen


def build_inventory(hosts: int) -> Inventory:
    return Inventory.of(
        GpuView(f"host-{h:04d}", i, f"GPU-{h:04d}-{i}", H100, H100_MB, H100_MB - 500, 0.0)
        for h in range(hosts)
        for i in range(GPUS_PER_HOST)
    )


def allocate_body(k: int) -> Any:
    return parse_allocate_body(
        {
            "service_name": f"svc-{k % 50}",
            "gpu_count": 1,
            "min_memory_mb": 1024,
            "priority": 5,
            "queue": True,
            "max_utilization": 100,
            "request_id": f"burst-{k:06d}",
        }
    )


async def bounded(items: Sequence[Any], in_flight: int, call: Callable[[Any], Awaitable[None]]) -> None:
    """`call(item)` for every item, `in_flight` at a time (workers pulling from one iterator)."""
    source: Iterator[Any] = iter(items)

    async def worker() -> None:
        for item in source:
            await call(item)

    async with trio.open_nursery() as nursery:
        for _ in range(min(in_flight, len(items))):
            nursery.start_soon(worker, name="request worker (bench)")


async def run_size(hosts: int, args: argparse.Namespace, timer: StepTimer, tmp: Path) -> Run:
    run = Run(hosts, args.requests, args.releases)
    run.load_before = os.getloadavg()[0]
    config = lan().replace(snapshot_every=args.snapshot_every)
    wire = Wire()
    storages: dict[str, RaftStorage] = {}
    timed: dict[str, TimedStorage] = {}
    roles: list[tuple[float, str, RoleState]] = []

    async def on_applied(entries: Sequence[Applied]) -> None:
        return None

    for name in NAMES:
        storages[name] = RaftStorage(tmp / f"{hosts}-{name}.db")
        timed[name] = TimedStorage(storages[name])
        raft = RaftLog(
            timed[name], wire.sink(name), node_id=name, on_applied=on_applied, config=config,
            rng=random.Random(f"{args.seed}-{name}"), bootstrap_voters=NAMES,
        )
        raft.on_role(role_listener(roles, name))
        wire.logs[name] = raft
        await raft.recover()

    inventory = build_inventory(hosts)
    section = SchedulerSection()
    try:
        async with trio.open_nursery() as nursery:
            for raft in wire.logs.values():
                await nursery.start(raft.run)
            with trio.fail_after(ELECTION_TIMEOUT_S):
                while not any(r.leader_ready for r in wire.logs.values()):
                    await trio.sleep(0.01)
            leader = next(r for r in wire.logs.values() if r.leader_ready)
            wire.leader, run.leader_term = leader.node_id, leader.term
            followers = [n for n in NAMES if n != leader.node_id]
            service = LeaseService(
                leader,
                Admission(
                    Scheduler(
                        SchedulerConfig(queue_timeout_s=section.queue_timeout_s, max_queue=args.max_queue),
                        random.Random(args.seed),
                    )
                ),
                lambda: inventory,
                WorkloadAnalysis(lambda: inventory),
                default_ttl_s=section.default_ttl_s,
                max_ttl_s=section.max_ttl_s,
                tick_interval_s=section.tick_interval_s,
                clock=time.time,
            )
            await nursery.start(service.run_scheduler)
            roles_before = len(roles)
            lags: list[float] = []
            nursery.start_soon(lag_probe, lags)
            first_index = leader.applied_index
            persists_before = len(timed[leader.node_id].persists)

            timer.reset()
            timer.enabled = True
            wire.recording = True
            t0 = trio.current_time()
            await trio.sleep(IDLE_S)
            run.idle_window = (t0, trio.current_time())

            granted: list[str] = []

            async def allocate(k: int) -> None:
                started = trio.current_time()
                try:
                    outcome = await service.allocate(allocate_body(k))
                except Exception as error:  # reported, never raised: figures are not assertions
                    run.note_error("allocate", error)
                    return
                status = 200 if outcome.allocation is not None else 202
                run.allocate_ms[status].append((trio.current_time() - started) * 1000)
                if outcome.allocation is not None:
                    granted.append(outcome.allocation.allocation_id)

            t1 = trio.current_time()
            await bounded(range(args.requests), args.in_flight, allocate)
            run.burst_window = (t1, trio.current_time())
            run.queue_at_peak = leader.table.queue_length()
            run.leases_at_peak = len(leader.table.allocations())

            async def release(allocation_id: str) -> None:
                started = trio.current_time()
                try:
                    await service.release_allocation(allocation_id)
                except Exception as error:
                    run.note_error("release", error)
                    return
                run.release_ms.append((trio.current_time() - started) * 1000)

            to_release = random.Random(args.seed).sample(granted, min(args.releases, len(granted)))
            target = max(0, run.queue_at_peak - len(to_release))
            t2 = trio.current_time()
            await bounded(to_release, args.in_flight, release)
            with trio.move_on_after(PLACEMENT_TIMEOUT_S):
                while leader.table.queue_length() > target:
                    await trio.sleep(0.01)
            run.release_window = (t2, trio.current_time())
            run.placed_from_queue = run.queue_at_peak - leader.table.queue_length()

            wire.recording = False
            timer.enabled = False
            run.sent = {f: list(wire.sent[f]) for f in followers}
            run.entries = leader.applied_index - first_index
            # The loop captures the table every snapshot_every applied entries (RaftLog._maybe_snapshot).
            run.snapshots = sum(r.applied_index // config.snapshot_every for r in wire.logs.values())
            run.persists_ms = [s * 1000 for s in timed[leader.node_id].persists[persists_before:]]
            run.lags_ms = [lag * 1000 for lag in lags]
            run.steps = {n: (timer.total[n], timer.longest[n], timer.steps[n]) for n in timer.total}
            for at, name, state in roles[roles_before:]:
                if state.term != run.leader_term:
                    run.term_changes.append(
                        f"{at - t0:.2f} s: {name} term {state.term} {state.role.value} (leader {state.leader})"
                    )
            nursery.cancel_scope.cancel()
    finally:
        for storage in storages.values():
            storage.close()
    run.load_after = os.getloadavg()[0]
    return run


# ---------------------------------------------------------------------- figures


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def gaps_ms(
    sent: dict[str, list[tuple[float, MessageKind]]], window: tuple[float, float], kinds: tuple[MessageKind, ...]
) -> list[float]:
    """Gaps between successive messages of `kinds` to each follower, for those sent inside `window`, in ms."""
    out: list[float] = []
    for messages in sent.values():
        times = [t for t, kind in messages if kind in kinds]
        out += [(b - a) * 1000 for a, b in zip(times, times[1:]) if window[0] <= b <= window[1]]
    return out


def summary(runs: list[Run], nominal_ms: float) -> list[tuple[str, list[str]]]:
    """The table's rows: (label, one cell per run)."""
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell: Callable[[Run], str]) -> None:
        rows.append((label, [cell(r) for r in runs]))

    def gap_cells(label: str, window: Callable[[Run], tuple[float, float]], kinds: tuple[MessageKind, ...]) -> None:
        for pct in (50, 99):
            row(f"{label} p{pct} (ms)", lambda r: f"{percentile(gaps_ms(r.sent, window(r), kinds), pct):.1f}")
        row(f"{label} max (ms)", lambda r: f"{max(gaps_ms(r.sent, window(r), kinds), default=math.nan):.1f}")
        row(
            f"{label} max / nominal",
            lambda r: f"{max(gaps_ms(r.sent, window(r), kinds), default=math.nan) / nominal_ms:.2f}",
        )

    hb = (MessageKind.HEARTBEAT,)
    any_kind = (MessageKind.HEARTBEAT, MessageKind.APP)
    row("GPUs", lambda r: f"{r.hosts * GPUS_PER_HOST:,}")
    gap_cells("heartbeat period, idle", lambda r: r.idle_window, hb)
    gap_cells("heartbeat period, burst", lambda r: r.burst_window, hb)
    gap_cells("heartbeat period, releases", lambda r: r.release_window, hb)
    for pct in (99,):
        row(f"silence to a follower, burst p{pct} (ms)", lambda r: f"{percentile(gaps_ms(r.sent, r.burst_window, any_kind), pct):.1f}")
    row("silence to a follower, whole run max (ms)", lambda r: f"{max(gaps_ms(r.sent, (r.idle_window[0], r.release_window[1]), any_kind), default=math.nan):.1f}")
    row("term changes (spurious elections)", lambda r: str(len(r.term_changes)))
    row("burst: allocates", lambda r: f"{sum(len(v) for v in r.allocate_ms.values()):,} ({len(r.allocate_ms[200]):,} x 200, {len(r.allocate_ms[202]):,} x 202)")
    row("burst: duration (s)", lambda r: f"{r.burst_window[1] - r.burst_window[0]:.1f}")
    row("burst: allocates/s", lambda r: f"{sum(len(v) for v in r.allocate_ms.values()) / (r.burst_window[1] - r.burst_window[0]):,.0f}")
    def all_alloc(r: Run) -> list[float]:
        return r.allocate_ms[200] + r.allocate_ms[202]

    row("allocate p50 / p99 (ms)", lambda r: f"{percentile(all_alloc(r), 50):.1f} / {percentile(all_alloc(r), 99):.1f}")
    row("  granted (200) p50 / p99 (ms)", lambda r: f"{percentile(r.allocate_ms[200], 50):.1f} / {percentile(r.allocate_ms[200], 99):.1f}")
    row("  queued (202) p50 / p99 (ms)", lambda r: f"{percentile(r.allocate_ms[202], 50):.1f} / {percentile(r.allocate_ms[202], 99):.1f}")
    row("leases / queued after the burst", lambda r: f"{r.leases_at_peak:,} / {r.queue_at_peak:,}")
    row("releases: count, duration (s)", lambda r: f"{len(r.release_ms):,}, {r.release_window[1] - r.release_window[0]:.1f}")
    row("release p50 / p99 (ms)", lambda r: f"{percentile(r.release_ms, 50):.1f} / {percentile(r.release_ms, 99):.1f}")
    row("placed from the queue", lambda r: f"{r.placed_from_queue:,}")
    row("errors", lambda r: ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0")
    row("entries applied; snapshot captures (3 servers)", lambda r: f"{r.entries:,}; {r.snapshots}")
    row("leader persists: n, p50 / p99 / max (ms)", lambda r: f"{len(r.persists_ms):,}, {percentile(r.persists_ms, 50):.1f} / {percentile(r.persists_ms, 99):.1f} / {max(r.persists_ms, default=math.nan):.1f}")
    row("loop lag (10 ms probe) p99 / max (ms)", lambda r: f"{percentile(r.lags_ms, 99):.1f} / {max(r.lags_ms, default=math.nan):.1f}")
    row("load average (1 min) before / after", lambda r: f"{r.load_before:.2f} / {r.load_after:.2f}")
    return rows


def render(runs: list[Run], nominal_ms: float) -> str:
    rows = summary(runs, nominal_ms)
    width = max(len(label) for label, _ in rows)
    cells = max(len(c) for _, cs in rows for c in cs)
    head = f"{'figure':<{width}}  " + "  ".join(f"{f'N={r.hosts}':>{cells}}" for r in runs)
    lines = [head, "-" * len(head)]
    lines += [f"{label:<{width}}  " + "  ".join(f"{c:>{cells}}" for c in cs) for label, cs in rows]
    if len(runs) > 1:
        base = runs[-1]
        lines.append("")
        lines.append(f"ratios N={runs[0].hosts} / N={base.hosts}:")
        for label, key in (
            ("heartbeat period max, burst", lambda r: max(gaps_ms(r.sent, r.burst_window, (MessageKind.HEARTBEAT,)), default=math.nan)),
            ("heartbeat period p99, burst", lambda r: percentile(gaps_ms(r.sent, r.burst_window, (MessageKind.HEARTBEAT,)), 99)),
            ("allocate p50", lambda r: percentile(r.allocate_ms[200] + r.allocate_ms[202], 50)),
            ("allocate p99", lambda r: percentile(r.allocate_ms[200] + r.allocate_ms[202], 99)),
            ("burst allocates/s", lambda r: sum(len(v) for v in r.allocate_ms.values()) / (r.burst_window[1] - r.burst_window[0])),
        ):
            lines.append(f"  {label:<30} {key(runs[0]) / key(base):.2f}")
    for r in runs:
        verdict_max = max(gaps_ms(r.sent, r.burst_window, (MessageKind.HEARTBEAT,)), default=math.nan) / nominal_ms
        lines.append("")
        lines.append(
            f"N={r.hosts}: target 'heartbeat period within {TARGET_RATIO:g}x nominal during the burst': "
            + ("n/a" if math.isnan(verdict_max) else "held" if verdict_max <= TARGET_RATIO else "MISSED")
            + f" (worst {verdict_max:.2f}x); 'no spurious election': "
            + ("held" if not r.term_changes else f"MISSED ({len(r.term_changes)} term changes)")
        )
        for change in r.term_changes:
            lines.append(f"  {change}")
        if r.first_error:
            lines.append(f"  first error: {r.first_error}")
        lines.append("  where the loop's time went (task steps during the run: total s, longest ms, steps):")
        for name, (total, longest, steps) in sorted(r.steps.items(), key=lambda kv: -kv[1][0])[:8]:
            lines.append(f"    {name:<44} {total:7.2f} s {longest * 1000:8.1f} ms {steps:9,}")
    return "\n".join(lines)


def machine() -> str:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return (
        f"machine: {len(os.sched_getaffinity(0))} CPUs ({model}), Python {platform.python_version()}, "
        f"Linux {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_heartbeat", description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1000, 100], help="cluster sizes, 8 GPUs a host (default 1000 100)")
    parser.add_argument("--requests", type=int, default=10_000, help="allocates in the burst (default 10,000)")
    parser.add_argument("--releases", type=int, default=2_000, help="leases released after the burst (default 2,000)")
    parser.add_argument("--in-flight", type=int, default=200, help="requests in flight at once (default 200)")
    parser.add_argument(
        "--max-queue", type=int, default=10_000,
        help="[scheduler] max_queue (default 10,000; the agent's default of 1,000 would answer 503 queue_full)",
    )
    parser.add_argument(
        "--snapshot-every", type=int, default=lan().snapshot_every,
        help=f"the log's snapshot_every (default lan()'s {lan().snapshot_every:,}; a larger one takes no snapshot in the run)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--default-gc", action="store_true",
        help="leave CPython's collector as it is (the agent's process installs agent/gc_policy.py; this bench does too unless told)",
    )
    args = parser.parse_args(argv)
    if not args.default_gc:
        gc_policy.install()  # as agent/cli.py does for the agent's process
    nominal_ms = lan().tick_interval_s * lan().heartbeat_ticks * 1000
    print(machine())
    print(
        f"3 RaftLogs, lan() timing: heartbeat every {nominal_ms:g} ms, election timeout "
        f"{lan().tick_interval_s * lan().election_ticks:g} s; snapshot every {args.snapshot_every:,} entries; "
        f"SQLite WAL + fsync; burst of {args.requests:,} allocates then {args.releases:,} releases, "
        f"{args.in_flight} in flight",
        flush=True,
    )
    pauses = GcPauses()
    gc.callbacks.insert(0, pauses)  # first: it times the collection, the policy's callback included
    timer = StepTimer()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-heartbeat-") as tmp:
        for hosts in args.hosts:
            print(f"... N={hosts} hosts", file=sys.stderr, flush=True)
            runs.append(trio.run(run_size, hosts, args, timer, Path(tmp), instruments=[timer]))
    gc.callbacks.remove(pauses)
    print()
    print(render(runs, nominal_ms))
    print()
    print(f"garbage collector ({'CPython defaults' if args.default_gc else 'agent/gc_policy.py'}), whole run:")
    print(pauses.render())
    return 0


class GcPauses:
    """A gc callback timing every collection, per generation (the pauses the loop cannot avoid)."""

    def __init__(self) -> None:
        self._started = 0.0
        self.ms: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.ms[int(info["generation"])].append((time.perf_counter() - self._started) * 1000)

    def render(self) -> str:
        return "\n".join(
            f"  generation {g}: {len(ms):,} collections, {sum(ms):,.0f} ms in all, longest {max(ms, default=0):.1f} ms"
            for g, ms in self.ms.items()
        )


if __name__ == "__main__":
    sys.exit(main())
