"""A simulated fleet of GPUs, for trying the agent out and for tests.

`gpu-agent --simulate 4xH100-80GB,2xA100-40GB` runs the agent on GPUs described
by `parse_simulate_spec`. They are never chosen in place of NVML silently.

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
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.devices.base import DeviceBackend, GpuLink, GpuProcess, GpuReading

log = logging.getLogger(__name__)

MAX_SIMULATED_GPUS = 64  # one host; NVML itself rarely sees more than 16
UTILIZATION_TAU_S = 1.5  # a job reaches ~95 % of its load in about 4.5 s
MEMORY_TAU_S = 1.0  # allocations come quickly once a job starts
TEMPERATURE_TAU_S = 10.0  # the heatsink lags the load
IDLE_UTILIZATION_PCT = 0.3
IDLE_SM_CLOCK_MHZ = 210  # what data-centre GPUs drop to with nothing to do
HBM_OFFSET_C = 3.0  # HBM runs a few degrees above the GPU core


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


_CATALOG: dict[str, SimulatedGpuSpec] = {
    spec.model.upper(): spec
    for spec in (
        # Memory totals as NVML reports them (nvidia-smi's MiB), board power limits from the data sheets.
        SimulatedGpuSpec("H100-80GB", "NVIDIA H100 80GB HBM3", 81559, 700.0, 70.0, 68.0, 1980, 2619, 18),
        SimulatedGpuSpec("H200-141GB", "NVIDIA H200", 143771, 700.0, 75.0, 68.0, 1980, 3201, 18),
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


def parse_simulate_spec(spec: str) -> list[SimulatedGpuSpec]:
    """Parse a fleet such as "4xH100-80GB,2xA100-40GB" into one spec per GPU, in index order.

    Each comma-separated item is [COUNTx]MODEL: a catalog model (case-insensitive)
    or any NAME-<N>GB. Raises ValueError saying what is wrong: an empty spec or
    item, a count that is not a whole number or is zero, an unknown format, more
    than MAX_SIMULATED_GPUS in all.
    """
    if not spec.strip():
        raise ValueError("empty simulated fleet: expected e.g. 4xH100-80GB,2xA100-40GB")
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
    removed: bool = False


def _new_gpu(index: int, spec: SimulatedGpuSpec, seed: int) -> _SimGpu:
    rng = random.Random(f"simulated-gpu:{seed}:{index}")
    gpu_uuid = uuid.UUID(int=rng.getrandbits(128), version=4)
    board, slot = divmod(index, len(_HGX_BUSES))
    idle_temperature = rng.uniform(30.0, 35.0)
    return _SimGpu(
        index=index,
        spec=spec,
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
    simulated agents never share GPU UUIDs by accident.
    """

    kind = "simulated"

    def __init__(self, specs: Sequence[SimulatedGpuSpec], seed: int | None = None) -> None:
        if not specs:
            raise ValueError("a simulated fleet needs at least one GPU")
        if len(specs) > MAX_SIMULATED_GPUS:
            raise ValueError(f"a simulated fleet has at most {MAX_SIMULATED_GPUS} GPUs, got {len(specs)}")
        self._seed = seed if seed is not None else random.SystemRandom().getrandbits(64)
        self._gpus = [_new_gpu(index, spec, self._seed) for index, spec in enumerate(specs)]
        for gpu in self._gpus:
            gpu.memory_used_mb = gpu.idle_memory_mb
        # sample() runs in a worker thread while set_leases and the fault hooks run on trio's.
        self._lock = threading.Lock()
        self._leases: dict[int, str] = {}
        self._open = False
        self._degraded: str | None = None

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
            models = {gpu.spec for gpu in self._gpus}
            nvlinks = self._gpus[0].spec.nvlinks if len(models) == 1 else 0
            present = [gpu.index for gpu in self._gpus if not gpu.removed]
            return [
                GpuLink(a=a, b=b, relation="nvlink" if nvlinks else "host_bridge", nvlinks=nvlinks)
                for i, a in enumerate(present)
                for b in present[i + 1 :]
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

    # ---- fault injection

    def inject_xid(self, index: int, code: int) -> None:
        """Record an XID event (e.g. 79, fallen off the bus) on GPU `index`: its xid_errors count grows by one."""
        if code < 1:
            raise ValueError(f"XID codes are positive, got {code}")
        with self._lock:
            self._gpu(index).xid_errors += 1
        log.warning("simulated XID %d on GPU %d", code, index)

    def remove_gpu(self, index: int) -> None:
        """Make GPU `index` lost: left out of samples and topology until restore_gpu()."""
        with self._lock:
            self._gpu(index).removed = True

    def restore_gpu(self, index: int) -> None:
        """Bring back a GPU removed by remove_gpu(); its state carries on from where it was."""
        with self._lock:
            self._gpu(index).removed = False

    def _gpu(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"no simulated GPU {index}: the fleet has GPUs 0-{len(self._gpus) - 1}")
        return self._gpus[index]

    # ---- the model

    def _step(self, gpu: _SimGpu, now: float) -> GpuReading:
        spec = gpu.spec
        allocation_id = self._leases.get(gpu.index)
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
            temperature_c=float(round(gpu.temperature_c)),
            memory_temperature_c=float(round(gpu.temperature_c + HBM_OFFSET_C)),
            power_draw_w=power,
            power_limit_w=spec.power_limit_w,
            total_energy_mj=gpu.energy_mj,
            sm_clock_mhz=int(round(sm_clock)),
            mem_clock_mhz=spec.mem_clock_mhz,
            ecc_volatile_sbe=0,
            ecc_volatile_dbe=0,
            ecc_aggregate_sbe=0,
            ecc_aggregate_dbe=0,
            retired_pages=0,
            remapped_rows_correctable=0,
            remapped_rows_uncorrectable=0,
            remapped_rows_pending=False,
            remapped_rows_failed=False,
            pcie_replay_counter=0,
            xid_errors=gpu.xid_errors,
            mig_mode=False,
            processes=processes,
            sampled_at=now,
        )
