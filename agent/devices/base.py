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

Health events
-------------
Some things a GPU reports only as they happen: an XID error (the driver's code
for a fault, e.g. 79 "fallen off the bus"), an ECC error, the GPU going missing
and coming back. The backend collects them as `DeviceEvent`s, from a watcher
thread of its own (NVML, between `start_event_watcher` and `stop_event_watcher`)
or from `sample` and the fault hooks (the simulation). The caller takes them with
`drain_events`, which never blocks. Until drained they wait in a bounded queue
(`MAX_PENDING_EVENTS`): an XID storm nobody drains cannot grow memory without
bound; the oldest are dropped first and the drop is logged.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

# What a DeviceEvent's `kind` may be.
EVENT_KINDS: Final = ("xid", "ecc_dbe", "ecc_sbe", "lost", "recovered")

MAX_PENDING_EVENTS: Final = 1000  # undrained events kept; older ones are dropped first


class DeviceError(Exception):
    """The device backend failed as a whole: NVML could not start, the driver is gone."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process holding GPU memory."""

    pid: int
    used_memory_mb: int | None  # None where the driver does not say (e.g. under MIG)


@dataclass(frozen=True, slots=True)
class MigInstance:
    """One GPU instance of a GPU in MIG mode, as the driver reports it (never created by the agent).

    `mig_index` is the MIG device's index under its GPU (nvmlDeviceGetMigDeviceHandleByIndex),
    `gpu_instance_id` the driver's GPU instance id, `profile` as nvidia-smi names it ("1g.10gb").
    """

    mig_index: int
    gpu_instance_id: int
    uuid: str  # "MIG-…", what CUDA_VISIBLE_DEVICES takes
    profile: str
    memory_total_mb: int
    memory_free_mb: int | None


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
    processes: tuple[GpuProcess, ...] | None  # compute and graphics processes, one per pid
    sampled_at: float  # the `now` passed to sample()
    # Added later, so with defaults: readings built without them stay valid.
    # Ratio 0..1 of time the graphics/compute engine was busy: the NVML stand-in for
    # DCGM_FI_PROF_GR_ENGINE_ACTIVE, computed as utilization.gpu / 100 (NVML's
    # "percent of time over the past sample period during which one or more
    # kernels was executing"), so it has that counter's coarser sampling window.
    gr_engine_active: float | None = None
    # Where the GPU starts slowing its clocks to cool down (NVML's SLOWDOWN
    # threshold, °C); fixed per board, read once.
    temperature_slowdown_c: float | None = None
    # The last XID the backend saw on this GPU, as dcgm-exporter's
    # DCGM_FI_DEV_XID_ERRORS reports it; 0 = none seen while watching, None = not watched.
    last_xid: int | None = None
    # The GPU instances of a GPU in MIG mode, by mig_index; () when not in MIG
    # mode or none is configured (a MIG-mode GPU without instances runs nothing).
    mig_instances: tuple[MigInstance, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something that happened to one GPU, as it happened (see "Health events")."""

    index: int  # GPU index as the backend reports it
    kind: str  # one of EVENT_KINDS: "xid" | "ecc_dbe" | "ecc_sbe" | "lost" | "recovered"
    code: int | None  # the XID number for "xid", else None
    at: float  # wall-clock seconds (time.time()) when seen
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown device event kind {self.kind!r}: expected one of {', '.join(EVENT_KINDS)}")


class EventQueue:
    """The events a backend has seen and nobody has drained yet: thread-safe, bounded."""

    def __init__(self, limit: int = MAX_PENDING_EVENTS) -> None:
        self._lock = threading.Lock()
        self._events: deque[DeviceEvent] = deque(maxlen=limit)
        self.dropped = 0  # events pushed out unread since the queue was made
        self._warned = False  # the current overflow has been logged

    def put(self, event: DeviceEvent) -> None:
        with self._lock:
            full = len(self._events) == self._events.maxlen
            if full:
                self.dropped += 1
            self._events.append(event)
            warn = full and not self._warned
            self._warned = self._warned or full
        if warn:
            log.warning(
                "%d device events are waiting to be drained: dropping the oldest until they are",
                len(self._events),
            )

    def drain(self) -> list[DeviceEvent]:
        """Every event put since the last drain, oldest first; the queue is left empty."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            self._warned = False
            return events


@dataclass(frozen=True, slots=True)
class GpuLink:
    """How GPUs `a` < `b` on one host are connected.

    `relation` is the closest path between them: "nvlink", or else the PCIe level
    of nvmlDeviceGetTopologyCommonAncestor: "same_board" (INTERNAL),
    "pcie_switch" (SINGLE), "pcie_switches" (MULTIPLE: several switches, no host
    bridge), "host_bridge" (HOSTBRIDGE), "numa_node" (NODE: host bridges of one
    NUMA node), "cross_cpu" (SYSTEM), or "unknown".
    """

    a: int
    b: int
    relation: str
    nvlinks: int | None  # active NVLink links between the pair, None if unknown


@dataclass(frozen=True, slots=True)
class GpuAffinity:
    """Where GPU `index` sits in the host: its NUMA node and the CPUs closest to it."""

    index: int
    numa_node: int | None  # None where neither NVML nor sysfs says
    cpu_list: str | None  # Linux cpulist form, e.g. "0-31,64-95"; None where unknown


class DeviceBackend(ABC):
    """A host's GPUs. Every method but `set_leases` and `drain_events` may block: run them in a worker thread."""

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

    def affinity(self) -> list[GpuAffinity]:
        """Each answering GPU's NUMA node and nearby CPUs, by index; [] where the backend cannot tell.

        Raises DeviceError like sample().
        """
        return []

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

    @property
    def watcher_error(self) -> str | None:
        """Why the event watcher is not watching right now; None when it is (or none is needed)."""
        return None

    def drain_events(self) -> list[DeviceEvent]:
        """The events seen since the last call, oldest first. Never blocks; thread-safe."""
        return []

    def start_event_watcher(self) -> None:
        """Start watching for events in the background, where the backend needs a watcher.

        Idempotent. A backend whose events come from sample() needs none.
        """

    def stop_event_watcher(self) -> None:
        """Stop the watcher start_event_watcher() started, promptly. Idempotent."""
