"""The sampling loop: one telemetry snapshot of this host's GPUs per interval.

Everything that shows GPU state - `/gpu/status`, `/metrics`, the scheduler -
reads the latest snapshot here; nothing queries the device on demand, so a
scrape or an API call costs no NVML call and cannot hang on one.

Each sample also feeds the pure health policy (coordinator/gpu_health.py) with
the readings and the device events seen since the last sample (XIDs, ECC
errors, GPUs lost or back), and the usage tracker (coordinator/gpu_usage.py)
with who holds each GPU. A GPU that disappears stays listed, unhealthy, with
its last reading, so nobody mistakes a lost GPU for one that never existed.

How the GPUs are wired (`topology`: NVLink and PCIe links, NUMA nodes, CPUs)
is read in the same worker-thread call as a sample, but only when the set of
answering GPUs differs from the one it was last read for: at the first sample
and after a GPU is lost or comes back. It is gossiped and placement uses it
(coordinator/topology.py). Failing to read it costs the sample nothing: the
previous topology stays and the next sample tries again.

Error handling
--------------
Each sample runs in a worker thread under a deadline (`timeout_s`). A sample
that raises DeviceError or overruns marks the backend degraded (reported in
`/healthz` and metrics) and the loop retries with jittered exponential backoff.
A hung NVML call is abandoned, not waited for: its thread is left to finish on
its own, and no new call is started until it does, since NVML handles are not
safe to use from a thread racing a stuck one.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import trio

from coordinator.backoff import retry_delay
from coordinator.gpu_health import HEALTHY_GPU, GpuHealth, HealthPolicy, HealthTracker
from coordinator.gpu_usage import UsageTracker
from coordinator.mig import slice_index
from coordinator.model import UNHEALTHY, GpuView
from coordinator.topology import NODE, PHB, PIX, PXB, SYS, UNKNOWN, NodeTopology, nvlink, parse_cpulist

from agent.devices.base import DeviceBackend, DeviceError, DeviceEvent, GpuAffinity, GpuLink, GpuReading

log = logging.getLogger(__name__)

HealthCallback = Callable[[int, GpuHealth], None]

# GpuLink's PCIe relations as link codes (coordinator/topology.py); NVLink pairs count their links.
_LINK_CODES = {
    "same_board": PIX,
    "pcie_switch": PIX,
    "pcie_switches": PXB,
    "host_bridge": PHB,
    "numa_node": NODE,
    "cross_cpu": SYS,
    "unknown": UNKNOWN,
}


def _link_code(link: GpuLink) -> int:
    if link.relation == "nvlink" and link.nvlinks:
        return nvlink(link.nvlinks)
    return _LINK_CODES.get(link.relation, UNKNOWN)


def node_topology(links: Sequence[GpuLink], affinity: Sequence[GpuAffinity]) -> NodeTopology | None:
    """What the backend's links and affinities say as a NodeTopology; None when they say nothing.

    A CPU list that is not a Linux cpulist is logged and taken as unknown.
    """
    if not links and not affinity:
        return None
    codes = {(link.a, link.b): _link_code(link) for link in links}
    cpus: dict[int, str | None] = {}
    for gpu in affinity:
        cpus[gpu.index] = gpu.cpu_list
        if gpu.cpu_list is not None:
            try:
                parse_cpulist(gpu.cpu_list)
            except ValueError as exc:
                log.warning("GPU %d: CPU affinity left unknown: %s", gpu.index, exc)
                cpus[gpu.index] = None
    return NodeTopology(codes, {gpu.index: gpu.numa_node for gpu in affinity}, cpus)


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU as last seen: its reading, whether it is present now, and its health."""

    reading: GpuReading
    present: bool
    health: GpuHealth


# The answering GPUs a topology was read for, and what was read.
_Wiring = tuple[frozenset[int], NodeTopology | None]


class DeviceSampler:
    """Owns the backend; holds the latest readings and health for everyone else to read."""

    def __init__(
        self,
        backend: DeviceBackend,
        node_name: str,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float],
        rng: random.Random,
        health_policy: HealthPolicy | None = None,
        idle_utilization_pct: float = 5.0,
    ) -> None:
        self.backend = backend
        self.node_name = node_name
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._rng = rng
        self.health_tracker = HealthTracker(health_policy)
        self.usage = UsageTracker(idle_utilization_pct)
        # Who holds each local GPU (index -> allocation id); set by the agent.
        self.holders: Callable[[], Mapping[int, str]] = dict
        # GPU index -> (allocation ids of its shares, their budgets in MB): shared GPUs of this node.
        self.shares: Callable[[], Mapping[int, tuple[tuple[str, ...], int]]] = dict
        self.last_sample_at: float | None = None
        self.last_sample_seconds = 0.0
        self.failures = 0
        self.events_seen = 0
        self.error: str | None = None
        self._busy = threading.Event()
        self._gpus: dict[int, GpuSnapshot] = {}
        self._views: list[GpuView] = []
        self._on_sample: list[Callable[[], None]] = []
        self._on_health: list[HealthCallback] = []
        # How this host's GPUs are wired, and the answering GPUs it was read for (None: not read yet).
        self.topology: NodeTopology | None = None
        self._wired_for: frozenset[int] | None = None

    @property
    def degraded_reason(self) -> str | None:
        """Why telemetry or health events are missing or partial now, or None when all is well."""
        return self.error or self.backend.degraded_reason or self.backend.watcher_error

    @property
    def readings(self) -> list[GpuReading]:
        """The last reading of every GPU this host has shown, present or lost, by index."""
        return [snap.reading for _, snap in sorted(self._gpus.items())]

    def snapshots(self) -> list[GpuSnapshot]:
        return [snap for _, snap in sorted(self._gpus.items())]

    def snapshot(self, index: int) -> GpuSnapshot | None:
        return self._gpus.get(index)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the trio thread) after every successful sample; returns the function that stops it."""
        self._on_sample.append(callback)
        return lambda: self._on_sample.remove(callback)

    def on_health_change(self, callback: HealthCallback) -> Callable[[], None]:
        """Call `callback(index, health)` (from the trio thread) when a GPU's health changes; returns the stopper."""
        self._on_health.append(callback)
        return lambda: self._on_health.remove(callback)

    def gpu_views(self) -> Sequence[GpuView]:
        """This host's GPUs as the scheduler sees them (cached per sample)."""
        return self._views

    async def open(self) -> None:
        """Open the backend, start its event watcher and take a first sample.

        Raises DeviceError when the backend cannot start at all.
        """
        await trio.to_thread.run_sync(self.backend.open)
        await trio.to_thread.run_sync(self.backend.start_event_watcher)
        await self.sample_once()
        if self.error is not None and not self._gpus:
            raise DeviceError(self.error)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.backend.stop_event_watcher)
        await trio.to_thread.run_sync(self.backend.close)

    async def sample_once(self) -> bool:
        """Take one sample; returns False (and records why) when it failed."""
        if self._busy.is_set():
            self.error = f"a device call has been hung for over {self.timeout_s:g}s"
            return False
        now = self._clock()
        started = trio.current_time()
        result: tuple[list[GpuReading], _Wiring | None] | None = None
        try:
            with trio.move_on_after(self.timeout_s):
                result = await trio.to_thread.run_sync(
                    self._sample_in_thread, now, self._wired_for, abandon_on_cancel=True
                )
        except DeviceError as exc:
            self._fail(str(exc))
            return False
        if result is None:
            self._fail(f"device sample took longer than {self.timeout_s:g}s")
            return False
        readings, wiring = result
        if wiring is not None:
            self._wired_for, self.topology = wiring
        self.last_sample_seconds = trio.current_time() - started
        self.last_sample_at = now
        self._absorb(readings, self.backend.drain_events(), now)
        if self.error is not None:
            log.info("device telemetry recovered after %d failed samples", self.failures)
        self.error = None
        self.failures = 0
        for callback in self._on_sample:
            callback()
        return True

    def _sample_in_thread(
        self, now: float, wired_for: frozenset[int] | None
    ) -> tuple[list[GpuReading], _Wiring | None]:
        """A sample, and the topology when the answering GPUs are not those it was read for."""
        self._busy.set()
        try:
            readings = self.backend.sample(now)
            present = frozenset(r.index for r in readings)
            if present == wired_for:
                return readings, None
            try:
                topology = node_topology(self.backend.topology(), self.backend.affinity())
            except DeviceError as exc:
                log.warning("could not read how the GPUs are wired (%s); trying again at the next sample", exc)
                return readings, None
            if topology is not None:
                log.info("GPU topology of %d GPU(s):\n%s", len(topology.indices), topology.matrix())
            return readings, (present, topology)
        finally:
            self._busy.clear()

    def _absorb(self, readings: list[GpuReading], events: list[DeviceEvent], now: float) -> None:
        """Feed one sample and its events to the policies; rebuild snapshots and views."""
        tracker = self.health_tracker
        for event in events:
            self.events_seen += 1
            if event.kind == "xid" and event.code is not None:
                if tracker.xid(event.index, event.code, event.at):
                    log.warning("GPU %d: XID %d %s", event.index, event.code, event.detail)
            elif event.kind == "ecc_dbe":
                log.warning("GPU %d: double-bit ECC error %s", event.index, event.detail)
                tracker.double_bit_ecc(event.index, event.at)
            elif event.kind == "lost":
                tracker.lost(event.index, event.at)
        # A GPU missing from one sample without a "lost" event (a query failed
        # once) keeps its health and last reading; only the backend's events say lost.
        present = {r.index: r for r in readings}
        for r in readings:
            tracker.reading(
                r.index,
                now,
                temperature_c=r.temperature_c,
                slowdown_c=r.temperature_slowdown_c,
                ecc_volatile_dbe=r.ecc_volatile_dbe,
                remapped_rows_pending=r.remapped_rows_pending,
                remapped_rows_failed=r.remapped_rows_failed,
            )
        holders = self.holders()
        shares = self.shares()
        changed: list[tuple[int, GpuHealth]] = []
        gpus: dict[int, GpuSnapshot] = {}
        for index in sorted(set(self._gpus) | set(present)):
            reading = present.get(index) or self._gpus[index].reading
            health = tracker.health(index, now)
            self.usage.observe(
                index,
                now,
                holder=_holder(index, reading, holders),
                utilization_pct=reading.utilization_gpu_pct if index in present else None,
                process_count=None if reading.processes is None else len(reading.processes),
            )
            tenants, budget_mb = shares.get(index, ((), 0))
            used = reading.memory_used_mb if index in present else None
            if self.usage.observe_shares(index, shares=len(tenants), budget_mb=budget_mb, memory_used_mb=used):
                log.warning(
                    "GPU %d uses %s MB, above the %d MB its shares were promised: one of %s is over its budget",
                    index,
                    used,
                    budget_mb,
                    ", ".join(tenants),
                )
            previous = self._gpus.get(index)
            before = previous.health if previous else HEALTHY_GPU
            # Compare verdicts, not the recovery time: a new XID during a quiet
            # period moves `until` but is no new state worth a log entry.
            if (before.state, before.reasons) != (health.state, health.reasons):
                changed.append((index, health))
            gpus[index] = GpuSnapshot(reading, index in present, health)
        self._gpus = gpus
        self._views = [view for snap in gpus.values() for view in self._unit_views(snap)]
        for index, health in changed:
            log.log(
                logging.WARNING if health.state == UNHEALTHY else logging.INFO,
                "GPU %d is now %s%s",
                index,
                health.state,
                f" ({'; '.join(health.reasons)})" if health.reasons else "",
            )
            for callback in self._on_health:
                callback(index, health)

    def restore_health(self, records: Mapping[int, tuple[str, ...]], now: float) -> None:
        """Resume unhealthy verdicts recorded in the lease table before a restart (index -> reasons)."""
        for index, reasons in records.items():
            self.health_tracker.restore(index, reasons, now)
        self._gpus = {
            index: GpuSnapshot(snap.reading, snap.present, self.health_tracker.health(index, now))
            for index, snap in self._gpus.items()
        }
        self._views = [view for snap in self._gpus.values() for view in self._unit_views(snap)]

    def _fail(self, reason: str) -> None:
        self.failures += 1
        if self.error != reason:
            log.warning("device sampling failed (%s); keeping the last readings", reason)
        self.error = reason

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample every interval; back off while the backend keeps failing."""
        task_status.started()
        while True:
            ok = await self.sample_once()
            if ok:
                await trio.sleep(self.interval_s)
            else:
                delay = retry_delay(self.failures, self._rng, base_s=1.0, cap_s=60.0)
                await trio.sleep(max(self.interval_s, delay))

    def _unit_views(self, snap: GpuSnapshot) -> list[GpuView]:
        """What the scheduler may lease of one GPU: the GPU, or in MIG mode its instances (coordinator/mig.py).

        A GPU in MIG mode runs nothing outside its instances, so it is never
        offered whole, and without instances it offers nothing. Each instance
        carries its GPU's health: a fault of the GPU is a fault of every slice.
        """
        r = snap.reading
        if not r.mig_mode:
            return [self._view(snap)]
        return [
            GpuView(
                node=self.node_name,
                index=slice_index(r.index, instance.mig_index),
                uuid=instance.uuid,
                name=f"{r.name} MIG {instance.profile}",
                memory_total_mb=instance.memory_total_mb,
                memory_free_mb=instance.memory_free_mb,
                # NVML reports no utilization per MIG device: only memory tells use.
                utilization_pct=None,
                health=snap.health.state,
                sampled_at=r.sampled_at,
                mig_profile=instance.profile,
                parent_uuid=r.uuid,
            )
            for instance in r.mig_instances
        ]

    def _view(self, snap: GpuSnapshot) -> GpuView:
        r = snap.reading
        return GpuView(
            node=self.node_name,
            index=r.index,
            uuid=r.uuid,
            name=r.name,
            memory_total_mb=r.memory_total_mb,
            memory_free_mb=r.memory_free_mb,
            utilization_pct=r.utilization_gpu_pct,
            health=snap.health.state,
            sampled_at=r.sampled_at,
        )


def _holder(index: int, reading: GpuReading, holders: Mapping[int, str]) -> str | None:
    """Who leases GPU `index` for the usage tracker: its lease, or in MIG mode its first leased slice's.

    A MIG GPU's processes are its slices' (NVML lists them on the GPU), so it is
    in use without a lease only while none of its slices is leased; work in an
    unleased slice beside a leased one is not told apart.
    """
    if not reading.mig_mode:
        return holders.get(index)
    units = (slice_index(index, i.mig_index) for i in reading.mig_instances)
    return next((holders[u] for u in units if u in holders), None)
