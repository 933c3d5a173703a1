"""How fragmented the free GPUs are: the largest request each node, and the cluster, could take now.

A node with six free GPUs in three separate NVLink pairs takes a 6-GPU
request, but no 4-GPU request will get an all-NVLink set there. A figure per
shape of request says that (the `gpu_orchestrator_*_largest_request_gpus`,
`*_free_mig_instances` and `*_largest_share_bytes` metrics, the
`largest_request` of `GET /gpu/status?summary=true`, `gpuctl status`):

- ``gpus``: the node's free GPUs (schedulable, held by no lease): the largest
  whole-GPU request it can take now, memory and model aside;
- ``nvlink``: the most of those joined pair by pair by NVLink (behind
  NVSwitches, all of them): the largest request that would get an all-NVLink
  set; 1 when a GPU is free but no two are joined, None when the node has not
  reported its topology;
- ``mig``: the node's free MIG slices (schedulable, held by no lease) by
  profile, every profile the node has a slice of listed, 0 included; None on
  a node without slices. A slice request takes one slice of a profile, so
  the largest MIG profile it can get is the largest one listed above 0;
- ``share_mb``: the largest share (`gpu_memory_mb`) one request could get:
  a free whole GPU's memory, or the room left on a schedulable GPU that holds
  shares already (that room only for the GPU's sharing group). 0 when
  neither.

Whole GPUs and slices are apart: a slice never serves a whole-GPU request nor
a share, and a GPU in MIG mode is in the inventory as its slices only
(coordinator/mig.py). Health and drains count as for placement: an unhealthy
or drained unit is not free, and a drained GPU's slices are drained with it
(the agent lays the drain over them).

A request lives on one node, so the cluster's ``gpus``, ``nvlink`` and
``share_mb`` are the largest of its nodes'. A slice request takes one slice
on whichever node has it, so the cluster's ``mig`` counts are the sums of its
nodes'.

Cost: one pass over each node's units (whole GPUs and slices) with a
constant-time lookup per unit, plus the NVLink search over the node's free
GPUs (memoized by the topology): O(units in the cluster) per call. It is
called per scrape and per status summary, never per scheduling decision.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.inventory import Inventory
from coordinator.mig import profile_memory_order
from coordinator.model import GpuRef, GpuView
from coordinator.share_placement import SharedGpu
from coordinator.topology import NodeTopology

# The shapes counted in GPUs (the `shape` label of the *_largest_request_gpus metrics).
SHAPES = ("gpus", "nvlink")

# Free slices by profile, smallest profile first (coordinator/mig.py profile_memory_order).
MigCounts = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class LargestRequest:
    """The largest request that fits now, by shape (see the module docstring)."""

    gpus: int
    nvlink: int | None
    mig: MigCounts | None = None
    share_mb: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus,
            "nvlink": self.nvlink,
            "mig": None if self.mig is None else dict(self.mig),
            "share_mb": self.share_mb,
        }


def node_largest_request(
    views: Sequence[GpuView],
    held: Callable[[GpuRef], bool],
    topology: NodeTopology | None,
    *,
    shared: Mapping[GpuRef, SharedGpu],
) -> LargestRequest:
    """The largest request one node's units (`views`) can take.

    `held` says which units a lease holds; `shared` is the lease table's GPUs
    holding shares (ShareIndex.gpus), whose room is what a share could still get there.
    """
    free: list[int] = []
    share_mb = 0
    slices: Counter[str] = Counter()
    for view in views:
        if view.mig_profile is not None:
            # Every profile present is listed, so a fully taken one reads 0, not absent.
            slices[view.mig_profile] += 1 if view.schedulable and not held(view.ref) else 0
        elif not view.schedulable:
            continue
        elif not held(view.ref):
            free.append(view.index)
            share_mb = max(share_mb, view.memory_total_mb)
        elif (room := shared.get(view.ref)) is not None:
            share_mb = max(share_mb, room.remaining_mb)
    return LargestRequest(
        gpus=len(free),
        nvlink=None if topology is None else topology.largest_nvlink_set(free),
        mig=_ordered(slices) if slices else None,
        share_mb=share_mb,
    )


def largest_requests(
    inventory: Inventory, held: Callable[[GpuRef], bool], shared: Mapping[GpuRef, SharedGpu]
) -> dict[str, LargestRequest]:
    """Every node's largest request, by node name."""
    return {
        node: node_largest_request(inventory.node_views(node), held, inventory.topology(node), shared=shared)
        for node in inventory.nodes()
    }


def cluster_largest_request(nodes: Iterable[LargestRequest]) -> LargestRequest:
    """The cluster's: the largest of its nodes' (nvlink None when no node knows it), MIG slices summed."""
    listed = list(nodes)
    known = [n.nvlink for n in listed if n.nvlink is not None]
    with_slices = [n.mig for n in listed if n.mig is not None]
    slices: Counter[str] = Counter()
    for counts in with_slices:
        for profile, count in counts:
            slices[profile] += count
    return LargestRequest(
        gpus=max((n.gpus for n in listed), default=0),
        nvlink=max(known) if known else None,
        mig=_ordered(slices) if with_slices else None,
        share_mb=max((n.share_mb for n in listed), default=0),
    )


def _ordered(counts: Counter[str]) -> MigCounts:
    # Counter's `+= 0` keeps the key, so profiles with no free slice stay listed.
    return tuple(sorted(counts.items(), key=lambda item: profile_memory_order(item[0])))
