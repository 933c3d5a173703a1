"""Tell systemd how the agent is doing: the sd_notify protocol, and a watchdog that means something.

Theory of operation
-------------------
Under ``Type=notify`` systemd hands the service ``$NOTIFY_SOCKET``, a unix
datagram socket (in the abstract namespace when the name starts with ``@``),
and reads newline-separated ``KEY=value`` assignments from each datagram
(sd_notify(3)). That is the whole protocol, so it is implemented here in a few
lines rather than through a library: python-systemd needs libsystemd's headers
and a compiler on every GPU host, and the `sdnotify` package has been
unmaintained for years. Without ``$NOTIFY_SOCKET`` (run by hand, in tests,
under another supervisor) every call is a no-op.

What the agent says (agent/app.py decides when):

* ``READY=1`` once the HTTP port is bound and the gossip membership is running.
  It does not wait for ``[cluster] join`` to succeed: agents may start in any
  order, and a first server whose seeds are still down would otherwise time out
  its own start and be restarted in a loop. How many members are alive is in
  ``STATUS=`` instead.
* ``STATUS=…`` one line for ``systemctl status``: role, node, GPUs (and
  unhealthy ones), members alive, and the degraded reason when there is one;
  re-sent whenever it changes.
* ``RELOADING=1`` (with ``MONOTONIC_USEC``) then ``READY=1`` around a SIGHUP reload.
* ``STOPPING=1`` as soon as SIGTERM arrives.
* ``WATCHDOG=1`` every ``WatchdogSec/2`` (``$WATCHDOG_USEC`` / 2), when
  ``$WATCHDOG_PID`` is unset or names this process, from a trio task that
  pings only while the device sampler is not stuck (`SampleWatch`). A blocked
  trio loop sends nothing because the task cannot run; a hung NVML call stops
  the pings because the sampler check fails. Either way systemd kills and
  restarts the agent after ``WatchdogSec``. A backend that *fails* quickly
  (driver gone, GPU lost) is not stuck: the agent stays up and reports itself
  degraded, since a restart would not bring the GPU back and a host must keep
  answering for its GPUs' health.

Test hook
---------
``GPU_AGENT_TEST_HANG_SAMPLER_AFTER_S=<seconds>`` makes every device sample
started that long after the backend was opened block until the backend is
closed, as a hung NVML call would. It exists only so that
tests/integration/test_systemd_notify.py can show the pings stop; it is read
only by `SampleWatch.from_environ` and logged loudly when set.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import trio

from agent.devices.base import DeviceBackend, DeviceError, DeviceEvent, GpuAffinity, GpuLink, GpuReading

log = logging.getLogger(__name__)

TEST_HANG_ENV = "GPU_AGENT_TEST_HANG_SAMPLER_AFTER_S"
# How often the STATUS= line is recomputed (and re-sent if it changed).
STATUS_REFRESH_S = 2.0


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; does nothing without one."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace)."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; return False if it could not be sent.

        Never raises and never blocks: systemd not reading its socket must not
        stall the agent, so a full socket buffer drops the message (logged).
        """
        if self._socket is None or self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._socket.sendto("\n".join(assignments).encode(), target)
        except OSError as error:
            log.warning("sd_notify to %s failed: %s", self.address, error)
            return False
        return True

    def status(self, text: str) -> bool:
        # STATUS is one line: a newline would start another assignment.
        return self.notify("STATUS=" + " ".join(text.split()))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is asked of us.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or
    ``$WATCHDOG_PID`` names another process (sd_watchdog_enabled(3)).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6 / 2


def reloading_assignments() -> tuple[str, str]:
    """RELOADING=1 with the monotonic timestamp systemd (253+) matches it against."""
    return "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


async def run_watchdog(notifier: Notifier, interval_s: float, sampler_ok: Callable[[], str | None]) -> None:
    """Send WATCHDOG=1 every `interval_s` while `sampler_ok()` returns None (its reason otherwise)."""
    withheld: str | None = None
    while True:
        problem = sampler_ok()
        if problem is None:
            notifier.notify("WATCHDOG=1")
            if withheld is not None:
                log.warning("device sampler responsive again; resuming watchdog pings")
        elif problem != withheld:
            log.error("withholding the systemd watchdog ping (systemd will restart the agent): %s", problem)
        withheld = problem
        await trio.sleep(interval_s)


async def run_status(notifier: Notifier, status: Callable[[], str]) -> None:
    """Send the STATUS= line now and whenever it changes (checked every STATUS_REFRESH_S)."""
    sent = ""
    while True:
        line = status()
        if line != sent and notifier.status(line):
            sent = line
        await trio.sleep(STATUS_REFRESH_S)


class SampleWatch(DeviceBackend):
    """The device backend, watched: how long the call in progress (if any) has been running.

    Wraps the real backend for the sampler, so the watchdog can tell a sampler
    that is stuck inside the backend from one that is failing quickly or
    backing off. Every other method passes straight through.
    """

    def __init__(
        self,
        inner: DeviceBackend,
        *,
        stall_s: float,
        hang_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.stall_s = stall_s
        self._clock = clock
        self._hang_after_s = hang_after_s
        self._opened_at: float | None = None
        self._in_call_since: float | None = None
        self._closed = threading.Event()

    @classmethod
    def from_environ(cls, inner: DeviceBackend, *, stall_s: float, environ: Mapping[str, str]) -> SampleWatch:
        """Watch `inner`; honour the test hook (module docstring) if the environment sets it."""
        hang: float | None = None
        text = environ.get(TEST_HANG_ENV, "")
        if text:
            hang = float(text)
            log.warning("TEST HOOK %s=%s: device samples will hang after %gs", TEST_HANG_ENV, text, hang)
        return cls(inner, stall_s=stall_s, hang_after_s=hang)

    def problem(self) -> str | None:
        """Why the sampler counts as stuck (a backend call running past `stall_s`), or None."""
        since = self._in_call_since
        if since is None:
            return None
        running = self._clock() - since
        if running <= self.stall_s:
            return None
        return f"a device sample has been running for {running:.0f}s (limit {self.stall_s:g}s)"

    def open(self) -> None:
        self.inner.open()
        self._opened_at = self._clock()

    def sample(self, now: float) -> list[GpuReading]:
        self._in_call_since = self._clock()
        try:
            opened = self._opened_at
            if self._hang_after_s is not None and opened is not None and self._clock() - opened >= self._hang_after_s:
                self._closed.wait()
                raise DeviceError("the backend was closed during a hung sample (test hook)")
            return self.inner.sample(now)
        finally:
            self._in_call_since = None

    def topology(self) -> list[GpuLink]:
        return self.inner.topology()

    def affinity(self) -> list[GpuAffinity]:
        return self.inner.affinity()

    def close(self) -> None:
        self._closed.set()
        self.inner.close()

    def set_leases(self, leased: Mapping[int, str]) -> None:
        self.inner.set_leases(leased)

    @property
    def degraded_reason(self) -> str | None:
        return self.inner.degraded_reason

    @property
    def watcher_error(self) -> str | None:
        return self.inner.watcher_error

    def drain_events(self) -> list[DeviceEvent]:
        return self.inner.drain_events()

    def start_event_watcher(self) -> None:
        self.inner.start_event_watcher()

    def stop_event_watcher(self) -> None:
        self.inner.stop_event_watcher()
