"""How fragmented the free GPUs are: the largest request each node, and the cluster, could take now.

A node with six free GPUs in three separate NVLink pairs takes a 6-GPU
request, but no 4-GPU request will get an all-NVLink set there. Two shapes
say that (the metric `gpu_orchestrator_*_largest_request_gpus{shape}`, the
`largest_request` of `GET /gpu/status?summary=true`, `gpuctl status`):

- ``gpus``: the node's free GPUs (schedulable, held by no lease): the largest
  whole-GPU request it can take now, memory and model aside;
- ``nvlink``: the most of those joined pair by pair by NVLink (behind
  NVSwitches, all of them): the largest request that would get an all-NVLink
  set; 1 when a GPU is free but no two are joined, None when the node has not
  reported its topology.

A request lives on one node, so the cluster's figures are the largest of its
nodes'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from coordinator.inventory import Inventory
from coordinator.model import GpuRef, GpuView
from coordinator.topology import NodeTopology

SHAPES = ("gpus", "nvlink")


@dataclass(frozen=True, slots=True)
class LargestRequest:
    """The largest request that fits now, by shape (see the module docstring)."""

    gpus: int
    nvlink: int | None

    def to_wire(self) -> dict[str, int | None]:
        return {"gpus": self.gpus, "nvlink": self.nvlink}


def node_largest_request(
    views: Sequence[GpuView], held: Callable[[GpuRef], bool], topology: NodeTopology | None
) -> LargestRequest:
    """The largest request one node's GPUs (`views`) can take, `held` saying which a lease holds."""
    # Whole GPUs only: a slice never serves a request for whole GPUs.
    free = [v.index for v in views if v.schedulable and v.mig_profile is None and not held(v.ref)]
    return LargestRequest(len(free), None if topology is None else topology.largest_nvlink_set(free))


def largest_requests(inventory: Inventory, held: Callable[[GpuRef], bool]) -> dict[str, LargestRequest]:
    """Every node's largest request, by node name."""
    return {
        node: node_largest_request(inventory.node_views(node), held, inventory.topology(node))
        for node in inventory.nodes()
    }


def cluster_largest_request(nodes: Iterable[LargestRequest]) -> LargestRequest:
    """The cluster's: the largest of its nodes' in each shape (nvlink None when no node knows it)."""
    listed = list(nodes)
    known = [n.nvlink for n in listed if n.nvlink is not None]
    return LargestRequest(max((n.gpus for n in listed), default=0), max(known) if known else None)
