"""Placing a gang: `gpu_count` GPUs on each of `nodes` distinct nodes, all or none.

Theory of operation
-------------------
A gang (`Requirements.nodes > 1`) is one request in the queue, served in rank
order like any other by the same `PlanWalk` (placement.py). Where a single
request needs one node, a gang needs `nodes` of them at once:

- **Fit.** Every node where one member would fit by best fit is a candidate,
  scored by best fit's own key (degraded GPUs, free GPUs left, memory, name).
  Among the candidates, the gang prefers nodes that share a label value
  (`GANG_LABEL_KEYS`, from each agent's `[agent] labels`: the same NVLink
  domain first, then the same rack), because its collectives cross the
  network between its nodes. Of the groups with enough nodes, the one whose
  best members score best wins; without such a group, the best-scoring nodes
  whatever their labels. Members are ranked by node name; rank 0's node is
  the rendezvous. Each member's GPUs are then chosen on its node exactly as a
  single request's are (topology included).
- **Reservation.** A gang that does not fit holds, against lower-ranked work,
  every eligible open GPU on the `nodes` nodes where it is closest to fitting
  (most eligible open GPUs, then name), among nodes that could ever hold one
  member. So 1-GPU backfill cannot starve it: what is open on those nodes only
  grows with each release until all its members fit.
- **All or none.** A fit takes GPUs on every member node or on none, and the
  scheduler turns it into one Allocate carrying every member (commands.py),
  which the lease table applies whole or refuses whole.

Cost
----
A gang's search reads at most `GANG_NODE_SEARCH_LIMIT` nodes (those with the
fewest open GPUs that are still enough for a member, for a fit; those with the
most, for a reservation), each at best fit's cost of one pass over its open
GPUs, plus a sort of those candidates: O(L·g + L log L) for L = the limit and
g GPUs per node, whatever the cluster's size. A cluster whose first L such
nodes hold no gang-worthy group may miss a better labelled group further on;
the gang is still placed on the best-scoring nodes it saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from coordinator.model import AllocationRequest, GpuRef, GpuView

if TYPE_CHECKING:
    from coordinator.placement import Placement, PlanWalk

# Nodes one gang decision reads at most (see Cost). 256 nodes of 8 GPUs is
# 2,048 GPU checks, about a millisecond; enough for gangs of up to 256 nodes.
GANG_NODE_SEARCH_LIMIT = 256
# Labels whose shared value a gang prefers, the most tightly coupled first.
GANG_LABEL_KEYS = ("nvlink_domain", "rack")

FitScore = tuple[int, int, int, str]


@dataclass(frozen=True, slots=True)
class GangPlacement:
    """Where a gang goes: one placement per node, in rank order (rank 0 first)."""

    members: tuple[Placement, ...]

    @property
    def node(self) -> str:
        """Rank 0's node: the rendezvous."""
        return self.members[0].node

    @property
    def gpus(self) -> tuple[GpuView, ...]:
        """Every GPU of the gang, over all its nodes: what queue counts take."""
        return tuple(g for m in self.members for g in m.gpus)


def best_gang_fit(walk: PlanWalk, request: AllocationRequest, labels: Mapping[str, Mapping[str, str]]) -> GangPlacement | None:
    """The gang's placement on the open GPUs, or None when fewer than `nodes` nodes could take a member.

    `labels` maps node names to their labels (nodes without any may be absent).
    """
    req = request.requirements
    need = req.gpu_count
    candidates: list[tuple[FitScore, Placement]] = []
    looked = 0
    for count in sorted(c for c in walk.open.buckets if c >= need):
        for node in walk.open.buckets[count]:
            # Counted whether or not a member fits there: the bound is on nodes read.
            looked += 1
            fit = walk.member_fit(request, node)
            if fit is not None:
                candidates.append(fit)
            if looked >= GANG_NODE_SEARCH_LIMIT:
                break
        if looked >= GANG_NODE_SEARCH_LIMIT:
            break
    if len(candidates) < req.nodes:
        return None
    candidates.sort(key=lambda c: c[0])
    chosen = _prefer_shared_label(candidates, req.nodes, labels)
    members = sorted(chosen, key=lambda p: p.node)
    return GangPlacement(tuple(walk.wired(request, m) for m in members))


def _prefer_shared_label(
    candidates: list[tuple[FitScore, Placement]], nodes: int, labels: Mapping[str, Mapping[str, str]]
) -> list[Placement]:
    """The `nodes` best candidates (score order) that share a label, by GANG_LABEL_KEYS order; else the best overall."""
    for key in GANG_LABEL_KEYS:
        groups: dict[str, list[tuple[FitScore, Placement]]] = {}
        for fit in candidates:
            value = labels.get(fit[1].node, {}).get(key)
            if value is not None:
                groups.setdefault(value, []).append(fit)
        whole = [(sorted(s for s, _ in group[:nodes]), value) for value, group in groups.items() if len(group) >= nodes]
        if whole:
            _, value = min(whole)
            return [p for _, p in groups[value][:nodes]]
    return [p for _, p in candidates[:nodes]]


def gang_reservation(walk: PlanWalk, request: AllocationRequest) -> list[tuple[str, set[GpuRef]]]:
    """The `nodes` nodes where the gang is closest to fitting, with their eligible open GPUs.

    Closest: the most eligible open GPUs, then the node name, among nodes that
    could ever hold one member. Fewer than `nodes` entries (even none) when
    fewer such nodes have an eligible open GPU.
    """
    req = request.requirements
    seen: list[tuple[int, str, set[GpuRef]]] = []
    looked = 0
    for count in sorted(walk.open.buckets, reverse=True):
        if len(seen) >= req.nodes and count < -seen[req.nodes - 1][0]:
            break  # no later node can beat the ones kept
        for node in walk.open.buckets[count]:
            looked += 1
            refs = walk.eligible_refs(request, node)
            if refs and walk.capable(req, node):
                seen.append((-len(refs), node, refs))
                seen.sort(key=lambda s: (s[0], s[1]))
                del seen[req.nodes :]
            if looked >= GANG_NODE_SEARCH_LIMIT:
                break
        if looked >= GANG_NODE_SEARCH_LIMIT:
            break
    return [(node, refs) for _, node, refs in seen]
