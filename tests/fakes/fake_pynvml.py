"""A stand-in for the `pynvml` module (nvidia-ml-py), for testing NvmlDevices without a GPU.

`FakeNvml` is a module object with pynvml's function names and signatures, its
constants and its real error classes (`pynvml.NVMLError_NotSupported` and the
rest, built the way pynvml builds them: `pynvml.NVMLError(code)` returns the
subclass), so the backend's except clauses are tested against what it will
really catch. Return values are pynvml's own ctypes structures (`c_nvmlMemory_t`,
`c_nvmlUtilization_t`, `nvmlPciInfo_t`, `c_nvmlFieldValue_t`, `c_nvmlEventData_t`)
or the objects pynvml builds (`nvmlFriendlyObject` for processes), so attribute
names and types match what nvidia-ml-py 13 gives on a real H100 (checked against
driver 580): names, UUIDs and `.busId` are str. `strings_as_bytes=True` imitates
older bindings, which returned all three as bytes; `missing=("nvmlEventSetWait_v2", ...)`
leaves names out of the module, as older bindings do.

Device handles are real `pynvml.c_nvmlDevice_t` pointers, one address per GPU,
as NVML's are: two pointer objects for one GPU compare unequal, so code that
keys on the handle object instead of its address breaks here as it would on a host.

Scenarios, each a few lines in a test:

* `h100_80gb(position)` — a normal HGX H100 80GB HBM3: 18 NVLinks to NVSwitches, on
  NUMA node `numa_node` with CPUs `cpus` (nvmlDeviceGetNumaNodeId, nvmlDeviceGetCpuAffinity),
  row remapping instead of page retirement (retired pages answer NotSupported).
* `half_unsupported(gpu)` — half of the per-sample queries answer NotSupported,
  FunctionNotFound or NoPermission, as on a consumer card inside a container.
* `fake.break_nvml(code)` / `fake.heal()` — NVML starts failing as a whole
  mid-run (every call, nvmlInit included, raises `code`), then recovers; after
  Uninitialized or DriverNotLoaded it must be initialised again, like a reloaded driver.
* `gpu.lost = True` — every call on that GPU raises GpuIsLost (fallen off the bus);
  `fake.unplug(uuid)` removes it from the enumeration (the count drops and the
  later GPUs move up one index), `fake.plug(gpu)` adds one back at the end.
* `gpu.errors[function] = code` — one function raises `code` on one GPU
  ("nvmlDeviceGetMemoryInfo_v2" for the versioned memory query alone).
* `a100_80gb_mig(position, ["3g.40gb", "2g.20gb", "1g.10gb"])` — an A100 80GB in MIG
  mode with those GPU instances (MIG devices 0, 1, 2), as the operator made them:
  nvmlDeviceGetMaxMigDeviceCount, nvmlDeviceGetMigDeviceHandleByIndex (NotFound
  for an empty index), nvmlDeviceGetUUID and nvmlDeviceGetMemoryInfo on the MIG
  handle, nvmlDeviceGetGpuInstanceId, nvmlDeviceGetGpuInstanceById,
  nvmlGpuInstanceGetInfo and nvmlDeviceGetGpuInstanceProfileInfo answer as NVML
  does; `gpu.mig_devices[i].memory_used` is what runs in slice i.
* `fake.inject_event(position, event_type, data)` — the GPU at NVML's `position`
  raises an event (e.g. `nvmlEventTypeXidCriticalError` with the XID as data):
  every live event set registered for that type on that GPU receives it, and a
  thread blocked in `nvmlEventSetWait_v2` wakes. `fake.fail_next_waits(code, n)`
  makes the next `n` waits raise `code`.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeAlias

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
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetMigMode",
)

# nvmlDeviceGetSupportedEventTypes on an H100 80GB HBM3, driver 580.159.04: every type
# but bits 5-6, XID and both ECC kinds among them.
H100_EVENT_TYPES = 0xFF9F

NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId / computeInstanceId of an event outside MIG

# Bus numbers of the eight GPUs on an HGX H100 board.
HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

SWITCH = "switch"  # an entry of FakeGpu.nvlinks: a link to an NVSwitch


# GPU instance profiles of an A100-SXM4-80GB (`nvidia-smi mig -lgip`, driver 535):
# NVML_GPU_INSTANCE_PROFILE_* -> (profile id, slices, memory MiB, name).
A100_80GB_MIG_PROFILES: dict[int, tuple[int, int, int, str]] = {
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: (19, 1, 9728, "MIG 1g.10gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: (20, 1, 9728, "MIG 1g.10gb+me"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: (15, 1, 19968, "MIG 1g.20gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: (14, 2, 19968, "MIG 2g.20gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: (9, 3, 40192, "MIG 3g.40gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: (5, 4, 40192, "MIG 4g.40gb"),
    pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: (0, 7, 80896, "MIG 7g.80gb"),
}
MAX_MIG_DEVICES = 7  # nvmlDeviceGetMaxMigDeviceCount on an A100 or H100


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
    memory_used: int = 512 * MIB  # what processes hold: nvmlMemory_v2's `used`
    # Held back by the driver: counted in v1's `used`, reported apart by v2.
    memory_reserved: int = 0
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
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    # NVML_TEMPERATURE_THRESHOLD_* -> °C; the others answer NotSupported
    temperature_thresholds: dict[int, int] = field(default_factory=dict)
    supported_events: int = H100_EVENT_TYPES  # nvmlDeviceGetSupportedEventTypes
    mig_mode: int = pynvml.NVML_DEVICE_MIG_DISABLE
    nvlinks: list[str] = field(default_factory=list)  # per link: SWITCH or the peer GPU's bus id
    pcie_switch: int = 0  # GPUs on the same switch share an NVML_TOPOLOGY_SINGLE ancestor
    # Other switches of one NUMA node meet at NVML_TOPOLOGY_NODE, unless both GPUs name the same
    # upstream switch (NVML_TOPOLOGY_MULTIPLE) or the same host bridge (NVML_TOPOLOGY_HOSTBRIDGE).
    upstream_switch: int | None = None
    host_bridge: int | None = None
    numa_node: int = 0  # GPUs on different nodes meet at NVML_TOPOLOGY_SYSTEM; nvmlDeviceGetNumaNodeId
    cpus: str = "0-31"  # nvmlDeviceGetCpuAffinity's mask, as a cpulist ("" = an empty mask)
    unsupported: set[str] = field(default_factory=set)  # functions answering NotSupported
    unsupported_fields: set[int] = field(default_factory=set)  # NVML_FI_* answering NotSupported
    errors: dict[str, int] = field(default_factory=dict)  # function -> NVML error code it raises
    lost: bool = False  # every call on this GPU raises GpuIsLost
    # NVML_GPU_INSTANCE_PROFILE_* -> (profile id, slices, memory MiB, name); empty: not MIG-capable
    mig_profiles: dict[int, tuple[int, int, int, str]] = field(default_factory=dict)
    mig_devices: dict[int, FakeMigDevice] = field(default_factory=dict)  # MIG device index -> device


@dataclass
class FakeMigDevice:
    """One MIG device (a GPU instance with its compute instance) of a FakeGpu in MIG mode."""

    uuid: str
    gpu_instance_id: int
    profile_id: int
    memory_total: int  # bytes
    memory_used: int = 0  # bytes


def a100_80gb_mig(position: int, layout: Iterable[str], **overrides: Any) -> FakeGpu:
    """An A100-SXM4-80GB in MIG mode with one GPU instance per profile name of `layout`, in MIG device order."""
    values: dict[str, Any] = {
        "name": "NVIDIA A100-SXM4-80GB",
        "memory_total": 81920 * MIB,
        "mig_mode": pynvml.NVML_DEVICE_MIG_ENABLE,
        "mig_profiles": dict(A100_80GB_MIG_PROFILES),
        "nvlinks": [SWITCH] * 12,
    }
    values.update(overrides)
    gpu = h100_80gb(position, **values)
    by_name = {name.removeprefix("MIG "): (pid, mb) for pid, _, mb, name in A100_80GB_MIG_PROFILES.values()}
    for mig_index, profile in enumerate(layout):
        profile_id, memory_mb = by_name[profile]
        gpu.mig_devices[mig_index] = FakeMigDevice(
            uuid=f"MIG-{position:08x}-{mig_index:04x}-4444-5555-{profile_id:012x}",
            gpu_instance_id=mig_index + 1,  # NVML's ids are its own; these only need to be distinct
            profile_id=profile_id,
            memory_total=memory_mb * MIB,
        )
    return gpu


def h100_80gb(position: int, **overrides: Any) -> FakeGpu:
    """A healthy, idle H100 80GB HBM3 at `position` of an HGX board (NVSwitch, 18 links)."""
    values: dict[str, Any] = {
        "uuid": f"GPU-{position:08x}-1111-2222-3333-{position:012x}",
        "pci_bus_id": f"00000000:{HGX_BUSES[position % 8]:02X}:00.0",
        "nvlinks": [SWITCH] * 18,
        "unsupported": {"nvmlDeviceGetRetiredPages"},  # Hopper remaps rows instead
        # Read from an H100 80GB HBM3 on driver 580.159.04 (nvidia-smi agrees: 480 MiB reserved).
        "memory_reserved": 480 * MIB,
        "temperature_thresholds": {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: 95,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: 89,
            pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: 95,
            pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: 87,
        },
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
        "nvmlDeviceGetTemperatureThreshold",
    }
    gpu.unsupported_fields.add(pynvml.NVML_FI_DEV_MEMORY_TEMP)
    gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    gpu.errors["nvmlDeviceGetComputeRunningProcesses"] = pynvml.NVML_ERROR_NO_PERMISSION
    return gpu


# What nvmlDeviceGetHandleByIndex returns: a pynvml.c_nvmlDevice_t pointer, bound to its GPU like a real handle.
FakeHandle: TypeAlias = Any


@dataclass(eq=False)
class FakeEventSet:
    """What nvmlEventSetCreate returns: registrations and the events delivered to them."""

    registered: dict[int, int] = field(default_factory=dict)  # id(FakeGpu) -> event type mask
    pending: deque[Any] = field(default_factory=deque)  # c_nvmlEventData_t, oldest first
    freed: bool = False


class FakeNvml(ModuleType):
    """pynvml with fake GPUs behind it. `calls` counts every function call by name."""

    def __init__(
        self, gpus: list[FakeGpu], *, strings_as_bytes: bool = False, missing: Iterable[str] = ()
    ) -> None:
        super().__init__("fake_pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError", "nvmlEventType")):
                setattr(self, name, getattr(pynvml, name))
        self.nvmlFriendlyObject = pynvml.nvmlFriendlyObject
        self.nvmlMemory_v2 = pynvml.nvmlMemory_v2
        self.gpus = list(gpus)
        self.strings_as_bytes = strings_as_bytes
        self.missing = frozenset(missing)  # names this module pretends not to have
        self.calls: Counter[str] = Counter()
        self.refcount = 0  # nvmlInit calls not yet matched by nvmlShutdown
        self.broken: int | None = None  # error code every call raises
        # One device struct per GPU ever seen, kept alive so its address stays that GPU's handle.
        self._devices: dict[int, tuple[FakeGpu, Any]] = {}  # id(FakeGpu) -> (gpu, struct)
        self._by_address: dict[int, FakeGpu] = {}
        # MIG device and GPU instance handles: address -> (its GPU, the device).
        self._mig_structs: dict[int, Any] = {}  # id(FakeMigDevice) -> struct, kept alive
        self._mig_by_address: dict[int, tuple[FakeGpu, FakeMigDevice]] = {}
        self._instance_structs: dict[int, Any] = {}
        self._instance_by_address: dict[int, tuple[FakeGpu, FakeMigDevice]] = {}
        # Event sets and the waits on them; a waiter sleeps on `_events_changed`.
        self._events_changed = threading.Condition()
        self.event_sets: list[FakeEventSet] = []  # created and not yet freed
        self._wait_failures: deque[int] = deque()  # error codes the next waits raise

    def __getattribute__(self, name: str) -> Any:
        if name in ModuleType.__getattribute__(self, "__dict__").get("missing", ()):
            raise AttributeError(f"module 'fake_pynvml' has no attribute {name!r}")
        return ModuleType.__getattribute__(self, name)

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

    def inject_event(self, position: int, event_type: int, data: int = 0, *, gpu_instance: int = NO_INSTANCE,
                     compute_instance: int = NO_INSTANCE) -> int:
        """The GPU at NVML's `position` raises an event; returns how many event sets received it.

        As in NVML, only sets registered for that event type on that GPU receive it:
        an event nobody registered for is gone.
        """
        gpu = self.gpus[position]
        with self._events_changed:
            receivers = [s for s in self.event_sets if s.registered.get(id(gpu), 0) & event_type]
            for event_set in receivers:
                event = pynvml.c_nvmlEventData_t()
                event.device = self._handle(gpu)
                event.eventType = event_type
                event.eventData = data
                event.gpuInstanceId = gpu_instance
                event.computeInstanceId = compute_instance
                event_set.pending.append(event)
            self._events_changed.notify_all()
        return len(receivers)

    def fail_next_waits(self, code: int, count: int = 1) -> None:
        """The next `count` calls to nvmlEventSetWait_v2 raise `code` (at once, without waiting)."""
        with self._events_changed:
            self._wait_failures.extend([code] * count)
            self._events_changed.notify_all()

    def registered_events(self, position: int) -> int:
        """The event types registered for the GPU at `position`, over every live event set."""
        gpu = self.gpus[position]
        with self._events_changed:
            mask = 0
            for event_set in self.event_sets:
                mask |= event_set.registered.get(id(gpu), 0)
            return mask

    # ---- plumbing

    def _check(self, function: str) -> None:
        """Count the call and fail it the way all of NVML is failing, if it is."""
        self.calls[function] += 1
        if self.broken is not None:
            raise error(self.broken)
        if self.refcount == 0:
            raise error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _handle(self, gpu: FakeGpu) -> FakeHandle:
        """A new pointer object to the GPU's one device struct, as each NVML call returns."""
        known = self._devices.get(id(gpu))
        if known is None:
            known = (gpu, pynvml.struct_c_nvmlDevice_t())
            self._devices[id(gpu)] = known
            self._by_address[ctypes.addressof(known[1])] = gpu
        return ctypes.pointer(known[1])

    def _mig_handle(self, gpu: FakeGpu, device: FakeMigDevice) -> FakeHandle:
        struct = self._mig_structs.get(id(device))
        if struct is None:
            struct = self._mig_structs[id(device)] = pynvml.struct_c_nvmlDevice_t()
            self._mig_by_address[ctypes.addressof(struct)] = (gpu, device)
        return ctypes.pointer(struct)

    def _mig_of(self, handle: FakeHandle) -> tuple[FakeGpu, FakeMigDevice] | None:
        """The (GPU, MIG device) a handle names, or None for a whole GPU's handle."""
        return self._mig_by_address.get(ctypes.cast(handle, ctypes.c_void_p).value or 0)

    def _enter_mig(self, function: str, handle: FakeHandle) -> FakeMigDevice:
        """_enter for a MIG device handle: its GPU's failures apply, and the device must still exist."""
        self._check(function)
        found = self._mig_of(handle)
        if found is None:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu, device = found
        if gpu.lost or all(g is not gpu for g in self.gpus):
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if all(d is not device for d in gpu.mig_devices.values()):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # the operator destroyed it
        self._fail_as_configured(gpu, function)
        return device

    def _enter(self, function: str, handle: FakeHandle) -> FakeGpu:
        """_check, then fail the call the way this GPU fails it, if it does; else the GPU."""
        self._check(function)
        gpu = self._by_address.get(ctypes.cast(handle, ctypes.c_void_p).value or 0)
        if gpu is None:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.lost or all(g is not gpu for g in self.gpus):
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        self._fail_as_configured(gpu, function)
        return gpu

    @staticmethod
    def _fail_as_configured(gpu: FakeGpu, function: str) -> None:
        if function in gpu.errors:
            raise error(gpu.errors[function])
        if function in gpu.unsupported:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)

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
        return self._handle(gpu)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeHandle:
        self._check("nvmlDeviceGetHandleByUUID")
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.gpus:
            if gpu.uuid == text:
                return self._handle(gpu)
        raise error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str | bytes:
        if self._mig_of(handle) is not None:
            return self._string(self._enter_mig("nvmlDeviceGetUUID", handle).uuid)
        return self._string(self._enter("nvmlDeviceGetUUID", handle).uuid)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str | bytes:
        return self._string(self._enter("nvmlDeviceGetName", handle).name)

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> Any:
        return self._pci_info(self._enter("nvmlDeviceGetPciInfo", handle).pci_bus_id)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        if self._mig_of(handle) is not None:
            device = self._enter_mig("nvmlDeviceGetMemoryInfo", handle)
            free = device.memory_total - device.memory_used
            if not version:
                return pynvml.c_nvmlMemory_t(total=device.memory_total, free=free, used=device.memory_used)
            return pynvml.c_nvmlMemory_v2_t(
                version=version, total=device.memory_total, reserved=0, free=free, used=device.memory_used
            )
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        free = gpu.memory_total - gpu.memory_reserved - gpu.memory_used
        if not version:
            # v1 counts the driver's reservation as used.
            return pynvml.c_nvmlMemory_t(total=gpu.memory_total, free=free, used=gpu.memory_used + gpu.memory_reserved)
        self._fail_as_configured(gpu, "nvmlDeviceGetMemoryInfo_v2")
        if version != pynvml.nvmlMemory_v2:
            raise error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return pynvml.c_nvmlMemory_v2_t(
            version=version, total=gpu.memory_total, reserved=gpu.memory_reserved, free=free, used=gpu.memory_used
        )

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> pynvml.c_nvmlUtilization_t:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        gpu = self._enter("nvmlDeviceGetTemperature", handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeHandle, threshold: int) -> int:
        gpu = self._enter("nvmlDeviceGetTemperatureThreshold", handle)
        if threshold not in gpu.temperature_thresholds:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.temperature_thresholds[threshold]

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

    @staticmethod
    def _processes(processes: list[tuple[int, int | None]]) -> list[Any]:
        return [
            pynvml.nvmlFriendlyObject(
                {"pid": pid, "usedGpuMemory": used, "gpuInstanceId": NO_INSTANCE, "computeInstanceId": NO_INSTANCE}
            )
            for pid, used in processes
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return self._processes(self._enter("nvmlDeviceGetComputeRunningProcesses", handle).processes)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        return self._processes(self._enter("nvmlDeviceGetGraphicsRunningProcesses", handle).graphics_processes)

    def nvmlDeviceGetMigMode(self, device: FakeHandle) -> list[int]:
        gpu = self._enter("nvmlDeviceGetMigMode", device)
        return [gpu.mig_mode, gpu.mig_mode]

    # ---- MIG (instances are reported, never created: no nvmlDeviceCreateGpuInstance here)

    def nvmlDeviceGetMaxMigDeviceCount(self, device: FakeHandle) -> int:
        gpu = self._enter("nvmlDeviceGetMaxMigDeviceCount", device)
        if not gpu.mig_profiles:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return MAX_MIG_DEVICES

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeHandle, index: int) -> FakeHandle:
        gpu = self._enter("nvmlDeviceGetMigDeviceHandleByIndex", device)
        if not gpu.mig_profiles:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < MAX_MIG_DEVICES:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE or index not in gpu.mig_devices:
            raise error(pynvml.NVML_ERROR_NOT_FOUND)
        return self._mig_handle(gpu, gpu.mig_devices[index])

    def nvmlDeviceIsMigDeviceHandle(self, device: FakeHandle) -> Any:
        self._check("nvmlDeviceIsMigDeviceHandle")
        return ctypes.c_uint(1 if self._mig_of(device) is not None else 0)

    def nvmlDeviceGetGpuInstanceId(self, device: FakeHandle) -> int:
        if self._mig_of(device) is None:
            self._enter("nvmlDeviceGetGpuInstanceId", device)
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # not a MIG device handle
        return self._enter_mig("nvmlDeviceGetGpuInstanceId", device).gpu_instance_id

    def nvmlDeviceGetGpuInstanceById(self, device: FakeHandle, gpuInstanceId: int) -> Any:
        gpu = self._enter("nvmlDeviceGetGpuInstanceById", device)
        if gpu.mig_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for found in gpu.mig_devices.values():
            if found.gpu_instance_id == gpuInstanceId:
                struct = self._instance_structs.get(id(found))
                if struct is None:
                    struct = self._instance_structs[id(found)] = pynvml.struct_c_nvmlGpuInstance_t()
                    self._instance_by_address[ctypes.addressof(struct)] = (gpu, found)
                return ctypes.pointer(struct)
        raise error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> Any:
        self._check("nvmlGpuInstanceGetInfo")
        found = self._instance_by_address.get(ctypes.cast(gpuInstance, ctypes.c_void_p).value or 0)
        if found is None:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu, device = found
        info = pynvml.c_nvmlGpuInstanceInfo_t()
        info.device = self._handle(gpu)
        info.id = device.gpu_instance_id
        info.profileId = device.profile_id
        return info

    def nvmlDeviceGetGpuInstanceProfileInfo(self, device: FakeHandle, profile: int, version: int = 2) -> Any:
        gpu = self._enter("nvmlDeviceGetGpuInstanceProfileInfo", device)
        if profile not in gpu.mig_profiles:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        profile_id, slices, memory_mb, name = gpu.mig_profiles[profile]
        if version == 2:
            info: Any = pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            info.name = name.encode()
        elif version == 1:
            info = pynvml.c_nvmlGpuInstanceProfileInfo_t()
        else:
            raise error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        info.id = profile_id
        info.sliceCount = slices
        info.memorySizeMB = memory_mb
        return info

    def nvmlDeviceGetTopologyCommonAncestor(self, device1: FakeHandle, device2: FakeHandle) -> int:
        a = self._enter("nvmlDeviceGetTopologyCommonAncestor", device1)
        b = self._enter("nvmlDeviceGetTopologyCommonAncestor", device2)
        if a.numa_node != b.numa_node:
            return int(pynvml.NVML_TOPOLOGY_SYSTEM)
        if a.pcie_switch == b.pcie_switch:
            return int(pynvml.NVML_TOPOLOGY_SINGLE)
        if a.upstream_switch is not None and a.upstream_switch == b.upstream_switch:
            return int(pynvml.NVML_TOPOLOGY_MULTIPLE)
        if a.host_bridge is not None and a.host_bridge == b.host_bridge:
            return int(pynvml.NVML_TOPOLOGY_HOSTBRIDGE)
        return int(pynvml.NVML_TOPOLOGY_NODE)

    def nvmlDeviceGetNumaNodeId(self, handle: FakeHandle) -> int:
        return self._enter("nvmlDeviceGetNumaNodeId", handle).numa_node

    def nvmlDeviceGetCpuAffinity(self, handle: FakeHandle, cpuSetSize: int) -> Any:
        gpu = self._enter("nvmlDeviceGetCpuAffinity", handle)
        mask = (ctypes.c_ulonglong * cpuSetSize)()  # what pynvml returns: 64 CPUs a word
        for part in filter(None, gpu.cpus.split(",")):
            first, _, last = part.partition("-")
            for cpu in range(int(first), int(last or first) + 1):
                if cpu < 64 * cpuSetSize:
                    mask[cpu // 64] |= 1 << (cpu % 64)
        return mask

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

    # ---- events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._check("nvmlEventSetCreate")
        event_set = FakeEventSet()
        with self._events_changed:
            self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        return self._enter("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: FakeEventSet) -> None:
        gpu = self._enter("nvmlDeviceRegisterEvents", handle)
        if eventSet.freed:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if eventTypes & ~gpu.supported_events:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        with self._events_changed:
            eventSet.registered[id(gpu)] = eventSet.registered.get(id(gpu), 0) | eventTypes

    def nvmlEventSetWait_v2(self, eventSet: FakeEventSet, timeoutms: int) -> Any:
        """The oldest event delivered to the set; NVMLError_Timeout when none comes within `timeoutms`."""
        return self._wait("nvmlEventSetWait_v2", eventSet, timeoutms)

    def nvmlEventSetWait(self, eventSet: FakeEventSet, timeoutms: int) -> Any:
        return self._wait("nvmlEventSetWait", eventSet, timeoutms)

    def _wait(self, function: str, eventSet: FakeEventSet, timeoutms: int) -> Any:
        self._check(function)
        if eventSet.freed:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with self._events_changed:
            self._events_changed.wait_for(
                lambda: bool(eventSet.pending or self._wait_failures), timeout=timeoutms / 1000.0
            )
            if self._wait_failures:
                raise error(self._wait_failures.popleft())
            if eventSet.pending:
                return eventSet.pending.popleft()
        raise error(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, eventSet: FakeEventSet) -> None:
        self._check("nvmlEventSetFree")
        if eventSet.freed:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with self._events_changed:
            eventSet.freed = True
            self.event_sets.remove(eventSet)


__all__ = [
    "A100_80GB_MIG_PROFILES",
    "MAX_MIG_DEVICES",
    "FakeMigDevice",
    "a100_80gb_mig",
    "H100_EVENT_TYPES",
    "HGX_BUSES",
    "MIB",
    "NO_INSTANCE",
    "SAMPLED_FUNCTIONS",
    "SWITCH",
    "FakeEventSet",
    "FakeGpu",
    "FakeHandle",
    "FakeNvml",
    "error",
    "h100_80gb",
    "half_unsupported",
]
