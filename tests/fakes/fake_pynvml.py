"""A stand-in for the `pynvml` module (nvidia-ml-py), for testing NvmlDevices without a GPU.

`FakeNvml` is a module object with pynvml's function names and signatures, its
constants and its real error classes (`pynvml.NVMLError_NotSupported` and the
rest, built the way pynvml builds them: `pynvml.NVMLError(code)` returns the
subclass), so the backend's except clauses are tested against what it will
really catch. Return values are pynvml's own ctypes structures (`c_nvmlMemory_t`,
`c_nvmlUtilization_t`, `nvmlPciInfo_t`, `c_nvmlFieldValue_t`) or the objects
pynvml builds (`nvmlFriendlyObject` for processes), so attribute names and types
match what nvidia-ml-py 13 gives on a real H100 (checked against driver 580):
names, UUIDs and `.busId` are str. `strings_as_bytes=True` imitates older
bindings, which returned all three as bytes.

Scenarios, each a few lines in a test:

* `h100_80gb(position)` — a normal HGX H100 80GB HBM3: 18 NVLinks to NVSwitches,
  row remapping instead of page retirement (retired pages answer NotSupported).
* `half_unsupported(gpu)` — half of the per-sample queries answer NotSupported,
  FunctionNotFound or NoPermission, as on a consumer card inside a container.
* `fake.break_nvml(code)` / `fake.heal()` — NVML starts failing as a whole
  mid-run (every call, nvmlInit included, raises `code`), then recovers; after
  Uninitialized or DriverNotLoaded it must be initialised again, like a reloaded driver.
* `gpu.lost = True` — every call on that GPU raises GpuIsLost (fallen off the bus);
  `fake.unplug(uuid)` removes it from the enumeration (the count drops and the
  later GPUs move up one index), `fake.plug(gpu)` adds one back at the end.
* `gpu.errors[function] = code` — one function raises `code` on one GPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pynvml

MIB = 1024 * 1024

# The functions NvmlDevices calls on every sample, by pynvml's names.
SAMPLED_FUNCTIONS = (
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetRetiredPages",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetPcieReplayCounter",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetMigMode",
)

# Bus numbers of the eight GPUs on an HGX H100 board.
HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

SWITCH = "switch"  # an entry of FakeGpu.nvlinks: a link to an NVSwitch


def error(code: int) -> pynvml.NVMLError:
    """The real pynvml exception for `code`, e.g. error(pynvml.NVML_ERROR_NOT_SUPPORTED)."""
    return pynvml.NVMLError(code)


@dataclass
class FakeGpu:
    """One fake GPU. Memory in bytes, power in milliwatts, energy in millijoules, as NVML gives them."""

    uuid: str
    pci_bus_id: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 81559 * MIB
    memory_used: int = 512 * MIB
    utilization_gpu: int = 0
    utilization_memory: int = 0
    temperature: int = 33
    memory_temperature: int = 31
    power_usage_mw: int = 71_000
    power_limit_mw: int = 700_000
    total_energy_mj: int = 1_000_000
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    # (error type, counter type) -> count, e.g. (NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC)
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)
    retired_pages: dict[int, list[int]] = field(default_factory=dict)  # cause -> page addresses
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    pcie_replay_counter: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes or None)
    mig_mode: int = pynvml.NVML_DEVICE_MIG_DISABLE
    nvlinks: list[str] = field(default_factory=list)  # per link: SWITCH or the peer GPU's bus id
    pcie_switch: int = 0  # GPUs on the same switch share an NVML_TOPOLOGY_SINGLE ancestor
    numa_node: int = 0  # GPUs on different nodes meet at NVML_TOPOLOGY_SYSTEM
    unsupported: set[str] = field(default_factory=set)  # functions answering NotSupported
    unsupported_fields: set[int] = field(default_factory=set)  # NVML_FI_* answering NotSupported
    errors: dict[str, int] = field(default_factory=dict)  # function -> NVML error code it raises
    lost: bool = False  # every call on this GPU raises GpuIsLost


def h100_80gb(position: int, **overrides: Any) -> FakeGpu:
    """A healthy, idle H100 80GB HBM3 at `position` of an HGX board (NVSwitch, 18 links)."""
    values: dict[str, Any] = {
        "uuid": f"GPU-{position:08x}-1111-2222-3333-{position:012x}",
        "pci_bus_id": f"00000000:{HGX_BUSES[position % 8]:02X}:00.0",
        "nvlinks": [SWITCH] * 18,
        "unsupported": {"nvmlDeviceGetRetiredPages"},  # Hopper remaps rows instead
    }
    values.update(overrides)
    return FakeGpu(**values)


def half_unsupported(gpu: FakeGpu) -> FakeGpu:
    """Make half of the sampled queries fail the ways a GPU that cannot answer them fails."""
    gpu.unsupported |= {
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRetiredPages",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetPcieReplayCounter",
        "nvmlDeviceGetMigMode",
    }
    gpu.unsupported_fields.add(pynvml.NVML_FI_DEV_MEMORY_TEMP)
    gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    gpu.errors["nvmlDeviceGetComputeRunningProcesses"] = pynvml.NVML_ERROR_NO_PERMISSION
    return gpu


@dataclass(frozen=True)
class FakeHandle:
    """What nvmlDeviceGetHandleByIndex returns; stays bound to its GPU like a real handle."""

    gpu: FakeGpu


class FakeNvml(ModuleType):
    """pynvml with fake GPUs behind it. `calls` counts every function call by name."""

    def __init__(self, gpus: list[FakeGpu], *, strings_as_bytes: bool = False) -> None:
        super().__init__("fake_pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError")):
                setattr(self, name, getattr(pynvml, name))
        self.nvmlFriendlyObject = pynvml.nvmlFriendlyObject
        self.gpus = list(gpus)
        self.strings_as_bytes = strings_as_bytes
        self.calls: Counter[str] = Counter()
        self.refcount = 0  # nvmlInit calls not yet matched by nvmlShutdown
        self.broken: int | None = None  # error code every call raises

    # ---- scenario controls

    def break_nvml(self, code: int) -> None:
        """From now on every call raises `code`; a driver-level failure also forgets nvmlInit."""
        self.broken = code
        if code in (pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED):
            self.refcount = 0

    def heal(self) -> None:
        self.broken = None

    def unplug(self, uuid: str) -> FakeGpu:
        """Remove a GPU from the enumeration; its handles answer GpuIsLost."""
        gpu = next(g for g in self.gpus if g.uuid == uuid)
        self.gpus.remove(gpu)
        return gpu

    def plug(self, gpu: FakeGpu) -> None:
        self.gpus.append(gpu)

    # ---- plumbing

    def _check(self, function: str) -> None:
        """Count the call and fail it the way all of NVML is failing, if it is."""
        self.calls[function] += 1
        if self.broken is not None:
            raise error(self.broken)
        if self.refcount == 0:
            raise error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _enter(self, function: str, handle: FakeHandle) -> FakeGpu:
        """_check, then fail the call the way this GPU fails it, if it does; else the GPU."""
        self._check(function)
        gpu = handle.gpu
        if gpu.lost or all(g is not gpu for g in self.gpus):
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if function in gpu.errors:
            raise error(gpu.errors[function])
        if function in gpu.unsupported:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def _string(self, value: str) -> str | bytes:
        return value.encode() if self.strings_as_bytes else value

    def _pci_info(self, bus_id: str) -> Any:
        if self.strings_as_bytes:
            return pynvml.nvmlFriendlyObject({"busId": bus_id.encode(), "busIdLegacy": bus_id.encode()})
        info = pynvml.nvmlPciInfo_t()
        info.busId = bus_id.encode()
        info.busIdLegacy = bus_id.encode()
        return info

    # ---- pynvml's API

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.broken is not None:
            raise error(self.broken)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return FakeHandle(gpu)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        self._check("nvmlDeviceGetHandleByUUID")
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.gpus:
            if gpu.uuid == text:
                return FakeHandle(gpu)
        raise error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        return self._string(self._enter("nvmlDeviceGetUUID", handle).uuid)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        return self._string(self._enter("nvmlDeviceGetName", handle).name)

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> Any:
        return self._pci_info(self._enter("nvmlDeviceGetPciInfo", handle).pci_bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> pynvml.c_nvmlMemory_t:
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        return pynvml.c_nvmlMemory_t(
            total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used, used=gpu.memory_used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> pynvml.c_nvmlUtilization_t:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: list[int]) -> Any:
        gpu = self._enter("nvmlDeviceGetFieldValues", handle)
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        for i, field_id in enumerate(fieldIds):
            values[i].fieldId = field_id
            if field_id in gpu.unsupported_fields:
                values[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            elif field_id == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                values[i].nvmlReturn = pynvml.NVML_SUCCESS
                values[i].valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                values[i].value.uiVal = gpu.memory_temperature
            else:
                values[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._enter("nvmlDeviceGetPowerUsage", handle).power_usage_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._enter("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._enter("nvmlDeviceGetTotalEnergyConsumption", handle).total_energy_mj

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:
        gpu = self._enter("nvmlDeviceGetClockInfo", handle)
        if type == pynvml.NVML_CLOCK_SM:
            return gpu.sm_clock_mhz
        if type == pynvml.NVML_CLOCK_MEM:
            return gpu.mem_clock_mhz
        raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:
        gpu = self._enter("nvmlDeviceGetTotalEccErrors", handle)
        return gpu.ecc.get((errorType, counterType), 0)

    def nvmlDeviceGetRetiredPages(self, device: FakeHandle, sourceFilter: int) -> list[int]:
        gpu = self._enter("nvmlDeviceGetRetiredPages", device)
        return list(gpu.retired_pages.get(sourceFilter, []))

    def nvmlDeviceGetRemappedRows(self, device: FakeHandle) -> tuple[int, int, int, int]:
        return self._enter("nvmlDeviceGetRemappedRows", device).remapped_rows

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        return self._enter("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay_counter

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        gpu = self._enter("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            pynvml.nvmlFriendlyObject(
                {"pid": pid, "usedGpuMemory": used, "gpuInstanceId": 0xFFFFFFFF, "computeInstanceId": 0xFFFFFFFF}
            )
            for pid, used in gpu.processes
        ]

    def nvmlDeviceGetMigMode(self, device: FakeHandle) -> list[int]:
        gpu = self._enter("nvmlDeviceGetMigMode", device)
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetTopologyCommonAncestor(self, device1: FakeHandle, device2: FakeHandle) -> int:
        a = self._enter("nvmlDeviceGetTopologyCommonAncestor", device1)
        b = self._enter("nvmlDeviceGetTopologyCommonAncestor", device2)
        if a.numa_node != b.numa_node:
            return int(pynvml.NVML_TOPOLOGY_SYSTEM)
        if a.pcie_switch == b.pcie_switch:
            return int(pynvml.NVML_TOPOLOGY_SINGLE)
        return int(pynvml.NVML_TOPOLOGY_NODE)

    def _link(self, function: str, device: FakeHandle, link: int) -> str:
        gpu = self._enter(function, device)
        if not gpu.nvlinks:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= link < len(gpu.nvlinks):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlinks[link]

    def nvmlDeviceGetNvLinkState(self, device: FakeHandle, link: int) -> int:
        self._link("nvmlDeviceGetNvLinkState", device, link)
        return int(pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: FakeHandle, link: int) -> int:
        remote = self._link("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
        if remote == SWITCH:
            return int(pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH)
        return int(pynvml.NVML_NVLINK_DEVICE_TYPE_GPU)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: FakeHandle, link: int) -> Any:
        remote = self._link("nvmlDeviceGetNvLinkRemotePciInfo", device, link)
        # A switch has a bus id of its own, which matches no GPU.
        return self._pci_info("00000000:05:00.0" if remote == SWITCH else remote)


__all__ = [
    "HGX_BUSES",
    "MIB",
    "SAMPLED_FUNCTIONS",
    "SWITCH",
    "FakeGpu",
    "FakeHandle",
    "FakeNvml",
    "error",
    "h100_80gb",
    "half_unsupported",
]
