"""Scale benchmark of the pure scheduler core: 10 to 1,000 hosts of 8 GPUs.

Run it with `python -m tests.bench.bench_scale` (see docs/benchmarks.md, "Scale");
it is not part of the test suite and takes a few minutes. No agent, no disk,
no network: the lease table, the inventory and the scheduler only, driven as
the agent drives them, timed around one call by the CPU time of the thread
(`time.thread_time`): on a shared machine wall time also counts the waits for a
CPU, which vary threefold with the neighbours' load. `--wall` times by the wall
clock instead.

Per size N (hosts of 8 H100s), the state is the one a busy cluster settles in:
L = 8·N one-GPU leases (every GPU held, expiring in a day), Q = 10·N queued
requests (90% one GPU at priorities 2-9, 10% four GPUs at priority 1, deadlines
in an hour), and a day of finished requests (FINISHED_PER_GPU_DAY per GPU)
remembered for idempotency. Measured, each as µs per call (p50 and p99):

- admit (1 GPU / 4 GPUs), on the full cluster: the answer is Enqueue;
- admit with room (1 GPU, priority 5): one lease was released just before, so
  the queue ahead of the request is walked until the freed GPU is taken;
- release-triggered tick: one lease is released, then a tick places the head
  of the queue on its GPU (the commands are applied and a new request queued,
  so the state stays the same size);
- timer tick with nothing due; next_deadline; queue position of a waiter;
- Inventory.set_node of one node with new telemetry, and with equal views;
- snapshot encode (snapshot() + msgpack, as the agent stores it) and restore
  (msgpack + restore()); "cold" is the first encode of a table built by
  applying commands, which makes every allocation's and waiter's JSON text
  (later encodes make only the texts of what changed, and a restored table
  starts with all of them).

The previous scheduler (tests/unit/reference_scheduler.py) runs the same admit
and tick at the sizes where it finishes in reasonable time, as a baseline.

`--queues K` runs the same under a queue policy (coordinator/queue_pass.py): K
queues of equal weight, no guarantees, priority preemption off, leases and
waiters spread round-robin over them, so every queue sits at its fair share and
each decision takes the queue pass (claims, guarantees, borrowing by weight)
instead of the strict-priority walk.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import msgpack

from coordinator.commands import Allocate, Cancel, Command, Enqueue, Release, SetQueuePolicy
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, GpuView, Requirements
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.unit import reference_scheduler as reference

GPUS_PER_HOST = 8
H100 = "NVIDIA H100 80GB HBM3"
H100_MB = 81559
DAY_S = 86_400.0
START = 1_000_000.0
# Requests finished per GPU per day, remembered for a day: leases of four hours
# on average (busy training and batch fleets run hours-long jobs), one request
# every 1.8 s at 8,000 GPUs. --finished-per-gpu-day changes it.
FINISHED_PER_GPU_DAY = 6


@dataclass
class State:
    """A settled cluster: table, inventory, scheduler, and the clock the bench advances."""

    table: LeaseTable
    inventory: Inventory
    scheduler: Scheduler
    now: float
    rng: random.Random
    issued: int = 0
    queues: int = 0

    def request(self, gpus: int = 1, priority: int | None = None) -> AllocationRequest:
        self.issued += 1
        return AllocationRequest(
            request_id=f"req-{self.issued:08d}",
            service_name=f"svc{self.issued % 50}",
            workload_type="generic",
            priority=self.rng.randint(1, 9) if priority is None else priority,
            requirements=Requirements(gpus, 4096),
            ttl_s=DAY_S,
            submitted_at=self.now,
            queue_name=f"team-{self.issued % self.queues}" if self.queues else "default",
        )

    def apply(self, command: Command) -> None:
        result = self.table.apply(command)
        assert result.ok, result.error


def build(hosts: int, seed: int, finished_per_gpu_day: int = FINISHED_PER_GPU_DAY, queues: int = 0) -> State:
    """The busy cluster described in the module docstring (under K queues with `queues`)."""
    rng = random.Random(seed)
    views = [
        GpuView(f"host-{h:04d}", i, f"GPU-{h}-{i}", H100, H100_MB, H100_MB - 500, 0.0)
        for h in range(hosts)
        for i in range(GPUS_PER_HOST)
    ]
    state = State(LeaseTable(), Inventory.of(views), Scheduler(SchedulerConfig(3600.0, 10**9), rng), START, rng)
    if queues:
        state.queues = queues
        policy = QueuePolicy.of((QueueSpec(f"team-{k}") for k in range(queues)), preemption_priority_gap=0)
        state.apply(SetQueuePolicy(START - DAY_S - 1, policy))
    # A day of finished requests, spread evenly over the day before now.
    finished = hosts * GPUS_PER_HOST * finished_per_gpu_day
    for k in range(finished):
        state.now = START - DAY_S + DAY_S * k / finished
        request = state.request()
        state.apply(Enqueue(state.now, request, None))
        state.apply(Cancel(state.now, (request.request_id,)))
    state.now = START
    for view in views:
        request = state.request()
        alloc = Allocation(
            f"{request.service_name}-{state.issued:016x}",
            request,
            view.node,
            (AllocatedGpu(view.node, view.index, view.uuid, view.name, view.memory_total_mb),),
            state.now - rng.uniform(0, 3600),
            state.now + rng.uniform(3600, DAY_S),
        )
        state.apply(Allocate(state.now, alloc))
    for _ in range(hosts * 10):
        # The four-GPU waiters rank last, so a freed GPU goes to a one-GPU head.
        request = state.request(4, 1) if rng.random() < 0.1 else state.request(1, rng.randint(2, 9))
        state.apply(Enqueue(state.now, request, state.now + 3600))
    return state


CLOCK: Callable[[], float] = time.thread_time


def timed(call: Callable[[], Any], samples: list[float]) -> Any:
    started = CLOCK()
    result = call()
    samples.append((CLOCK() - started) * 1e6)
    return result


def release_one(state: State) -> None:
    """End one lease at random (a caller's release), one second later."""
    state.now += 1.0
    live = state.table.allocations_on(f"host-{state.rng.randrange(len(state.inventory.nodes())):04d}")
    state.apply(Release(state.now, (live[0].allocation_id,)))


def measure(state: State, repeats: int) -> dict[str, list[float]]:
    """µs samples per operation, on `state` (left the same size)."""
    out: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    s, table, inventory = state.scheduler, state.table, state.inventory
    s.tick(table, inventory, state.now)  # builds the scheduler's index once
    for _ in range(repeats):
        for gpus, name in ((1, "admit 1 GPU (full)"), (4, "admit 4 GPUs (full)")):
            command = timed(lambda: s.admit(state.request(gpus), table, inventory, state.now), out[name])
            assert isinstance(command, Enqueue)
        release_one(state)
        command = timed(lambda: s.admit(state.request(1, 5), table, inventory, state.now), out["admit 1 GPU (room)"])
        commands = timed(lambda: s.tick(table, inventory, state.now), out["release-triggered tick"])
        assert len(commands) == 1 and isinstance(commands[0], Allocate), commands
        state.apply(commands[0])
        state.apply(Enqueue(state.now, state.request(1, state.rng.randint(2, 9)), state.now + 3600))
        assert timed(lambda: s.tick(table, inventory, state.now), out["timer tick, nothing due"]) == []
        timed(lambda: s.next_deadline(table), out["next_deadline"])
        target = table.queue()[state.rng.randrange(table.queue_length())].request.request_id
        assert timed(lambda: table.queue_position(target), out["queue position"]) is not None
        node = f"host-{state.rng.randrange(len(inventory.nodes())):04d}"
        views = [replace(v, utilization_pct=state.rng.random()) for v in inventory.node_views(node)]
        timed(lambda: inventory.set_node(node, views), out["set_node (changed)"])
        same = list(views)
        timed(lambda: inventory.set_node(node, same), out["set_node (equal)"])
    return out


def measure_snapshot(state: State, repeats: int) -> dict[str, list[float]]:
    """Encode and restore; the first encode, which makes every JSON text, is reported apart."""
    out: dict[str, list[float]] = {name: [] for name in SNAPSHOT_OPERATIONS}
    timed(lambda: msgpack.packb(state.table.snapshot(), use_bin_type=True), out["snapshot encode, cold"])
    for _ in range(repeats):
        data = timed(lambda: msgpack.packb(state.table.snapshot(), use_bin_type=True), out["snapshot encode"])
        restored = timed(lambda: LeaseTable.restore(msgpack.unpackb(data, raw=False)), out["snapshot restore"])
        assert restored.queue_length() == state.table.queue_length()
    return out


def measure_reference(state: State, repeats: int) -> dict[str, list[float]]:
    """The previous scheduler on the same state: admit with room, and the release-triggered tick."""
    out: dict[str, list[float]] = {"admit 1 GPU (room)": [], "release-triggered tick": []}
    old = reference.Scheduler(reference.SchedulerConfig(3600.0, 10**9), random.Random(1))
    gpus = list(state.inventory)
    for _ in range(repeats):
        release_one(state)
        timed(lambda: old.admit(state.request(1, 5), state.table, gpus, state.now), out["admit 1 GPU (room)"])
        commands = timed(lambda: old.tick(state.table, gpus, state.now), out["release-triggered tick"])
        state.apply(commands[0])
        state.apply(Enqueue(state.now, state.request(1, state.rng.randint(2, 9)), state.now + 3600))
    return out


OPERATIONS = (
    "admit 1 GPU (full)",
    "admit 4 GPUs (full)",
    "admit 1 GPU (room)",
    "release-triggered tick",
    "timer tick, nothing due",
    "next_deadline",
    "queue position",
    "set_node (changed)",
    "set_node (equal)",
)


SNAPSHOT_OPERATIONS = ("snapshot encode, cold", "snapshot encode", "snapshot restore")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--snapshot-repeats", type=int, default=5)
    parser.add_argument("--reference-max-hosts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--finished-per-gpu-day", type=int, default=FINISHED_PER_GPU_DAY)
    parser.add_argument("--wall", action="store_true", help="time by the wall clock, not thread CPU time")
    parser.add_argument("--queues", type=int, default=0, help="run under K queues of equal weight (0: no queues)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.thread_time

    clock = "wall clock" if args.wall else "thread CPU time"
    print(f"python {platform.python_version()} on {platform.machine()}, timed by {clock}")
    results: dict[int, dict[str, list[float]]] = {}
    baseline: dict[int, dict[str, list[float]]] = {}
    for hosts in args.hosts:
        started = time.perf_counter()
        state = build(hosts, args.seed, args.finished_per_gpu_day, args.queues)
        built = time.perf_counter() - started
        results[hosts] = measure(state, args.repeats) | measure_snapshot(state, args.snapshot_repeats)
        if hosts <= args.reference_max_hosts and not args.queues:
            baseline[hosts] = measure_reference(state, max(3, args.repeats // (hosts // 10 or 1) // 10))
        print(
            f"N={hosts} hosts ({hosts * GPUS_PER_HOST} GPUs), L={hosts * GPUS_PER_HOST} leases, "
            f"Q={hosts * 10} queued, {hosts * GPUS_PER_HOST * args.finished_per_gpu_day} finished records: built in {built:.1f} s"
        )

    sizes = list(results)
    print_growth_table("operation", {n: f"N={n}" for n in sizes}, results, [*OPERATIONS, *SNAPSHOT_OPERATIONS])
    for name in ("admit 1 GPU (room)", "release-triggered tick"):
        cells = []
        for n in sizes:
            if n in baseline:
                old = statistics.median(baseline[n][name])
                new = statistics.median(results[n][name])
                cells.append(f"{old:,.0f} ({old / new:,.0f}x)")
            else:
                cells.append("-")
        print(f"| previous scheduler: {name}, p50 µs (x slower) | " + " | ".join(cells) + " | |")


def print_growth_table(
    label: str, columns: dict[int, str], results: dict[int, dict[str, list[float]]], names: list[str], decimals: int = 1
) -> None:
    """A markdown table of p50 / p99 µs per size (`columns` names each size's column) and the growth per doubling."""
    sizes = list(results)
    print()
    print(f"| {label} | " + " | ".join(f"{columns[n]} p50 / p99 µs" for n in sizes) + " | growth per doubling |")
    print("|" + "---|" * (len(sizes) + 2))
    for name in names:
        cells = [f"{percentile(results[n][name], 0.5):,.{decimals}f} / {percentile(results[n][name], 0.99):,.{decimals}f}" for n in sizes]
        print(f"| {name} | " + " | ".join(cells) + f" | {growth(sizes, results, name)} |")


def growth(sizes: list[int], results: dict[int, dict[str, list[float]]], name: str) -> str:
    """The p50's growth per doubling of N between consecutive sizes, e.g. '1.05, 1.10'."""
    factors = []
    for small, big in zip(sizes, sizes[1:]):
        ratio = statistics.median(results[big][name]) / statistics.median(results[small][name])
        factors.append(ratio ** (math.log(2) / math.log(big / small)))
    return ", ".join(f"{f:.2f}" for f in factors)


if __name__ == "__main__":
    main()
