"""What the agent knows about its GPUs, whatever reads them.

A `DeviceBackend` turns a host's GPUs into `GpuReading`s (one GPU at one instant)
and `GpuLink`s (how two GPUs are wired). Two backends exist: `NvmlDevices` reads
real GPUs through NVML, `SimulatedDevices` invents a fleet for trying the agent out
and for tests.

Theory of operation
-------------------
The agent's sampler task calls `sample(now)` through `trio.to_thread` every
`sample_interval_s`: NVML calls block, so no backend method may be awaited. A
reading's fields that a GPU cannot report are None, never guessed: None means
"unsupported or unknown", 0 means "measured zero". The backend raises
`DeviceError` only when it fails as a whole (driver gone, NVML not initialised);
one GPU misbehaving makes the sample partial instead, with the reason in
`degraded_reason`. After a `DeviceError` the caller backs off and calls
`sample()` again, which re-initialises the backend.

`set_leases` runs on the trio thread while `sample` may be running in a worker
thread, so backends keep it cheap and lock whatever state it shares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass


class DeviceError(Exception):
    """The device backend failed as a whole: NVML could not start, the driver is gone."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process holding GPU memory."""

    pid: int
    used_memory_mb: int | None  # None where the driver does not say (e.g. under MIG)


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU's telemetry at one instant.

    Every field NVML may not support is Optional: None = unsupported/unknown.
    Memory is in MiB (NVML's bytes // 2**20, as nvidia-smi shows it), power in
    watts, energy in millijoules since the driver loaded (dcgm's unit for
    DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION), temperatures in °C, clocks in MHz.
    """

    index: int  # stable for the agent's lifetime: NVML's index when first seen
    uuid: str  # "GPU-…", what CUDA_VISIBLE_DEVICES takes
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    pci_bus_id: str | None  # e.g. "00000000:18:00.0"
    memory_total_mb: int
    memory_used_mb: int | None
    memory_free_mb: int | None
    utilization_gpu_pct: float | None
    utilization_memory_pct: float | None
    temperature_c: float | None
    memory_temperature_c: float | None
    power_draw_w: float | None
    power_limit_w: float | None
    total_energy_mj: float | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    ecc_volatile_sbe: int | None  # corrected errors since the driver loaded
    ecc_volatile_dbe: int | None  # uncorrected errors since the driver loaded
    ecc_aggregate_sbe: int | None  # corrected errors over the GPU's life
    ecc_aggregate_dbe: int | None  # uncorrected errors over the GPU's life
    retired_pages: int | None  # pages retired for ECC errors (pre-Ampere)
    remapped_rows_correctable: int | None  # row remapping (Ampere and later)
    remapped_rows_uncorrectable: int | None
    remapped_rows_pending: bool | None  # a remap waits for a GPU reset
    remapped_rows_failed: bool | None  # a remap failed: the GPU should be drained
    pcie_replay_counter: int | None
    xid_errors: int | None  # XID events seen; None where the backend does not count them
    mig_mode: bool | None
    processes: tuple[GpuProcess, ...] | None
    sampled_at: float  # the `now` passed to sample()


@dataclass(frozen=True, slots=True)
class GpuLink:
    """How GPUs `a` < `b` on one host are connected.

    `relation` is the closest path between them: "nvlink", or else the PCIe level
    of nvmlDeviceGetTopologyCommonAncestor: "same_board", "pcie_switch",
    "host_bridge" (same CPU socket), "cross_cpu", or "unknown".
    """

    a: int
    b: int
    relation: str
    nvlinks: int | None  # active NVLink links between the pair, None if unknown


class DeviceBackend(ABC):
    """A host's GPUs. Every method but `set_leases` may block: run them in a worker thread."""

    kind: str  # "nvml" | "simulated"

    @abstractmethod
    def open(self) -> None:
        """Start the backend and enumerate the GPUs. Raises DeviceError."""

    @abstractmethod
    def sample(self, now: float) -> list[GpuReading]:
        """Read every answering GPU, in index order, stamped `now`.

        GPUs that are lost are left out and named in `degraded_reason`. Raises
        DeviceError when the backend fails as a whole; the next call retries
        initialisation. Raises RuntimeError when called before open() or after close().
        """

    @abstractmethod
    def topology(self) -> list[GpuLink]:
        """The links between every pair of answering GPUs, (a, b) with a < b, sorted.

        Raises DeviceError like sample().
        """

    @abstractmethod
    def close(self) -> None:
        """Release the backend. Idempotent; never raises for a backend that already failed."""

    @abstractmethod
    def set_leases(self, leased: Mapping[int, str]) -> None:
        """Tell the backend which GPU indices are leased, to which allocation id.

        Called from the trio thread: cheap and thread-safe. The simulated backend
        drives its load from it; NVML ignores it.
        """

    @property
    @abstractmethod
    def degraded_reason(self) -> str | None:
        """Why the last sample was partial or failed; None when it was complete."""
