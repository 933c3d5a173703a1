"""NvmlDevices against a fake pynvml that raises pynvml's real error classes.

Four scenarios, as a platform team meets them on real hosts:
  1. a normal HGX H100 80GB board: every field read and converted right;
  2. a GPU that does not support half the queries: None, logged once, not asked again;
  3. NVML failing as a whole mid-run, then recovering: DeviceError, then re-init;
  4. a GPU disappearing: GpuIsLost, or the device count dropping.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pynvml
import pytest

from agent.devices import DeviceError, GpuAffinity, GpuLink, GpuProcess, GpuReading, NvmlDevices, backend_from_config
from tests.fakes.fake_pynvml import MIB, FakeGpu, FakeNvml, h100_80gb, half_unsupported

LOGGER = "agent.devices.nvml"


def opened(
    gpus: list[FakeGpu], *, strings_as_bytes: bool = False, missing: tuple[str, ...] = ()
) -> tuple[FakeNvml, NvmlDevices]:
    fake = FakeNvml(gpus, strings_as_bytes=strings_as_bytes, missing=missing)
    devices = NvmlDevices(fake)
    devices.open()
    return fake, devices


# ---- 1. a normal H100 80GB HBM3 board


def busy_h100() -> FakeGpu:
    return h100_80gb(
        0,
        memory_used=40_000 * MIB + 512 * 1024,  # half a MiB more: MiB are floored, as nvidia-smi does
        utilization_gpu=87,
        utilization_memory=41,
        temperature=61,
        memory_temperature=70,
        power_usage_mw=312_456,
        power_limit_mw=700_000,
        total_energy_mj=123_456_789,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        ecc={
            (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC): 3,
            (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC): 1,
        },
        remapped_rows=(2, 0, 1, 0),
        pcie_replay_counter=5,
        processes=[(4242, 38 * 1024 * MIB), (4243, None)],
    )


def test_normal_h100_every_field_read_and_converted() -> None:
    fake, devices = opened([busy_h100(), h100_80gb(1)])

    readings = devices.sample(now=100.0)

    assert readings[0] == GpuReading(
        index=0,
        uuid="GPU-00000000-1111-2222-3333-000000000000",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:18:00.0",
        memory_total_mb=81559,
        memory_used_mb=40_000,  # nvmlMemory_v2: the driver's 480 MiB reservation is not "used"
        memory_free_mb=41_078,  # (81559 - 480 - 40000 MiB - half a MiB) floored
        utilization_gpu_pct=87.0,
        utilization_memory_pct=41.0,
        temperature_c=61.0,
        memory_temperature_c=70.0,
        power_draw_w=312.456,
        power_limit_w=700.0,
        total_energy_mj=123_456_789.0,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        ecc_volatile_sbe=3,
        ecc_volatile_dbe=0,
        ecc_aggregate_sbe=0,
        ecc_aggregate_dbe=1,
        retired_pages=None,  # Hopper remaps rows; page retirement answers NotSupported
        remapped_rows_correctable=2,
        remapped_rows_uncorrectable=0,
        remapped_rows_pending=True,
        remapped_rows_failed=False,
        pcie_replay_counter=5,
        xid_errors=None,
        mig_mode=False,
        processes=(GpuProcess(pid=4242, used_memory_mb=38 * 1024), GpuProcess(pid=4243, used_memory_mb=None)),
        sampled_at=100.0,
        gr_engine_active=0.87,
        temperature_slowdown_c=89.0,
        last_xid=None,  # the event watcher is not running
    )
    assert [r.index for r in readings] == [0, 1]
    assert readings[1].uuid == "GPU-00000001-1111-2222-3333-000000000001"
    assert readings[1].pci_bus_id == "00000000:2A:00.0"
    assert readings[1].processes == ()
    assert devices.degraded_reason is None


def test_unit_conversions() -> None:
    gpu = h100_80gb(
        0,
        memory_total=80 * 1024 * MIB,
        memory_used=MIB - 1,  # under one MiB floors to 0
        power_usage_mw=1,
        power_limit_mw=350_500,
        total_energy_mj=7,
        processes=[(1, 3 * MIB + MIB // 2)],
        mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE,
    )
    _, devices = opened([gpu])

    (reading,) = devices.sample(now=0.0)

    assert reading.memory_total_mb == 81920
    assert reading.memory_used_mb == 0
    assert reading.memory_free_mb == 81439  # (80 GiB - 480 MiB reserved - 1 MiB + 1 byte) floored
    assert reading.power_draw_w == 0.001
    assert reading.power_limit_w == 350.5
    assert reading.total_energy_mj == 7.0  # NVML's millijoules are dcgm's unit: passed through
    assert reading.processes == (GpuProcess(pid=1, used_memory_mb=3),)
    assert reading.mig_mode is True


def test_strings_from_older_bindings_arrive_as_bytes() -> None:
    _, devices = opened([h100_80gb(0)], strings_as_bytes=True)

    (reading,) = devices.sample(now=0.0)

    assert reading.uuid == "GPU-00000000-1111-2222-3333-000000000000"
    assert reading.name == "NVIDIA H100 80GB HBM3"
    assert reading.pci_bus_id == "00000000:18:00.0"


def test_hgx_topology_every_pair_over_nvswitch() -> None:
    _, devices = opened([h100_80gb(i) for i in range(4)])

    links = devices.topology()

    assert links == [
        GpuLink(a=a, b=b, relation="nvlink", nvlinks=18) for a in range(4) for b in range(a + 1, 4)
    ]


@pytest.mark.parametrize("strings_as_bytes", [False, True])
def test_pcie_topology_and_direct_nvlink_bridge(strings_as_bytes: bool) -> None:
    # GPUs 0 and 1 share a PCIe switch and a 4-link NVLink bridge; 2 sits on the
    # other switch of the same NUMA node; 3 on the other socket.
    bus = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3A:00.0", "00000000:9A:00.0"]
    gpus = [
        h100_80gb(0, nvlinks=[bus[1]] * 4, pcie_switch=0),
        h100_80gb(1, nvlinks=[bus[0]] * 4, pcie_switch=0),
        h100_80gb(2, nvlinks=[], pcie_switch=1),
        h100_80gb(3, nvlinks=[], pcie_switch=2, numa_node=1),
    ]
    _, devices = opened(gpus, strings_as_bytes=strings_as_bytes)  # remote bus ids as bytes too

    links = {(link.a, link.b): (link.relation, link.nvlinks) for link in devices.topology()}

    assert links == {
        (0, 1): ("nvlink", 4),
        (0, 2): ("numa_node", 0),
        (0, 3): ("cross_cpu", 0),
        (1, 2): ("numa_node", 0),
        (1, 3): ("cross_cpu", 0),
        (2, 3): ("cross_cpu", 0),
    }


def test_every_pcie_level_of_nvml_keeps_its_own_relation() -> None:
    # One NUMA node: 0 and 1 on switches under one upstream switch (MULTIPLE), 2 on another
    # switch of their host bridge (HOSTBRIDGE), 3 behind another host bridge (NODE).
    gpus = [
        h100_80gb(0, nvlinks=[], pcie_switch=0, upstream_switch=0, host_bridge=0),
        h100_80gb(1, nvlinks=[], pcie_switch=1, upstream_switch=0, host_bridge=0),
        h100_80gb(2, nvlinks=[], pcie_switch=2, host_bridge=0),
        h100_80gb(3, nvlinks=[], pcie_switch=3, host_bridge=1),
    ]
    _, devices = opened(gpus)

    links = {(link.a, link.b): link.relation for link in devices.topology()}

    assert links == {
        (0, 1): "pcie_switches",
        (0, 2): "host_bridge",
        (0, 3): "numa_node",
        (1, 2): "host_bridge",
        (1, 3): "numa_node",
        (2, 3): "numa_node",
    }


def test_nvlink_permission_denied_leaves_link_count_unknown() -> None:
    gpus = [h100_80gb(0), h100_80gb(1, pcie_switch=0)]
    gpus[1].errors["nvmlDeviceGetNvLinkState"] = pynvml.NVML_ERROR_NO_PERMISSION
    _, devices = opened(gpus)

    assert devices.topology() == [GpuLink(a=0, b=1, relation="pcie_switch", nvlinks=None)]


def test_numa_node_and_cpus_from_nvml() -> None:
    # A DGX H100's first and last GPU: one on each socket, hyperthreads numbered after the cores.
    gpus = [h100_80gb(0, numa_node=0, cpus="0-55,112-167"), h100_80gb(7, numa_node=1, cpus="56-111,168-223")]
    fake, devices = opened(gpus)

    assert devices.affinity() == [
        GpuAffinity(index=0, numa_node=0, cpu_list="0-55,112-167"),
        GpuAffinity(index=1, numa_node=1, cpu_list="56-111,168-223"),
    ]
    assert fake.calls["nvmlDeviceGetCpuAffinity"] == 2


def sysfs_device(root: Path, bus_id: str, numa_node: str, cpulist: str) -> None:
    device = root / "bus" / "pci" / "devices" / bus_id
    device.mkdir(parents=True)
    (device / "numa_node").write_text(numa_node + "\n")
    (device / "local_cpulist").write_text(cpulist + "\n")


@pytest.mark.parametrize("how", ["binding", "unsupported"])
def test_numa_node_and_cpus_from_sysfs_where_nvml_cannot_say(how: str, tmp_path: Path) -> None:
    sysfs_device(tmp_path, "0000:18:00.0", "1", "32-63")
    sysfs_device(tmp_path, "0000:2a:00.0", "-1", "0-63")  # no NUMA: the kernel writes -1
    gpus = [h100_80gb(0), h100_80gb(1)]
    missing: tuple[str, ...] = ()
    if how == "binding":  # an nvidia-ml-py older than both queries
        missing = ("nvmlDeviceGetNumaNodeId", "nvmlDeviceGetCpuAffinity")
    else:
        for gpu in gpus:
            gpu.unsupported |= {"nvmlDeviceGetNumaNodeId", "nvmlDeviceGetCpuAffinity"}
    fake = FakeNvml(gpus, missing=missing)
    devices = NvmlDevices(fake, sysfs=tmp_path)
    devices.open()

    assert devices.affinity() == [
        GpuAffinity(index=0, numa_node=1, cpu_list="32-63"),
        GpuAffinity(index=1, numa_node=None, cpu_list="0-63"),
    ]


def test_an_empty_cpu_mask_and_no_sysfs_read_as_unknown(tmp_path: Path) -> None:
    fake = FakeNvml([h100_80gb(0, cpus="")])
    devices = NvmlDevices(fake, sysfs=tmp_path)
    devices.open()

    assert devices.affinity() == [GpuAffinity(index=0, numa_node=0, cpu_list=None)]


def test_a_lost_gpu_is_left_out_of_the_affinities() -> None:
    gpus = [h100_80gb(0), h100_80gb(1)]
    _, devices = opened(gpus)
    gpus[0].lost = True

    assert [a.index for a in devices.affinity()] == [1]


def test_affinity_fails_as_a_whole_when_nvml_does() -> None:
    fake, devices = opened([h100_80gb(0)])
    fake.break_nvml(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    with pytest.raises(DeviceError):
        devices.affinity()


def test_memory_v2_leaves_the_reservation_out_as_nvidia_smi_does() -> None:
    # On an idle H100, driver 580: nvidia-smi shows 480 MiB reserved, 0 MiB used, 81079 MiB free.
    fake, devices = opened([h100_80gb(0, memory_used=0)])

    (reading,) = devices.sample(now=0.0)

    assert (reading.memory_total_mb, reading.memory_used_mb, reading.memory_free_mb) == (81559, 0, 81079)
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 1


@pytest.mark.parametrize("missing", ["driver", "binding"])
def test_memory_falls_back_to_v1_where_v2_is_missing(missing: str, caplog: pytest.LogCaptureFixture) -> None:
    gpu = h100_80gb(0, memory_used=0)
    if missing == "driver":  # pynvml looks up nvmlDeviceGetMemoryInfo_v2 in an older libnvidia-ml
        gpu.errors["nvmlDeviceGetMemoryInfo_v2"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fake, devices = opened([gpu], missing=("nvmlMemory_v2",) if missing == "binding" else ())
        first = devices.sample(now=0.0)[0]
        second = devices.sample(now=1.0)[0]

    for reading in (first, second):
        # v1 counts the reservation as used; free is the same either way.
        assert (reading.memory_used_mb, reading.memory_free_mb) == (480, 81079)
    assert devices.degraded_reason is None
    expected_calls = 3 if missing == "driver" else 2  # v2 is not asked again once it failed
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == expected_calls
    logged = [r.getMessage() for r in caplog.records if "memory_v2" in r.getMessage()]
    assert len(logged) == (1 if missing == "driver" else 0)


def test_compute_and_graphics_processes_once_per_pid() -> None:
    gpu = h100_80gb(
        0,
        processes=[(100, 2 * 1024 * MIB), (101, MIB)],
        graphics_processes=[(101, MIB), (200, 64 * MIB)],  # 101 uses CUDA and OpenGL/Vulkan both
    )
    _, devices = opened([gpu])

    (reading,) = devices.sample(now=0.0)

    assert reading.processes == (
        GpuProcess(pid=100, used_memory_mb=2048),
        GpuProcess(pid=101, used_memory_mb=1),
        GpuProcess(pid=200, used_memory_mb=64),
    )


def test_graphics_processes_unsupported_leaves_the_compute_list() -> None:
    gpu = h100_80gb(0, processes=[(100, MIB)])
    gpu.unsupported.add("nvmlDeviceGetGraphicsRunningProcesses")
    _, devices = opened([gpu])

    (reading,) = devices.sample(now=0.0)

    assert reading.processes == (GpuProcess(pid=100, used_memory_mb=1),)
    assert devices.degraded_reason is None


def test_slowdown_temperature_is_read_once() -> None:
    fake, devices = opened([h100_80gb(0, utilization_gpu=42)])

    readings = [devices.sample(now=float(t))[0] for t in range(3)]

    assert [r.temperature_slowdown_c for r in readings] == [89.0] * 3
    assert fake.calls["nvmlDeviceGetTemperatureThreshold"] == 1
    assert readings[0].gr_engine_active == pytest.approx(0.42)  # utilization.gpu / 100


def test_slowdown_temperature_read_again_after_a_transient_failure() -> None:
    fake, devices = opened([h100_80gb(0)])
    fake.gpus[0].errors["nvmlDeviceGetTemperatureThreshold"] = pynvml.NVML_ERROR_UNKNOWN

    (first,) = devices.sample(now=0.0)
    del fake.gpus[0].errors["nvmlDeviceGetTemperatureThreshold"]
    (second,) = devices.sample(now=1.0)
    devices.sample(now=2.0)

    assert (first.temperature_slowdown_c, second.temperature_slowdown_c) == (None, 89.0)
    assert fake.calls["nvmlDeviceGetTemperatureThreshold"] == 2


# ---- 2. a GPU that does not support half the queries


def test_unsupported_queries_read_none_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake, devices = opened([h100_80gb(0), half_unsupported(h100_80gb(1))])

    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = devices.sample(now=1.0)
        calls_after_first = fake.calls.copy()
        second = devices.sample(now=2.0)
        devices.sample(now=3.0)

    healthy, partial = second
    assert healthy.ecc_volatile_sbe == 0 and healthy.total_energy_mj == 1_000_000.0
    for reading in (first[1], partial):
        assert reading.memory_temperature_c is None
        assert reading.total_energy_mj is None  # FunctionNotFound
        assert reading.processes is None  # NoPermission
        assert (reading.ecc_volatile_sbe, reading.ecc_volatile_dbe) == (None, None)
        assert (reading.ecc_aggregate_sbe, reading.ecc_aggregate_dbe) == (None, None)
        assert reading.retired_pages is None
        assert reading.remapped_rows_correctable is None and reading.remapped_rows_pending is None
        assert reading.pcie_replay_counter is None
        assert reading.mig_mode is None
        # ... while the supported half still reads.
        assert reading.memory_used_mb == 512
        assert reading.utilization_gpu_pct == 0.0
        assert reading.temperature_c == 33.0
        assert reading.power_draw_w == 71.0
        assert reading.sm_clock_mhz == 1980
    assert devices.degraded_reason is None  # unsupported is normal, not degraded

    # Not asked again: only the healthy GPU's four ECC counters per later sample.
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] - calls_after_first["nvmlDeviceGetTotalEccErrors"] == 8
    assert fake.calls["nvmlDeviceGetMigMode"] - calls_after_first["nvmlDeviceGetMigMode"] == 2

    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    about_gpu1 = [m for m in messages if m.startswith("GPU 1 ")]
    fields = sorted(m.split(": ")[1] for m in about_gpu1)
    assert fields == sorted(
        [
            "memory_temperature",
            "total_energy",
            "ecc_volatile_sbe",
            "ecc_volatile_dbe",
            "ecc_aggregate_sbe",
            "ecc_aggregate_dbe",
            "retired_pages",
            "remapped_rows",
            "pcie_replay_counter",
            "processes",
            "mig_mode",
            "temperature_slowdown",
        ]
    )
    # The healthy H100 logs only its unsupported page retirement, once.
    assert [m.split(": ")[1] for m in messages if m.startswith("GPU 0 ")] == ["retired_pages"]


def test_transient_field_error_is_degraded_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    fake, devices = opened([h100_80gb(0)])
    fake.gpus[0].errors["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_UNKNOWN

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        (first,) = devices.sample(now=1.0)
        (second,) = devices.sample(now=2.0)

    assert first.temperature_c is None and second.temperature_c is None
    assert devices.degraded_reason == "GPU 0: temperature failed: Unknown Error"
    assert len([r for r in caplog.records if "temperature" in r.getMessage()]) == 1
    assert fake.calls["nvmlDeviceGetTemperature"] == 2  # transient: asked again

    del fake.gpus[0].errors["nvmlDeviceGetTemperature"]
    (third,) = devices.sample(now=3.0)
    assert third.temperature_c == 33.0
    assert devices.degraded_reason is None


# ---- 3. NVML failing as a whole mid-run, then recovering


@pytest.mark.parametrize(
    "code",
    [pynvml.NVML_ERROR_UNKNOWN, pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED],
)
def test_nvml_fails_mid_run_then_recovers(code: int) -> None:
    fake, devices = opened([h100_80gb(0), h100_80gb(1)])
    before = devices.sample(now=1.0)

    fake.break_nvml(code)
    with pytest.raises(DeviceError):
        devices.sample(now=2.0)
    assert devices.degraded_reason is not None
    assert str(pynvml.NVMLError(code)) in devices.degraded_reason
    # Still broken: the next sample tries nvmlInit again and fails again.
    with pytest.raises(DeviceError, match="NVML could not start"):
        devices.sample(now=3.0)
    assert fake.calls["nvmlInit"] == 2

    fake.heal()
    after = devices.sample(now=4.0)

    assert fake.calls["nvmlInit"] == 3
    # Each failed session was shut down before the next nvmlInit; only a shutdown
    # that itself failed (Unknown) leaves its reference behind, which is harmless.
    assert fake.refcount == (2 if code == pynvml.NVML_ERROR_UNKNOWN else 1)
    assert [(r.index, r.uuid) for r in after] == [(r.index, r.uuid) for r in before]
    assert devices.degraded_reason is None


def test_unknown_error_on_every_gpu_fails_the_backend() -> None:
    fake, devices = opened([h100_80gb(0), h100_80gb(1)])
    for gpu in fake.gpus:
        gpu.errors["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_UNKNOWN

    with pytest.raises(DeviceError, match="NVML failed on every GPU"):
        devices.sample(now=1.0)


def test_unknown_error_on_one_gpu_leaves_it_out() -> None:
    fake, devices = opened([h100_80gb(0), h100_80gb(1)])
    fake.gpus[1].errors["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_UNKNOWN

    readings = devices.sample(now=1.0)

    assert [r.index for r in readings] == [0]
    assert devices.degraded_reason == (
        "GPU 1 (GPU-00000001-1111-2222-3333-000000000001) did not answer: memory: Unknown Error"
    )


def test_open_fails_cleanly_without_a_driver() -> None:
    fake = FakeNvml([h100_80gb(0)])
    fake.break_nvml(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    devices = NvmlDevices(fake)

    with pytest.raises(DeviceError, match="NVML could not start: NVML Shared Library Not Found"):
        devices.open()
    with pytest.raises(RuntimeError, match="not open"):
        devices.sample(now=0.0)


def test_close_shuts_nvml_down_once() -> None:
    fake, devices = opened([h100_80gb(0)])

    devices.close()
    devices.close()

    assert fake.refcount == 0
    assert fake.calls["nvmlShutdown"] == 1
    with pytest.raises(RuntimeError, match="not open"):
        devices.sample(now=0.0)


# ---- 4. a GPU that disappears


def test_gpu_is_lost_left_out_then_back() -> None:
    fake, devices = opened([h100_80gb(0), h100_80gb(1), h100_80gb(2)])
    fake.gpus[1].lost = True

    readings = devices.sample(now=1.0)

    assert [r.index for r in readings] == [0, 2]
    assert devices.degraded_reason == "GPU 1 (GPU-00000001-1111-2222-3333-000000000001) lost: memory: GPU is lost"
    assert [(link.a, link.b) for link in devices.topology()] == [(0, 2)]

    fake.gpus[1].lost = False
    assert [r.index for r in devices.sample(now=2.0)] == [0, 1, 2]
    assert devices.degraded_reason is None


def test_gpu_vanishing_keeps_the_other_indices() -> None:
    fake, devices = opened([h100_80gb(0), h100_80gb(1), h100_80gb(2)])
    gone = fake.unplug("GPU-00000001-1111-2222-3333-000000000001")  # NVML's count drops to 2

    readings = devices.sample(now=1.0)

    # NVML now calls the third GPU index 1; the backend keeps calling it 2.
    assert [(r.index, r.uuid) for r in readings] == [
        (0, "GPU-00000000-1111-2222-3333-000000000000"),
        (2, "GPU-00000002-1111-2222-3333-000000000002"),
    ]
    assert devices.degraded_reason == "GPU 1 (GPU-00000001-1111-2222-3333-000000000001) lost: NVML no longer lists it"

    fake.plug(gone)  # back, at NVML's index 2 now
    readings = devices.sample(now=2.0)
    assert [(r.index, r.uuid[:12]) for r in readings] == [
        (0, "GPU-00000000"),
        (1, "GPU-00000001"),
        (2, "GPU-00000002"),
    ]
    assert devices.degraded_reason is None


def test_gpu_lost_at_open_is_reported() -> None:
    fake = FakeNvml([h100_80gb(0), h100_80gb(1)])
    fake.gpus[0].lost = True
    devices = NvmlDevices(fake)
    devices.open()

    readings = devices.sample(now=1.0)

    assert [r.index for r in readings] == [1]
    assert devices.degraded_reason == "GPU at NVML index 0 cannot be identified: GPU is lost"


# ---- choosing the backend


def test_backend_from_config_nvml_does_not_touch_the_driver() -> None:
    backend = backend_from_config("nvml", "4xH100-80GB")  # the fleet spec only matters when simulated

    assert isinstance(backend, NvmlDevices)
    assert backend.kind == "nvml"
    assert backend.degraded_reason is None
