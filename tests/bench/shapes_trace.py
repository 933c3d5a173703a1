"""A mixed fleet and a mixed-shape trace for the shapes replay (tests/bench/bench_shapes.py).

Theory of operation
-------------------
The fleet is four kinds of host, each what `gpu-agent --simulate <spec>` runs
(agent/devices/simulated.py), so names, memory, MIG slices and wiring are the
simulated agent's own:

- `hgx-h100`: 8 H100 80GB behind NVSwitches (every pair NV18);
- `pcie-nvlink-pairs`: 4 H100 NVL, NVLink bridges joining 0-1 and 2-3;
- `pcie-2socket`: 8 L40S on two sockets, a PCIe switch per pair;
- `a100-mig`: 8 A100 80GB in MIG mode, each cut 3g.40gb/2g.20gb/1g.10gb/1g.10gb.

A trace is two Poisson streams, thinned to a day (as tests/bench/policy_trace.py
does): whole-GPU work on the first three kinds, and MIG-slice inference on the
fourth, each stream's rate set so its pool sees `load`. Nothing is measured:
the shapes follow what published studies of shared GPU clusters report, with
parameters chosen by us (the papers' numbers differ between clusters):

- Jeon et al., ATC 2019 (Microsoft Philly) and Hu et al., SC 2021 (SenseTime
  Helios): most jobs take one GPU, a few take 2, 4, 8 or several hosts, and
  those few hold most of the GPU time; durations are log-normal-like with a
  long tail.
- Weng et al., "MLaaS in the Wild", NSDI 2022 (Alibaba PAI, 2020 trace): many
  tasks ask for a fraction of one GPU (`plan_gpu` below 100 in its task table)
  and use little of what they get; inference services run for hours. Here the
  *share candidates*: jobs needing at most 12 GB of GPU memory, 35 % of
  whole-GPU jobs (our choice; the paper reports fractional requests as common,
  not this figure).

Determinism: one `random.Random` per stream, seeded by strings derived from the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TypeVar

from agent.devices.simulated import MIG_PROFILES, parse_simulate_spec, simulated_host
from coordinator.inventory import Inventory
from coordinator.mig import slice_index
from coordinator.model import GpuView
from coordinator.topology import NodeTopology

DAY_S = 86_400.0
MIN_DURATION_S = 10.0
MAX_DURATION_S = 2 * DAY_S
MIG_LAYOUT = "3g.40gb/2g.20gb/1g.10gb/1g.10gb"
# (kind, --simulate spec, share of hosts).
HOST_KINDS: tuple[tuple[str, str, float], ...] = (
    ("hgx-h100", "hgx-h100", 0.40),
    ("pcie-nvlink-pairs", "pcie-nvlink-pairs", 0.25),
    ("pcie-2socket", "pcie-2socket", 0.20),
    ("a100-mig", f"8xA100-80GB:mig={MIG_LAYOUT}", 0.15),
)
MIG_KIND = "a100-mig"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Shape:
    """One kind of job: how it asks, how often, for how long."""

    name: str
    # Share of its stream's jobs.
    share: float
    gpus: int  # per node
    nodes: int
    # (memory MB per GPU, probability); for MIG jobs (profile, probability) instead.
    memory_mix: tuple[tuple[int, float], ...]
    median_s: float
    sigma: float
    mig_profiles: tuple[tuple[str, float], ...] = ()

    def mean_units_s(self) -> float:
        """E[units · duration] of one job before clamping (the load calibration)."""
        return self.gpus * self.nodes * self.median_s * math.exp(self.sigma**2 / 2)


# Whole-GPU stream. `small` are the share candidates: with sharing OFF they take a whole GPU.
WHOLE_SHAPES: tuple[Shape, ...] = (
    Shape("small", 0.35, 1, 1, ((2048, 0.3), (4096, 0.3), (8192, 0.25), (12288, 0.15)), 3600.0, 1.5),
    Shape("1 GPU", 0.33, 1, 1, ((16384, 0.6), (40960, 0.4)), 1200.0, 1.8),
    Shape("2 GPUs", 0.13, 2, 1, ((40960, 1.0),), 1800.0, 1.7),
    Shape("4 GPUs", 0.10, 4, 1, ((40960, 1.0),), 2700.0, 1.7),
    Shape("8 GPUs", 0.06, 8, 1, ((40960, 0.5), (65536, 0.5)), 3600.0, 1.6),
    Shape("gang 2x8", 0.03, 8, 2, ((65536, 1.0),), 3600.0, 1.5),
)
MIG_SHAPE = Shape("MIG slice", 1.0, 1, 1, (), 4 * 3600.0, 1.2, (("1g.10gb", 0.5), ("2g.20gb", 0.25), ("3g.40gb", 0.25)))
SHAPES = tuple(s.name for s in (*WHOLE_SHAPES, MIG_SHAPE))


@dataclass(frozen=True, slots=True)
class ShapedJob:
    job_id: str
    shape: str
    submit: float
    duration: float
    gpus: int
    nodes: int
    memory_mb: int
    mig_profile: str | None = None


@dataclass(frozen=True, slots=True)
class Fleet:
    """The hosts: each one's kind, views and wiring (None where it has none)."""

    kinds: dict[str, str]
    views: dict[str, tuple[GpuView, ...]]
    topologies: dict[str, NodeTopology]

    def inventory(self, *, topology: bool) -> Inventory:
        """The scheduler's inventory; `topology=False` leaves every node's wiring out (placement by index)."""
        inventory = Inventory.of(v for views in self.views.values() for v in views)
        if topology:
            for node, topo in self.topologies.items():
                inventory.set_topology(node, topo)
        return inventory

    def whole_gpus(self) -> int:
        return sum(len(v) for n, v in self.views.items() if self.kinds[n] != MIG_KIND)

    def mig_gpus(self) -> int:
        return sum(len({s.parent_uuid for s in v}) for n, v in self.views.items() if self.kinds[n] == MIG_KIND)

    def slices(self) -> int:
        return sum(len(v) for n, v in self.views.items() if self.kinds[n] == MIG_KIND)


def host_counts(hosts: int) -> dict[str, int]:
    """Hosts of each kind for a fleet of `hosts` (at least one of each; HGX takes the rounding)."""
    counts = {kind: max(1, int(share * hosts)) for kind, _, share in HOST_KINDS}
    counts["hgx-h100"] += max(0, hosts - sum(counts.values()))
    return counts


def build_fleet(hosts: int) -> Fleet:
    kinds: dict[str, str] = {}
    views: dict[str, tuple[GpuView, ...]] = {}
    topologies: dict[str, NodeTopology] = {}
    counts = host_counts(hosts)
    for kind, spec, _ in HOST_KINDS:
        gpus = parse_simulate_spec(spec)
        named = simulated_host(spec)
        for h in range(counts[kind]):
            node = f"{kind}-{h:03d}"
            kinds[node] = kind
            node_views: list[GpuView] = []
            for i, g in enumerate(gpus):
                if not g.mig_layout:
                    node_views.append(GpuView(node, i, f"GPU-{node}-{i}", g.name, g.memory_total_mb))
                    continue
                for m, profile in enumerate(g.mig_layout):
                    memory = MIG_PROFILES[g.model][profile]
                    node_views.append(
                        GpuView(
                            node, slice_index(i, m), f"MIG-{node}-{i}-{m}", f"{g.name} MIG {profile}", memory,
                            mig_profile=profile, parent_uuid=f"GPU-{node}-{i}",
                        )
                    )
            views[node] = tuple(node_views)
            if named is not None:
                topologies[node] = named.topology
    return Fleet(kinds, views, topologies)


def slice_compute(profile: str) -> int:
    """Compute slices (the `Ng` of a profile name) of a MIG slice: its share of a GPU is this / 7."""
    return int(profile.split("g.")[0].split(".")[-1])


@dataclass(frozen=True, slots=True)
class ShapesTrace:
    hosts: int
    seed: int
    load: float
    jobs: tuple[ShapedJob, ...]


def generate(*, jobs: int, hosts: int, seed: int, load: float = 0.8) -> ShapesTrace:
    """`jobs` jobs on a fleet of `hosts`, the same for the same arguments."""
    if jobs < 1 or hosts < len(HOST_KINDS):
        raise ValueError(f"a trace needs a job and at least {len(HOST_KINDS)} hosts")
    fleet = build_fleet(hosts)
    whole_rate = load * fleet.whole_gpus() / sum(s.share * s.mean_units_s() for s in WHOLE_SHAPES)
    mig_mean = sum(p * slice_compute(prof) for prof, p in MIG_SHAPE.mig_profiles) / 7
    mig_rate = load * fleet.mig_gpus() / (mig_mean * MIG_SHAPE.mean_units_s())
    total = whole_rate + mig_rate
    amplitude = 0.5
    peak = 1 + amplitude
    arrivals = random.Random(f"shapes-trace/{seed}/arrivals")
    draws = random.Random(f"shapes-trace/{seed}/shapes")
    out: list[ShapedJob] = []
    now = 0.0
    while len(out) < jobs:
        now += arrivals.expovariate(total * peak)
        mig = arrivals.random() * total >= whole_rate
        day = 1.0 + amplitude * math.sin(2 * math.pi * (now / DAY_S - 0.375))
        if arrivals.random() * peak >= day:
            continue
        shape = MIG_SHAPE if mig else WHOLE_SHAPES[_pick(draws.random(), [(i, s.share) for i, s in enumerate(WHOLE_SHAPES)])]
        duration = min(MAX_DURATION_S, max(MIN_DURATION_S, draws.lognormvariate(math.log(shape.median_s), shape.sigma)))
        profile = _pick(draws.random(), list(shape.mig_profiles)) if mig else None
        memory = 0 if mig else _pick(draws.random(), list(shape.memory_mix))
        out.append(
            ShapedJob(f"j{len(out):06d}", shape.name, round(now, 3), round(duration, 3), shape.gpus, shape.nodes, memory, profile)
        )
    return ShapesTrace(hosts, seed, load, tuple(out))


def _pick(x: float, mix: list[tuple[_T, float]]) -> _T:
    for value, p in mix:
        if x < p:
            return value
        x -= p
    return mix[-1][0]

