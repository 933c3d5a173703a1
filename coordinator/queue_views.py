"""Each queue as `GET /queues` and `gpuctl queues` show it: its terms and where it stands now.

Pure: read from the replicated table (policy, per-queue counts) and the
inventory's size, so any server answers alike. Cost O(queues + preempting leases).
"""

from __future__ import annotations

from typing import Any

from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.queue_rules import QueueBook


def queue_views(table: LeaseTable, inventory: Inventory) -> list[dict[str, Any]]:
    """One JSON-ready dict per queue (declared ones, `default`, and any holding or awaiting GPUs), by name."""
    policy = table.queue_policy
    ledger = table.queue_ledger
    book = QueueBook(policy, ledger, len(inventory))
    preempting: dict[str, int] = {}
    for allocation_id in table.preempting_ids():
        alloc = table.allocation(allocation_id)
        if alloc is not None:
            preempting[alloc.request.queue_name] = preempting.get(alloc.request.queue_name, 0) + 1
    names = sorted({*policy.names(), *ledger.gpus, *ledger.waiting})
    views = []
    for name in names:
        spec = policy.spec(name)
        children = policy.children(name)
        members = children or (name,)
        in_use = sum(ledger.gpus[m] for m in members)
        view = spec.to_wire()
        view["guaranteed_gpus"] = spec.guarantee
        view["guaranteed_by_model"] = {m: n for m, n in spec.guaranteed_by_model}
        view.update(
            declared=policy.declared(name),
            children=list(children),
            in_use_gpus=in_use,
            borrowed_gpus=max(0, in_use - spec.guarantee),
            fair_share_gpus=round(sum(book.fair_share(m) for m in members), 3),
            pending_requests=sum(len(ledger.waiting[m]) for m in members if m in ledger.waiting),
            pending_gpus=sum(ledger.pending_gpus[m] for m in members),
            preempting_leases=sum(preempting.get(m, 0) for m in members),
        )
        views.append(view)
    return views
