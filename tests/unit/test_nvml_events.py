"""NvmlDevices' event watcher against the fake pynvml's event sets.

Scenarios, as they happen on a host:
  1. an XID and an uncorrectable ECC error reach the agent as DeviceEvents, and
     the XID becomes the GPU's last_xid;
  2. a GPU that cannot report events is left out, the others still watched;
  3. NVML failing under the watcher: it logs, backs off, starts over, and never dies;
  4. a GPU that falls off the bus and comes back: "lost", then "recovered";
  5. stopping is prompt, and close() stops the watcher and frees its set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import pynvml
import pytest

from agent.devices import DeviceError, DeviceEvent, NvmlDevices
from agent.devices.base import EventQueue
from tests.fakes.fake_pynvml import FakeGpu, FakeNvml, h100_80gb

LOGGER = "agent.devices.nvml"
XID = pynvml.nvmlEventTypeXidCriticalError
DBE = pynvml.nvmlEventTypeDoubleBitEccError
SBE = pynvml.nvmlEventTypeSingleBitEccError
WATCHED = XID | DBE | SBE
WALL = 1_700_000_000.0  # the clock the watcher stamps events with


def eventually(condition: Callable[[], object], timeout: float = 2.0) -> None:
    """Wait until `condition()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout}s: {condition}")
        time.sleep(0.005)


def drain_until(devices: NvmlDevices, count: int, timeout: float = 2.0) -> list[DeviceEvent]:
    events: list[DeviceEvent] = []

    def enough() -> bool:
        events.extend(devices.drain_events())
        return len(events) >= count

    eventually(enough, timeout)
    return events


@pytest.fixture
def watched() -> Iterator[Callable[..., tuple[FakeNvml, NvmlDevices]]]:
    """Open NvmlDevices on fake GPUs with its watcher started (fast waits and retries); stops it after."""
    started: list[NvmlDevices] = []

    def start(gpus: list[FakeGpu], *, missing: tuple[str, ...] = ()) -> tuple[FakeNvml, NvmlDevices]:
        fake = FakeNvml(gpus, missing=missing)
        devices = NvmlDevices(fake, event_wait_ms=20, event_retry_s=(0.01, 0.05), clock=lambda: WALL)
        devices.open()
        devices.start_event_watcher()
        started.append(devices)
        eventually(
            lambda: all(fake.registered_events(i) for i, gpu in enumerate(gpus) if gpu.supported_events & WATCHED)
        )
        return fake, devices

    yield start
    for devices in started:
        devices.close()


# ---- 1. XID and ECC errors arrive as events


def test_xid_arrives_with_its_code_and_becomes_last_xid(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]],
) -> None:
    fake, devices = watched([h100_80gb(0), h100_80gb(1)])
    before = devices.sample(now=1.0)
    assert [(r.last_xid, r.xid_errors) for r in before] == [(0, 0), (0, 0)]  # watched, none seen

    assert fake.inject_event(1, XID, 79) == 1

    (event,) = drain_until(devices, 1)
    assert event == DeviceEvent(index=1, kind="xid", code=79, at=WALL, detail="GPU has fallen off the bus")
    fake.inject_event(1, XID, 48)
    drain_until(devices, 1)
    after = devices.sample(now=2.0)
    assert [(r.last_xid, r.xid_errors) for r in after] == [(0, 0), (48, 2)]
    assert devices.drain_events() == []  # drained once, gone


def test_unknown_xid_999_is_an_xid_not_a_lost_gpu(watched: Callable[..., tuple[FakeNvml, NvmlDevices]]) -> None:
    # NVML's header: "eventData is set as 999 for unknown xid error".
    fake, devices = watched([h100_80gb(0)])

    fake.inject_event(0, XID, 999)

    (event,) = drain_until(devices, 1)
    assert (event.kind, event.code, event.detail) == ("xid", 999, "an XID NVML could not identify")
    assert devices.sample(now=1.0)[0].last_xid == 999


def test_ecc_errors_and_mig_instances(watched: Callable[..., tuple[FakeNvml, NvmlDevices]]) -> None:
    fake, devices = watched([h100_80gb(0), h100_80gb(1)])

    fake.inject_event(0, DBE)
    fake.inject_event(1, SBE)
    fake.inject_event(1, XID, 94, gpu_instance=3, compute_instance=0)

    events = drain_until(devices, 3)
    assert [(e.index, e.kind, e.code) for e in events] == [(0, "ecc_dbe", None), (1, "ecc_sbe", None), (1, "xid", 94)]
    assert events[0].detail == "double-bit (uncorrectable) ECC error"
    assert events[2].detail == "contained ECC error (MIG GPU instance 3, compute instance 0)"
    # ECC events leave the XID state alone.
    assert [r.last_xid for r in devices.sample(now=1.0)] == [0, 94]


def test_registers_only_the_watched_types_a_gpu_supports(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]],
) -> None:
    # ECC disabled: the GPU lists no ECC events, so only XIDs are registered.
    fake, _ = watched([h100_80gb(0), h100_80gb(1, supported_events=XID | pynvml.nvmlEventTypePState)])

    assert fake.registered_events(0) == WATCHED  # not PState or clock changes
    assert fake.registered_events(1) == XID
    assert fake.inject_event(1, DBE) == 0  # nobody registered: NVML drops it


# ---- 2. a GPU that cannot report events


def test_gpu_without_event_support_is_skipped_and_logged_once(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]], caplog: pytest.LogCaptureFixture
) -> None:
    no_events = h100_80gb(1, supported_events=0)
    no_events.unsupported.add("nvmlDeviceGetSupportedEventTypes")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fake, devices = watched([h100_80gb(0), no_events, h100_80gb(2)])

        fake.inject_event(2, XID, 13)
        (event,) = drain_until(devices, 1)

    assert (event.index, event.code) == (2, 13)
    assert fake.registered_events(1) == 0
    readings = devices.sample(now=1.0)
    assert [(r.last_xid, r.xid_errors) for r in readings] == [(0, 0), (None, None), (13, 1)]
    messages = [r.getMessage() for r in caplog.records if "events" in r.getMessage()]
    assert messages == [
        "GPU 1 (GPU-00000001-1111-2222-3333-000000000001): events: Not Supported; "
        "not watching it for XID and ECC events"
    ]
    assert devices.watcher_error is None


def test_no_gpu_with_events_leaves_the_watcher_idle(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]],
) -> None:
    fake, devices = watched([h100_80gb(0, supported_events=pynvml.nvmlEventTypePState)])
    time.sleep(0.1)

    assert fake.calls["nvmlEventSetWait_v2"] == 0  # nothing registered: nothing to wait on
    assert devices.watcher_error is None
    assert devices.sample(now=1.0)[0].last_xid is None


# ---- 3. NVML failing under the watcher


def test_watcher_survives_an_nvml_error_and_recovers(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]], caplog: pytest.LogCaptureFixture
) -> None:
    fake, devices = watched([h100_80gb(0)])
    sets_created = fake.calls["nvmlEventSetCreate"]

    with caplog.at_level(logging.INFO, logger=LOGGER):
        fake.fail_next_waits(pynvml.NVML_ERROR_UNKNOWN, count=3)
        eventually(lambda: devices.watcher_error is not None)
        assert devices.watcher_error is not None and "Unknown Error" in devices.watcher_error
        eventually(lambda: devices.watcher_error is None and fake.registered_events(0))

        fake.inject_event(0, XID, 31)
        (event,) = drain_until(devices, 1)

    assert event.code == 31
    assert fake.calls["nvmlEventSetCreate"] == sets_created + 3  # a fresh set after each failure
    assert len(fake.event_sets) == 1  # the failed sets were freed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "watcher" in r.getMessage()]
    assert len(warnings) == 1  # three failures of one kind: logged once
    assert any("recovered after 3 failure(s)" in r.getMessage() for r in caplog.records)


def test_watcher_waits_out_nvml_down_then_registers_again(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]],
) -> None:
    fake, devices = watched([h100_80gb(0), h100_80gb(1)])

    fake.break_nvml(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)  # the driver goes away...
    eventually(lambda: devices.watcher_error is not None)
    assert "Driver Not Loaded" in (devices.watcher_error or "")
    fake.heal()  # ...and comes back; the sampler finds NVML gone, then initialises it again
    with pytest.raises(DeviceError):
        devices.sample(now=1.0)
    devices.sample(now=2.0)
    eventually(lambda: devices.watcher_error is None and fake.registered_events(1))

    fake.inject_event(1, XID, 79)
    assert [(e.index, e.code) for e in drain_until(devices, 1)] == [(1, 79)]


def test_wait_falls_back_to_the_unversioned_name(watched: Callable[..., tuple[FakeNvml, NvmlDevices]]) -> None:
    fake, devices = watched([h100_80gb(0)], missing=("nvmlEventSetWait_v2",))

    fake.inject_event(0, XID, 43)

    assert [e.code for e in drain_until(devices, 1)] == [43]
    with pytest.raises(AttributeError):
        fake.nvmlEventSetWait_v2  # noqa: B018 - the fake really lacks it


def test_the_wait_does_not_hold_the_sampling_lock() -> None:
    fake = FakeNvml([h100_80gb(0)])
    # A watcher that waits ten seconds at a time: sample() must not queue behind it.
    devices = NvmlDevices(fake, event_wait_ms=10_000)
    devices.open()
    devices.start_event_watcher()
    try:
        eventually(lambda: fake.calls["nvmlEventSetWait_v2"] == 1)
        started = time.monotonic()
        devices.sample(now=1.0)
        assert time.monotonic() - started < 0.5
    finally:
        fake.inject_event(0, XID, 1)  # wake the wait so the test ends at once
        devices.close()


# ---- 4. a GPU falling off the bus


def test_lost_and_recovered_are_emitted_once_each(watched: Callable[..., tuple[FakeNvml, NvmlDevices]]) -> None:
    fake, devices = watched([h100_80gb(0), h100_80gb(1)])
    devices.sample(now=1.0)

    fake.gpus[1].lost = True
    devices.sample(now=2.0)
    devices.sample(now=3.0)  # still lost: no second event
    fake.gpus[1].lost = False
    devices.sample(now=4.0)

    assert devices.drain_events() == [
        DeviceEvent(index=1, kind="lost", code=None, at=2.0, detail="memory: GPU is lost"),
        DeviceEvent(index=1, kind="recovered", code=None, at=4.0),
    ]
    # Back, and registered for events again.
    eventually(lambda: fake.registered_events(1) == WATCHED)
    fake.inject_event(1, XID, 79)
    assert [e.code for e in drain_until(devices, 1)] == [79]


def test_vanished_gpu_is_lost_and_replugged_one_recovers(
    watched: Callable[..., tuple[FakeNvml, NvmlDevices]],
) -> None:
    fake, devices = watched([h100_80gb(0), h100_80gb(1), h100_80gb(2)])
    gone = fake.unplug("GPU-00000001-1111-2222-3333-000000000001")

    devices.sample(now=1.0)
    fake.plug(gone)  # back at NVML position 2
    devices.sample(now=2.0)

    assert [(e.index, e.kind, e.detail) for e in devices.drain_events()] == [
        (1, "lost", "NVML no longer lists it"),
        (1, "recovered", ""),
    ]
    eventually(lambda: fake.registered_events(2) == WATCHED)
    fake.inject_event(2, XID, 79)  # NVML's position 2 is the backend's GPU 1
    assert [(e.index, e.code) for e in drain_until(devices, 1)] == [(1, 79)]


# ---- 5. stopping


def test_stop_is_prompt_and_frees_the_set() -> None:
    fake = FakeNvml([h100_80gb(0)])
    devices = NvmlDevices(fake)  # the default 500 ms wait
    devices.open()
    devices.start_event_watcher()
    devices.start_event_watcher()  # idempotent: one watcher
    eventually(lambda: fake.calls["nvmlEventSetWait_v2"] >= 1)
    assert [t.name for t in threading.enumerate()].count("nvml-event-watcher") == 1

    started = time.monotonic()
    devices.stop_event_watcher()
    assert time.monotonic() - started < 1.0
    assert fake.event_sets == [] and fake.calls["nvmlEventSetFree"] == 1
    assert "nvml-event-watcher" not in [t.name for t in threading.enumerate()]
    devices.stop_event_watcher()  # idempotent

    devices.start_event_watcher()  # and it starts again
    eventually(lambda: len(fake.event_sets) == 1)
    devices.close()  # close stops it before nvmlShutdown
    assert fake.event_sets == [] and fake.refcount == 0


def test_event_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown device event kind 'xid_error'"):
        DeviceEvent(index=0, kind="xid_error", code=79, at=WALL)


def test_undrained_events_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    queue = EventQueue(limit=3)

    with caplog.at_level(logging.WARNING, logger="agent.devices.base"):
        for code in range(1, 7):
            queue.put(DeviceEvent(index=0, kind="xid", code=code, at=WALL))

    assert [e.code for e in queue.drain()] == [4, 5, 6]  # the oldest went first
    assert queue.dropped == 3
    assert len(caplog.records) == 1  # one warning per overflow, not per event
    assert queue.drain() == []


def test_watcher_needs_open() -> None:
    devices = NvmlDevices(FakeNvml([h100_80gb(0)]))

    with pytest.raises(RuntimeError, match="not open"):
        devices.start_event_watcher()
    devices.stop_event_watcher()  # nothing to stop: fine
    assert devices.drain_events() == []
