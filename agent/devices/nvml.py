"""Real GPUs, read through NVML (the `pynvml` module of nvidia-ml-py).

Rules of this file
------------------
* Every NVML error is sorted into one of four kinds, here and only here:

  - unsupported (NotSupported, FunctionNotFound, NoPermission): the GPU cannot
    report that field. It reads None, is logged once per (GPU, field), and is not
    asked again until NVML is re-initialised: it will not start working by itself,
    and skipping it keeps `sample()` cheap.
  - lost (GpuIsLost, ResetRequired): the GPU fell off the bus or needs a reset. It
    is left out of the readings and `degraded_reason` names it. It is asked again
    each sample, so a GPU that comes back after a reset reappears.
  - fatal (Uninitialized, DriverNotLoaded, LibraryNotFound, LibRmVersionMismatch):
    NVML itself is gone. `sample()` raises DeviceError and the next call shuts
    NVML down and initialises it again (the caller applies the backoff).
  - anything else (Unknown, Timeout, ...): a transient failure of one query. The
    field reads None for this sample and `degraded_reason` says so. If the query
    was the GPU's memory query the GPU is left out of this sample; if that happens
    to every GPU, NVML has failed as a whole and DeviceError is raised.

* Indices are stable for the backend's lifetime. A GPU keeps the index NVML gave
  it when first seen, matched by UUID afterwards, so a GPU vanishing (NVML's count
  drops and the indices after it shift) does not renumber the others and leases
  on them stay right.

* Identity (UUID, name, PCI bus id) is read once per GPU when it is enumerated,
  the slowdown temperature on its first sample; each sample reads the rest with
  one NVML call per field (two for retired pages, one per ECC counter, two for
  processes: compute and graphics).

* Where each GPU sits (`affinity()`): its NUMA node from nvmlDeviceGetNumaNodeId
  and its nearby CPUs from nvmlDeviceGetCpuAffinity (a bitmask, 64 CPUs a word);
  where NVML cannot say (an older driver or binding, NotSupported, an empty
  mask), from the PCI device's sysfs files `numa_node` and `local_cpulist`,
  which the kernel fills from the firmware's tables. -1 there means no NUMA.

* Memory comes from nvmlDeviceGetMemoryInfo with `version=nvmlMemory_v2`, whose
  `used` leaves out what the driver reserves for itself, as nvidia-smi shows it;
  where the binding or driver lacks v2 (FunctionNotFound), from v1, whose `used`
  counts the reservation. `free` is the same in both.

Events
------
XID and ECC errors are not counters to poll: NVML announces them through an
event set. `start_event_watcher()` starts a daemon thread that creates one set,
registers every present GPU for the XID, double-bit and single-bit ECC events it
supports (a GPU that supports none, or answers NotSupported, is logged once and
left out), and waits on it `EVENT_WAIT_MS` at a time, so `stop_event_watcher()`
returns within about that long. The wait runs without the lock `sample()` takes;
only registration takes it. Each event becomes a `DeviceEvent`; an XID also
becomes the GPU's `last_xid` and counts in its `xid_errors`.

NVML's eventData of 999 means "an XID NVML could not identify", not a lost GPU:
it is reported as XID 999. A lost GPU is what `sample()` finds: it emits "lost"
when a GPU it knows stops answering (GpuIsLost, ResetRequired, or NVML no longer
lists it) and "recovered" when it answers again.

The watcher never stops on an error. Any failure (NVML's or not) is logged once
per kind and exposed as `watcher_error`; the watcher frees its set, waits (0.5 s
doubling to 30 s) and starts over with a new set. It also starts over whenever
the GPUs' handles may have changed (NVML re-initialised or re-enumerated, a lost
GPU back); events raised in the moment between two sets are not seen.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from coordinator.topology import format_cpulist

from agent.devices.base import (
    DeviceBackend,
    DeviceError,
    DeviceEvent,
    EventQueue,
    GpuAffinity,
    GpuLink,
    GpuProcess,
    GpuReading,
    MigInstance,
)

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
# What reading a MIG GPU's instances takes (nvidia-ml-py 11.450 and later has them all).
_MIG_FUNCTIONS: Final = (
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
    "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetGpuInstanceById",
    "nvmlGpuInstanceGetInfo",
    "nvmlDeviceGetGpuInstanceProfileInfo",
)

EVENT_WAIT_MS: Final = 500  # one wait on the event set: how long stop_event_watcher() may take
EVENT_RETRY_S: Final = (0.5, 30.0)  # the watcher's backoff after a failure: first delay, cap

UNKNOWN_XID: Final = 999  # NVML's eventData for an XID it cannot identify
_NO_INSTANCE: Final = 0xFFFFFFFF  # an event's gpuInstanceId/computeInstanceId outside MIG

# What the XIDs an operator meets most often mean (NVIDIA's XID catalogue), for logs and event details.
XID_NAMES: Final[Mapping[int, str]] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup, due to previous errors",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapping recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    UNKNOWN_XID: "an XID NVML could not identify",
}


class _GpuLost(Exception):
    """This GPU answered GpuIsLost or ResetRequired: leave it out of this sample."""


class _GpuFailed(Exception):
    """This GPU's memory query failed with a transient error: leave it out of this sample."""


@dataclass(slots=True)
class _Gpu:
    """A GPU seen since open(), with what never changes while it is present."""

    index: int
    uuid: str
    handle: Any
    name: str = "unknown"
    pci_bus_id: str | None = None
    memory_total_mb: int = 0  # the last total NVML reported; 0 until it has reported one
    slowdown_c: float | None = None  # NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, once read
    lost: bool = False  # the last sample left it out as lost ("lost" event sent, "recovered" due)
    unsupported: set[str] = field(default_factory=set)  # fields not to ask again


@dataclass(slots=True)
class _NvLinks:
    """One GPU's active NVLink links: to NVSwitches, and directly to peer GPUs by index."""

    to_switch: int
    to_peer: Counter[int]


def _text(value: object) -> str:
    """NVML strings come back as bytes from older bindings and struct fields, str from newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _bus_key(bus_id: str) -> str:
    return bus_id.strip().upper()


def _handle_key(handle: object) -> Hashable:
    """A device handle as a dict key.

    pynvml's handles are ctypes pointers, and two pointer objects to one device
    compare unequal (an event's `.device` is a new one each time): key by address.
    """
    if isinstance(handle, ctypes._Pointer):
        return ctypes.cast(handle, ctypes.c_void_p).value
    return handle


def _processes(*lists: Iterable[Any]) -> tuple[GpuProcess, ...]:
    """NVML's process lists as one, a process in several (compute and graphics) once, as first listed."""
    seen: dict[int, GpuProcess] = {}
    for processes in lists:
        for info in processes:
            process = _process(info)
            seen.setdefault(process.pid, process)
    return tuple(seen.values())


class NvmlDevices(DeviceBackend):
    """The host's NVIDIA GPUs. `nvml` is the pynvml module; tests pass a fake with the same names."""

    kind = "nvml"

    def __init__(
        self,
        nvml: ModuleType | None = None,
        *,
        event_wait_ms: int = EVENT_WAIT_MS,
        event_retry_s: tuple[float, float] = EVENT_RETRY_S,
        clock: Callable[[], float] = time.time,
        sysfs: Path = Path("/sys"),
    ) -> None:
        """`clock` stamps the events the watcher sees; the event arguments tune the watcher (see
        Events); `sysfs` is where the kernel's PCI devices are (see where each GPU sits)."""
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._error: type[Exception] = nvml.NVMLError
        self._timeout: type[Exception] = nvml.NVMLError_Timeout
        self._unsupported: tuple[type[Exception], ...] = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_FunctionNotFound,
            nvml.NVMLError_NoPermission,
        )
        self._lost: tuple[type[Exception], ...] = (
            nvml.NVMLError_GpuIsLost,
            nvml.NVMLError_ResetRequired,
        )
        self._fatal: tuple[type[Exception], ...] = (
            nvml.NVMLError_Uninitialized,
            nvml.NVMLError_DriverNotLoaded,
            nvml.NVMLError_LibraryNotFound,
            nvml.NVMLError_LibRmVersionMismatch,
        )
        # A link index past the GPU's last link answers one of these.
        self._no_such_link: tuple[type[Exception], ...] = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_InvalidArgument,
            nvml.NVMLError_NotFound,
        )
        self._relations: dict[int, str] = {
            nvml.NVML_TOPOLOGY_INTERNAL: "same_board",
            nvml.NVML_TOPOLOGY_SINGLE: "pcie_switch",
            nvml.NVML_TOPOLOGY_MULTIPLE: "pcie_switches",
            nvml.NVML_TOPOLOGY_HOSTBRIDGE: "host_bridge",
            nvml.NVML_TOPOLOGY_NODE: "numa_node",
            nvml.NVML_TOPOLOGY_SYSTEM: "cross_cpu",
        }
        self._value_members: dict[int, str] = {
            nvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
            nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
            nvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
            nvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: "usVal",
        }
        # One lock around NVML: trio.to_thread may run sample() and topology() on different threads.
        self._lock = threading.Lock()
        self._state = "closed"  # "closed" | "open" | "failed" (the next call re-initialises)
        self._initialised = False  # our nvmlInit succeeded and is not yet matched by nvmlShutdown
        self._gpus: dict[str, _Gpu] = {}  # every GPU seen since open(), by UUID
        self._present: list[_Gpu] = []  # enumerated in the current NVML session, by index
        self._device_count = 0  # nvmlDeviceGetCount at the last enumeration
        self._enumeration_problems: list[str] = []  # positions that could not be identified
        self._enumeration_failures = 0  # of those, the ones not lost
        self._logged: set[tuple[str, str, str]] = set()
        self._degraded: str | None = None
        self._memory_v2: int | None = getattr(nvml, "nvmlMemory_v2", None)  # None: a binding without v2
        # Events (see the module's Events). `_generation` changes whenever GPU handles may have.
        self._xid_event: int = nvml.nvmlEventTypeXidCriticalError
        self._dbe_event: int = nvml.nvmlEventTypeDoubleBitEccError
        self._sbe_event: int = nvml.nvmlEventTypeSingleBitEccError
        self._event_wait_ms = event_wait_ms
        self._event_retry_s = event_retry_s
        self._clock = clock
        self._sysfs = sysfs
        self._events = EventQueue()
        self._generation = 0
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self._watcher_guard = threading.Lock()  # start/stop_event_watcher against each other
        self._watcher_error: str | None = None
        self._watcher_logged: set[str] = set()  # kinds of watcher failure already logged
        self._watch_failures = 0  # failures since the watcher last waited successfully
        # Per GPU index, under `_xid_lock` (the watcher writes, sample() reads): present once the GPU
        # is registered for XID events.
        self._xid_lock = threading.Lock()
        self._last_xid: dict[int, int] = {}
        self._xid_counts: dict[int, int] = {}
        # GPU UUID -> {GPU instance profile id: profile name}, read once per GPU (see _mig_profile).
        self._mig_profile_names: dict[str, dict[int, str]] = {}

    # ---- DeviceBackend

    def open(self) -> None:
        with self._lock:
            if self._state != "closed":
                raise RuntimeError("NvmlDevices is already open")
            self._start()
            self._state = "open"
            log.info("NVML opened: %d GPU(s)", len(self._present))

    def sample(self, now: float) -> list[GpuReading]:
        with self._lock:
            self._ensure_ready()
            try:
                readings, problems = self._sample_locked(now)
            except DeviceError as exc:
                self._fail(exc)
                raise
            self._degraded = "; ".join(problems) or None
            return readings

    def topology(self) -> list[GpuLink]:
        with self._lock:
            self._ensure_ready()
            try:
                return self._topology_locked()
            except DeviceError as exc:
                self._fail(exc)
                raise

    def affinity(self) -> list[GpuAffinity]:
        with self._lock:
            self._ensure_ready()
            try:
                return self._affinity_locked()
            except DeviceError as exc:
                self._fail(exc)
                raise

    def close(self) -> None:
        self.stop_event_watcher()  # before nvmlShutdown: its event set belongs to this session
        with self._lock:
            self._state = "closed"
            self._shutdown()

    def set_leases(self, leased: Mapping[int, str]) -> None:
        """NVML reports what the GPUs really do; leases do not change it."""

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded

    def drain_events(self) -> list[DeviceEvent]:
        return self._events.drain()

    def start_event_watcher(self) -> None:
        """Start the event watcher thread (see Events). Idempotent; RuntimeError before open()."""
        with self._watcher_guard:
            if self._state == "closed":
                raise RuntimeError("NvmlDevices is not open")
            if self._watcher is not None and self._watcher.is_alive():
                return
            # A fresh stop flag: a watcher that outlived its stop keeps the flag that stopped it.
            self._stop_watching = threading.Event()
            self._watcher = threading.Thread(
                target=self._watch, args=(self._stop_watching,), name="nvml-event-watcher", daemon=True
            )
            self._watcher.start()

    def stop_event_watcher(self) -> None:
        """Stop the watcher and free its event set; returns within about EVENT_WAIT_MS. Idempotent."""
        with self._watcher_guard:
            watcher, self._watcher = self._watcher, None
            if watcher is None:
                return
            self._stop_watching.set()
            watcher.join(timeout=self._event_wait_ms / 1000.0 + 1.0)
            if watcher.is_alive():
                log.warning("NVML event watcher is stuck in an NVML call; leaving it to finish on its own")

    @property
    def watcher_error(self) -> str | None:
        """Why the event watcher is not watching right now; None while it watches (or was never started)."""
        return self._watcher_error

    # ---- NVML session

    def _start(self) -> None:
        """nvmlInit and enumerate. Raises DeviceError, leaving NVML shut down."""
        try:
            self._nvml.nvmlInit()
        except self._error as exc:
            raise DeviceError(f"NVML could not start: {exc}") from exc
        self._initialised = True
        self._generation += 1
        try:
            self._enumerate(self._device_count_now())
        except DeviceError:
            self._shutdown()
            raise

    def _shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        try:
            self._nvml.nvmlShutdown()
        except self._error as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def _ensure_ready(self) -> None:
        if self._state == "closed":
            raise RuntimeError("NvmlDevices is not open")
        if self._state == "failed":
            self._shutdown()
            # A driver reload may have changed what each GPU supports.
            for gpu in self._gpus.values():
                gpu.unsupported.clear()
            try:
                self._start()
            except DeviceError as exc:
                self._degraded = str(exc)
                raise
            self._state = "open"
            log.info("NVML re-initialised: %d GPU(s)", len(self._present))

    def _fail(self, exc: DeviceError) -> None:
        self._state = "failed"
        self._degraded = str(exc)

    def _device_count_now(self) -> int:
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except self._error as exc:
            raise DeviceError(f"NVML failed: nvmlDeviceGetCount: {exc}") from exc

    def _enumerate(self, count: int) -> None:
        """Match NVML's positions 0..count-1 to known GPUs by UUID; give new GPUs an index."""
        nvml = self._nvml
        claimed = {gpu.index for gpu in self._gpus.values()}
        present: list[_Gpu] = []
        problems: list[str] = []
        failures = 0
        for position in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(position)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except self._error as exc:
                if isinstance(exc, self._fatal):
                    raise DeviceError(f"NVML failed: identifying GPU {position}: {exc}") from exc
                if not isinstance(exc, self._lost):
                    failures += 1
                problems.append(f"GPU at NVML index {position} cannot be identified: {exc}")
                continue
            gpu = self._gpus.get(uuid)
            if gpu is not None:
                gpu.handle = handle
            else:
                index = position if position not in claimed else max(claimed) + 1
                gpu = _Gpu(index=index, uuid=uuid, handle=handle)
                try:
                    name = self._query(gpu, "name", problems, nvml.nvmlDeviceGetName, handle)
                    pci = self._query(gpu, "pci_info", problems, nvml.nvmlDeviceGetPciInfo, handle)
                except _GpuLost as exc:
                    problems.append(f"GPU at NVML index {position} ({uuid}) lost: {exc}")
                    continue
                gpu.name = "unknown" if name is None else _text(name)
                gpu.pci_bus_id = None if pci is None else _text(pci.busId)
                self._gpus[uuid] = gpu
                claimed.add(index)
            present.append(gpu)
        self._present = sorted(present, key=lambda gpu: gpu.index)
        self._generation += 1
        self._device_count = count
        self._enumeration_problems = problems
        self._enumeration_failures = failures

    # ---- errors

    def _classify(
        self, gpu: _Gpu, what: str, exc: Exception, problems: list[str], *, essential: bool
    ) -> None:
        """Turn an NVML error from one GPU's query into this file's rules; returns when the field is None."""
        if isinstance(exc, self._fatal):
            raise DeviceError(f"NVML failed: GPU {gpu.index} {what}: {exc}") from exc
        if isinstance(exc, self._lost):
            raise _GpuLost(f"{what}: {exc}") from exc
        if isinstance(exc, self._unsupported):
            gpu.unsupported.add(what)
            self._log_once(gpu, what, exc, logging.INFO, "reporting it as unknown")
            return
        if essential:
            raise _GpuFailed(f"{what}: {exc}") from exc
        problems.append(f"GPU {gpu.index}: {what} failed: {exc}")
        self._log_once(gpu, what, exc, logging.WARNING, "reporting it as unknown for now")

    def _log_once(self, gpu: _Gpu, what: str, exc: Exception, level: int, outcome: str) -> None:
        key = (gpu.uuid, what, type(exc).__name__)
        if key in self._logged:
            return
        self._logged.add(key)
        log.log(level, "GPU %d (%s): %s: %s; %s", gpu.index, gpu.uuid, what, exc, outcome)

    def _query(
        self,
        gpu: _Gpu,
        what: str,
        problems: list[str],
        call: Callable[..., Any],
        *args: Any,
        essential: bool = False,
    ) -> Any:
        """call(*args), or None when `what` is unsupported or failed transiently (see the rules)."""
        if what in gpu.unsupported:
            return None
        try:
            return call(*args)
        except self._error as exc:
            self._classify(gpu, what, exc, problems, essential=essential)
            return None

    # ---- sampling

    def _sample_locked(self, now: float) -> tuple[list[GpuReading], list[str]]:
        count = self._device_count_now()
        if count != self._device_count:
            log.warning("NVML reports %d GPU(s), was %d: enumerating again", count, self._device_count)
            self._enumerate(count)
        problems = list(self._enumeration_problems)
        failures = self._enumeration_failures
        present = {gpu.uuid for gpu in self._present}
        readings: list[GpuReading] = []
        for gpu in sorted(self._gpus.values(), key=lambda gpu: gpu.index):
            if gpu.uuid not in present:
                problems.append(f"GPU {gpu.index} ({gpu.uuid}) lost: NVML no longer lists it")
                self._mark_lost(gpu, now, "NVML no longer lists it")
                continue
            try:
                readings.append(self._read(gpu, now, problems))
                self._mark_answering(gpu, now)
            except _GpuLost as exc:
                problems.append(f"GPU {gpu.index} ({gpu.uuid}) lost: {exc}")
                self._mark_lost(gpu, now, str(exc))
            except _GpuFailed as exc:
                failures += 1
                problems.append(f"GPU {gpu.index} ({gpu.uuid}) did not answer: {exc}")
        if failures and not readings:
            raise DeviceError("NVML failed on every GPU: " + "; ".join(problems))
        return readings, problems

    def _mark_lost(self, gpu: _Gpu, now: float, why: str) -> None:
        if gpu.lost:
            return
        gpu.lost = True
        self._events.put(DeviceEvent(index=gpu.index, kind="lost", code=None, at=now, detail=why))

    def _mark_answering(self, gpu: _Gpu, now: float) -> None:
        if not gpu.lost:
            return
        gpu.lost = False
        self._generation += 1  # the watcher registers it again
        self._events.put(DeviceEvent(index=gpu.index, kind="recovered", code=None, at=now))

    def _read(self, gpu: _Gpu, now: float, problems: list[str]) -> GpuReading:
        nvml = self._nvml
        h = gpu.handle

        def query(what: str, call: Callable[..., Any], *args: Any) -> Any:
            return self._query(gpu, what, problems, call, h, *args)

        memory = self._memory(gpu, problems)
        if memory is not None:
            gpu.memory_total_mb = int(memory.total) // _MIB
        utilization = query("utilization", nvml.nvmlDeviceGetUtilizationRates)
        temperature = query("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        if gpu.slowdown_c is None:
            slowdown = query(
                "temperature_slowdown", nvml.nvmlDeviceGetTemperatureThreshold, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
            )
            gpu.slowdown_c = None if slowdown is None else float(slowdown)
        power_mw = query("power_draw", nvml.nvmlDeviceGetPowerUsage)
        limit_mw = query("power_limit", nvml.nvmlDeviceGetEnforcedPowerLimit)
        energy_mj = query("total_energy", nvml.nvmlDeviceGetTotalEnergyConsumption)
        sm_clock = query("sm_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
        mem_clock = query("mem_clock", nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM)
        corrected = nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
        uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        ecc = nvml.nvmlDeviceGetTotalEccErrors
        volatile_sbe = query("ecc_volatile_sbe", ecc, corrected, nvml.NVML_VOLATILE_ECC)
        volatile_dbe = query("ecc_volatile_dbe", ecc, uncorrected, nvml.NVML_VOLATILE_ECC)
        aggregate_sbe = query("ecc_aggregate_sbe", ecc, corrected, nvml.NVML_AGGREGATE_ECC)
        aggregate_dbe = query("ecc_aggregate_dbe", ecc, uncorrected, nvml.NVML_AGGREGATE_ECC)
        remapped = query("remapped_rows", nvml.nvmlDeviceGetRemappedRows)
        pcie_replays = query("pcie_replay_counter", nvml.nvmlDeviceGetPcieReplayCounter)
        compute = query("processes", nvml.nvmlDeviceGetComputeRunningProcesses)
        # Graphics processes add to a known compute list; unknown compute processes leave the list unknown.
        graphics = None if compute is None else query("graphics_processes", nvml.nvmlDeviceGetGraphicsRunningProcesses)
        mig = query("mig_mode", nvml.nvmlDeviceGetMigMode)
        mig_enabled = mig is not None and int(mig[0]) == nvml.NVML_DEVICE_MIG_ENABLE
        mig_instances = self._mig_instances(gpu, problems) if mig_enabled else ()
        with self._xid_lock:
            last_xid = self._last_xid.get(gpu.index)
            xid_count = self._xid_counts.get(gpu.index)
        return GpuReading(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            pci_bus_id=gpu.pci_bus_id,
            memory_total_mb=gpu.memory_total_mb,
            memory_used_mb=None if memory is None else int(memory.used) // _MIB,
            memory_free_mb=None if memory is None else int(memory.free) // _MIB,
            utilization_gpu_pct=None if utilization is None else float(utilization.gpu),
            utilization_memory_pct=None if utilization is None else float(utilization.memory),
            temperature_c=None if temperature is None else float(temperature),
            memory_temperature_c=self._memory_temperature(gpu, problems),
            power_draw_w=None if power_mw is None else int(power_mw) / 1000.0,
            power_limit_w=None if limit_mw is None else int(limit_mw) / 1000.0,
            total_energy_mj=None if energy_mj is None else float(energy_mj),
            sm_clock_mhz=None if sm_clock is None else int(sm_clock),
            mem_clock_mhz=None if mem_clock is None else int(mem_clock),
            ecc_volatile_sbe=None if volatile_sbe is None else int(volatile_sbe),
            ecc_volatile_dbe=None if volatile_dbe is None else int(volatile_dbe),
            ecc_aggregate_sbe=None if aggregate_sbe is None else int(aggregate_sbe),
            ecc_aggregate_dbe=None if aggregate_dbe is None else int(aggregate_dbe),
            retired_pages=self._retired_pages(gpu, problems),
            remapped_rows_correctable=None if remapped is None else int(remapped[0]),
            remapped_rows_uncorrectable=None if remapped is None else int(remapped[1]),
            remapped_rows_pending=None if remapped is None else bool(remapped[2]),
            remapped_rows_failed=None if remapped is None else bool(remapped[3]),
            pcie_replay_counter=None if pcie_replays is None else int(pcie_replays),
            xid_errors=xid_count,  # counted by the event watcher; None while it does not watch this GPU
            mig_mode=None if mig is None else int(mig[0]) == nvml.NVML_DEVICE_MIG_ENABLE,
            processes=None if compute is None else _processes(compute, graphics or ()),
            sampled_at=now,
            gr_engine_active=None if utilization is None else float(utilization.gpu) / 100.0,
            temperature_slowdown_c=gpu.slowdown_c,
            last_xid=last_xid,
            mig_instances=mig_instances,
        )

    def _mig_instances(self, gpu: _Gpu, problems: list[str]) -> tuple[MigInstance, ...]:
        """The GPU instances the operator configured on MIG-mode `gpu`, by MIG device index.

        NVML numbers a GPU's MIG devices 0 … nvmlDeviceGetMaxMigDeviceCount − 1 and
        answers NotFound for an index with no device. A device's profile is that
        of its GPU instance (nvmlDeviceGetGpuInstanceId, then
        nvmlDeviceGetGpuInstanceById and nvmlGpuInstanceGetInfo's profileId),
        named by nvmlDeviceGetGpuInstanceProfileInfo. A device that fails to
        answer is left out of this sample, with the reason in `problems`: a
        slice the agent cannot describe is not offered.
        """
        nvml = self._nvml
        if not all(hasattr(nvml, name) for name in _MIG_FUNCTIONS):
            # A binding older than MIG: the GPU is in MIG mode, but its slices cannot be read.
            self._log_once(
                gpu, "mig_instances", AttributeError("nvidia-ml-py lacks the MIG device functions"),
                logging.WARNING, "offering none of its MIG slices",
            )
            return ()
        count = self._query(gpu, "mig_device_count", problems, nvml.nvmlDeviceGetMaxMigDeviceCount, gpu.handle)
        if not count:
            return ()
        instances: list[MigInstance] = []
        for mig_index in range(int(count)):
            try:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, mig_index)
            except self._error as exc:
                if getattr(exc, "value", None) != nvml.NVML_ERROR_NOT_FOUND:
                    problems.append(f"GPU {gpu.index} MIG device {mig_index}: {exc}")
                continue
            try:
                instance_id = int(nvml.nvmlDeviceGetGpuInstanceId(handle))
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                instances.append(
                    MigInstance(
                        mig_index=mig_index,
                        gpu_instance_id=instance_id,
                        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        profile=self._mig_profile(gpu, instance_id),
                        memory_total_mb=int(memory.total) // _MIB,
                        memory_free_mb=int(memory.free) // _MIB,
                    )
                )
            except self._error as exc:
                problems.append(f"GPU {gpu.index} MIG device {mig_index} did not answer: {exc}")
        return tuple(instances)

    def _mig_profile(self, gpu: _Gpu, instance_id: int) -> str:
        """The profile name ("1g.10gb") of GPU instance `instance_id` of `gpu`. Raises NVMLError.

        Profile ids map to names through nvmlDeviceGetGpuInstanceProfileInfo over
        every NVML_GPU_INSTANCE_PROFILE_*; the map is fixed per GPU, so it is read once.
        """
        nvml = self._nvml
        names = self._mig_profile_names.get(gpu.uuid)
        if names is None:
            names = {}
            for profile in range(int(getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 0))):
                try:
                    info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu.handle, profile)
                except self._error:
                    continue  # a profile this GPU does not offer
                names[int(info.id)] = _profile_name(info)
            self._mig_profile_names[gpu.uuid] = names
        info = nvml.nvmlGpuInstanceGetInfo(nvml.nvmlDeviceGetGpuInstanceById(gpu.handle, instance_id))
        return names.get(int(info.profileId), f"profile-{int(info.profileId)}")

    def _memory(self, gpu: _Gpu, problems: list[str]) -> Any:
        """The memory query: nvmlMemory_v2 where the binding and driver have it, else v1 (see the rules)."""
        nvml = self._nvml
        if self._memory_v2 is not None and "memory_v2" not in gpu.unsupported:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(gpu.handle, version=self._memory_v2)
            except self._error as exc:
                if not isinstance(exc, self._unsupported):
                    self._classify(gpu, "memory", exc, problems, essential=True)  # raises: memory is essential
                    return None
                gpu.unsupported.add("memory_v2")
                self._log_once(
                    gpu, "memory_v2", exc, logging.INFO, "reading memory with v1, whose used memory includes reserved"
                )
        return self._query(gpu, "memory", problems, nvml.nvmlDeviceGetMemoryInfo, gpu.handle, essential=True)

    def _memory_temperature(self, gpu: _Gpu, problems: list[str]) -> float | None:
        """HBM temperature: only the field-values API has it, with a status per field."""
        nvml = self._nvml
        what = "memory_temperature"
        values = self._query(
            gpu, what, problems, nvml.nvmlDeviceGetFieldValues, gpu.handle, [nvml.NVML_FI_DEV_MEMORY_TEMP]
        )
        if values is None:
            return None
        value = values[0]
        status = int(value.nvmlReturn)
        if status != nvml.NVML_SUCCESS:
            self._classify(gpu, what, nvml.NVMLError(status), problems, essential=False)
            return None
        member = self._value_members.get(int(value.valueType))
        if member is None:
            problems.append(f"GPU {gpu.index}: {what} has unknown value type {value.valueType}")
            return None
        return float(getattr(value.value, member))

    def _retired_pages(self, gpu: _Gpu, problems: list[str]) -> int | None:
        """Pages retired for either cause; pre-Ampere only (Ampere and later remap rows instead)."""
        nvml = self._nvml
        total = 0
        for cause in (
            nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
            nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        ):
            pages = self._query(gpu, "retired_pages", problems, nvml.nvmlDeviceGetRetiredPages, gpu.handle, cause)
            if pages is None:
                return None
            total += len(pages)
        return total

    # ---- events (the watcher thread; see Events)

    def _watch(self, stop: threading.Event) -> None:
        """The watcher thread: watch with one event set after another until `stop`; never raise."""
        self._watch_failures = 0
        while not stop.is_set():
            try:
                registered = self._register_events()
                if registered is None:  # NVML is not open: the sampler re-initialises it
                    stop.wait(self._event_wait_ms / 1000.0)
                    continue
                event_set, by_handle, generation = registered
                try:
                    self._watch_set(stop, event_set, by_handle, generation)
                finally:
                    self._free_event_set(event_set)
            except Exception as exc:  # the watcher must outlive every failure: log it, back off, retry
                self._watch_failures += 1
                first, cap = self._event_retry_s
                delay = min(cap, first * 2 ** min(self._watch_failures - 1, 16))
                what = str(exc) or type(exc).__name__
                self._watcher_error = f"NVML event watcher failed: {what}; retrying in {delay:g}s"
                kind = type(exc).__name__
                if kind not in self._watcher_logged:
                    self._watcher_logged.add(kind)
                    # An NVML error explains itself; anything else is a bug here: show where.
                    traceback = not isinstance(exc, self._error)
                    log.warning("%s (logged once per kind of failure)", self._watcher_error, exc_info=traceback)
                stop.wait(delay)

    def _register_events(self) -> tuple[Any, dict[Hashable, int], int] | None:
        """A new event set with every present GPU registered that can be; None while NVML is not open.

        Returns the set, the registered GPUs' indices by handle, and the generation
        of handles they belong to. Raises NVMLError, having freed the set.
        """
        nvml = self._nvml
        with self._lock:
            if self._state != "open":
                return None
            event_set = nvml.nvmlEventSetCreate()
            try:
                by_handle = {
                    _handle_key(gpu.handle): gpu.index for gpu in self._present if self._register_gpu(gpu, event_set)
                }
            except BaseException:
                self._free_event_set(event_set)
                raise
            return event_set, by_handle, self._generation

    def _register_gpu(self, gpu: _Gpu, event_set: Any) -> bool:
        """Register `gpu` for the XID and ECC events it supports; False when it supports none or is lost."""
        nvml = self._nvml
        wanted = self._xid_event | self._dbe_event | self._sbe_event
        try:
            supported = int(nvml.nvmlDeviceGetSupportedEventTypes(gpu.handle)) & wanted
            if supported:
                nvml.nvmlDeviceRegisterEvents(gpu.handle, supported, event_set)
        except self._error as exc:
            if isinstance(exc, self._unsupported):
                self._log_once(gpu, "events", exc, logging.INFO, "not watching it for XID and ECC events")
                return False
            if isinstance(exc, self._lost):
                return False  # sample() reports it lost; it is registered again when it is back
            raise
        if not supported:
            key = (gpu.uuid, "events", "none")
            if key not in self._logged:
                self._logged.add(key)
                log.info("GPU %d (%s) supports no XID or ECC events: not watching it", gpu.index, gpu.uuid)
            return False
        if supported & self._xid_event:
            with self._xid_lock:
                self._last_xid.setdefault(gpu.index, 0)
                self._xid_counts.setdefault(gpu.index, 0)
        return True

    def _watch_set(
        self, stop: threading.Event, event_set: Any, by_handle: Mapping[Hashable, int], generation: int
    ) -> None:
        """Wait on `event_set` until `stop` or new handles (another generation).

        Does not hold `_lock`: sample() runs meanwhile. Raises what NVML raises, Timeout aside.
        """
        nvml = self._nvml
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        while not stop.is_set() and generation == self._generation:
            if not by_handle:  # nothing to watch: wait for new handles (a GPU back, NVML re-initialised)
                stop.wait(self._event_wait_ms / 1000.0)
                continue
            try:
                data = wait(event_set, self._event_wait_ms)
            except self._timeout:
                data = None
            if self._watch_failures:
                log.info("NVML event watcher recovered after %d failure(s)", self._watch_failures)
                self._watch_failures = 0
            self._watcher_error = None
            if data is not None:
                self._record_event(data, by_handle)

    def _record_event(self, data: Any, by_handle: Mapping[Hashable, int]) -> None:
        """Turn one c_nvmlEventData_t into a DeviceEvent (and the GPU's last XID)."""
        index = by_handle.get(_handle_key(data.device))
        event_type = int(data.eventType)
        if index is None:
            log.warning("NVML event 0x%x from a GPU that is not registered: ignored", event_type)
            return
        code: int | None = None
        if event_type & self._xid_event:
            kind = "xid"
            code = int(data.eventData)
            detail = XID_NAMES.get(code, "")
        elif event_type & self._dbe_event:
            kind, detail = "ecc_dbe", "double-bit (uncorrectable) ECC error"
        elif event_type & self._sbe_event:
            kind, detail = "ecc_sbe", "single-bit (corrected) ECC error"
        else:
            return  # a type not registered for
        instance, compute = int(data.gpuInstanceId), int(data.computeInstanceId)
        if instance != _NO_INSTANCE:
            where = f"MIG GPU instance {instance}"
            if compute != _NO_INSTANCE:
                where += f", compute instance {compute}"
            detail = f"{detail} ({where})" if detail else where
        if code is not None:
            with self._xid_lock:
                self._last_xid[index] = code
                self._xid_counts[index] = self._xid_counts.get(index, 0) + 1
        self._events.put(DeviceEvent(index=index, kind=kind, code=code, at=self._clock(), detail=detail))
        level = logging.INFO if kind == "ecc_sbe" else logging.WARNING  # corrected errors are routine
        what = kind if code is None else f"{kind} {code}"
        log.log(level, "GPU %d: %s%s", index, what, f": {detail}" if detail else "")

    def _free_event_set(self, event_set: Any) -> None:
        try:
            self._nvml.nvmlEventSetFree(event_set)
        except self._error as exc:  # a set from a session NVML has since dropped
            log.debug("nvmlEventSetFree failed: %s", exc)

    # ---- topology

    def _topology_locked(self) -> list[GpuLink]:
        self._device_count_now()  # fails as a whole when NVML does
        by_bus = {_bus_key(g.pci_bus_id): g.index for g in self._present if g.pci_bus_id is not None}
        gpus: list[_Gpu] = []
        links: dict[int, _NvLinks | None] = {}
        for gpu in self._present:
            try:
                links[gpu.index] = self._nvlinks(gpu, by_bus)
            except _GpuLost as exc:
                log.info("GPU %d left out of the topology: %s", gpu.index, exc)
                continue
            gpus.append(gpu)
        result: list[GpuLink] = []
        for i, a in enumerate(gpus):
            for b in gpus[i + 1 :]:
                la, lb = links[a.index], links[b.index]
                nvlinks = None
                if la is not None and lb is not None:
                    # Behind NVSwitches every pair reaches the other over all of the
                    # smaller side's switch links (nvidia-smi topo shows NV18 on HGX H100).
                    nvlinks = la.to_peer[b.index] + min(la.to_switch, lb.to_switch)
                relation = "nvlink" if nvlinks else self._pcie_relation(a, b)
                result.append(GpuLink(a=a.index, b=b.index, relation=relation, nvlinks=nvlinks))
        return result

    def _pcie_relation(self, a: _Gpu, b: _Gpu) -> str:
        try:
            level = self._nvml.nvmlDeviceGetTopologyCommonAncestor(a.handle, b.handle)
        except self._error as exc:
            if isinstance(exc, self._fatal):
                raise DeviceError(f"NVML failed: topology of GPUs {a.index},{b.index}: {exc}") from exc
            log.info("GPUs %d and %d: common PCIe ancestor unknown: %s", a.index, b.index, exc)
            return "unknown"
        return self._relations.get(int(level), "unknown")

    def _nvlinks(self, gpu: _Gpu, by_bus: Mapping[str, int]) -> _NvLinks | None:
        """The GPU's active links, or None when NVML will not say (permission, transient error)."""
        nvml = self._nvml
        found = _NvLinks(to_switch=0, to_peer=Counter())
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if int(nvml.nvmlDeviceGetNvLinkState(gpu.handle, link)) != nvml.NVML_FEATURE_ENABLED:
                    continue
                remote_kind = self._remote_kind(gpu, link)
                if remote_kind == nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                    found.to_switch += 1
                    continue
                if remote_kind not in (None, nvml.NVML_NVLINK_DEVICE_TYPE_GPU):
                    continue  # an IBM NPU or something NVML cannot name: not a GPU peer
                remote = nvml.nvmlDeviceGetNvLinkRemotePciInfo(gpu.handle, link)
            except self._error as exc:
                if isinstance(exc, self._fatal):
                    raise DeviceError(f"NVML failed: GPU {gpu.index} NVLink {link}: {exc}") from exc
                if isinstance(exc, self._lost):
                    raise _GpuLost(f"NVLink {link}: {exc}") from exc
                if isinstance(exc, self._no_such_link):
                    break  # past the last link; at link 0, a GPU without NVLink
                log.info("GPU %d: NVLink %d unknown: %s", gpu.index, link, exc)
                return None
            peer = by_bus.get(_bus_key(_text(remote.busId)))
            if peer is not None:
                found.to_peer[peer] += 1
        return found

    # ---- where each GPU sits

    def _affinity_locked(self) -> list[GpuAffinity]:
        self._device_count_now()  # fails as a whole when NVML does
        result: list[GpuAffinity] = []
        for gpu in self._present:
            try:
                numa = self._ask(gpu, "nvmlDeviceGetNumaNodeId", "NUMA node", gpu.handle)
                # Room for this host's CPUs, and never less than 1024: a mask too short is cut short.
                words = max(16, -(-(os.cpu_count() or 1) // 64))
                mask = self._ask(gpu, "nvmlDeviceGetCpuAffinity", "CPU affinity", gpu.handle, words)
            except _GpuLost as exc:
                log.info("GPU %d left out of the CPU affinities: %s", gpu.index, exc)
                continue
            node = self._sysfs_numa(gpu) if numa is None else int(numa)
            cpus = [64 * w + bit for w, word in enumerate(mask or ()) for bit in range(64) if int(word) >> bit & 1]
            result.append(
                GpuAffinity(
                    index=gpu.index,
                    numa_node=node if node is not None and node >= 0 else None,
                    cpu_list=format_cpulist(cpus) if cpus else self._sysfs_text(gpu, "local_cpulist"),
                )
            )
        return result

    def _ask(self, gpu: _Gpu, function: str, what: str, *args: Any) -> Any:
        """NVML's answer, or None where this binding, driver or GPU cannot give it (then sysfs is asked)."""
        call = getattr(self._nvml, function, None)
        if call is None:
            return None
        try:
            return call(*args)
        except self._error as exc:
            if isinstance(exc, self._fatal):
                raise DeviceError(f"NVML failed: GPU {gpu.index} {what}: {exc}") from exc
            if isinstance(exc, self._lost):
                raise _GpuLost(f"{what}: {exc}") from exc
            self._log_once(gpu, what, exc, logging.INFO, "reading it from sysfs")
            return None

    def _sysfs_text(self, gpu: _Gpu, name: str) -> str | None:
        """A file of the GPU's PCI device in sysfs, stripped; None when it cannot be read."""
        if gpu.pci_bus_id is None:
            return None
        domain, _, rest = gpu.pci_bus_id.strip().partition(":")
        try:
            # NVML writes an 8-digit domain ("00000000:18:00.0"); the kernel, 4 ("0000:18:00.0").
            path = self._sysfs / "bus" / "pci" / "devices" / f"{int(domain, 16):04x}:{rest.lower()}" / name
            return path.read_text().strip() or None
        except (OSError, ValueError) as exc:
            log.debug("GPU %d: cannot read %s from sysfs: %s", gpu.index, name, exc)
            return None

    def _sysfs_numa(self, gpu: _Gpu) -> int | None:
        """The GPU's NUMA node as sysfs says it (-1: none), or None when it cannot be read."""
        text = self._sysfs_text(gpu, "numa_node")
        try:
            return None if text is None else int(text)
        except ValueError:
            return None

    def _remote_kind(self, gpu: _Gpu, link: int) -> int | None:
        """What is at the far end of a link; None where the driver predates the query."""
        try:
            return int(self._nvml.nvmlDeviceGetNvLinkRemoteDeviceType(gpu.handle, link))
        except self._unsupported:
            return None


def _process(info: Any) -> GpuProcess:
    used = info.usedGpuMemory  # bytes; None where the driver cannot tell (WDDM, MIG)
    return GpuProcess(pid=int(info.pid), used_memory_mb=None if used is None else int(used) // _MIB)


def _profile_name(info: Any) -> str:
    """nvidia-smi's name of a GPU instance profile: the v2 struct's "MIG 1g.10gb" without "MIG ",
    else (a v1 struct) built from its slice count and memory, as nvidia-smi builds it."""
    name = _text(getattr(info, "name", b"")).strip()
    if name:
        return name.removeprefix("MIG ").strip()
    return f"{int(info.sliceCount)}g.{round(int(info.memorySizeMB) / 1024)}gb"
