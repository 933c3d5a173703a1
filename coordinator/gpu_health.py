"""GPU health: a pure policy from device events and readings to healthy / degraded / unhealthy.

Theory of operation
-------------------
The agent feeds each GPU's telemetry readings and device events (XIDs, ECC
errors, a GPU lost or back) into a `HealthTracker`, with their times; the
tracker answers each GPU's health at a given `now`. Nothing here reads a clock,
so a test can walk a GPU through XID -> unhealthy -> quiet period -> healthy by
passing times.

Rules, most severe first:

- **unhealthy** (never scheduled):
  - lost from NVML (the GPU vanished or NVML reports it lost), until it is seen
    again and then stays quiet for `quiet_period_s`;
  - a critical XID, a double-bit (uncorrectable) ECC error, or a failed row
    remap, until `quiet_period_s` has passed without another one. XIDs that mean
    the application failed, not the GPU, are ignored (the Kubernetes device
    plugin's list: 13, 31, 43, 45, 68, 109);
- **degraded** (scheduled only where no healthy GPU fits):
  - at or above its slowdown temperature (from NVML, else `default_slowdown_c`),
    until it cools `temperature_hysteresis_c` below it;
  - a row remap pending (the GPU wants a reset to retire a bad row);
- **healthy** otherwise.

Unlike the Kubernetes device plugin, which keeps a GPU out of service until the
plugin restarts, a GPU here returns on its own once the quiet period passes with
no new critical event; an operator who wants it out for good drains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.model import DEGRADED, HEALTHY, UNHEALTHY

# XIDs caused by the application rather than the GPU (user-space faults, aborted
# contexts): k8s-device-plugin's default skip list (internal/rm/health.go).
APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Thresholds of the health policy; defaults explained per field."""

    # Seconds without a new critical event before an unhealthy GPU returns to
    # service. Five minutes outlasts the bursts in which XIDs usually come, and is
    # short enough that a transient fault does not cost a GPU-hour.
    quiet_period_s: float = 300.0
    # XIDs that never affect health.
    ignored_xids: frozenset[int] = APPLICATION_XIDS
    # Slowdown temperature to assume when NVML does not report one (°C): below
    # every datacenter GPU's hardware slowdown point.
    default_slowdown_c: float = 85.0
    # Degrees below the slowdown point a hot GPU must cool to count as healthy
    # again, so a GPU hovering at the threshold does not flap.
    temperature_hysteresis_c: float = 5.0


@dataclass(frozen=True, slots=True)
class GpuHealth:
    """One GPU's health and why."""

    state: str
    reasons: tuple[str, ...] = ()
    # When an unhealthy GPU returns to service if nothing new happens (None: not timed).
    until: float | None = None

    @property
    def schedulable(self) -> bool:
        return self.state != UNHEALTHY


HEALTHY_GPU = GpuHealth(HEALTHY)


@dataclass(slots=True)
class _GpuState:
    lost: bool = False
    last_critical_at: float | None = None
    critical_reasons: list[str] = field(default_factory=list)
    hot: bool = False
    temperature_c: float | None = None
    slowdown_c: float | None = None
    remap_pending: bool = False
    remap_failed: bool = False
    dbe_seen: int | None = None


class HealthTracker:
    """Health of one host's GPUs, by index, from what the agent observes."""

    def __init__(self, policy: HealthPolicy | None = None) -> None:
        self.policy = policy or HealthPolicy()
        self._gpus: dict[int, _GpuState] = {}

    def _gpu(self, index: int) -> _GpuState:
        return self._gpus.setdefault(index, _GpuState())

    # ------------------------------------------------------------------ inputs

    def xid(self, index: int, code: int, at: float) -> bool:
        """Record XID `code` on GPU `index`; returns True when it counts as critical."""
        if code in self.policy.ignored_xids:
            return False
        self._critical(index, f"XID {code}", at)
        return True

    def double_bit_ecc(self, index: int, at: float) -> None:
        """Record an uncorrectable ECC error on GPU `index`."""
        self._critical(index, "double-bit ECC error", at)

    def lost(self, index: int, at: float) -> None:
        """GPU `index` is gone from NVML (or NVML says it is lost)."""
        gpu = self._gpu(index)
        if not gpu.lost:
            gpu.lost = True
            self._critical(index, "lost from NVML", at)

    def reading(
        self,
        index: int,
        at: float,
        *,
        temperature_c: float | None = None,
        slowdown_c: float | None = None,
        ecc_volatile_dbe: int | None = None,
        remapped_rows_pending: bool | None = None,
        remapped_rows_failed: bool | None = None,
    ) -> None:
        """A telemetry reading of GPU `index` (it is present, so no longer lost).

        A rise in the volatile double-bit ECC count counts as an ECC event, so a
        backend without NVML events still trips the policy.
        """
        gpu = self._gpu(index)
        if gpu.lost:
            # Back from lost: it must now stay quiet for a full period before use.
            gpu.lost = False
            self._critical(index, "lost from NVML", at)
        if ecc_volatile_dbe is not None:
            if gpu.dbe_seen is not None and ecc_volatile_dbe > gpu.dbe_seen:
                self._critical(index, "double-bit ECC error", at)
            gpu.dbe_seen = ecc_volatile_dbe
        if remapped_rows_failed:
            self._critical(index, "row remapping failed", at)
        gpu.remap_failed = bool(remapped_rows_failed)
        gpu.remap_pending = bool(remapped_rows_pending)
        gpu.temperature_c = temperature_c
        gpu.slowdown_c = slowdown_c
        if temperature_c is not None:
            limit = slowdown_c if slowdown_c is not None else self.policy.default_slowdown_c
            if temperature_c >= limit:
                gpu.hot = True
            elif temperature_c <= limit - self.policy.temperature_hysteresis_c:
                gpu.hot = False

    def restore(self, index: int, reasons: tuple[str, ...], at: float) -> None:
        """Resume an unhealthy verdict recorded before a restart: a full quiet period from `at`.

        The tracker's memory does not survive the agent; the lease table's record
        does. Restarting must not put a faulty GPU straight back into service.
        """
        for reason in reasons or ("unhealthy before restart",):
            self._critical(index, reason, at)

    def forget(self, index: int) -> None:
        """Drop everything known about GPU `index` (it left the host for good)."""
        self._gpus.pop(index, None)

    def _critical(self, index: int, reason: str, at: float) -> None:
        gpu = self._gpu(index)
        if gpu.last_critical_at is None or at >= gpu.last_critical_at:
            gpu.last_critical_at = at
        if reason not in gpu.critical_reasons:
            gpu.critical_reasons.append(reason)

    # ------------------------------------------------------------------ output

    def health(self, index: int, now: float) -> GpuHealth:
        """GPU `index`'s health at `now` (healthy when nothing is known of it)."""
        gpu = self._gpus.get(index)
        if gpu is None:
            return HEALTHY_GPU
        if gpu.lost:
            return GpuHealth(UNHEALTHY, ("lost from NVML",))
        if gpu.remap_failed:
            return GpuHealth(UNHEALTHY, ("row remapping failed",))
        if gpu.last_critical_at is not None:
            quiet_until = gpu.last_critical_at + self.policy.quiet_period_s
            if now < quiet_until:
                return GpuHealth(UNHEALTHY, tuple(gpu.critical_reasons), until=quiet_until)
            gpu.last_critical_at = None
            gpu.critical_reasons.clear()
        reasons = []
        if gpu.hot:
            limit = gpu.slowdown_c if gpu.slowdown_c is not None else self.policy.default_slowdown_c
            temp = gpu.temperature_c if gpu.temperature_c is not None else limit
            where = "at or above" if temp >= limit else "cooling below"
            reasons.append(f"temperature {temp:.0f}°C {where} slowdown {limit:.0f}°C")
        if gpu.remap_pending:
            reasons.append("row remap pending: reset the GPU")
        if reasons:
            return GpuHealth(DEGRADED, tuple(reasons))
        return HEALTHY_GPU
