"""Why a queued request waits: the reason the API and `gpuctl list` show.

Theory of operation
-------------------
Reasons are worked out when asked, from the replicated table and the
inventory, so any server answers the same way and nothing is stored per
request. In order, the first that applies:

1. `preempting` - victims are in their grace period for it (deadline given).
2. `queue_quota` - its queue's rules forbid it now: the cap, or beyond the
   guarantee while not preemptible or not allowed to borrow (queue_rules.py).
3. `drained_or_unhealthy` - some node has enough GPUs of its shape, but not
   enough of them schedulable.
4. `reservation` - it would fit on free GPUs, which are held for earlier requests.
5. `priority` - it does not fit now and waits behind N higher-ranked requests.
6. `resources` - it waits first in line and no node has the shape free; the
   closest node is named.

For a gang (`nodes` > 1) "has the shape" means: enough nodes, each with
`gpu_count` such GPUs; the details count nodes.

Cost: the node analysis (3-6) walks the inventory once per set of
requirements per explainer, and an explainer serves one API call, so a
listing of the whole queue costs O(GPUs × distinct shapes), not O(GPUs ×
queued requests); a single request's reason costs one walk of the GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, Requirements
from coordinator.queue_rules import QueueBook, Standing

REASONS = ("queue_quota", "priority", "resources", "reservation", "drained_or_unhealthy", "preempting")


@dataclass(frozen=True, slots=True)
class PendingReason:
    reason: str
    detail: str
    # For `preempting`: when the last victim's grace period ends.
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class _ShapeFit:
    """The best node for a shape by each count: free and schedulable, schedulable, any."""

    free: tuple[int, str | None]
    schedulable: tuple[int, str | None]
    present: tuple[int, str | None]
    # How many nodes reach `gpu_count` by each count (what a gang needs `nodes` of).
    nodes_free: int = 0
    nodes_schedulable: int = 0
    nodes_present: int = 0


class PendingExplainer:
    """Reasons for the requests of one table and inventory; build one per API call."""

    def __init__(self, table: LeaseTable, inventory: Inventory) -> None:
        self._table = table
        self._inventory = inventory
        self._book = QueueBook(table.queue_policy, table.queue_ledger, len(inventory))
        self._fits: dict[Requirements, _ShapeFit] = {}

    def explain(self, request_id: str) -> PendingReason | None:
        """The reason `request_id` waits, or None when it does not wait."""
        queued = self._table.queued(request_id)
        if queued is None:
            return None
        request = queued.request
        claim = self._table.claim(request_id)
        if claim is not None:
            deadlines = [d for v in claim[1] if (d := self._table.preempting(v)) is not None]
            if deadlines:
                return PendingReason(
                    "preempting",
                    f"{len(deadlines)} lease(s) on {claim[0]} are being preempted for it",
                    max(deadlines),
                )
        if self._table.queue_policy.configured:
            verdict = self._book.classify(request)
            if verdict.standing is Standing.QUOTA:
                return PendingReason("queue_quota", verdict.detail)
        return self._by_nodes(request)

    def _by_nodes(self, request: AllocationRequest) -> PendingReason:
        if request.requirements.is_gang:
            return self._gang_by_nodes(request)
        need = request.requirements.gpu_count
        fit = self._fit(request.requirements)
        if fit.present[0] >= need and fit.schedulable[0] < need:
            return PendingReason(
                "drained_or_unhealthy",
                f"node {fit.present[1]} has {fit.present[0]} matching GPU(s) but only "
                f"{fit.schedulable[0]} schedulable (the rest drained or unhealthy)",
            )
        ahead = (self._table.queue_position(request.request_id) or 1) - 1
        if fit.free[0] >= need:
            if ahead:
                return PendingReason(
                    "reservation", f"free GPUs that fit are held for {ahead} earlier request(s)"
                )
            return PendingReason(
                "reservation", f"fits on node {fit.free[1]}: placed at the next scheduling pass unless in unleased use"
            )
        if ahead:
            return PendingReason("priority", f"waits behind {ahead} higher-ranked request(s)")
        closest = f"closest fit: node {fit.free[1]} with {fit.free[0]} free" if fit.free[1] else "no matching GPU is free"
        return PendingReason("resources", f"no node has {need} matching GPU(s) free; {closest}")

    def _gang_by_nodes(self, request: AllocationRequest) -> PendingReason:
        req = request.requirements
        fit = self._fit(req)
        shape = f"{req.nodes} nodes with {req.gpu_count} matching GPU(s) each"
        if fit.nodes_present >= req.nodes and fit.nodes_schedulable < req.nodes:
            return PendingReason(
                "drained_or_unhealthy",
                f"{fit.nodes_present} node(s) have {req.gpu_count} matching GPU(s) but only "
                f"{fit.nodes_schedulable} that many schedulable (the rest drained or unhealthy); the gang needs {req.nodes}",
            )
        ahead = (self._table.queue_position(request.request_id) or 1) - 1
        if fit.nodes_free >= req.nodes:
            if ahead:
                return PendingReason("reservation", f"free GPUs that fit are held for {ahead} earlier request(s)")
            return PendingReason("reservation", f"{shape} are free: placed at the next scheduling pass")
        if ahead:
            return PendingReason("priority", f"waits behind {ahead} higher-ranked request(s)")
        return PendingReason(
            "resources",
            f"the gang needs {shape} free; {fit.nodes_free} node(s) have that many now "
            "(free GPUs on its closest nodes are held for it)",
        )

    def _fit(self, req: Requirements) -> _ShapeFit:
        cached = self._fits.get(req)
        if cached is not None:
            return cached
        best: dict[str, tuple[int, str | None]] = {"free": (0, None), "schedulable": (0, None), "present": (0, None)}
        reaching = {"free": 0, "schedulable": 0, "present": 0}
        nodes = [req.node] if req.node is not None else self._inventory.nodes()
        for node in nodes:
            counts = {"free": 0, "schedulable": 0, "present": 0}
            for view in self._inventory.node_views(node):
                if not req.matches_statically(view):
                    continue
                counts["present"] += 1
                if view.schedulable:
                    counts["schedulable"] += 1
                    if self._table.holder(view.ref) is None:
                        counts["free"] += 1
            for key, count in counts.items():
                if count > best[key][0]:
                    best[key] = (count, node)
                if count >= req.gpu_count:
                    reaching[key] += 1
        fit = _ShapeFit(
            best["free"], best["schedulable"], best["present"],
            reaching["free"], reaching["schedulable"], reaching["present"],
        )
        self._fits[req] = fit
        return fit


def why_pending(table: LeaseTable, inventory: Inventory, request_id: str) -> PendingReason | None:
    """The reason `request_id` waits (see the module docstring), or None when it does not wait."""
    return PendingExplainer(table, inventory).explain(request_id)
