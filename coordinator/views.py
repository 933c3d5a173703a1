"""The JSON shapes the outside world sees: API objects, webhooks and workflow events.

One module so that an allocation looks the same in `/gpu/allocate`,
`/gpu/list`, a webhook and a graph-service event. Times are RFC 3339 UTC.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

from coordinator.model import (
    Allocation,
    AllocationRequest,
    LeaseEvent,
    QueuedRequest,
    RequestRecord,
)
from coordinator.pending_reasons import PendingReason
from coordinator.share_placement import SHARE_GROUP_ANY, ShareIndex

JsonObject = dict[str, Any]


def rfc3339(ts: float | None) -> str | None:
    """Seconds since the epoch as RFC 3339 UTC with milliseconds, e.g. 2026-11-26T17:48:20.123Z."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def requirements_view(request: AllocationRequest) -> JsonObject:
    req = request.requirements
    view: JsonObject = {
        "gpu_count": req.gpu_count,
        "min_memory_mb": req.min_memory_mb,
        "max_utilization": req.max_utilization,
        "gpu_model": req.gpu_model,
        "node": req.node,
        "mig_profile": req.mig_profile,
        "ttl_seconds": request.ttl_s,
        "decided_by": request.decided_by,
        "estimate": dict(request.estimate),
    }
    if req.is_gang:
        # gpu_count is per node; the request's own names for the shape.
        view["nodes"] = req.nodes
        view["gpus_per_node"] = req.gpu_count
    return view


def allocation_view(
    alloc: Allocation,
    gang: tuple[Allocation, ...] = (),
    *,
    shares: ShareIndex | None = None,
    mps: Mapping[str, str] | None = None,
) -> JsonObject:
    """An allocation as the API returns it (SPEC.md's allocation object).

    With `gang` (every member lease, rank order), the whole gang: its id, all
    its GPUs, and per node its GPUs under `nodes`, with the `rendezvous`;
    `node`, `gpu_ids`, `cuda_visible_devices` and `topology` stay the first
    node's. Without it, a gang member alone says which gang it belongs to.
    """
    if gang:
        return _gang_view(gang)
    request = alloc.request
    view: JsonObject = {
        "id": alloc.allocation_id,
        "allocation_id": alloc.allocation_id,
        "status": "allocated",
        "request_id": request.request_id,
        "service_name": request.service_name,
        "workload_type": request.workload_type,
        "priority": request.priority,
        "node": alloc.node,
        "gpu_ids": [g.index for g in alloc.gpus],
        "gpus": [
            {
                "node": g.node,
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_mb": g.memory_total_mb,
                **({} if g.mig_profile is None else {"mig_profile": g.mig_profile, "parent_uuid": g.parent_uuid}),
            }
            for g in alloc.gpus
        ],
        # Comma-joined UUIDs: `export CUDA_VISIBLE_DEVICES=<this>` works as is,
        # and UUIDs (unlike indices) survive a change of enumeration order.
        "cuda_visible_devices": ",".join(g.uuid for g in alloc.gpus),
        "allocated_at": rfc3339(alloc.allocated_at),
        "expires_at": rfc3339(alloc.expires_at),
        "queue_name": request.queue_name,
        "preemptible": request.preemptible,
        "requirements": requirements_view(request),
        # How the GPUs are wired (coordinator/topology.py); null where the node did not say.
        "topology": None if alloc.topology is None else alloc.topology.to_wire(),
        # The MIG slice held (coordinator/mig.py); null for whole GPUs.
        "mig": mig_view(alloc),
        # The share of a GPU held (coordinator/share_placement.py); null for whole units.
        "shared": shared_view(alloc, shares, mps),
    }
    if alloc.gang is not None:
        view["gang"] = {"gang_id": alloc.gang.gang_id, "rank": alloc.gang.rank, "size": alloc.gang.size}
    if request.workflow_id is not None:
        view["workflow_id"] = request.workflow_id
    return view


def _gang_view(members: tuple[Allocation, ...]) -> JsonObject:
    first = members[0]
    assert first.gang is not None
    view = allocation_view(first)
    del view["gang"]
    view["id"] = view["allocation_id"] = first.gang.gang_id
    view["gang_id"] = first.gang.gang_id
    view["gpus"] = [gpu for m in members for gpu in allocation_view(m)["gpus"]]
    view["nodes"] = [
        {
            "rank": rank,
            "node": m.node,
            "allocation_id": m.allocation_id,
            "gpu_ids": [g.index for g in m.gpus],
            "cuda_visible_devices": ",".join(g.uuid for g in m.gpus),
            "topology": None if m.topology is None else m.topology.to_wire(),
        }
        for rank, m in enumerate(members)
    ]
    low, high = first.gang.rendezvous_ports
    # What torch.distributed's launchers take: --master_addr, --master_port, --nnodes (--node_rank = rank).
    view["rendezvous"] = {
        "address": first.gang.rendezvous_address,
        "port": first.gang.rendezvous_port,
        "port_range": [low, high],
        "nnodes": len(members),
    }
    return view


def shared_view(alloc: Allocation, shares: ShareIndex | None, mps: Mapping[str, str] | None) -> JsonObject | None:
    """`{"gpu_memory_mb", "gpu_memory_total_mb", "cross_queue", "co_tenants", "mps"}` for a share, else None.

    The budget is what the holder should keep its process to (e.g. PyTorch's
    `set_per_process_memory_fraction(gpu_memory_mb / gpu_memory_total_mb)`):
    nothing enforces it on the GPU, but the agent flags a GPU whose used memory
    passes the sum of its shares' budgets (docs/shapes.md). Its `mps` is the
    environment of an MPS client (the configured directories, plus the budget
    as a limit that MPS enforces), or None without MPS configured.
    """
    if alloc.share_group is None:
        return None
    gpu = alloc.gpus[0]
    budget_mb = alloc.request.requirements.share_mb
    return {
        "gpu_memory_mb": budget_mb,
        "gpu_memory_total_mb": gpu.memory_total_mb,
        "cross_queue": alloc.share_group == SHARE_GROUP_ANY,
        "co_tenants": None if shares is None else max(0, len(shares.tenants(gpu.ref)) - 1),
        "mps": mps_environment(mps, budget_mb) if mps else None,
    }


def mps_environment(directories: Mapping[str, str], budget_mb: int | None) -> JsonObject:
    """The environment a share's MPS client sets: `directories` plus its memory limit.

    CUDA_MPS_PINNED_DEVICE_MEM_LIMIT is "ordinal=limit[,ordinal=limit...]" over
    the devices the client sees (NVIDIA's MPS guide: "0=1G,1=512MB"); with
    `cuda_visible_devices` (the one GPU's UUID) exported, that GPU is ordinal 0.
    The budget is in MiB (as every MB here): "<budget>M" is that, or a little
    less if MPS counts M as 10^6 bytes, never more. Only an MPS client honours
    it, so it is given only where MPS is configured: outside MPS it would read
    as a limit that nothing enforces.
    """
    env: JsonObject = dict(directories)
    if budget_mb is not None:
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={budget_mb}M"
    return env


def mig_view(alloc: Allocation) -> JsonObject | None:
    """`{"profile", "instance_uuids", "gpu_uuids"}` for an allocation of MIG slices, else None."""
    slices = [g for g in alloc.gpus if g.mig_profile is not None]
    if not slices:
        return None
    return {
        "profile": slices[0].mig_profile,
        "instance_uuids": [g.uuid for g in slices],
        "gpu_uuids": [g.parent_uuid for g in slices],
    }


def queued_view(queued: QueuedRequest, position: int, pending: PendingReason | None = None) -> JsonObject:
    """A waiting request; `position` is 1 for the next one served; `pending` why it waits
    (coordinator/pending_reasons.py): `reason`, `reason_detail` and, while leases are
    being preempted for it, `preempting_deadline` (all null when not known)."""
    request = queued.request
    view: JsonObject = {
        "status": "queued",
        "request_id": request.request_id,
        "service_name": request.service_name,
        "workload_type": request.workload_type,
        "priority": request.priority,
        "position": position,
        "submitted_at": rfc3339(request.submitted_at),
        "queue_deadline": rfc3339(queued.deadline),
        "queue_name": request.queue_name,
        "preemptible": request.preemptible,
        "reason": None if pending is None else pending.reason,
        "reason_detail": None if pending is None else pending.detail,
        "preempting_deadline": None if pending is None else rfc3339(pending.deadline),
        "requirements": requirements_view(request),
    }
    if request.workflow_id is not None:
        view["workflow_id"] = request.workflow_id
    return view


def record_view(
    record: RequestRecord, allocation: Allocation | None, queued: JsonObject | None, gang: tuple[Allocation, ...] = ()
) -> JsonObject:
    """GET /gpu/requests/{id}: the status of a request id and what it became."""
    view: JsonObject = {
        "request_id": record.request_id,
        "service_name": record.service_name,
        "status": record.status,
        "submitted_at": rfc3339(record.submitted_at),
        "updated_at": rfc3339(record.updated_at),
        "allocation_id": record.allocation_id,
        "reason": record.reason,
    }
    if allocation is not None:
        view["allocation"] = allocation_view(allocation, gang)
    if queued is not None:
        view["queue"] = queued
    return view


# A LeaseEvent kind whose outside name differs (SPEC "Lease end reasons": the
# webhook and graph event before `preempted` is `lease_preempting`).
_EVENT_NAMES = {"preempting": "lease_preempting"}


def event_name(kind: str) -> str:
    """The name webhooks and graph events give a LeaseEvent kind."""
    return _EVENT_NAMES.get(kind, kind)


def webhook_payload(event: LeaseEvent) -> JsonObject:
    """The body POSTed to a request's `webhook_url` (the seed's fields, plus event and reason).

    `lease_preempting` adds `deadline` (RFC 3339): when the lease ends unless
    released first; `reason` says why (reclaim, priority or idle). The end is
    `preempted` with reason `preempted` or `idle`.
    """
    request = event.request
    name = event_name(event.kind)
    payload: JsonObject = {
        "status": name,
        "event": name,
        "reason": event.reason,
        "request_id": request.request_id,
        "service_name": request.service_name,
        "submitted_at": rfc3339(request.submitted_at),
        "at": rfc3339(event.at),
        "allocation": None if event.allocation is None else allocation_view(event.allocation, event.gang),
    }
    if event.kind == "lost" and event.allocation is not None:
        # The host the lease was lost with, at the top level: what a receiver
        # needs to decide where to reschedule, without reading the allocation.
        payload["node"] = event.allocation.node
        if event.gang:
            # Every member's host: which one was lost is in the logs, not in this event.
            payload["nodes"] = [m.node for m in event.gang]
    if event.deadline is not None:
        payload["deadline"] = rfc3339(event.deadline)
    if event.kind == "allocated" and event.allocation is not None:
        payload["allocated_at"] = rfc3339(event.allocation.allocated_at)
        payload["wait_time_seconds"] = round(event.allocation.allocated_at - request.submitted_at, 3)
    if request.workflow_id is not None:
        payload["workflow_id"] = request.workflow_id
    return payload


def graph_event(event: LeaseEvent, node: str) -> JsonObject:
    """The workflow event POSTed to the graph service for every lifecycle change (`deadline` as in webhooks)."""
    request = event.request
    name = event_name(event.kind)
    doc: JsonObject = {
        "type": f"gpu.allocation.{name}",
        "event": name,
        "reason": event.reason,
        "at": rfc3339(event.at),
        "source": {"service": "gpu-orchestrator", "node": node},
        "workflow_id": request.workflow_id,
        "request_id": request.request_id,
        "service_name": request.service_name,
        "workload_type": request.workload_type,
        "priority": request.priority,
        "allocation_id": None if event.allocation is None else allocation_view(event.allocation, event.gang)["id"],
        "allocation": None if event.allocation is None else allocation_view(event.allocation, event.gang),
    }
    if event.deadline is not None:
        doc["deadline"] = rfc3339(event.deadline)
    return doc


def usage_view(
    by: str, first_hour: int, last_hour: int, rows: list[tuple[str, float, float]], retention_s: float
) -> JsonObject:
    """GET /usage: GPU-seconds per queue or service over the whole hours [first_hour, last_hour).

    `rows` are (name, allocated, utilized) as LeaseTable.usage gives them.
    `utilization` is utilized ÷ allocated (null when nothing was allocated).
    """
    usage = [
        {
            by: name,
            "allocated_gpu_seconds": allocated,
            "utilized_gpu_seconds": utilized,
            "utilization": utilized / allocated if allocated > 0 else None,
        }
        for name, allocated, utilized in rows
    ]
    return {
        "by": by,
        "since": rfc3339(first_hour * 3600.0),
        "until": rfc3339(last_hour * 3600.0),
        "retention_days": retention_s / 86_400.0,
        "usage": usage,
        "totals": {
            "allocated_gpu_seconds": sum(row[1] for row in rows),
            "utilized_gpu_seconds": sum(row[2] for row in rows),
        },
    }
