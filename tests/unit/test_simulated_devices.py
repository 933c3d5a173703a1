"""The simulated GPU fleet: spec parsing, reproducible dynamics, fault injection."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from agent.devices import (
    DeviceEvent,
    GpuAffinity,
    GpuLink,
    GpuReading,
    SimulatedDevices,
    SimulatedFault,
    backend_from_config,
    parse_fault_schedule,
    parse_simulate_spec,
)
from agent.devices.simulated import MAX_SIMULATED_GPUS

WALL = 1_700_000_000.0  # what the fault hooks' clock says


def fleet(spec: str, seed: int = 7) -> SimulatedDevices:
    devices = SimulatedDevices(
        parse_simulate_spec(spec), seed=seed, faults=parse_fault_schedule(spec), clock=lambda: WALL
    )
    devices.open()
    return devices


def run(devices: SimulatedDevices, start: float, stop: float, step: float = 0.5) -> list[list[GpuReading]]:
    """Sample every `step` seconds from `start` to `stop` inclusive."""
    samples = []
    now = start
    while now <= stop + 1e-9:
        samples.append(devices.sample(now))
        now += step
    return samples


# ---- parsing the fleet


def test_parse_catalog_models_in_index_order() -> None:
    specs = parse_simulate_spec("4xH100-80GB,2xA100-40GB")

    assert [s.model for s in specs] == ["H100-80GB"] * 4 + ["A100-40GB"] * 2
    assert (specs[0].name, specs[0].memory_total_mb, specs[0].power_limit_w) == (
        "NVIDIA H100 80GB HBM3",
        81559,
        700.0,
    )
    assert (specs[4].name, specs[4].memory_total_mb) == ("NVIDIA A100-SXM4-40GB", 40960)


def test_parse_is_forgiving_about_case_spaces_and_a_missing_count() -> None:
    specs = parse_simulate_spec(" 2 x h100-80gb , L4-24GB,RTX4090-24GB")

    assert [s.name for s in specs] == ["NVIDIA H100 80GB HBM3"] * 2 + ["NVIDIA L4", "NVIDIA GeForce RTX 4090"]


def test_parse_accepts_any_name_with_a_memory_size() -> None:
    specs = parse_simulate_spec("2xMI300X-192GB,B200-180GB")

    assert [(s.model, s.name, s.memory_total_mb) for s in specs] == [
        ("MI300X-192GB", "Simulated MI300X", 192 * 1024),
        ("MI300X-192GB", "Simulated MI300X", 192 * 1024),
        ("B200-180GB", "Simulated B200", 180 * 1024),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty simulated fleet"),
        ("   ", "empty simulated fleet"),
        ("4xH100-80GB,", "empty item"),
        ("0xH100-80GB", "needs at least 1 GPU"),
        ("-1xH100-80GB", "bad GPU count '-1'"),
        ("1.5xH100-80GB", "bad GPU count '1.5'"),
        ("twoxH100-80GB", "bad GPU count 'two'"),
        ("4xH100", r"expected \[COUNTx\]MODEL-<N>GB"),
        ("4x", r"expected \[COUNTx\]MODEL-<N>GB"),
        ("4xH100-0GB", "memory must be at least 1 GB"),
        ("4xH100 80GB", r"expected \[COUNTx\]MODEL-<N>GB"),
        (f"{MAX_SIMULATED_GPUS + 1}xH100-80GB", "more than 64 GPUs"),
        ("32xH100-80GB,33xL4-24GB", "more than 64 GPUs"),
        ("99999999999999999999xT4-16GB", "more than 64 GPUs"),
    ],
)
def test_parse_rejects_bad_specs_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_simulate_spec(spec)


def test_sixty_four_gpus_is_the_limit_not_past_it() -> None:
    assert len(parse_simulate_spec("64xT4-16GB")) == 64


# ---- identity and idle state


def test_uuids_and_bus_ids_are_stable_per_seed_and_unique() -> None:
    a = fleet("8xH100-80GB,2xL4-24GB", seed=7).sample(0.0)
    b = fleet("8xH100-80GB,2xL4-24GB", seed=7).sample(0.0)
    c = fleet("8xH100-80GB,2xL4-24GB", seed=8).sample(0.0)

    assert [r.uuid for r in a] == [r.uuid for r in b]
    assert len({r.uuid for r in a} | {r.uuid for r in c}) == 20
    for reading in a:
        assert reading.uuid.startswith("GPU-")
        assert uuid.UUID(reading.uuid[4:]).version == 4
    assert [r.pci_bus_id for r in a[:3]] == ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3A:00.0"]
    assert a[8].pci_bus_id == "00000001:18:00.0"  # the ninth GPU starts a second board
    assert len({r.pci_bus_id for r in a}) == 10


def test_idle_gpus_look_idle_and_every_field_is_filled() -> None:
    devices = fleet("2xH100-80GB")

    for reading in run(devices, 0.0, 30.0)[-1]:
        assert reading.utilization_gpu_pct is not None and reading.utilization_gpu_pct <= 2.0
        assert reading.memory_used_mb is not None and 256 <= reading.memory_used_mb <= 640
        assert reading.memory_free_mb == 81559 - reading.memory_used_mb
        assert reading.temperature_c is not None and 30.0 <= reading.temperature_c <= 35.0
        assert reading.power_draw_w is not None and 70.0 <= reading.power_draw_w < 80.0
        assert reading.processes == ()
        assert reading.sampled_at == 30.0
        assert all(getattr(reading, f.name) is not None for f in dataclasses.fields(reading))
        assert (reading.ecc_volatile_dbe, reading.retired_pages, reading.xid_errors, reading.mig_mode) == (
            0,
            0,
            0,
            False,
        )
    assert devices.degraded_reason is None


# ---- load follows leases


def test_leased_gpu_ramps_to_its_busy_level_and_back() -> None:
    devices = fleet("2xH100-80GB")
    run(devices, 0.0, 5.0)
    devices.set_leases({0: "alloc-a"})

    ramp = run(devices, 5.5, 40.0)
    util = [s[0].utilization_gpu_pct or 0.0 for s in ramp]
    temps = [s[0].temperature_c or 0.0 for s in ramp]
    busy = ramp[-1][0]

    assert util[0] < 0.5 * util[-1]  # half a second in, still climbing
    assert 59.0 <= util[-1] <= 99.0
    assert max(util[16:]) - min(util[16:]) <= 4.0  # settled after ~8 s: only jitter left
    assert busy.memory_used_mb is not None and busy.memory_used_mb >= 0.4 * 81559 * 0.95
    # Temperature lags utilisation: a few seconds in it has not got halfway yet.
    assert temps[4] < temps[0] + 0.5 * (temps[-1] - temps[0])
    assert temps[-1] > 55.0
    assert busy.processes is not None and len(busy.processes) == 1
    assert busy.processes[0].used_memory_mb is not None and busy.processes[0].used_memory_mb > 30_000
    # The GPU nobody leased stayed idle.
    assert (ramp[-1][1].utilization_gpu_pct or 0.0) <= 2.0 and ramp[-1][1].processes == ()

    devices.set_leases({})
    cooled = run(devices, 40.5, 100.0)[-1][0]
    assert cooled.utilization_gpu_pct is not None and cooled.utilization_gpu_pct <= 2.0
    assert cooled.memory_used_mb is not None and cooled.memory_used_mb <= 640
    assert cooled.temperature_c is not None and cooled.temperature_c <= 36.0
    assert cooled.processes == ()


def test_power_follows_utilization_and_energy_integrates_it() -> None:
    devices = fleet("1xH100-80GB")
    devices.set_leases({0: "alloc-a"})

    readings = [s[0] for s in run(devices, 10.0, 20.0, step=0.25)]

    for r in readings:
        assert r.utilization_gpu_pct is not None
        assert r.power_draw_w == pytest.approx(70.0 + r.utilization_gpu_pct / 100.0 * (700.0 - 70.0))
    assert readings[0].total_energy_mj == 0.0  # the first sample has no interval behind it
    for before, after in zip(readings, readings[1:]):
        assert before.power_draw_w is not None and after.power_draw_w is not None
        assert before.total_energy_mj is not None and after.total_energy_mj is not None
        expected = (before.power_draw_w + after.power_draw_w) / 2.0 * 0.25 * 1000.0
        assert after.total_energy_mj - before.total_energy_mj == pytest.approx(expected)


def test_busy_level_is_per_lease_and_reproducible() -> None:
    def settled(seed: int, allocation_id: str) -> GpuReading:
        devices = fleet("1xH100-80GB", seed=seed)
        devices.set_leases({0: allocation_id})
        return run(devices, 0.0, 30.0)[-1][0]

    first, again, other = settled(7, "alloc-a"), settled(7, "alloc-a"), settled(7, "alloc-b")

    assert first == again
    assert first.memory_used_mb != other.memory_used_mb
    assert first.processes != other.processes


def test_same_inputs_same_readings() -> None:
    def script(seed: int) -> list[list[GpuReading]]:
        devices = fleet("2xH100-80GB,1xL4-24GB", seed=seed)
        out = run(devices, 0.0, 3.0)
        devices.set_leases({0: "a", 2: "b"})
        out += run(devices, 3.1, 9.0, step=0.7)
        devices.inject_xid(1, 79)
        devices.set_leases({2: "b"})
        out += run(devices, 9.5, 15.0, step=1.3)
        return out

    assert script(42) == script(42)
    assert script(42) != script(43)


# ---- fault injection


def test_inject_xid_counts_on_that_gpu_only() -> None:
    devices = fleet("2xH100-80GB")

    devices.inject_xid(1, 79)
    devices.inject_xid(1, 48)

    readings = devices.sample(0.0)
    assert [(r.xid_errors, r.last_xid) for r in readings] == [(0, 0), (2, 48)]
    assert devices.drain_events() == [
        DeviceEvent(index=1, kind="xid", code=79, at=WALL),
        DeviceEvent(index=1, kind="xid", code=48, at=WALL),
    ]
    assert devices.drain_events() == []
    with pytest.raises(ValueError, match="no simulated GPU 2"):
        devices.inject_xid(2, 79)
    with pytest.raises(ValueError, match="positive"):
        devices.inject_xid(0, 0)


def test_ecc_errors_count_and_become_events() -> None:
    devices = fleet("2xH100-80GB")

    devices.inject_ecc_dbe(0)
    devices.inject_ecc_sbe(0)
    devices.inject_ecc_sbe(0)

    first, second = devices.sample(0.0)
    assert (first.ecc_volatile_dbe, first.ecc_aggregate_dbe, first.ecc_volatile_sbe, first.ecc_aggregate_sbe) == (
        1,
        1,
        2,
        2,
    )
    assert (second.ecc_volatile_dbe, second.ecc_volatile_sbe) == (0, 0)
    assert [(e.index, e.kind, e.code) for e in devices.drain_events()] == [
        (0, "ecc_dbe", None),
        (0, "ecc_sbe", None),
        (0, "ecc_sbe", None),
    ]
    with pytest.raises(ValueError, match="no simulated GPU 5"):
        devices.inject_ecc_dbe(5)


def test_temperature_override_pins_the_reading_then_lets_go() -> None:
    devices = fleet("1xH100-80GB")
    idle = devices.sample(0.0)[0].temperature_c

    devices.set_temperature_override(0, 92.0)
    hot = devices.sample(1.0)[0]
    devices.set_temperature_override(0, None)
    back = devices.sample(2.0)[0]

    assert (hot.temperature_c, hot.memory_temperature_c, hot.temperature_slowdown_c) == (92.0, 95.0, 89.0)
    assert hot.temperature_c is not None and hot.temperature_slowdown_c is not None
    assert hot.temperature_c > hot.temperature_slowdown_c  # what an over-temperature check looks for
    assert back.temperature_c == idle
    assert devices.drain_events() == []  # NVML has no event for temperature either


def test_removed_gpu_is_lost_until_restored() -> None:
    devices = fleet("3xH100-80GB")
    lost_uuid = devices.sample(0.0)[1].uuid

    devices.remove_gpu(1)
    devices.remove_gpu(1)  # already lost: no second event

    assert [r.index for r in devices.sample(1.0)] == [0, 2]
    assert devices.degraded_reason == f"GPU 1 ({lost_uuid}) lost: removed by the simulation"
    assert [(link.a, link.b) for link in devices.topology()] == [(0, 2)]

    devices.restore_gpu(1)
    devices.restore_gpu(1)
    assert [r.index for r in devices.sample(2.0)] == [0, 1, 2]
    assert devices.degraded_reason is None
    assert devices.drain_events() == [
        DeviceEvent(index=1, kind="lost", code=None, at=WALL, detail="removed by the simulation"),
        DeviceEvent(index=1, kind="recovered", code=None, at=WALL),
    ]


def test_new_telemetry_fields() -> None:
    devices = fleet("1xH100-80GB,1xL4-24GB")
    devices.set_leases({0: "alloc-a"})

    for reading in run(devices, 0.0, 20.0)[-1]:
        assert reading.utilization_gpu_pct is not None
        assert reading.gr_engine_active == reading.utilization_gpu_pct / 100.0
        assert reading.temperature_slowdown_c == 89.0
        assert reading.last_xid == 0


# ---- faults scheduled in the --simulate spec


def test_parse_fault_schedule() -> None:
    spec = "4xH100-80GB; xid=2:79@30 ;lost=2@31s;recovered=2@90;dbe=0@5;sbe=1@0.5;temp=3:95@60;temp=3:off@120"

    assert parse_simulate_spec(spec) == parse_simulate_spec("4xH100-80GB")  # the fleet alone
    assert parse_fault_schedule(spec) == [
        SimulatedFault(at_s=0.5, index=1, kind="sbe"),
        SimulatedFault(at_s=5.0, index=0, kind="dbe"),
        SimulatedFault(at_s=30.0, index=2, kind="xid", code=79),
        SimulatedFault(at_s=31.0, index=2, kind="lost"),
        SimulatedFault(at_s=60.0, index=3, kind="temp", celsius=95.0),
        SimulatedFault(at_s=90.0, index=2, kind="recovered"),
        SimulatedFault(at_s=120.0, index=3, kind="temp", celsius=None),
    ]
    assert parse_fault_schedule("4xH100-80GB") == []
    assert parse_fault_schedule("1xT4-16GB;XID=0:13@1;xid=0:43@1") == [  # same time: as written
        SimulatedFault(at_s=1.0, index=0, kind="xid", code=13),
        SimulatedFault(at_s=1.0, index=0, kind="xid", code=43),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("4xH100-80GB;", "empty fault"),
        ("4xH100-80GB;xid=2:79@30;;", "empty fault"),
        ("4xH100-80GB;xid=2:79", r"bad fault 'xid=2:79': expected one of xid=GPU:CODE@SECONDS"),
        ("4xH100-80GB;xid=2@30", "expected xid=GPU:CODE@SECONDS"),
        ("4xH100-80GB;dbe=2:1@30", "expected dbe=GPU@SECONDS"),
        ("4xH100-80GB;fire=2@30", "bad fault 'fire=2@30'"),
        ("4xH100-80GB;xid=2:79@-1", "bad fault"),
        ("4xH100-80GB;xid=2:79@soon", "bad fault"),
        ("4xH100-80GB;xid=4:79@30", "names GPU 4, but the fleet has GPUs 0-3"),
        ("4xH100-80GB;xid=2:0@30", "XID code is a whole number of at least 1"),
        ("4xH100-80GB;xid=2:x79@30", "XID code is a whole number of at least 1"),
        ("4xH100-80GB;temp=1:hot@30", "expected °C or 'off'"),
        ("4xH100-80GB;temp=1:900@30", "900 °C is no temperature"),
        ("4xH100;xid=2:79@30", r"expected \[COUNTx\]MODEL-<N>GB"),  # the fleet is still checked first
    ],
)
def test_bad_fault_specs_are_rejected_clearly(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fault_schedule(spec)
    with pytest.raises(ValueError, match=message):
        parse_simulate_spec(spec)  # a fleet with a bad fault is a bad fleet


def test_scheduled_faults_fire_relative_to_the_first_sample() -> None:
    devices = fleet("4xH100-80GB;xid=2:79@30;lost=2@31;recovered=2@60;temp=1:95@10;dbe=0@0")

    start = devices.sample(1000.0)  # time zero: the @0 fault fires now
    assert start[0].ecc_volatile_dbe == 1
    assert devices.drain_events() == [DeviceEvent(index=0, kind="ecc_dbe", code=None, at=1000.0)]

    assert [r.temperature_c for r in devices.sample(1009.5)][1] != 95.0
    assert [r.temperature_c for r in devices.sample(1010.0)][1] == 95.0
    assert devices.sample(1029.9)[2].last_xid == 0
    late = devices.sample(1045.0)  # one late sample fires both the XID and the loss, at their own times
    assert [r.index for r in late] == [0, 1, 3]
    assert devices.drain_events() == [
        DeviceEvent(index=2, kind="xid", code=79, at=1030.0),
        DeviceEvent(index=2, kind="lost", code=None, at=1031.0, detail="removed by the simulation"),
    ]
    back = devices.sample(1060.0)
    assert (back[2].index, back[2].last_xid, back[2].xid_errors) == (2, 79, 1)
    assert [e.kind for e in devices.drain_events()] == ["recovered"]
    devices.sample(2000.0)
    assert devices.drain_events() == []  # each fault fires once


def test_faults_naming_a_gpu_outside_the_fleet_are_refused() -> None:
    with pytest.raises(ValueError, match="names GPU 3, but the fleet has GPUs 0-1"):
        SimulatedDevices(parse_simulate_spec("2xL4-24GB"), seed=1, faults=[SimulatedFault(1.0, 3, "lost")])


def test_backend_from_config_schedules_the_spec_faults() -> None:
    backend = backend_from_config("simulated", "2xH100-80GB;xid=1:79@0", seed=3)
    backend.open()

    assert [r.last_xid for r in backend.sample(0.0)] == [0, 79]
    assert [(e.index, e.kind, e.code) for e in backend.drain_events()] == [(1, "xid", 79)]


# ---- topology


@pytest.mark.parametrize(
    ("spec", "relation", "nvlinks"),
    [
        ("4xH100-80GB", "nvlink", 18),
        ("2xH200-141GB", "nvlink", 18),
        ("2xA100-80GB", "nvlink", 12),  # NVLink 3: twelve links per A100
        ("2xH100-80GB,2xA100-40GB", "host_bridge", 0),
        ("2xL4-24GB", "host_bridge", 0),
        ("2xFOO-8GB", "host_bridge", 0),
    ],
)
def test_topology(spec: str, relation: str, nvlinks: int) -> None:
    devices = fleet(spec)
    n = len(parse_simulate_spec(spec))

    assert devices.topology() == [
        GpuLink(a=a, b=b, relation=relation, nvlinks=nvlinks) for a in range(n) for b in range(a + 1, n)
    ]


@pytest.mark.parametrize(
    ("spec", "count", "name"),
    [("hgx-h100", 8, "NVIDIA H100 80GB HBM3"), ("PCIe-NVLink-Pairs", 4, "NVIDIA H100 NVL"), ("pcie-2socket", 8, "NVIDIA L40S")],
)
def test_simulated_hosts_are_whole_fleets(spec: str, count: int, name: str) -> None:
    assert [g.name for g in parse_simulate_spec(spec)] == [name] * count


def host(spec: str) -> SimulatedDevices:
    backend = backend_from_config("simulated", spec, seed=7)
    assert isinstance(backend, SimulatedDevices)
    backend.open()
    return backend


def test_hgx_h100_is_wired_all_to_all_over_nvswitch_on_two_sockets() -> None:
    devices = host("hgx-h100")

    assert {(link.relation, link.nvlinks) for link in devices.topology()} == {("nvlink", 18)}
    assert len(devices.topology()) == 28
    assert devices.affinity()[0] == GpuAffinity(index=0, numa_node=0, cpu_list="0-55,112-167")
    assert devices.affinity()[7] == GpuAffinity(index=7, numa_node=1, cpu_list="56-111,168-223")


def test_pcie_nvlink_pairs_bridge_0_1_and_2_3() -> None:
    links = {(link.a, link.b): (link.relation, link.nvlinks) for link in host("pcie-nvlink-pairs").topology()}

    assert links == {
        (0, 1): ("nvlink", 12),
        (0, 2): ("pcie_switch", 0),
        (0, 3): ("host_bridge", 0),
        (1, 2): ("host_bridge", 0),
        (1, 3): ("pcie_switch", 0),
        (2, 3): ("nvlink", 12),
    }


def test_pcie_2socket_crosses_sockets_only_between_halves() -> None:
    devices = host("pcie-2socket")
    links = {(link.a, link.b): link.relation for link in devices.topology()}

    assert links[(0, 1)] == "pcie_switch" and links[(0, 2)] == "numa_node" and links[(3, 4)] == "cross_cpu"
    assert [a.numa_node for a in devices.affinity()] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_lost_gpu_leaves_a_simulated_host_s_topology() -> None:
    devices = host("pcie-nvlink-pairs;lost=1@0")
    devices.sample(0.0)

    assert [(link.a, link.b) for link in devices.topology()] == [(0, 2), (0, 3), (2, 3)]
    assert [a.index for a in devices.affinity()] == [0, 2, 3]


def test_a_fleet_of_models_has_no_affinity() -> None:
    assert fleet("2xH100-80GB").affinity() == []


def test_a_simulated_host_is_a_whole_fleet() -> None:
    with pytest.raises(ValueError, match="whole simulated host"):
        parse_simulate_spec("hgx-h100,2xL4-24GB")


# ---- lifecycle


def test_sampling_needs_open() -> None:
    devices = SimulatedDevices(parse_simulate_spec("1xT4-16GB"), seed=1)

    with pytest.raises(RuntimeError, match="not open"):
        devices.sample(0.0)
    devices.open()
    devices.close()
    with pytest.raises(RuntimeError, match="not open"):
        devices.topology()


def test_empty_fleet_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one GPU"):
        SimulatedDevices([], seed=1)


# ---- choosing the backend


def test_backend_from_config_builds_the_simulated_fleet() -> None:
    backend = backend_from_config("simulated", "2xH100-80GB,1xL4-24GB", seed=3)
    backend.open()

    assert backend.kind == "simulated"
    assert [r.name for r in backend.sample(0.0)] == ["NVIDIA H100 80GB HBM3"] * 2 + ["NVIDIA L4"]


@pytest.mark.parametrize(
    ("kind", "simulate", "message"),
    [
        ("simulated", None, "needs a fleet"),
        ("simulated", " ", "needs a fleet"),
        ("simulated", "4xH100", "expected"),
        ("simulated", "4xH100-80GB;xid=9:79@1", "names GPU 9"),
        ("dcgm", None, "unknown devices backend 'dcgm'"),
        ("NVML", None, "unknown devices backend 'NVML'"),
    ],
)
def test_backend_from_config_rejects(kind: str, simulate: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backend_from_config(kind, simulate, seed=1)
