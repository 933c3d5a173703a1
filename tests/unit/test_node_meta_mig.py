"""MIG slices in gossiped node metadata (agent/node_meta.py, key ``mg``).

A GPU in MIG mode is gossiped as a GPU (flag bit 2) and its slices apart; the
leader's inventory takes the slices and leaves the GPU out. Agents from before
MIG ignore ``mg`` and the bit. Slices are the first thing dropped for the cap.
"""

from __future__ import annotations

import msgpack

from coordinator.mig import slice_index
from coordinator.model import HEALTHY
from coordinator.swim_config import lan

from agent.inventory_feed import member_views
from agent.node_meta import GpuState, NodeMetaBuilder, decode_node_meta
from tests.unit.test_node_meta import IDENTITY, gpu_state

CAP = lan().max_meta_size
A100 = "NVIDIA A100-SXM4-80GB"


def slice_state(gpu: int, mig: int, profile: str = "1g.10gb", **changes: object) -> GpuState:
    values: dict[str, object] = dict(
        index=slice_index(gpu, mig),
        uuid=f"MIG-{gpu:08x}-{mig:04x}-2222-3333-444455556666",
        model=f"{A100} MIG {profile}",
        memory_total_mb=9728,
        memory_free_mb=9728,
        utilization_pct=None,
        health=HEALTHY,
        drained=False,
        allocated=False,
        mig_profile=profile,
    )
    values.update(changes)
    return GpuState(**values)  # type: ignore[arg-type]


def mig_gpu(index: int) -> GpuState:
    return gpu_state(index, uuid=f"GPU-{index:08x}-1111-2222-3333-444455556666", model=A100, mig_mode=True)


def test_slices_round_trip_and_old_decoders_see_the_gpu_alone() -> None:
    states = [mig_gpu(0), slice_state(0, 0, "3g.40gb", memory_total_mb=40192), slice_state(0, 1, allocated=True), gpu_state(1)]
    blob = NodeMetaBuilder(IDENTITY, max_bytes=CAP).update(states, now=0.0)
    assert blob is not None
    meta = decode_node_meta(blob)
    slices = [g for g in meta.gpus if g.mig_profile is not None]
    assert [(g.index, g.mig_profile, g.allocated) for g in slices] == [(1000, "3g.40gb", False), (1001, "1g.10gb", True)]
    assert slices[0].uuid == "MIG-00000000-0000-2222-3333-444455556666"
    assert meta.gpu_count == 2 and meta.gpus[0].mig_mode
    # What an agent from before MIG reads: the GPU rows, 8 fields each, and no slice among them.
    doc = msgpack.unpackb(blob, raw=False)
    assert [len(row) for row in doc["g"]] == [8, 8] and len(doc["mg"]) == 2


def test_the_leaders_views_take_the_slices_and_leave_the_mig_gpu_out() -> None:
    class Member:
        class view:
            name = "n1"

        meta_received_at = 5.0

    blob = NodeMetaBuilder(IDENTITY, max_bytes=CAP).update([mig_gpu(0), slice_state(0, 0), gpu_state(1)], now=0.0)
    Member.meta = decode_node_meta(blob or b"")  # type: ignore[attr-defined]
    views = member_views(Member)  # type: ignore[arg-type]
    assert [(v.index, v.mig_profile) for v in views] == [(1, None), (1000, "1g.10gb")]
    assert views[1].parent_uuid == "GPU-00000000-1111-2222-3333-444455556666"


def test_slices_are_dropped_before_any_gpu_for_the_cap() -> None:
    states = [mig_gpu(i) for i in range(8)] + [slice_state(g, m) for g in range(8) for m in range(7)]
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP)
    blob = builder.update(states, now=0.0)
    assert blob is not None and len(blob) <= CAP and builder.truncated
    meta = decode_node_meta(blob)
    assert sum(1 for g in meta.gpus if g.mig_profile is None) == 8
    kept = [g.index for g in meta.gpus if g.mig_profile is not None]
    assert 0 < len(kept) < 56 and kept == sorted(kept)[: len(kept)] and kept[0] == 1000


def test_a_slice_lease_is_announced_at_once() -> None:
    builder = NodeMetaBuilder(IDENTITY, max_bytes=CAP, min_interval_s=60.0)
    assert builder.update([mig_gpu(0), slice_state(0, 0)], now=0.0) is not None
    assert builder.update([mig_gpu(0), slice_state(0, 0, allocated=True)], now=1.0) is not None
