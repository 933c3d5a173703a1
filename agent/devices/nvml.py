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

* Identity (UUID, name, PCI bus id) is read once per GPU when it is enumerated;
  each sample reads the rest with one NVML call per field (two for retired pages,
  one per ECC counter).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from agent.devices.base import DeviceBackend, DeviceError, GpuLink, GpuProcess, GpuReading

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


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


class NvmlDevices(DeviceBackend):
    """The host's NVIDIA GPUs. `nvml` is the pynvml module; tests pass a fake with the same names."""

    kind = "nvml"

    def __init__(self, nvml: ModuleType | None = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._error: type[Exception] = nvml.NVMLError
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
            nvml.NVML_TOPOLOGY_MULTIPLE: "pcie_switch",
            nvml.NVML_TOPOLOGY_HOSTBRIDGE: "host_bridge",
            nvml.NVML_TOPOLOGY_NODE: "host_bridge",  # host bridges within one NUMA node
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

    def close(self) -> None:
        with self._lock:
            self._state = "closed"
            self._shutdown()

    def set_leases(self, leased: Mapping[int, str]) -> None:
        """NVML reports what the GPUs really do; leases do not change it."""

    @property
    def degraded_reason(self) -> str | None:
        return self._degraded

    # ---- NVML session

    def _start(self) -> None:
        """nvmlInit and enumerate. Raises DeviceError, leaving NVML shut down."""
        try:
            self._nvml.nvmlInit()
        except self._error as exc:
            raise DeviceError(f"NVML could not start: {exc}") from exc
        self._initialised = True
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
                continue
            try:
                readings.append(self._read(gpu, now, problems))
            except _GpuLost as exc:
                problems.append(f"GPU {gpu.index} ({gpu.uuid}) lost: {exc}")
            except _GpuFailed as exc:
                failures += 1
                problems.append(f"GPU {gpu.index} ({gpu.uuid}) did not answer: {exc}")
        if failures and not readings:
            raise DeviceError("NVML failed on every GPU: " + "; ".join(problems))
        return readings, problems

    def _read(self, gpu: _Gpu, now: float, problems: list[str]) -> GpuReading:
        nvml = self._nvml
        h = gpu.handle

        def query(what: str, call: Callable[..., Any], *args: Any) -> Any:
            return self._query(gpu, what, problems, call, h, *args)

        memory = self._query(gpu, "memory", problems, nvml.nvmlDeviceGetMemoryInfo, h, essential=True)
        if memory is not None:
            gpu.memory_total_mb = int(memory.total) // _MIB
        utilization = query("utilization", nvml.nvmlDeviceGetUtilizationRates)
        temperature = query("temperature", nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
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
        processes = query("processes", nvml.nvmlDeviceGetComputeRunningProcesses)
        mig = query("mig_mode", nvml.nvmlDeviceGetMigMode)
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
            xid_errors=None,  # XIDs arrive as NVML events, not as a counter to poll
            mig_mode=None if mig is None else int(mig[0]) == nvml.NVML_DEVICE_MIG_ENABLE,
            processes=None if processes is None else tuple(_process(p) for p in processes),
            sampled_at=now,
        )

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

    def _remote_kind(self, gpu: _Gpu, link: int) -> int | None:
        """What is at the far end of a link; None where the driver predates the query."""
        try:
            return int(self._nvml.nvmlDeviceGetNvLinkRemoteDeviceType(gpu.handle, link))
        except self._unsupported:
            return None


def _process(info: Any) -> GpuProcess:
    used = info.usedGpuMemory  # bytes; None where the driver cannot tell (WDDM, MIG)
    return GpuProcess(pid=int(info.pid), used_memory_mb=None if used is None else int(used) // _MIB)
