"""The sampling loop: one telemetry snapshot of this host's GPUs per interval.

Everything that shows GPU state - `/gpu/status`, `/metrics`, the scheduler -
reads the latest snapshot here; nothing queries the device on demand, so a
scrape or an API call costs no NVML call and cannot hang on one.

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
from typing import Callable, Sequence

import trio

from coordinator.backoff import retry_delay
from coordinator.model import HEALTHY, GpuView

from agent.devices.base import DeviceBackend, DeviceError, GpuReading

log = logging.getLogger(__name__)


class DeviceSampler:
    """Owns the backend; holds the latest readings for everyone else to read."""

    def __init__(
        self,
        backend: DeviceBackend,
        node_name: str,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.backend = backend
        self.node_name = node_name
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._rng = rng
        self.readings: list[GpuReading] = []
        self.last_sample_at: float | None = None
        self.last_sample_seconds = 0.0
        self.failures = 0
        self.error: str | None = None
        self._busy = threading.Event()
        self._views: list[GpuView] = []
        self._on_sample: list[Callable[[], None]] = []

    @property
    def degraded_reason(self) -> str | None:
        """Why telemetry is missing or partial right now, or None when all is well."""
        return self.error or self.backend.degraded_reason

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the trio thread) after every successful sample."""
        self._on_sample.append(callback)

    def gpu_views(self) -> Sequence[GpuView]:
        """This host's GPUs as the scheduler sees them (cached per sample)."""
        return self._views

    async def open(self) -> None:
        """Open the backend and take a first sample, so the agent starts with an inventory.

        Raises DeviceError when the backend cannot start at all.
        """
        await trio.to_thread.run_sync(self.backend.open)
        await self.sample_once()
        if self.error is not None and not self.readings:
            raise DeviceError(self.error)

    async def sample_once(self) -> bool:
        """Take one sample; returns False (and records why) when it failed."""
        if self._busy.is_set():
            self.error = f"a device call has been hung for over {self.timeout_s:g}s"
            return False
        now = self._clock()
        started = trio.current_time()
        readings: list[GpuReading] | None = None
        try:
            with trio.move_on_after(self.timeout_s):
                readings = await trio.to_thread.run_sync(
                    self._sample_in_thread, now, abandon_on_cancel=True
                )
        except DeviceError as exc:
            self._fail(str(exc))
            return False
        if readings is None:
            self._fail(f"device sample took longer than {self.timeout_s:g}s")
            return False
        self.last_sample_seconds = trio.current_time() - started
        self.readings = readings
        self.last_sample_at = now
        self._views = [self._view(r) for r in readings]
        if self.error is not None:
            log.info("device telemetry recovered after %d failed samples", self.failures)
        self.error = None
        self.failures = 0
        for callback in self._on_sample:
            callback()
        return True

    def _sample_in_thread(self, now: float) -> list[GpuReading]:
        self._busy.set()
        try:
            return self.backend.sample(now)
        finally:
            self._busy.clear()

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
                await trio.sleep(max(self.interval_s, retry_delay(self.failures, self._rng, base_s=1.0, cap_s=60.0)))

    def _view(self, r: GpuReading) -> GpuView:
        return GpuView(
            node=self.node_name,
            index=r.index,
            uuid=r.uuid,
            name=r.name,
            memory_total_mb=r.memory_total_mb,
            memory_free_mb=r.memory_free_mb,
            utilization_pct=r.utilization_gpu_pct,
            health=HEALTHY,
            sampled_at=r.sampled_at,
        )
