"""The agent's GPUs: real ones through NVML, or a simulated fleet.

`backend_from_config` is the one place that picks a backend, so the choice is
always the configuration's: NVML is never replaced by the simulation silently.
"""

from __future__ import annotations

from agent.devices.base import DeviceBackend, DeviceError, DeviceEvent, GpuAffinity, GpuLink, GpuProcess, GpuReading
from agent.devices.nvml import NvmlDevices
from agent.devices.simulated import (
    SimulatedDevices,
    SimulatedFault,
    SimulatedGpuSpec,
    parse_fault_schedule,
    parse_simulate_spec,
    simulated_host,
)

__all__ = [
    "DeviceBackend",
    "DeviceError",
    "DeviceEvent",
    "GpuAffinity",
    "GpuLink",
    "GpuProcess",
    "GpuReading",
    "NvmlDevices",
    "SimulatedDevices",
    "SimulatedFault",
    "SimulatedGpuSpec",
    "backend_from_config",
    "parse_fault_schedule",
    "parse_simulate_spec",
    "simulated_host",
]


def backend_from_config(kind: str, simulate: str | None, *, seed: int | None = None) -> DeviceBackend:
    """The backend `[devices] backend` names, not yet opened.

    "nvml" reads the real GPUs (`simulate` is ignored: it only describes the fleet
    for the simulated backend). "simulated" builds the fleet `simulate` describes,
    or the simulated host it names (e.g. "hgx-h100", wired as that host is),
    with the faults it schedules (e.g. "4xH100-80GB;xid=2:79@30"), seeded with
    `seed`. Raises ValueError for any other kind, for "simulated" without a
    fleet, or for a spec parse_simulate_spec rejects.
    """
    if kind == "nvml":
        return NvmlDevices()
    if kind == "simulated":
        if simulate is None or not simulate.strip():
            raise ValueError(
                "devices backend 'simulated' needs a fleet: set [devices] simulate "
                "or pass --simulate, e.g. 4xH100-80GB"
            )
        host = simulated_host(simulate)
        return SimulatedDevices(
            parse_simulate_spec(simulate),
            seed=seed,
            faults=parse_fault_schedule(simulate),
            topology=None if host is None else host.topology,
        )
    raise ValueError(f"unknown devices backend {kind!r}: expected 'nvml' or 'simulated'")
