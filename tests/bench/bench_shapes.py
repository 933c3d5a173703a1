"""Mixed-shape trace replay: topology-aware placement and GPU sharing, on and off, side by side.

Run it with `python -m tests.bench.bench_shapes` (docs/benchmarks.md, "Mixed
shapes"); not part of the test suite. Pure and in simulated time, as
tests/bench/bench_policy.py: `coordinator.Scheduler` (strict priority, best
fit, conservative backfill) and the real LeaseTable, driven by a
discrete-event loop over tests/bench/shapes_trace.py's fleet and trace.

Theory of operation
-------------------
Events are arrivals and completions; at one instant completions apply first,
then arrivals (`Scheduler.admit`, its Allocate or Enqueue applied at once),
then one `tick` when GPUs were freed while requests wait. Nobody times out.

Variants: **topology ON** is the scheduler as it is (with `--nvlink-first K`,
SchedulerConfig.nvlink_first_gpus = K: K+ GPU requests prefer an all-NVLink
set among nodes stranding as many GPUs); **topology OFF** gives it
the same inventory without the nodes' wiring (`Fleet.inventory(topology=False)`),
so placement takes the lowest indices among best fit's interchangeable GPUs,
as before topology existed. Node choice is best fit's either way. The figures
judge both with the real wiring (the fleet's topologies).

**Sharing ON** submits the `small` jobs (2-12 GB) as shares of a GPU
(`share_mb` = the job's memory, coordinator/share_placement.py), one lease per
share; the one place it enters is `share_candidate_request`. A shared GPU
counts as one whole GPU held while any share is on it (what a queue's quota
counts too), so util measures GPUs taken, not memory promised.

Figures, over the submission window (first to last submission), each state
held from one event instant to the next:

- util: GPU-equivalents held / GPUs, a MIG slice counting Ng/7 of its GPU;
  also the whole-GPU pool and the MIG pool apart;
- largest request: the cluster's largest whole-GPU request that fits
  (coordinator/fragmentation.py), in GPUs and all-NVLink, time-averaged;
- stranded: share of the time a request could not fit although enough GPUs
  were free in total on hosts that could ever hold it (8 GPUs on 8-GPU hosts;
  4 all-NVLink on hosts with 4 NVLink-joined GPUs; 2 all-NVLink likewise);
- bridged free: on pcie-nvlink-pairs hosts, the share of free GPUs whose
  bridge partner is free too (the rest are broken bridges);
- waits: start − submit, p50 / p99 (nearest rank) per shape;
- topology quality: mean set score (coordinator/topology.py) of 2- and 4-GPU
  sets; the share of 4-GPU sets all-NVLink; the share of 2-GPU sets on the best
  link their host has.
"""

from __future__ import annotations

import argparse
import heapq
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from coordinator.commands import Allocate, Enqueue, Release
from coordinator.fragmentation import node_largest_request
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, GpuRef, Requirements
from coordinator.scheduler import Scheduler, SchedulerConfig
from coordinator.topology import NodeTopology, is_nvlink
from tests.bench.policy_metrics import percentile
from tests.bench.shapes_trace import MIG_KIND, SHAPES, Fleet, ShapedJob, ShapesTrace, build_fleet, generate, slice_compute

PRIORITY = 5
_COMPLETION, _ARRIVAL = 0, 1
# (label, GPUs, all-NVLink): the stranded-request shapes.
STRANDED = (("8 GPUs", 8, False), ("4 NVLink", 4, True), ("2 NVLink", 2, True))


class ReplayError(Exception):
    """The replay broke an invariant: a refused command, a request never served."""


def share_candidate_request(job: ShapedJob, now: float, *, sharing: bool) -> AllocationRequest:
    """The request a share candidate (`small` job) submits: the one place sharing enters the replay.

    sharing OFF: one whole GPU with the job's memory.
    sharing ON: a share of one GPU whose budget is the job's memory (the
    allocate body's `sharing: "shared"`, `gpu_memory_mb`).
    """
    if sharing:
        return _request(job, now, Requirements(1, job.memory_mb, share_mb=job.memory_mb))
    return _request(job, now, Requirements(1, job.memory_mb))


def _request(job: ShapedJob, now: float, requirements: Requirements) -> AllocationRequest:
    return AllocationRequest(
        request_id=job.job_id, service_name=job.shape.replace(" ", "-"), workload_type="generic",
        priority=PRIORITY, requirements=requirements, ttl_s=0.0, submitted_at=now,
    )


def job_request(job: ShapedJob, now: float, *, sharing: bool) -> AllocationRequest:
    if job.shape == "small":
        return share_candidate_request(job, now, sharing=sharing)
    if job.mig_profile is not None:
        return _request(job, now, Requirements(1, 0, mig_profile=job.mig_profile))
    return _request(job, now, Requirements(job.gpus, job.memory_mb, nodes=job.nodes))


@dataclass(slots=True)
class Figures:
    variant: str
    util: float = 0.0
    util_whole: float = 0.0
    util_mig: float = 0.0
    largest_gpus: float = 0.0
    largest_nvlink: float = 0.0
    stranded: dict[str, float] = field(default_factory=dict)
    bridged_free: float = 0.0
    waits: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    score: dict[int, float] = field(default_factory=dict)
    nvlink4: float = 0.0
    best_link2: float = 0.0
    wall_s: float = 0.0
    jobs: int = 0


class Replay:
    """One variant over one trace."""

    def __init__(
        self, trace: ShapesTrace, *, topology: bool, sharing: bool, fleet: Fleet | None = None, nvlink_first: int = 0
    ) -> None:
        self.trace = trace
        self.sharing = sharing
        self.fleet = fleet or build_fleet(trace.hosts)
        self.inventory = self.fleet.inventory(topology=topology)
        self.table = LeaseTable()
        config = SchedulerConfig(queue_timeout_s=0, max_queue=10**9, nvlink_first_gpus=nvlink_first)
        self.scheduler = Scheduler(config, random.Random(trace.seed))
        self.figures = Figures(f"topology {'ON' if topology else 'OFF'}, sharing {'ON' if sharing else 'OFF'}")
        self._jobs = {j.job_id: j for j in trace.jobs}
        self._events: list[tuple[float, int, int, str]] = []
        self._seq = 0
        self._submitted: dict[str, float] = {}
        self._waits: dict[str, list[float]] = {s: [] for s in SHAPES}
        self._scores: dict[int, list[int]] = {2: [], 4: []}
        self._nv4: list[bool] = []
        self._best2: list[bool] = []
        self._whole_nodes = [n for n, k in self.fleet.kinds.items() if k != MIG_KIND]
        self._capable = {label: self._capable_nodes(k, nv) for label, k, nv in STRANDED}
        self._node_state: dict[str, tuple[int, int, int, int]] = {}  # free, nvlink, bridged free, free on pairs
        self._held_whole = 0
        self._held_compute = 0
        self._acc: dict[str, float] = {}
        self._units: dict[str, tuple[int, int]] = {}
        # Each live share's GPU: a shared GPU counts as held whole while any share is on it.
        self._shares: dict[str, GpuRef] = {}

    def _capable_nodes(self, k: int, nvlink: bool) -> list[str]:
        out = []
        for node in self._whole_nodes:
            views = self.fleet.views[node]
            topo = self.fleet.topologies.get(node)
            most = len(views) if not nvlink else (0 if topo is None else topo.largest_nvlink_set([v.index for v in views]))
            if most >= k:
                out.append(node)
        return out

    def run(self) -> Figures:
        started = time.perf_counter()
        for job in self.trace.jobs:
            self._push(job.submit, _ARRIVAL, job.job_id)
        start, end = self.trace.jobs[0].submit, self.trace.jobs[-1].submit
        for node in self._whole_nodes:
            self._refresh(node)
        version = self.table.holder_version
        now = start
        while self._events:
            t = self._events[0][0]
            self._integrate(max(0.0, min(t, end) - min(now, end)))
            now = t
            freed = False
            while self._events and self._events[0][0] == t:
                _, kind, _, key = heapq.heappop(self._events)
                if kind == _COMPLETION:
                    self._apply(Release(t, (key,), "released"))
                    freed = True
                else:
                    job = self._jobs[key]
                    self._submitted[key] = t
                    request = job_request(job, t, sharing=self.sharing)
                    self._apply(self.scheduler.admit(request, self.table, self.inventory, t))
            if freed and self.table.queue_length():
                for command in self.scheduler.tick(self.table, self.inventory, t):
                    self._apply(command)
            for node in self.table.holders_changed_since(version):
                if self.fleet.kinds[node] != MIG_KIND:
                    self._refresh(node)
            version = self.table.holder_version
        if self.table.queue_length():
            raise ReplayError(f"replay ended with {self.table.queue_length()} requests waiting")
        self._summarize(end - start, time.perf_counter() - started)
        return self.figures

    def _push(self, at: float, kind: int, key: str) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, kind, self._seq, key))

    def _apply(self, command: Any) -> None:
        result = self.table.apply(command)
        if not result.ok:
            raise ReplayError(f"{type(command).__name__} refused: {result.error}")
        if isinstance(command, Allocate):
            self._started(command, command.at)
        elif isinstance(command, Release):
            for allocation_id in result.affected:
                self._ended(allocation_id)
        elif not isinstance(command, Enqueue):
            raise ReplayError(f"unexpected command {command!r}")

    def _started(self, command: Allocate, now: float) -> None:
        lead = command.allocation
        job = self._jobs[lead.request.request_id]
        self._waits[job.shape].append(now - self._submitted[job.job_id])
        self._units[lead.allocation_id] = self._held_units(command)
        whole, compute = self._units[lead.allocation_id]
        self._held_whole += whole
        self._held_compute += compute
        self._push(now + job.duration, _COMPLETION, lead.allocation_id)
        if job.nodes == 1 and job.gpus in (2, 4) and job.mig_profile is None:
            topo = self.fleet.topologies.get(lead.node)
            if topo is not None:
                self._quality(topo, [g.index for g in lead.gpus])

    def _held_units(self, command: Allocate) -> tuple[int, int]:
        """(whole GPUs, MIG compute slices) `command` holds: (0, 0) for a share, whose GPU `_shared` counts."""
        if command.allocation.share_group is not None:
            ref = command.allocation.gpus[0].ref
            self._shares[command.allocation.allocation_id] = ref
            if len(self.table.shares.tenants(ref)) == 1:
                self._held_whole += 1  # it opened the GPU: held whole until its last share ends
            return (0, 0)
        gpus = [g for a in command.members for g in a.gpus]
        return (sum(1 for g in gpus if g.mig_profile is None), sum(slice_compute(g.mig_profile) for g in gpus if g.mig_profile))

    def _ended(self, allocation_id: str) -> None:
        ref = self._shares.pop(allocation_id, None)
        if ref is not None and ref not in self.table.shares.gpus:
            self._held_whole -= 1  # the GPU's last share ended (the Release is applied already)
        units = self._units.pop(allocation_id, None)
        if units is not None:  # a gang's other members come through its lead
            self._held_whole -= units[0]
            self._held_compute -= units[1]

    def _quality(self, topo: NodeTopology, gpus: list[int]) -> None:
        self._scores[len(gpus)].append(topo.score(gpus))
        if len(gpus) == 4:
            self._nv4.append(all(is_nvlink(topo.code(a, b)) for i, a in enumerate(gpus) for b in gpus[i + 1 :]))
        else:
            best = max(topo.weight(a, b) for i, a in enumerate(topo.indices) for b in topo.indices[i + 1 :])
            self._best2.append(topo.weight(*gpus) == best)

    def _refresh(self, node: str) -> None:
        views = self.fleet.views[node]
        topo = self.fleet.topologies.get(node)
        largest = node_largest_request(
            views, lambda ref: self.table.holder(ref) is not None, topo, shared=self.table.shares.gpus
        )
        bridged = on_pairs = 0
        if self.fleet.kinds[node] == "pcie-nvlink-pairs" and topo is not None:
            free = [v.index for v in views if self.table.holder(v.ref) is None]
            on_pairs = len(free)
            bridged = sum(1 for a in free if any(b != a and is_nvlink(topo.code(a, b)) for b in free))
        self._node_state[node] = (largest.gpus, largest.nvlink or 0, bridged, on_pairs)

    def _integrate(self, dt: float) -> None:
        if dt <= 0:
            return
        acc = self._acc
        acc["t"] = acc.get("t", 0.0) + dt
        acc["whole"] = acc.get("whole", 0.0) + self._held_whole * dt
        acc["compute"] = acc.get("compute", 0.0) + self._held_compute * dt
        state = self._node_state
        acc["gpus"] = acc.get("gpus", 0.0) + max(s[0] for s in state.values()) * dt
        acc["nvlink"] = acc.get("nvlink", 0.0) + max(s[1] for s in state.values()) * dt
        bridged = sum(s[2] for s in state.values())
        on_pairs = sum(s[3] for s in state.values())
        if on_pairs:
            acc["bridged"] = acc.get("bridged", 0.0) + bridged / on_pairs * dt
            acc["pairs_t"] = acc.get("pairs_t", 0.0) + dt
        for label, k, nvlink in STRANDED:
            nodes = self._capable[label]
            fits = any(state[n][1 if nvlink else 0] >= k for n in nodes)
            total = sum(state[n][0] for n in nodes)
            if not fits and total >= k:
                acc[label] = acc.get(label, 0.0) + dt

    def _summarize(self, window: float, wall: float) -> None:
        f, acc = self.figures, self._acc
        span = acc.get("t", 0.0) or 1.0
        whole, mig = self.fleet.whole_gpus(), self.fleet.mig_gpus()
        f.util_whole = acc.get("whole", 0.0) / (whole * span)
        f.util_mig = acc.get("compute", 0.0) / (7 * mig * span)
        f.util = (acc.get("whole", 0.0) + acc.get("compute", 0.0) / 7) / ((whole + mig) * span)
        f.largest_gpus = acc.get("gpus", 0.0) / span
        f.largest_nvlink = acc.get("nvlink", 0.0) / span
        f.stranded = {label: acc.get(label, 0.0) / span for label, _, _ in STRANDED}
        f.bridged_free = acc.get("bridged", 0.0) / (acc.get("pairs_t", 0.0) or 1.0)
        f.waits = {s: (percentile(w, 0.5), percentile(w, 0.99), len(w)) for s, w in self._waits.items() if w}
        f.score = {k: sum(v) / len(v) for k, v in self._scores.items() if v}
        f.nvlink4 = sum(self._nv4) / len(self._nv4) if self._nv4 else math.nan
        f.best_link2 = sum(self._best2) / len(self._best2) if self._best2 else math.nan
        f.wall_s = wall
        f.jobs = len(self.trace.jobs)


def replay(trace: ShapesTrace, *, topology: bool, sharing: bool, nvlink_first: int = 0) -> Figures:
    """The figures of one variant."""
    return Replay(trace, topology=topology, sharing=sharing, nvlink_first=nvlink_first).run()


VARIANTS = ((True, False), (False, False), (True, True), (False, True))


def run_variants(trace: ShapesTrace, nvlink_first: int = 0) -> list[Figures | str]:
    """Each variant's figures (`nvlink_first`: SchedulerConfig.nvlink_first_gpus)."""
    return [
        replay(trace, topology=topology, sharing=sharing, nvlink_first=nvlink_first) for topology, sharing in VARIANTS
    ]


def fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def table_rows(results: Sequence[Figures | str]) -> tuple[list[str], list[list[str]]]:
    """The report as (header, rows): one row per figure, one column per variant."""
    header = ["figure"]
    for r in results:
        header.append(r.variant if isinstance(r, Figures) else r.split(":")[0])

    def row(name: str, cell: Any) -> list[str]:
        return [name, *(cell(r) if isinstance(r, Figures) else "not available" for r in results)]

    rows = [
        row("util (GPU-equiv.)", lambda f: f"{f.util:.3f}"),
        row("util whole-GPU pool", lambda f: f"{f.util_whole:.3f}"),
        row("util MIG pool (compute)", lambda f: f"{f.util_mig:.3f}"),
        row("largest fit, GPUs (mean)", lambda f: f"{f.largest_gpus:.2f}"),
        row("largest fit, all-NVLink (mean)", lambda f: f"{f.largest_nvlink:.2f}"),
        *(row(f"stranded: {label}", lambda f, label=label: f"{f.stranded[label]:.1%}") for label, _, _ in STRANDED),
        row("pairs hosts: free GPUs bridged", lambda f: f"{f.bridged_free:.1%}"),
        row("2-GPU sets on best link", lambda f: f"{f.best_link2:.1%}"),
        row("2-GPU mean set score", lambda f: f"{f.score.get(2, math.nan):.0f}"),
        row("4-GPU sets all-NVLink", lambda f: f"{f.nvlink4:.1%}"),
        row("4-GPU mean set score", lambda f: f"{f.score.get(4, math.nan):.0f}"),
    ]
    for shape in SHAPES:
        rows.append(
            row(
                f"wait p50 / p99: {shape}",
                lambda f, s=shape: "-" if s not in f.waits else f"{fmt_s(f.waits[s][0])} / {fmt_s(f.waits[s][1])} ({f.waits[s][2]:,})",
            )
        )
    rows.append(row("replay wall s", lambda f: f"{f.wall_s:.1f}"))
    return header, rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--hosts", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=0.8, help="offered load of each pool (whole GPUs, MIG)")
    parser.add_argument(
        "--nvlink-first", type=int, default=0, metavar="K",
        help="SchedulerConfig.nvlink_first_gpus (0: off, the default as in the agent)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    trace = generate(jobs=args.jobs, hosts=args.hosts, seed=args.seed, load=args.load)
    fleet = build_fleet(args.hosts)
    kinds: dict[str, int] = {}
    for kind in fleet.kinds.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    days = (trace.jobs[-1].submit - trace.jobs[0].submit) / 86_400
    print(f"python {platform.python_version()} on {platform.machine()}; simulated time")
    print(
        f"fleet: {args.hosts} hosts ({', '.join(f'{n} {k}' for k, n in kinds.items())}): {fleet.whole_gpus()} whole GPUs, "
        f"{fleet.mig_gpus()} MIG GPUs in {fleet.slices()} slices; {len(trace.jobs):,} jobs over {days:.1f} days, "
        f"load {args.load}, seed {args.seed}, nvlink_first_gpus {args.nvlink_first}"
    )
    header, rows = table_rows(run_variants(trace, args.nvlink_first))
    print_table(header, rows)
    print(f"total run time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
