"""A simulated fleet of GPUs, for trying the agent out and for tests.

`gpu-agent --simulate 4xH100-80GB,2xA100-40GB` runs the agent on GPUs described
by `parse_simulate_spec`. They are never chosen in place of NVML silently.

Hosts with a real topology
--------------------------
A spec may instead name a whole host whose wiring is modelled on a real one
(`SIMULATED_HOSTS`), written as `nvidia-smi topo -m` prints it:

    hgx-h100            8 H100 80GB behind NVSwitches: every pair NV18; GPUs 0-3
                        on NUMA node 0, 4-7 on node 1 (a DGX H100)
    pcie-nvlink-pairs   4 H100 NVL on one socket, NVLink bridges (NV12) joining
                        0-1 and 2-3; 0-2 and 1-3 share a PCIe switch (PIX),
                        0-3 and 1-2 meet at the host bridge (PHB)
    pcie-2socket        8 L40S on two sockets: pairs on one switch (PIX), two
                        switches a socket (NODE), SYS across

Faults follow as for any fleet (`pcie-nvlink-pairs;lost=1@30`). A fleet of
counted models has no such detail: one model with NVLink is wired all-to-all
(as behind NVSwitches), anything else through the host bridge, and its NUMA
nodes and CPUs are unknown.

MIG
---
A GPU item may end in `:mig=` and a layout, the profiles of its GPU instances
in MIG device order: `2xA100-80GB:mig=3g.40gb/2g.20gb/1g.10gb/1g.10gb` is two
A100s in MIG mode, each with those four instances (7 compute slices at most;
the profiles per model are `MIG_PROFILES`). Instances are reported as NVML
reports an operator's layout; nothing creates or changes them. A leased
instance fills part of its memory, and its GPU works while any instance does.

Faults
------
A spec may go on with faults, each after a semicolon, so a demo shows them
without code: `4xH100-80GB;xid=2:79@30;lost=2@31;recovered=2@90`. Each fault
is KIND=GPU[:VALUE]@SECONDS, fired by the first `sample(now)` at or past
SECONDS after the first sample:

    xid=GPU:CODE@T    the GPU raises XID CODE (e.g. 79, fallen off the bus)
    dbe=GPU@T         an uncorrectable (double-bit) ECC error
    sbe=GPU@T         a corrected (single-bit) ECC error
    temp=GPU:C@T      its temperature reads C °C from then on; temp=GPU:off@T lets go
    lost=GPU@T        it stops answering (left out of samples and topology)
    recovered=GPU@T   it answers again

`parse_fault_schedule` reads them (`parse_simulate_spec` reads the fleet and
checks them). Tests call the same faults directly: `inject_xid`, `inject_ecc_dbe`,
`inject_ecc_sbe`, `set_temperature_override`, `remove_gpu`, `restore_gpu`. Each
also becomes a `DeviceEvent` for `drain_events` (a temperature pin aside: NVML
has no event for it), stamped with the fault's time: `clock()` for a call,
the first sample's `now` plus SECONDS for a scheduled fault.

Theory of operation
-------------------
Every GPU is a small first-order model driven by the leases the agent reports
through `set_leases` and by the `now` values passed to `sample`:

* An idle GPU sits near 0 % utilisation with a few hundred MiB used, at its idle
  temperature (30-35 °C) and idle power.
* A leased GPU moves towards a busy level drawn once per (GPU, allocation id):
  utilisation 60-98 %, 40-90 % of its memory. Utilisation approaches it with a
  time constant of `UTILIZATION_TAU_S`, memory with `MEMORY_TAU_S`, temperature
  with the slower `TEMPERATURE_TAU_S`; a released GPU relaxes back to idle the same way.
* power = idle power + utilisation × (power limit − idle power); the energy
  counter integrates power over the intervals between samples (trapezoid rule).

* An XID counts in `xid_errors` and becomes `last_xid`; an ECC error counts in
  both the volatile and the aggregate counter of its kind.

Given the seed, the same sequence of `now` values, lease changes and fault
injections produces the same readings: every random draw comes from a
`random.Random` seeded by (seed, GPU index) or (seed, GPU index, allocation id).
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from coordinator.mig import slice_index
from coordinator.topology import NODE, NVLINK_BASE, PHB, PIX, PXB, SYS, NodeTopology

from agent.devices.base import (
    DeviceBackend,
    DeviceEvent,
    EventQueue,
    GpuAffinity,
    GpuLink,
    GpuProcess,
    GpuReading,
    MigInstance,
)

log = logging.getLogger(__name__)

MAX_SIMULATED_GPUS = 64  # one host; NVML itself rarely sees more than 16
UTILIZATION_TAU_S = 1.5  # a job reaches ~95 % of its load in about 4.5 s
MEMORY_TAU_S = 1.0  # allocations come quickly once a job starts
TEMPERATURE_TAU_S = 10.0  # the heatsink lags the load
IDLE_UTILIZATION_PCT = 0.3
IDLE_SM_CLOCK_MHZ = 210  # what data-centre GPUs drop to with nothing to do
HBM_OFFSET_C = 3.0  # HBM runs a few degrees above the GPU core
# NVML's SLOWDOWN threshold read from an H100 80GB HBM3 (driver 580.159.04); used for every model.
SLOWDOWN_TEMPERATURE_C = 89.0


@dataclass(frozen=True, slots=True)
class SimulatedGpuSpec:
    """One simulated GPU model: what NVML would report for it."""

    model: str  # the spec's spelling, e.g. "H100-80GB"
    name: str  # NVML's name, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_mb: int
    power_limit_w: float
    idle_power_w: float
    busy_temperature_c: float  # where a fully loaded GPU settles
    sm_clock_max_mhz: int
    mem_clock_mhz: int
    nvlinks: int  # NVLink links between each pair in a fleet of this model alone; 0 = PCIe only
    slowdown_temperature_c: float = SLOWDOWN_TEMPERATURE_C  # where NVML's clocks slow to cool down
    # The GPU instances of a GPU in MIG mode, as profile names in MIG device order; () = MIG off.
    mig_layout: tuple[str, ...] = ()


_CATALOG: dict[str, SimulatedGpuSpec] = {
    spec.model.upper(): spec
    for spec in (
        # Memory totals as NVML reports them (nvidia-smi's MiB), board power limits from the data sheets.
        SimulatedGpuSpec("H100-80GB", "NVIDIA H100 80GB HBM3", 81559, 700.0, 70.0, 68.0, 1980, 2619, 18),
        SimulatedGpuSpec("H200-141GB", "NVIDIA H200", 143771, 700.0, 75.0, 68.0, 1980, 3201, 18),
        # PCIe boards: their NVLink bridges join pairs, which only a host layout (below) says.
        SimulatedGpuSpec("H100NVL-94GB", "NVIDIA H100 NVL", 95830, 400.0, 60.0, 65.0, 1785, 2619, 0),
        SimulatedGpuSpec("A100-80GB", "NVIDIA A100-SXM4-80GB", 81920, 400.0, 60.0, 65.0, 1410, 1593, 12),
        SimulatedGpuSpec("A100-40GB", "NVIDIA A100-SXM4-40GB", 40960, 400.0, 55.0, 65.0, 1410, 1215, 12),
        SimulatedGpuSpec("L40S-48GB", "NVIDIA L40S", 46068, 350.0, 35.0, 70.0, 2520, 9001, 0),
        SimulatedGpuSpec("L4-24GB", "NVIDIA L4", 23034, 72.0, 16.0, 70.0, 2040, 6251, 0),
        SimulatedGpuSpec("A10-24GB", "NVIDIA A10", 23028, 150.0, 20.0, 72.0, 1695, 6251, 0),
        SimulatedGpuSpec("T4-16GB", "Tesla T4", 15360, 70.0, 10.0, 70.0, 1590, 5001, 0),
        SimulatedGpuSpec("V100-32GB", "Tesla V100-SXM2-32GB", 32768, 300.0, 40.0, 68.0, 1530, 877, 0),
        SimulatedGpuSpec("RTX4090-24GB", "NVIDIA GeForce RTX 4090", 24564, 450.0, 20.0, 70.0, 2520, 10501, 0),
    )
}

# GPU instance profiles a model offers, with their memory in MiB, about what `nvidia-smi mig -lgip`
# reports (the exact figures vary a little with the driver); the `Ng` of a name is its compute slices.
MIG_PROFILES: dict[str, dict[str, int]] = {
    "A100-40GB": {"1g.5gb": 4864, "1g.10gb": 9984, "2g.10gb": 9984, "3g.20gb": 19968, "4g.20gb": 19968, "7g.40gb": 40192},
    "A100-80GB": {"1g.10gb": 9728, "1g.20gb": 19968, "2g.20gb": 19968, "3g.40gb": 40192, "4g.40gb": 40192, "7g.80gb": 80896},
    "H100-80GB": {"1g.10gb": 9984, "1g.20gb": 20096, "2g.20gb": 20096, "3g.40gb": 40320, "4g.40gb": 40320, "7g.80gb": 80512},
}
MIG_SLICES = 7  # compute slices of an A100 or H100: the most instances, and the most `Ng` a layout may sum to

# Any other NAME-<N>GB is accepted with these figures.
_GENERIC_POWER_LIMIT_W = 300.0
_GENERIC_IDLE_POWER_W = 50.0
_GENERIC_BUSY_TEMPERATURE_C = 70.0
_GENERIC_SM_CLOCK_MHZ = 1800
_GENERIC_MEM_CLOCK_MHZ = 5000

_MODEL = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.]*)-(?P<gb>\d+)GB", re.IGNORECASE)
_COUNTED = re.compile(r"(?P<count>\d+)\s*[xX]\s*(?P<model>.+)")
_FIRST_X = re.compile(r"(?P<count>.*?)\s*[xX]\s*(?P<model>.+)")

# PCI buses of the eight GPUs on an HGX H100 board; further boards take the next PCI domain.
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


@dataclass(frozen=True, slots=True)
class SimulatedHost:
    """A whole simulated host: its GPU model and how `nvidia-smi topo -m` shows its wiring."""

    model: str  # a catalog model
    topo_m: str  # the GPU rows of `nvidia-smi topo -m`, with CPU and NUMA affinity

    @property
    def topology(self) -> NodeTopology:
        return NodeTopology.from_nvidia_smi(self.topo_m)


SIMULATED_HOSTS: dict[str, SimulatedHost] = {
    # A DGX H100 (HGX H100 board): four NVSwitches, 18 links from every GPU; two 56-core sockets.
    "hgx-h100": SimulatedHost(
        "H100-80GB",
        """
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity    NUMA Affinity
GPU0     X      NV18    NV18    NV18    NV18    NV18    NV18    NV18    0-55,112-167    0
GPU1    NV18     X      NV18    NV18    NV18    NV18    NV18    NV18    0-55,112-167    0
GPU2    NV18    NV18     X      NV18    NV18    NV18    NV18    NV18    0-55,112-167    0
GPU3    NV18    NV18    NV18     X      NV18    NV18    NV18    NV18    0-55,112-167    0
GPU4    NV18    NV18    NV18    NV18     X      NV18    NV18    NV18    56-111,168-223  1
GPU5    NV18    NV18    NV18    NV18    NV18     X      NV18    NV18    56-111,168-223  1
GPU6    NV18    NV18    NV18    NV18    NV18    NV18     X      NV18    56-111,168-223  1
GPU7    NV18    NV18    NV18    NV18    NV18    NV18    NV18     X      56-111,168-223  1
""",
    ),
    # Four H100 NVL PCIe cards in bridged pairs (three bridges each: NV12), one 32-core socket.
    "pcie-nvlink-pairs": SimulatedHost(
        "H100NVL-94GB",
        """
        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity
GPU0     X      NV12    PIX     PHB     0-31            0
GPU1    NV12     X      PHB     PIX     0-31            0
GPU2    PIX     PHB      X      NV12    0-31            0
GPU3    PHB     PIX     NV12     X      0-31            0
""",
    ),
    # Eight L40S (no NVLink) on two 32-core sockets with hyperthreads: a switch per pair, two per socket.
    "pcie-2socket": SimulatedHost(
        "L40S-48GB",
        """
        GPU0    GPU1    GPU2    GPU3    GPU4    GPU5    GPU6    GPU7    CPU Affinity    NUMA Affinity
GPU0     X      PIX     NODE    NODE    SYS     SYS     SYS     SYS     0-31,64-95      0
GPU1    PIX      X      NODE    NODE    SYS     SYS     SYS     SYS     0-31,64-95      0
GPU2    NODE    NODE     X      PIX     SYS     SYS     SYS     SYS     0-31,64-95      0
GPU3    NODE    NODE    PIX      X      SYS     SYS     SYS     SYS     0-31,64-95      0
GPU4    SYS     SYS     SYS     SYS      X      PIX     NODE    NODE    32-63,96-127    1
GPU5    SYS     SYS     SYS     SYS     PIX      X      NODE    NODE    32-63,96-127    1
GPU6    SYS     SYS     SYS     SYS     NODE    NODE     X      PIX     32-63,96-127    1
GPU7    SYS     SYS     SYS     SYS     NODE    NODE    PIX      X      32-63,96-127    1
""",
    ),
}

# A link code's GpuLink relation (the inverse of what the sampler reads).
_RELATIONS = {PIX: "pcie_switch", PXB: "pcie_switches", PHB: "host_bridge", NODE: "numa_node", SYS: "cross_cpu"}


def simulated_host(spec: str) -> SimulatedHost | None:
    """The simulated host a `--simulate` spec names (its fleet before any ';'), or None for a fleet of models."""
    fleet, _ = _split_spec(spec)
    return SIMULATED_HOSTS.get(fleet.strip().lower())


def known_models() -> list[str]:
    """The catalog's model names, as a spec spells them."""
    return [spec.model for spec in _CATALOG.values()]


def _model_spec(text: str, item: str) -> SimulatedGpuSpec:
    known = _CATALOG.get(text.upper())
    if known is not None:
        return known
    match = _MODEL.fullmatch(text)
    if match is None:
        raise ValueError(
            f"bad simulated GPU {item!r}: expected [COUNTx]MODEL-<N>GB such as 4xH100-80GB "
            f"(known models: {', '.join(known_models())})"
        )
    gb = int(match["gb"])
    if gb < 1:
        raise ValueError(f"bad simulated GPU {item!r}: memory must be at least 1 GB")
    return SimulatedGpuSpec(
        model=f"{match['name']}-{gb}GB",
        name=f"Simulated {match['name']}",
        memory_total_mb=gb * 1024,
        power_limit_w=_GENERIC_POWER_LIMIT_W,
        idle_power_w=_GENERIC_IDLE_POWER_W,
        busy_temperature_c=_GENERIC_BUSY_TEMPERATURE_C,
        sm_clock_max_mhz=_GENERIC_SM_CLOCK_MHZ,
        mem_clock_mhz=_GENERIC_MEM_CLOCK_MHZ,
        nvlinks=0,
    )


def _parse_item(item: str) -> tuple[int, SimulatedGpuSpec]:
    gpus, marker, layout = item.partition(":")
    if marker:
        count, spec = _parse_item(gpus.strip())
        return count, _with_mig(spec, layout.strip(), item)
    counted = _COUNTED.fullmatch(item)
    if counted is not None:
        count, model = int(counted["count"]), counted["model"]
    else:
        # "RTX4090-24GB" has an x but no count; "twoxH100-80GB" or "-1xH100-80GB" has a bad one.
        first_x = _FIRST_X.fullmatch(item)
        if first_x is not None and first_x["count"] and (
            re.fullmatch(r"[+-]?[\d.,_]+", first_x["count"]) or first_x["model"].upper() in _CATALOG
        ):
            raise ValueError(
                f"bad GPU count {first_x['count']!r} in {item!r}: expected a whole number, "
                f"such as 4x{first_x['model']}"
            )
        count, model = 1, item
    if count < 1:
        raise ValueError(f"bad GPU count in {item!r}: a simulated model needs at least 1 GPU")
    return count, _model_spec(model.strip(), item)


def _with_mig(spec: SimulatedGpuSpec, text: str, item: str) -> SimulatedGpuSpec:
    """`spec` in MIG mode with the layout `text` ("mig=3g.40gb/2g.20gb/1g.10gb"). Raises ValueError."""
    key, _, profiles_text = text.partition("=")
    offered = next((p for m, p in MIG_PROFILES.items() if m.upper() == spec.model.upper()), None)
    if key.strip().lower() != "mig" or not profiles_text.strip():
        raise ValueError(f"bad simulated GPU {item!r}: expected MODEL:mig=PROFILE/PROFILE/…, e.g. A100-80GB:mig=3g.40gb/2g.20gb")
    if offered is None:
        raise ValueError(
            f"bad simulated GPU {item!r}: {spec.model} has no MIG profiles here "
            f"(MIG models: {', '.join(MIG_PROFILES)})"
        )
    layout = tuple(p.strip() for p in profiles_text.split("/"))
    unknown = [p for p in layout if p not in offered]
    if unknown:
        raise ValueError(
            f"bad simulated GPU {item!r}: {spec.model} has no MIG profile {unknown[0]!r} "
            f"(its profiles: {', '.join(offered)})"
        )
    slices = sum(int(p.split("g.", 1)[0]) for p in layout)
    if slices > MIG_SLICES:
        raise ValueError(
            f"bad simulated GPU {item!r}: the layout takes {slices} compute slices, and a GPU has {MIG_SLICES}"
        )
    return replace(spec, mig_layout=layout)


def parse_simulate_spec(spec: str) -> list[SimulatedGpuSpec]:
    """Parse a fleet such as "4xH100-80GB,2xA100-40GB" into one spec per GPU, in index order.

    Each comma-separated item is [COUNTx]MODEL[:mig=PROFILE/…]: a catalog model (case-insensitive)
    or any NAME-<N>GB, in MIG mode with those GPU instances when `:mig=` follows (see MIG); or the whole fleet is one of SIMULATED_HOSTS (e.g. "hgx-h100"). Faults after the fleet (";xid=2:79@30", see Faults) are
    checked but not returned: parse_fault_schedule returns them. Raises
    ValueError saying what is wrong: an empty spec or item, a count that is not a
    whole number or is zero, an unknown format, more than MAX_SIMULATED_GPUS in
    all, or a fault parse_fault_schedule rejects.
    """
    fleet_text, fault_texts = _split_spec(spec)
    fleet = _parse_fleet(fleet_text)
    _parse_faults(fault_texts, len(fleet))
    return fleet


def parse_fault_schedule(spec: str) -> list[SimulatedFault]:
    """The faults of a `--simulate` spec (see Faults), in the order they fire; [] when it has none.

    Raises ValueError for a fault that is malformed (a negative time among them;
    the message names the forms expected), names a GPU the fleet lacks, has an
    XID code below 1 or a temperature outside -50..200 °C, and for a fleet
    parse_simulate_spec rejects.
    """
    fleet_text, fault_texts = _split_spec(spec)
    return _parse_faults(fault_texts, len(_parse_fleet(fleet_text)))


def _split_spec(spec: str) -> tuple[str, list[str]]:
    fleet, *faults = spec.split(";")
    return fleet, faults


def _parse_faults(texts: Sequence[str], gpu_count: int) -> list[SimulatedFault]:
    faults = [_parse_fault(text.strip(), gpu_count) for text in texts]
    return sorted(faults, key=lambda fault: fault.at_s)  # stable: faults at one time fire as written


def _parse_fault(text: str, gpu_count: int) -> SimulatedFault:
    if not text:
        raise ValueError("empty fault in simulated fleet: expected KIND=GPU[:VALUE]@SECONDS after each ';'")
    match = _FAULT.fullmatch(text)
    if match is None or match["kind"].lower() not in _FAULT_FORMS:
        raise ValueError(
            f"bad fault {text!r}: expected one of {', '.join(_FAULT_FORMS.values())} "
            f"(SECONDS after the first sample), e.g. xid=2:79@30"
        )
    kind = match["kind"].lower()
    form = _FAULT_FORMS[kind]
    value = match["value"]
    if (value is None) != (":" not in form):
        raise ValueError(f"bad fault {text!r}: expected {form}")
    index = int(match["gpu"])
    if index >= gpu_count:
        raise ValueError(f"fault {text!r} names GPU {index}, but the fleet has GPUs 0-{gpu_count - 1}")
    at_s = float(match["at"])
    code: int | None = None
    celsius: float | None = None
    if kind == "xid":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"bad fault {text!r}: an XID code is a whole number of at least 1")
        code = int(value)
    elif kind == "temp":
        if value.lower() != "off":
            try:
                celsius = float(value)
            except ValueError:
                raise ValueError(
                    f"bad fault {text!r}: expected °C or 'off' after the GPU, e.g. temp=1:95@60"
                ) from None
            if not -50.0 <= celsius <= 200.0:
                raise ValueError(f"bad fault {text!r}: {celsius:g} °C is no temperature a GPU reports")
    return SimulatedFault(at_s=at_s, index=index, kind=kind, code=code, celsius=celsius)


def _parse_fleet(spec: str) -> list[SimulatedGpuSpec]:
    if not spec.strip():
        raise ValueError("empty simulated fleet: expected e.g. 4xH100-80GB,2xA100-40GB")
    host = SIMULATED_HOSTS.get(spec.strip().lower())
    if host is not None:
        return [_CATALOG[host.model.upper()]] * len(host.topology.indices)
    for item in spec.split(","):
        if item.strip().lower() in SIMULATED_HOSTS:
            raise ValueError(f"{item.strip()!r} is a whole simulated host: it cannot be combined with other GPUs in {spec!r}")
    fleet: list[SimulatedGpuSpec] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty item in simulated fleet {spec!r}")
        count, model = _parse_item(item)
        if len(fleet) + count > MAX_SIMULATED_GPUS:
            raise ValueError(
                f"simulated fleet {spec!r} has more than {MAX_SIMULATED_GPUS} GPUs, "
                f"the most one host may have"
            )
        fleet.extend([model] * count)
    return fleet


@dataclass(frozen=True, slots=True)
class SimulatedFault:
    """One fault of a `--simulate` spec (see Faults)."""

    at_s: float  # seconds after the first sample
    index: int  # the GPU
    kind: str  # "xid" | "dbe" | "sbe" | "temp" | "lost" | "recovered"
    code: int | None = None  # the XID, for "xid"
    celsius: float | None = None  # the pinned temperature, for "temp"; None lets go


# A fault's kind -> how it is written.
_FAULT_FORMS: dict[str, str] = {
    "xid": "xid=GPU:CODE@SECONDS",
    "dbe": "dbe=GPU@SECONDS",
    "sbe": "sbe=GPU@SECONDS",
    "temp": "temp=GPU:CELSIUS|off@SECONDS",
    "lost": "lost=GPU@SECONDS",
    "recovered": "recovered=GPU@SECONDS",
}
_FAULT = re.compile(
    r"(?P<kind>[A-Za-z]+)\s*=\s*(?P<gpu>\d+)\s*(?::\s*(?P<value>[^@\s]+)\s*)?@\s*(?P<at>\d+(?:\.\d*)?|\.\d+)\s*s?"
)


@dataclass(frozen=True, slots=True)
class _BusyLevel:
    """The load one allocation puts on one GPU."""

    allocation_id: str
    utilization_pct: float
    memory_fraction: float  # of the memory the idle GPU leaves free
    pid: int


@dataclass(slots=True)
class _SimGpu:
    index: int
    spec: SimulatedGpuSpec
    uuid: str
    pci_bus_id: str
    rng: random.Random
    idle_memory_mb: float
    idle_temperature_c: float
    utilization_pct: float
    memory_used_mb: float
    temperature_c: float
    power_w: float
    energy_mj: float = 0.0
    last_now: float | None = None
    busy: _BusyLevel | None = None
    xid_errors: int = 0
    last_xid: int = 0
    ecc_sbe: int = 0
    ecc_dbe: int = 0
    temperature_override_c: float | None = None
    removed: bool = False
    mig_uuids: tuple[str, ...] = ()  # one per instance of spec.mig_layout


def _new_gpu(index: int, spec: SimulatedGpuSpec, seed: int) -> _SimGpu:
    rng = random.Random(f"simulated-gpu:{seed}:{index}")
    gpu_uuid = uuid.UUID(int=rng.getrandbits(128), version=4)
    board, slot = divmod(index, len(_HGX_BUSES))
    idle_temperature = rng.uniform(30.0, 35.0)
    mig_rng = random.Random(f"simulated-mig:{seed}:{index}")
    return _SimGpu(
        index=index,
        spec=spec,
        mig_uuids=tuple(f"MIG-{uuid.UUID(int=mig_rng.getrandbits(128), version=4)}" for _ in spec.mig_layout),
        uuid=f"GPU-{gpu_uuid}",
        pci_bus_id=f"{board:08X}:{_HGX_BUSES[slot]:02X}:00.0",
        rng=rng,
        idle_memory_mb=float(rng.randint(256, 640)),
        idle_temperature_c=idle_temperature,
        utilization_pct=IDLE_UTILIZATION_PCT,
        memory_used_mb=0.0,
        temperature_c=idle_temperature,
        power_w=spec.idle_power_w,
    )


def _busy_level(seed: int, index: int, allocation_id: str) -> _BusyLevel:
    rng = random.Random(f"simulated-lease:{seed}:{index}:{allocation_id}")
    return _BusyLevel(
        allocation_id=allocation_id,
        utilization_pct=rng.uniform(60.0, 98.0),
        memory_fraction=rng.uniform(0.4, 0.9),
        pid=rng.randint(1000, 4_000_000),
    )


def _approach(value: float, target: float, dt: float, tau: float) -> float:
    return target + (value - target) * math.exp(-dt / tau)


class SimulatedDevices(DeviceBackend):
    """A fleet of simulated GPUs (see the module's theory of operation).

    `seed` makes UUIDs and every draw reproducible; None draws one, so two
    simulated agents never share GPU UUIDs by accident. `faults` fire from
    sample() (see Faults); `clock` stamps the events of the fault-injection calls.
    `topology` wires the GPUs as a simulated host does (see Hosts with a real
    topology); None wires a fleet of models as that section says.
    """

    kind = "simulated"

    def __init__(
        self,
        specs: Sequence[SimulatedGpuSpec],
        seed: int | None = None,
        *,
        faults: Sequence[SimulatedFault] = (),
        clock: Callable[[], float] = time.time,
        topology: NodeTopology | None = None,
    ) -> None:
        if not specs:
            raise ValueError("a simulated fleet needs at least one GPU")
        if len(specs) > MAX_SIMULATED_GPUS:
            raise ValueError(f"a simulated fleet has at most {MAX_SIMULATED_GPUS} GPUs, got {len(specs)}")
        for fault in faults:
            if not 0 <= fault.index < len(specs):
                raise ValueError(f"a fault names GPU {fault.index}, but the fleet has GPUs 0-{len(specs) - 1}")
        self._seed = seed if seed is not None else random.SystemRandom().getrandbits(64)
        self._gpus = [_new_gpu(index, spec, self._seed) for index, spec in enumerate(specs)]
        for gpu in self._gpus:
            gpu.memory_used_mb = gpu.idle_memory_mb
        # sample() runs in a worker thread while set_leases and the fault hooks run on trio's.
        self._lock = threading.Lock()
        self._leases: dict[int, str] = {}
        self._open = False
        self._degraded: str | None = None
        self._clock = clock
        self._events = EventQueue()
        self._faults = sorted(faults, key=lambda fault: fault.at_s)
        self._faults_fired = 0
        self._first_now: float | None = None  # the scheduled faults' time zero
        if topology is not None and topology.indices != tuple(range(len(specs))):
            raise ValueError(f"a topology of GPUs {list(topology.indices)} does not fit a fleet of {len(specs)}")
        self._topology = topology

    @property
    def seed(self) -> int:
        return self._seed

    # ---- DeviceBackend

    def open(self) -> None:
        with self._lock:
            self._open = True

    def sample(self, now: float) -> list[GpuReading]:
        with self._lock:
            if not self._open:
                raise RuntimeError("SimulatedDevices is not open")
            self._fire_due_faults(now)
            readings = [self._step(gpu, now) for gpu in self._gpus if not gpu.removed]
            lost = [
                f"GPU {gpu.index} ({gpu.uuid}) lost: removed by the simulation" for gpu in self._gpus if gpu.removed
            ]
            self._degraded = "; ".join(lost) or None
            return readings

    def topology(self) -> list[GpuLink]:
        with self._lock:
            if not self._open:
                raise RuntimeError("SimulatedDevices is not open")
            present = [gpu.index for gpu in self._gpus if not gpu.removed]
            pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]]
            if self._topology is not None:
                return [self._link(a, b, self._topology.code(a, b)) for a, b in pairs]
            models = {gpu.spec for gpu in self._gpus}
            nvlinks = self._gpus[0].spec.nvlinks if len(models) == 1 else 0
            return [
                GpuLink(a=a, b=b, relation="nvlink" if nvlinks else "host_bridge", nvlinks=nvlinks) for a, b in pairs
            ]

    @staticmethod
    def _link(a: int, b: int, code: int) -> GpuLink:
        if code > NVLINK_BASE:
            return GpuLink(a=a, b=b, relation="nvlink", nvlinks=code - NVLINK_BASE)
        return GpuLink(a=a, b=b, relation=_RELATIONS[code], nvlinks=0)

    def affinity(self) -> list[GpuAffinity]:
        with self._lock:
            if not self._open:
                raise RuntimeError("SimulatedDevices is not open")
            topology = self._topology
            if topology is None:
                return []
            return [
                GpuAffinity(index=gpu.index, numa_node=topology.numa_node(gpu.index), cpu_list=topology.cpu_list(gpu.index))
                for gpu in self._gpus
                if not gpu.removed
            ]

    def close(self) -> None:
        with self._lock:
            self._open = False

    def set_leases(self, leased: Mapping[int, str]) -> None:
        with self._lock:
            self._leases = dict(leased)

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded

    def drain_events(self) -> list[DeviceEvent]:
        return self._events.drain()

    # ---- fault injection (see Faults); each raises ValueError for a GPU the fleet lacks

    def inject_xid(self, index: int, code: int) -> None:
        """GPU `index` raises XID `code` (e.g. 79, fallen off the bus): counted, its last_xid, and an "xid" event."""
        if code < 1:
            raise ValueError(f"XID codes are positive, got {code}")
        self._inject(SimulatedFault(at_s=0.0, index=index, kind="xid", code=code))

    def inject_ecc_dbe(self, index: int) -> None:
        """GPU `index` has an uncorrectable ECC error: both DBE counters grow by one, and an "ecc_dbe" event."""
        self._inject(SimulatedFault(at_s=0.0, index=index, kind="dbe"))

    def inject_ecc_sbe(self, index: int) -> None:
        """GPU `index` corrects an ECC error: both SBE counters grow by one, and an "ecc_sbe" event."""
        self._inject(SimulatedFault(at_s=0.0, index=index, kind="sbe"))

    def set_temperature_override(self, index: int, celsius: float | None) -> None:
        """Pin GPU `index`'s temperature at `celsius` (HBM a few degrees above); None lets the model drive it again."""
        self._inject(SimulatedFault(at_s=0.0, index=index, kind="temp", celsius=celsius))

    def remove_gpu(self, index: int) -> None:
        """Make GPU `index` lost: left out of samples and topology until restore_gpu(); a "lost" event."""
        self._inject(SimulatedFault(at_s=0.0, index=index, kind="lost"))

    def restore_gpu(self, index: int) -> None:
        """Bring back a GPU removed by remove_gpu(), its state where it was; a "recovered" event."""
        self._inject(SimulatedFault(at_s=0.0, index=index, kind="recovered"))

    def _inject(self, fault: SimulatedFault) -> None:
        at = self._clock()
        with self._lock:
            self._apply(fault, at)

    def _fire_due_faults(self, now: float) -> None:
        if self._first_now is None:
            self._first_now = now
        while self._faults_fired < len(self._faults):
            fault = self._faults[self._faults_fired]
            at = self._first_now + fault.at_s
            if at > now:
                return
            self._faults_fired += 1
            self._apply(fault, at)

    def _apply(self, fault: SimulatedFault, at: float) -> None:
        """Apply one fault at time `at`, under the lock."""
        gpu = self._gpu(fault.index)
        event: DeviceEvent | None = None
        if fault.kind == "xid" and fault.code is not None:
            gpu.xid_errors += 1
            gpu.last_xid = fault.code
            event = DeviceEvent(index=gpu.index, kind="xid", code=fault.code, at=at)
        elif fault.kind == "dbe":
            gpu.ecc_dbe += 1
            event = DeviceEvent(index=gpu.index, kind="ecc_dbe", code=None, at=at)
        elif fault.kind == "sbe":
            gpu.ecc_sbe += 1
            event = DeviceEvent(index=gpu.index, kind="ecc_sbe", code=None, at=at)
        elif fault.kind == "temp":
            gpu.temperature_override_c = fault.celsius
        elif fault.kind == "lost" and not gpu.removed:
            gpu.removed = True
            event = DeviceEvent(index=gpu.index, kind="lost", code=None, at=at, detail="removed by the simulation")
        elif fault.kind == "recovered" and gpu.removed:
            gpu.removed = False
            event = DeviceEvent(index=gpu.index, kind="recovered", code=None, at=at)
        if event is not None:
            self._events.put(event)
            log.warning("simulated %s on GPU %d", event.kind if event.code is None else f"XID {event.code}", gpu.index)

    def _gpu(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"no simulated GPU {index}: the fleet has GPUs 0-{len(self._gpus) - 1}")
        return self._gpus[index]

    # ---- the model

    def _mig_instances(self, gpu: _SimGpu) -> tuple[MigInstance, ...]:
        """The GPU's instances, a leased one holding its lease's share of its memory."""
        instances = []
        offered = next(p for m, p in MIG_PROFILES.items() if m.upper() == gpu.spec.model.upper())
        for mig_index, (profile, mig_uuid) in enumerate(zip(gpu.spec.mig_layout, gpu.mig_uuids)):
            total = offered[profile]
            unit = slice_index(gpu.index, mig_index)
            allocation_id = self._leases.get(unit)
            used = 0 if allocation_id is None else int(total * _busy_level(self._seed, unit, allocation_id).memory_fraction)
            instances.append(MigInstance(mig_index, mig_index + 1, mig_uuid, profile, total, total - used))
        return tuple(instances)

    def _step(self, gpu: _SimGpu, now: float) -> GpuReading:
        spec = gpu.spec
        mig_instances = self._mig_instances(gpu) if spec.mig_layout else ()
        allocation_id = self._leases.get(gpu.index)
        if allocation_id is None and spec.mig_layout:
            # The GPU works while any of its instances is leased.
            allocation_id = next(
                (self._leases[u] for u in (slice_index(gpu.index, i) for i in range(len(spec.mig_layout))) if u in self._leases),
                None,
            )
        if allocation_id is None:
            gpu.busy = None
        elif gpu.busy is None or gpu.busy.allocation_id != allocation_id:
            gpu.busy = _busy_level(self._seed, gpu.index, allocation_id)
        dt = 0.0 if gpu.last_now is None else max(0.0, now - gpu.last_now)
        gpu.last_now = now

        if gpu.busy is None:
            target_util, target_memory = IDLE_UTILIZATION_PCT, gpu.idle_memory_mb
        else:
            target_util = gpu.busy.utilization_pct
            headroom = spec.memory_total_mb - gpu.idle_memory_mb
            target_memory = gpu.idle_memory_mb + gpu.busy.memory_fraction * headroom
        gpu.utilization_pct = _approach(gpu.utilization_pct, target_util, dt, UTILIZATION_TAU_S)
        gpu.memory_used_mb = _approach(gpu.memory_used_mb, target_memory, dt, MEMORY_TAU_S)
        load = gpu.utilization_pct / 100.0
        target_temperature = gpu.idle_temperature_c + load * (spec.busy_temperature_c - gpu.idle_temperature_c)
        gpu.temperature_c = _approach(gpu.temperature_c, target_temperature, dt, TEMPERATURE_TAU_S)

        # NVML reports whole percents; the jitter keeps a flat line from looking fake.
        utilization = float(min(100, max(0, round(gpu.utilization_pct + gpu.rng.uniform(-1.0, 1.0)))))
        power = spec.idle_power_w + utilization / 100.0 * (spec.power_limit_w - spec.idle_power_w)
        gpu.energy_mj += (gpu.power_w + power) / 2.0 * dt * 1000.0
        gpu.power_w = power

        memory_used = int(round(gpu.memory_used_mb))
        sm_clock = IDLE_SM_CLOCK_MHZ + (spec.sm_clock_max_mhz - IDLE_SM_CLOCK_MHZ) * min(1.0, utilization / 20.0)
        processes: tuple[GpuProcess, ...] = ()
        if gpu.busy is not None:
            job_memory = max(0, memory_used - int(gpu.idle_memory_mb))
            processes = (GpuProcess(pid=gpu.busy.pid, used_memory_mb=job_memory),)
        temperature = gpu.temperature_c if gpu.temperature_override_c is None else gpu.temperature_override_c
        return GpuReading(
            index=gpu.index,
            uuid=gpu.uuid,
            name=spec.name,
            pci_bus_id=gpu.pci_bus_id,
            memory_total_mb=spec.memory_total_mb,
            memory_used_mb=memory_used,
            memory_free_mb=spec.memory_total_mb - memory_used,
            utilization_gpu_pct=utilization,
            utilization_memory_pct=float(round(utilization * 0.5)),
            temperature_c=float(round(temperature)),
            memory_temperature_c=float(round(temperature + HBM_OFFSET_C)),
            power_draw_w=power,
            power_limit_w=spec.power_limit_w,
            total_energy_mj=gpu.energy_mj,
            sm_clock_mhz=int(round(sm_clock)),
            mem_clock_mhz=spec.mem_clock_mhz,
            ecc_volatile_sbe=gpu.ecc_sbe,
            ecc_volatile_dbe=gpu.ecc_dbe,
            ecc_aggregate_sbe=gpu.ecc_sbe,  # the simulated GPUs start their lives with the agent
            ecc_aggregate_dbe=gpu.ecc_dbe,
            retired_pages=0,
            remapped_rows_correctable=0,
            remapped_rows_uncorrectable=0,
            remapped_rows_pending=False,
            remapped_rows_failed=False,
            pcie_replay_counter=0,
            xid_errors=gpu.xid_errors,
            mig_mode=bool(spec.mig_layout),
            processes=processes,
            sampled_at=now,
            gr_engine_active=utilization / 100.0,
            temperature_slowdown_c=spec.slowdown_temperature_c,
            last_xid=gpu.last_xid,
            mig_instances=mig_instances,
        )
