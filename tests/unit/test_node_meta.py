"""Gossiped node metadata: compact, round-trips, refuses garbage, re-announces only what matters."""

from __future__ import annotations

import random
from dataclasses import replace

import msgpack
import pytest

from coordinator.model import DEGRADED, HEALTHY, UNHEALTHY
from coordinator.swim_config import lan
from coordinator.topology import PHB, PIX, NodeTopology, nvlink

from agent.node_meta import (
    GpuMeta,
    GpuState,
    NodeMeta,
    NodeMetaBuilder,
    NodeMetaError,
    decode_node_meta,
    encode_node_meta,
)

CAP = lan().max_meta_size
IDENTITY = NodeMeta(
    name="gpu-host-17.rack-3.example.internal",
    role="server",
    advertise_ip="10.20.30.40",
    http_port=8086,
    gossip_port=7946,
    raft_port=7947,
    version="0.1.0",
    labels={"rack": "r3", "zone": "eu-west-1a"},
)


def gpu_state(index: int, **changes: object) -> GpuState:
    values: dict[str, object] = dict(
        index=index,
        uuid=f"GPU-{index:08x}-1111-2222-3333-444455556666",
        model="NVIDIA H100 80GB HBM3",
        memory_total_mb=81559,
        memory_free_mb=81000,
        utilization_pct=0.0,
        health=HEALTHY,
        drained=False,
        allocated=False,
    )
    values.update(changes)
    return GpuState(**values)  # type: ignore[arg-type]


def test_an_eight_gpu_node_fits_comfortably_under_the_cap() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    blob = builder.update([gpu_state(i, memory_free_mb=12345, utilization_pct=67.0) for i in range(8)], now=0.0)
    assert blob is not None
    assert len(blob) <= lan().max_meta_size // 2, len(blob)


def test_a_node_with_too_many_gpus_gossips_those_that_fit_and_its_total() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    blob = builder.update([gpu_state(i) for i in range(64)], now=0.0)
    assert blob is not None and len(blob) <= CAP and builder.truncated
    meta = decode_node_meta(blob)
    assert meta.gpu_count == 64 and 8 < len(meta.gpus) < 64
    assert [g.index for g in meta.gpus] == list(range(len(meta.gpus)))
    assert decode_node_meta(NodeMetaBuilder(IDENTITY, max_bytes=CAP).update([gpu_state(0)], now=0.0) or b"").gpu_total is None


def test_round_trip_quantizes_telemetry_and_keeps_identity() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    blob = builder.update(
        [gpu_state(0, memory_free_mb=1000, utilization_pct=42.0, drained=True), gpu_state(1, health=DEGRADED)],
        now=0.0,
    )
    assert blob is not None
    meta = decode_node_meta(blob)
    assert (meta.name, meta.role, meta.labels, meta.version) == (
        IDENTITY.name, "server", IDENTITY.labels, "0.1.0"
    )
    assert (meta.http_address, meta.gossip_address, meta.raft_address) == (
        "10.20.30.40:8086", "10.20.30.40:7946", "10.20.30.40:7947"
    )
    first = meta.gpus[0]
    assert first.uuid == "GPU-00000000-1111-2222-3333-444455556666"
    assert (first.memory_free_mb, first.utilization_pct, first.drained, first.allocated) == (1024, 40, True, False)
    assert meta.gpus[1].health == DEGRADED


def test_non_nvml_uuids_ipv6_and_a_separate_http_address_survive() -> None:
    meta = NodeMeta(
        name="n", role="client", advertise_ip="fd00::5", http_port=80, gossip_port=7946, raft_port=7947,
        version="x", http_ip="fd00::6",
        gpus=(GpuMeta(0, "MIG-abc", "A100", 40000, None, None, UNHEALTHY, False, True),),
    )
    decoded = decode_node_meta(encode_node_meta(meta))
    assert decoded == meta
    assert decoded.http_address == "[fd00::6]:80"


def test_unchanged_or_jittering_telemetry_is_not_re_announced() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=5.0)
    assert builder.update([gpu_state(0, utilization_pct=42.4)], now=0.0) is not None
    # Jitter around a rounding boundary (42.5) and within 256 MiB: nothing to say, ever.
    for step, util in enumerate([42.6, 42.4, 43.5, 37.0]):
        assert builder.update([gpu_state(0, utilization_pct=util, memory_free_mb=81050)], now=10.0 * (step + 1)) is None


def test_telemetry_changes_wait_for_the_minimum_interval() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=5.0)
    builder.update([gpu_state(0)], now=0.0)
    assert builder.update([gpu_state(0, utilization_pct=90.0)], now=1.0) is None
    blob = builder.update([gpu_state(0, utilization_pct=90.0)], now=5.0)
    assert blob is not None and decode_node_meta(blob).gpus[0].utilization_pct == 90


@pytest.mark.parametrize(
    "change",
    [{"health": UNHEALTHY}, {"drained": True}, {"allocated": True}],
)
def test_health_drain_and_lease_changes_are_announced_at_once(change: dict[str, object]) -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=5.0)
    builder.update([gpu_state(0)], now=0.0)
    assert builder.update([gpu_state(0, **change)], now=0.1) is not None


def test_a_failing_gpu_gossips_why_bounded_and_a_healthy_one_nothing() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=5.0)
    healthy = builder.update([gpu_state(0, reasons=("left over from before",))], now=0.0)
    assert healthy is not None and decode_node_meta(healthy).gpus[0].reasons == ()
    reasons = ("XID 79", "x" * 200, "a third reason")
    blob = builder.update([gpu_state(0, health=UNHEALTHY, reasons=reasons)], now=0.1)
    assert blob is not None
    assert decode_node_meta(blob).gpus[0].reasons == ("XID 79", "x" * 64)
    # A new reason alone is news too (the leader records it at once).
    assert builder.update([gpu_state(0, health=UNHEALTHY, reasons=("XID 48",))], now=0.2) is not None
    # Eight failing GPUs with long reasons would not fit: the reasons go, every GPU stays.
    eight = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    blob = eight.update([gpu_state(i, health=DEGRADED, reasons=("r" * 80, "s" * 80)) for i in range(8)], now=0.0)
    assert blob is not None and len(blob) <= CAP and not eight.truncated
    assert [(g.health, g.reasons) for g in decode_node_meta(blob).gpus] == [(DEGRADED, ())] * 8


def test_a_row_without_reasons_from_an_older_agent_still_decodes() -> None:
    meta = IDENTITY
    blob = encode_node_meta(
        NodeMeta(
            meta.name, meta.role, meta.advertise_ip, meta.http_port, meta.gossip_port, meta.raft_port, meta.version,
            gpus=(GpuMeta(0, "GPU-00000000-1111-2222-3333-444455556666", "H100", 81559, 0, 0, UNHEALTHY, False, False),),
        )
    )
    doc = msgpack.unpackb(blob, raw=False)
    assert len(doc["g"][0]) == 8  # no reasons given: the row keeps the original eight fields
    assert decode_node_meta(blob).gpus[0].reasons == ()


def test_a_gpu_vanishing_is_announced_at_once() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=5.0)
    builder.update([gpu_state(0), gpu_state(1)], now=0.0)
    blob = builder.update([gpu_state(0)], now=0.1)
    assert blob is not None and len(decode_node_meta(blob).gpus) == 1


def test_garbage_raises_node_meta_error_only() -> None:
    rng = random.Random(7)
    good = NodeMetaBuilder(IDENTITY, max_bytes=CAP).update([gpu_state(i) for i in range(4)], now=0.0)
    assert good is not None
    candidates = [b"", b"\xc1", b"\x91\x01", msgpack.packb({"v": 2}), msgpack.packb({"v": 1})]
    candidates += [good[:n] for n in range(0, len(good), 7)]
    candidates += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))) for _ in range(500)]
    for _ in range(500):
        mutated = bytearray(good)
        mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        candidates.append(bytes(mutated))
    for blob in candidates:
        try:
            decode_node_meta(blob)
        except NodeMetaError:
            pass


@pytest.mark.parametrize(
    "doc, reason",
    [
        ({"v": 1}, "lacks"),
        ({"v": 1, "n": "a", "r": 1, "ip": b"\x01\x02", "hp": 1, "gp": 2, "rp": 3, "ver": ""}, "IP"),
        ({"v": 1, "n": "a", "r": 1, "ip": b"\x01\x02\x03\x04", "hp": 0, "gp": 2, "rp": 3, "ver": ""}, "port"),
        (
            {"v": 1, "n": "a", "r": 1, "ip": b"\x01\x02\x03\x04", "hp": 1, "gp": 2, "rp": 3, "ver": "",
             "m": [], "g": [[0, "u", 0, 1, None, None, 0, 0]]},
            "model",
        ),
        (
            {"v": 1, "n": "a", "r": 1, "ip": b"\x01\x02\x03\x04", "hp": 1, "gp": 2, "rp": 3, "ver": "",
             "m": ["x"], "g": [[0, "u", 0, 1, None, None, 9, 0]]},
            "health",
        ),
        ({"v": 1, "n": 5, "r": 1, "ip": b"\x01\x02\x03\x04", "hp": 1, "gp": 2, "rp": 3, "ver": ""}, "name"),
        ([1, 2], "not a map"),
    ],
)
def test_specific_errors_name_the_problem(doc: object, reason: str) -> None:
    with pytest.raises(NodeMetaError, match=reason):
        decode_node_meta(msgpack.packb(doc, use_bin_type=True))


def test_the_bootstrapped_flag_costs_three_bytes_and_old_blobs_read_as_blank() -> None:
    """Key `b`: set on servers holding Raft state, omitted otherwise, so a blob from an agent
    that predates it decodes as not bootstrapped and one that has it stays readable by others."""
    plain = encode_node_meta(IDENTITY)
    flagged = encode_node_meta(replace(IDENTITY, bootstrapped=True))
    assert not decode_node_meta(plain).bootstrapped and decode_node_meta(flagged).bootstrapped
    assert len(flagged) - len(plain) == 3  # fixstr "b" + fixint 1, one more map entry
    assert "b" not in msgpack.unpackb(plain, raw=False)
    with pytest.raises(NodeMetaError, match="bootstrapped"):
        doc = msgpack.unpackb(flagged, raw=False)
        decode_node_meta(msgpack.packb({**doc, "b": "yes"}, use_bin_type=True))


def test_setting_the_identity_keeps_the_gpus_and_announces_only_a_change() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    builder.update([gpu_state(0), gpu_state(1)], now=0.0)
    blob = builder.set_identity(replace(IDENTITY, bootstrapped=True), now=1.0)
    assert blob is not None and blob == builder.blob
    meta = decode_node_meta(blob)
    assert meta.bootstrapped and [g.index for g in meta.gpus] == [0, 1]
    assert builder.set_identity(replace(IDENTITY, bootstrapped=True), now=2.0) is None


# ---- topology (key `t`)

PAIRS = NodeTopology(
    {(0, 1): nvlink(12), (0, 2): PIX, (0, 3): PHB, (1, 2): PHB, (1, 3): PIX, (2, 3): nvlink(12)},
    numa={i: 0 for i in range(4)},
    cpus={i: "0-31" for i in range(4)},
)


def test_the_topology_travels_and_an_eight_gpu_node_still_fits_half_the_cap() -> None:
    hgx = NodeTopology(
        {(a, b): nvlink(18) for a in range(8) for b in range(a + 1, 8)},
        numa={i: i // 4 for i in range(8)},
        cpus={i: "0-55,112-167" if i < 4 else "56-111,168-223" for i in range(8)},
    )
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    blob = builder.update([gpu_state(i, memory_free_mb=12345, utilization_pct=67.0) for i in range(8)], 0.0, hgx)
    assert blob is not None and decode_node_meta(blob).topology == hgx
    assert len(blob) <= CAP // 2, len(blob)
    assert decode_node_meta(encode_node_meta(IDENTITY)).topology is None  # an older agent's blob: unknown


def test_a_topology_change_is_announced_at_once_and_no_change_is_not() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=5.0)
    gpus = [gpu_state(i) for i in range(4)]
    assert builder.update(gpus, 0.0) is not None
    blob = builder.update(gpus, 0.1, PAIRS)
    assert blob is not None and decode_node_meta(blob).topology == PAIRS
    assert builder.update(gpus, 0.2, NodeTopology.from_wire(PAIRS.to_wire())) is None
    assert builder.update(gpus, 0.3, None) is not None


def test_the_topology_goes_before_any_gpu_when_the_blob_would_not_fit() -> None:
    sixteen = NodeTopology({(a, b): nvlink(18) for a in range(16) for b in range(a + 1, 16)})
    gpus = [gpu_state(i) for i in range(16)]
    whole = len(encode_node_meta(replace(IDENTITY, gpus=tuple(
        GpuMeta(g.index, g.uuid, g.model, g.memory_total_mb, 81000 // 256 * 256, 0, HEALTHY, False, False) for g in gpus
    ))))
    builder = NodeMetaBuilder(IDENTITY, max_bytes=whole + 10)  # room for every GPU, not for their 120 pairs
    blob = builder.update(gpus, 0.0, sixteen)
    assert blob is not None and not builder.truncated
    meta = decode_node_meta(blob)
    assert len(meta.gpus) == 16 and meta.topology is None


def test_a_bad_topology_is_a_bad_blob() -> None:
    doc = msgpack.unpackb(encode_node_meta(replace(IDENTITY, topology=PAIRS)), raw=False)
    doc["t"][1] = [7] * 6  # 4-16 are no link codes
    with pytest.raises(NodeMetaError, match="topology"):
        decode_node_meta(msgpack.packb(doc, use_bin_type=True))
