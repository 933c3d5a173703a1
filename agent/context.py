"""What the HTTP layer reads: the agent's parts and the read-only views built from them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import NotFound
from coordinator.fragmentation import LargestRequest, cluster_largest_request, node_largest_request
from coordinator.lease_table import LeaseTable
from coordinator.mig import gpu_of_slice, slice_index
from coordinator.model import UNHEALTHY, GpuRef, GpuView
from coordinator.views import rfc3339

from agent.api_keys import ApiKeyring
from agent.audit import AuditTrail
from agent.cluster import ClusterRuntime
from agent.config import AgentConfig, exposure_warnings
from agent.device_sampler import DeviceSampler, GpuSnapshot
from agent.http_listener import ApiTls
from agent.devices.base import GpuReading
from agent.inventory_feed import InventoryFeed, overlay
from agent.leadership import Leadership
from agent.membership import MembershipService, RemoteGpu
from agent.node_meta import GpuMeta
from agent.metrics import AgentMetrics
from agent.queue_policy_sync import ConfiguredPolicy
from agent.replication import Replication, server_problem
from agent.workload_analysis import WorkloadAnalysis

# A state-file write running this long means the disk is not making progress: a
# healthy fsync takes milliseconds, and a Raft server stalled past an election
# timeout (1 s) has already lost leadership, so /healthz says degraded from here.
DISK_STALL_DEGRADED_S = 1.0

@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds a GPU, for a /gpu/status row."""

    allocation_id: str
    service_name: str
    allocated_at: str | None  # RFC 3339


# (node, index) -> its holder; GPUs not in it are free.
Holders = Mapping[tuple[str, int], LeaseHolder]


class TableHolders(Mapping[tuple[str, int], LeaseHolder]):
    """Each held GPU's holder, looked up in a replica of the lease table when asked (a page of
    rows costs its own GPUs, not every lease in the cluster)."""

    def __init__(self, table: LeaseTable) -> None:
        self._table = table

    def __getitem__(self, key: tuple[str, int]) -> LeaseHolder:
        allocation_id = self._table.holder(GpuRef(*key))
        alloc = None if allocation_id is None else self._table.allocation(allocation_id)
        if alloc is None:
            raise KeyError(key)
        return LeaseHolder(alloc.allocation_id, alloc.request.service_name, rfc3339(alloc.allocated_at))

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((ref.node, ref.index) for ref in self._table.held_gpus())

    def __len__(self) -> int:
        return len(self._table.held_gpus())


def holders_from_table(table: LeaseTable) -> Holders:
    """Every held GPU's holder, from a replica of the lease table."""
    return TableHolders(table)


def holders_from_allocations(allocations: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], LeaseHolder]:
    """Every held GPU's holder, from allocation objects as /gpu/list returns them (a client asks the leader)."""
    out: dict[tuple[str, int], LeaseHolder] = {}
    for alloc in allocations:
        holder = LeaseHolder(str(alloc["allocation_id"]), str(alloc["service_name"]), alloc.get("allocated_at"))
        for gpu in alloc["gpus"]:
            out[(str(gpu["node"]), int(gpu["index"]))] = holder
    return out


def degraded_reason(devices: str | None, write_stalled_s: float) -> str | None:
    """Why /healthz says degraded (device telemetry, a stalled state-file write), or None when ok."""
    reasons = [devices] if devices else []
    if write_stalled_s >= DISK_STALL_DEGRADED_S:
        reasons.append(f"state file write stalled for {write_stalled_s:.1f} s")
    return "; ".join(reasons) or None


@dataclass
class AgentContext:
    """The running agent's parts, for handlers and metrics (all on the trio thread).

    Every agent has the same parts; what differs is only what they hold now:
    a replica of the table once this server's log runs (never on a client), and
    a lease service while this server is the ready leader.
    """

    config: AgentConfig
    sampler: DeviceSampler
    metrics: AgentMetrics
    keyring: ApiKeyring | None
    version: str
    started_at: float
    membership: MembershipService
    replication: Replication
    leadership: Leadership
    cluster: ClusterRuntime
    inventory: InventoryFeed
    analysis: WorkloadAnalysis
    # Refreshed by a background task; a handler never waits on the disk for it.
    outbox_pending: int = 0
    outbox_gave_up: int = 0
    advertise_http: str = field(default="")
    # Wall-clock time of the last applied entry (the age of a stale read).
    last_applied_at: float = 0.0
    # The API's TLS contexts, reloaded on SIGHUP; None in set-ups without a listener.
    tls: ApiTls | None = None
    # The write audit trail (agent/audit.py), flushed by the housekeeping task.
    audit: AuditTrail | None = None
    # The queue policy of the configuration in force, which the leader makes the
    # cluster's (agent/queue_policy_sync.py); updated on SIGHUP.
    configured_policy: ConfiguredPolicy | None = None

    @property
    def node(self) -> str:
        return self.config.agent.node_name

    @property
    def table(self) -> LeaseTable | None:
        """This server's replica of the lease table; None on a client and before the log recovered."""
        replica = self.replication.log
        return None if replica is None else replica.table

    def disk_stalled_seconds(self) -> float:
        replica = self.replication.log
        return 0.0 if replica is None else replica.disk_stalled_seconds()

    def raft_health(self) -> dict[str, Any]:
        """The /healthz `raft` object: the replica's view, and the leader a client or non-voter learnt by asking."""
        raft = self.replication.health()
        learnt = self.cluster.learnt_leader()
        if raft.get("leader") is None and learnt is not None:
            raft["leader"] = learnt.node
            raft.setdefault("term", learnt.term)
            if raft["role"] == "client":
                raft["term"] = learnt.term
        raft.setdefault("term", None)
        raft.setdefault("leader", None)
        return raft

    def health(self) -> dict[str, Any]:
        """GET /healthz: ok, or degraded with the reason; always 200 so probes stay simple."""
        stalled = self.disk_stalled_seconds()
        degraded = degraded_reason(self.sampler.degraded_reason, stalled)
        raft = self.raft_health()
        doc: dict[str, Any] = {
            "status": "degraded" if degraded else "ok",
            "degraded": degraded,
            "service": "gpu-orchestrator",
            "version": self.version,
            "node": self.node,
            "role": str(raft["role"]),
            "leader": raft["leader"],
            "started_at": rfc3339(self.started_at),
            # The Go service's /healthz had it: when this answer was made.
            "timestamp": rfc3339(time.time()),
            # Set-up choices that make this agent unsafe to expose (auth off beyond loopback, ...).
            "warnings": exposure_warnings(self.config),
            "devices": {
                "backend": self.sampler.backend.kind,
                "gpus": len(self.sampler.readings),
                "unhealthy": sum(1 for snap in self.sampler.snapshots() if snap.health.state == UNHEALTHY),
                "degraded": self.sampler.degraded_reason,
                "last_sample_at": rfc3339(self.sampler.last_sample_at),
            },
            "outbox": {"pending": self.outbox_pending, "gave_up": self.outbox_gave_up},
            "raft": raft,
        }
        if self.replication.waiting_for:
            doc["waiting_for"] = self.replication.waiting_for
        table, replica = self.table, self.replication.log
        if table is not None and replica is not None:
            doc["lease_table"] = {
                "allocations": len(table.allocations()),
                "queue_depth": table.queue_length(),
                "applied_index": replica.applied_index,
                "snapshot_index": replica.snapshot_index,
                "write_stalled_seconds": round(stalled, 3),
            }
        return doc

    def status_line(self) -> str:
        """One line for systemd's STATUS= (`systemctl status`): role, node, GPUs, members, degradation."""
        snaps = self.sampler.snapshots()
        unhealthy = sum(1 for snap in snaps if snap.health.state == UNHEALTHY)
        kind = "server" if self.config.cluster.server else "client"
        counts = self.membership.member_counts() if self.membership.started else {}
        alive = counts.get("alive", 1)
        raft = self.raft_health()
        if self.replication.waiting_for:
            leading = f"waiting for {self.replication.waiting_for}"
        elif raft["role"] == "client":
            leading = "raft client"
        else:
            leading = f"raft {raft['role']}, term {raft['term']}"
        line = (
            f"{kind} {self.node} ({leading}): {len(snaps)} GPU(s), {unhealthy} unhealthy; "
            f"{alive} member(s) alive"
        )
        if counts.get("suspect") or counts.get("dead"):
            line += f", {counts.get('suspect', 0)} suspect, {counts.get('dead', 0)} dead"
        degraded = degraded_reason(self.sampler.degraded_reason, self.disk_stalled_seconds())
        return line + (f"; degraded: {degraded}" if degraded else "")

    def gpu_rows(
        self,
        holders: Holders | None = None,
        *,
        node: str | None = None,
        after: tuple[str, int] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """GET /gpu/status rows in (node, index) order: every GPU of the cluster, or one page of them.

        This agent's GPUs come from its sampler (`"source": "local"`); other
        live members' from their gossip metadata (`"source": "gossip"`, with the
        age of that metadata). Drains and recorded verdicts are laid over both
        by the inventory's overlay, as the scheduler sees them. Who holds each
        GPU comes from `holders` (a client passes the leader's), else from this
        server's replica; without either, the gossiped "allocated" flags.
        `node` keeps one node's GPUs; `after` starts past that (node, index);
        `limit` stops there. Rows are built for the page only.
        """
        table = self.table
        if holders is None and table is not None:
            holders = holders_from_table(table)
        # Another cluster's GPUs (a lone agent sharing the gossip) keep what their own gossip says.
        ours = self.inventory.inventory()
        now = time.time()
        rows: list[dict[str, Any]] = []
        for name, gpus in self._gpus_by_node(node, after):
            for gpu in gpus:
                if limit is not None and len(rows) >= limit:
                    return rows
                if isinstance(gpu, GpuSnapshot):
                    rows.append(self._row(gpu, table, holders))
                else:
                    rows.append(_gossip_row(gpu, now, holders if ours.node_views(name) else None, table))
        return rows

    def _gpus_by_node(
        self, node: str | None, after: tuple[str, int] | None
    ) -> Iterator[tuple[str, Sequence[GpuSnapshot | RemoteGpu]]]:
        """(node, its GPUs in index order) for the nodes a page covers, in name order."""
        names = [self.node]
        if self.membership.started:
            names += [m.view.name for m in self.membership.members() if m.view.name != self.node]
        for name in sorted(names):
            if (node is not None and name != node) or (after is not None and name < after[0]):
                continue
            if name == self.node:
                gpus: Sequence[GpuSnapshot | RemoteGpu] = self.sampler.snapshots()
            else:
                gpus = self.membership.live_gpus(name)
            if after is not None and name == after[0]:
                gpus = [g for g in gpus if _index(g) > after[1]]
            if gpus:
                yield name, gpus

    def gpu_summary(self) -> dict[str, Any]:
        """GET /gpu/status?summary=true: counts per node and for the cluster, no per-GPU rows."""
        nodes: list[dict[str, Any]] = []
        table = self.table
        ours = self.inventory.inventory()
        largest: list[LargestRequest] = []
        # Without a table (a Raft client) the room left on shared GPUs is unknown: they count as held.
        shared = table.shares.gpus if table is not None else {}
        held: Callable[[GpuRef], bool]
        for name, gpus in self._gpus_by_node(None, None):
            views = ours.node_views(name)
            refs = [GpuRef(name, _index(g)) for g in gpus]
            if table is not None and views:
                held = _table_holds(table)
            else:
                # What gossip says, MIG slices included (a slice's `allocated` is its own).
                held = {
                    GpuRef(name, meta.index)
                    for g in gpus
                    if isinstance(g, RemoteGpu)
                    for meta in (g.gpu, *g.slices)
                    if meta.allocated
                }.__contains__
            largest.append(node_largest_request(views, held, ours.topology(name), shared=shared))
            nodes.append(
                {
                    "node": name,
                    "gpus": len(gpus),
                    "allocated": sum(1 for ref in refs if held(ref)),
                    "unhealthy": sum(1 for v in views if v.health == UNHEALTHY),
                    "drained": sum(1 for v in views if v.drained),
                    "scheduled_here": bool(views),
                    # The largest request this node could take now (coordinator/fragmentation.py).
                    "largest_request": largest[-1].to_wire(),
                }
            )
        totals = {key: sum(n[key] for n in nodes) for key in ("gpus", "allocated", "unhealthy", "drained")}
        cluster = cluster_largest_request(largest).to_wire()
        return {"summary": {"nodes": len(nodes), **totals, "largest_request": cluster}, "nodes": nodes}

    def gpu_row(self, node: str, index: int) -> dict[str, Any]:
        """One GPU's row. Raises NotFound for a GPU this agent does not know."""
        snap = self.sampler.snapshot(index) if node == self.node else None
        if snap is None:
            if node != self.node:
                for row in self.gpu_rows(node=node):
                    if row["index"] == index:
                        return row
            raise NotFound(f"no GPU {node}/{index}")
        table = self.table
        return self._row(snap, table, None if table is None else holders_from_table(table))

    def _row(self, snap: GpuSnapshot, table: LeaseTable | None, holders: Holders | None) -> dict[str, Any]:
        r = snap.reading
        ref = GpuRef(self.node, r.index)
        holder = (holders or {}).get((self.node, r.index))
        drains = table.drained() if table is not None else {}
        now = self.sampler.last_sample_at or r.sampled_at
        return {
            "id": r.index,
            "node": self.node,
            "index": r.index,
            "uuid": r.uuid,
            "name": r.name,
            "memory_total": r.memory_total_mb,
            "memory_used": r.memory_used_mb,
            "memory_free": r.memory_free_mb,
            "utilization": r.utilization_gpu_pct,
            "temperature": r.temperature_c,
            "power_draw": r.power_draw_w,
            "last_updated": rfc3339(r.sampled_at),
            **_holder_fields(holder),
            "health": snap.health.state,
            "health_reasons": list(snap.health.reasons),
            "healthy_again_at": rfc3339(snap.health.until),
            "present": snap.present,
            "drained": ref in drains,
            "drain_reason": drains.get(ref) or None,
            "processes": None
            if r.processes is None
            else [{"pid": p.pid, "used_memory_mb": p.used_memory_mb} for p in r.processes],
            "in_use_without_lease": self.sampler.usage.unleased_in_use(r.index),
            "lease_idle_seconds": round(self.sampler.usage.idle_seconds(r.index, now), 1),
            "telemetry": _telemetry(r),
            "source": "local",
            # In MIG mode the GPU is leased by instance (coordinator/mig.py): each with its holder.
            **({"mig_instances": _mig_rows(self.node, r, holders)} if r.mig_mode else {}),
        }

    def members(self) -> list[dict[str, Any]]:
        """GET /cluster/members: the gossip view, by name; this agent alone if membership is off."""
        alone = {
            "name": self.node,
            "status": "alive",
            "role": "server" if self.config.cluster.server else "client",
            "leader": self.raft_health()["leader"] == self.node,
            "incarnation": 0,
            "addresses": {"http": self.advertise_http},
            "version": self.version,
            "gpus": len(self.sampler.readings),
            "self": True,
        }
        if not self.membership.started:
            return [alone]
        out: list[dict[str, Any]] = []
        raft_leader = self.raft_health()["leader"]
        for member in self.membership.members():
            view, meta = member.view, member.meta
            is_self = view.name == self.node
            out.append(
                {
                    "name": view.name,
                    "status": view.status,
                    "role": meta.role if meta else None,
                    "leader": view.name == raft_leader,
                    "incarnation": view.incarnation,
                    "addresses": {
                        "http": self.advertise_http if is_self else (meta.http_url if meta else None),
                        "gossip": f"{view.address[0]}:{view.address[1]}",
                        "raft": meta.raft_address if meta else None,
                    },
                    "version": meta.version if meta else None,
                    "labels": dict(meta.labels) if meta else {},
                    "gpus": len(self.sampler.readings) if is_self else (meta.gpu_count if meta else 0),
                    "gpu_models": sorted({g.model for g in meta.gpus}) if meta else [],
                    "self": is_self,
                }
            )
        return out

    def voters(self) -> tuple[str, ...]:
        """The Raft voters of this server's latest configuration (none before its log runs, or on a client)."""
        return self.replication.voters() or ()

    def servers(self) -> dict[str, Any]:
        """GET /cluster/servers: the Raft configuration and the other servers gossip knows (Replication.servers)."""
        raft = self.raft_health()
        return {"servers": self.replication.servers(), "leader": raft["leader"], "term": raft["term"]}

    def server_problem(self, name: str) -> str | None:
        """Why `name` cannot be added as a voter by gossip's view (agent.replication.server_problem), or None."""
        if not self.membership.started:
            return "unknown"
        return server_problem(self.membership, name)


# Reading fields shown under "telemetry" in /gpu/status, in NVML's units.
_TELEMETRY_FIELDS = (
    "pci_bus_id",
    "utilization_memory_pct",
    "memory_temperature_c",
    "power_limit_w",
    "total_energy_mj",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "ecc_volatile_sbe",
    "ecc_volatile_dbe",
    "ecc_aggregate_sbe",
    "ecc_aggregate_dbe",
    "retired_pages",
    "remapped_rows_correctable",
    "remapped_rows_uncorrectable",
    "remapped_rows_pending",
    "remapped_rows_failed",
    "pcie_replay_counter",
    "last_xid",
    "mig_mode",
    "gr_engine_active",
    "temperature_slowdown_c",
)


def _gossip_row(remote: RemoteGpu, now: float, holders: Holders | None, table: LeaseTable | None) -> dict[str, Any]:
    """A /gpu/status row for another member's GPU: what its gossip metadata says, fields it lacks None.

    Who holds it comes from `holders` when known, else only the gossiped flag; the
    table's drain and unhealthy verdict are laid over it (agent.inventory_feed.overlay).
    """
    g = remote.gpu
    ref = GpuRef(remote.node, g.index)
    view = overlay(
        GpuView(remote.node, g.index, g.uuid, g.model, g.memory_total_mb, health=g.health, drained=g.drained),
        table,
        local=False,
    )
    health, reasons = view.health, g.reasons
    if table is not None and health == UNHEALTHY and g.health != UNHEALTHY:
        reasons = table.gpu_health(ref)[1]
    used = None if g.memory_free_mb is None else max(0, g.memory_total_mb - g.memory_free_mb)
    return {
        "id": g.index,
        "node": remote.node,
        "index": g.index,
        "uuid": g.uuid,
        "name": g.model,
        "memory_total": g.memory_total_mb,
        "memory_used": used,
        "memory_free": g.memory_free_mb,
        "utilization": g.utilization_pct,
        "temperature": None,
        "power_draw": None,
        "last_updated": rfc3339(remote.received_at),
        **(
            _holder_fields(holders.get((remote.node, g.index)))
            if holders is not None
            else {"allocated": g.allocated, "allocated_to": None, "allocation_id": None, "allocated_at": None}
        ),
        "health": health,
        "health_reasons": list(reasons),
        "healthy_again_at": None,
        "present": None,  # gossip says health, not presence: a lost GPU shows as unhealthy
        "drained": view.drained,
        "drain_reason": (table.drained().get(ref) if table is not None else None) or None,
        "processes": None,
        "in_use_without_lease": None,
        "lease_idle_seconds": None,
        "telemetry": None,
        "source": "gossip",
        # Since the member last announced a change: unchanged state is not resent,
        # so a steady, healthy member's rows age while it stays alive and probed.
        "state_age_seconds": round(max(0.0, now - remote.received_at), 1),
        **({"mig_instances": [_gossip_slice_row(remote.node, s, holders) for s in remote.slices]} if g.mig_mode else {}),
    }


def _gossip_slice_row(node: str, s: GpuMeta, holders: Holders | None) -> dict[str, Any]:
    """A remote MIG slice as /gpu/status lists it: what gossip carries (no MIG or instance ids)."""
    gpu = gpu_of_slice(s.index)
    return {
        "index": s.index,
        "mig_index": None if gpu is None else s.index - slice_index(gpu, 0),
        "gpu_instance_id": None,
        "uuid": s.uuid,
        "profile": s.mig_profile,
        "memory_total": s.memory_total_mb,
        "memory_free": s.memory_free_mb,
        **(
            _holder_fields(holders.get((node, s.index)))
            if holders is not None
            else {"allocated": s.allocated, "allocated_to": None, "allocation_id": None, "allocated_at": None}
        ),
    }


def _table_holds(table: LeaseTable) -> Callable[[GpuRef], bool]:
    """Whether `table` has a lease on a unit (a whole GPU or a MIG slice)."""
    return lambda ref: table.holder(ref) is not None


def _index(gpu: GpuSnapshot | RemoteGpu) -> int:
    return gpu.reading.index if isinstance(gpu, GpuSnapshot) else gpu.gpu.index


def _mig_rows(node: str, r: GpuReading, holders: Holders | None) -> list[dict[str, Any]]:
    """A MIG-mode GPU's instances as GET /gpu/status lists them, each with its unit index and holder."""
    rows = []
    for instance in r.mig_instances:
        unit = slice_index(r.index, instance.mig_index)
        rows.append(
            {
                "index": unit,
                "mig_index": instance.mig_index,
                "gpu_instance_id": instance.gpu_instance_id,
                "uuid": instance.uuid,
                "profile": instance.profile,
                "memory_total": instance.memory_total_mb,
                "memory_free": instance.memory_free_mb,
                **_holder_fields((holders or {}).get((node, unit))),
            }
        )
    return rows


def _holder_fields(holder: LeaseHolder | None) -> dict[str, Any]:
    return {
        "allocated": holder is not None,
        "allocated_to": None if holder is None else holder.service_name,
        "allocation_id": None if holder is None else holder.allocation_id,
        "allocated_at": None if holder is None else holder.allocated_at,
    }


def _telemetry(r: GpuReading) -> dict[str, Any]:
    return {name: getattr(r, name) for name in _TELEMETRY_FIELDS}
