"""Value types shared by the lease table, the scheduler and the HTTP edge.

Everything here is an immutable record with a plain-dict codec (`to_wire` /
`from_wire`) made of JSON- and msgpack-safe values, because the same records
travel in log entries, snapshots, webhooks and API responses. Times are float
seconds since the Unix epoch, always passed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

HEALTHY = "healthy"
# A request's `mig_profile` that takes a MIG slice of any profile: the smallest adequate one.
MIG_ANY = "auto"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"

Wire = dict[str, Any]


@dataclass(frozen=True, slots=True, order=True)
class GpuRef:
    """One GPU in the cluster: its node's name and its NVML index on that node."""

    node: str
    index: int


@dataclass(frozen=True, slots=True)
class GpuView:
    """What the scheduler knows of one GPU: identity, latest telemetry and health.

    `memory_free_mb` and `utilization_pct` are None when the device cannot report
    them; the scheduler then relies on memory_total_mb alone. `sampled_at` lets the
    scheduler ignore telemetry taken before the GPU's last release (it describes
    the previous tenant, not unleased use).
    """

    node: str
    index: int
    uuid: str
    name: str
    memory_total_mb: int
    memory_free_mb: int | None = None
    utilization_pct: float | None = None
    health: str = HEALTHY
    drained: bool = False
    sampled_at: float = 0.0
    # For a MIG slice (coordinator/mig.py): its profile ("1g.10gb") and the
    # UUID of the GPU it is carved from; None for a whole GPU.
    mig_profile: str | None = None
    parent_uuid: str | None = None
    # Built once: the scheduler reads it several times per GPU per decision.
    ref: GpuRef = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", GpuRef(self.node, self.index))

    @property
    def schedulable(self) -> bool:
        """Not unhealthy and not drained by an operator: the only GPUs ever chosen.

        Degraded GPUs are schedulable, but best fit uses them only where no
        healthy GPU would do.
        """
        return self.health != UNHEALTHY and not self.drained


@dataclass(frozen=True, slots=True)
class Requirements:
    """What one allocation needs: `gpu_count` GPUs on each of `nodes` nodes.

    `nodes` is 1 for every ordinary request (all GPUs on a single node); above 1
    the request is a gang (coordinator/gang_placement.py): `gpu_count` GPUs on each of
    that many distinct nodes, granted all together or not at all.
    """

    gpu_count: int
    min_memory_mb: int
    max_utilization: float = 100.0
    gpu_model: str | None = None
    node: str | None = None
    nodes: int = 1
    # None: whole GPUs only. A profile ("1g.10gb"): one MIG slice of it. MIG_ANY:
    # one MIG slice of any profile, best fit taking the smallest adequate one.
    mig_profile: str | None = None
    # A share of one GPU (coordinator/share_placement.py): its memory budget in
    # MB, packed beside other shares of its sharing group. None: whole units.
    share_mb: int | None = None

    @property
    def total_gpus(self) -> int:
        """Every GPU the request takes, over all its nodes: what queue quotas count."""
        return self.gpu_count * self.nodes

    @property
    def is_gang(self) -> bool:
        return self.nodes > 1

    @property
    def is_share(self) -> bool:
        return self.share_mb is not None

    def matches_statically(self, gpu: GpuView) -> bool:
        """True when `gpu` could ever serve this request: kind of unit, model, node and total memory."""
        if not self.matches_unit(gpu.mig_profile):
            return False
        if self.node is not None and gpu.node != self.node:
            return False
        if self.gpu_model is not None and self.gpu_model.lower() not in gpu.name.lower():
            return False
        return gpu.memory_total_mb >= self.min_memory_mb

    def matches_unit(self, mig_profile: str | None) -> bool:
        """Whether a unit with `mig_profile` (None: a whole GPU) is the kind this request takes.

        Whole-GPU requests never get a slice, nor slice requests a whole GPU, so
        clusters and requests without MIG schedule exactly as before it existed.
        """
        if self.mig_profile is None or mig_profile is None:
            return self.mig_profile is None and mig_profile is None
        return self.mig_profile == MIG_ANY or self.mig_profile == mig_profile

    def to_wire(self) -> Wire:
        wire: Wire = {
            "gpu_count": self.gpu_count,
            "min_memory_mb": self.min_memory_mb,
            "max_utilization": self.max_utilization,
            "gpu_model": self.gpu_model,
            "node": self.node,
            # Left out for a single node, so ordinary requests encode as they always did.
            **({"nodes": self.nodes} if self.nodes != 1 else {}),
        }
        if self.mig_profile is not None:
            # Left out for whole GPUs, so records without MIG encode as they always did.
            wire["mig_profile"] = self.mig_profile
        if self.share_mb is not None:
            # Left out for whole units, so records without shares encode as they always did.
            wire["share_mb"] = self.share_mb
        return wire

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> Requirements:
        mig_profile = w.get("mig_profile")
        share_mb = w.get("share_mb")
        return cls(
            gpu_count=int(w["gpu_count"]),
            min_memory_mb=int(w["min_memory_mb"]),
            max_utilization=float(w["max_utilization"]),
            gpu_model=w.get("gpu_model"),
            node=w.get("node"),
            nodes=int(w.get("nodes", 1)),
            mig_profile=None if mig_profile is None else str(mig_profile),
            share_mb=None if share_mb is None else int(share_mb),
        )


@dataclass(frozen=True, slots=True)
class AllocationRequest:
    """A caller's request once parsed and analysed: what the queue holds.

    `ttl_s` is the lease length (0 = never expires). `decided_by` records which
    part fixed the requirements ("request" fields, the built-in "analyzer", or
    the DeepAgents "advisor"), and `estimate` how it got there.
    """

    request_id: str
    service_name: str
    workload_type: str
    priority: int
    requirements: Requirements
    ttl_s: float
    submitted_at: float
    queue: bool = True
    workload_data: Mapping[str, Any] = field(default_factory=dict)
    webhook_url: str | None = None
    workflow_id: str | None = None
    decided_by: str = "analyzer"
    estimate: Mapping[str, Any] = field(default_factory=dict)
    # The queue whose share the lease counts against (SPEC "Sharing the fleet").
    # Usage accounting groups GPU-seconds by it; absent on the wire = "default".
    queue_name: str = "default"
    # False: never preempted. Allowed only for a request within its queue's
    # guarantee (one that is not waits with reason queue_quota).
    preemptible: bool = True

    def rank_key(self, age_weight_per_hour: float = 0.0) -> tuple[float, float, str]:
        """Serving order: higher priority first, then oldest, then id (a total order).

        With aging, a request waiting since `submitted_at` has at time t the
        effective priority `priority + w * (t - submitted_at) / 3600`. The term in
        t is the same for every waiter, so ordering by `priority - w *
        submitted_at / 3600` is that order at every t: the key never changes
        while a request waits, and the queue's sorted index stays valid.
        """
        lifted = self.priority - age_weight_per_hour * self.submitted_at / 3600.0 if age_weight_per_hour else self.priority
        return (-lifted, self.submitted_at, self.request_id)

    def effective_priority(self, now: float, age_weight_per_hour: float) -> float:
        """The priority with aging at `now` (priority itself without aging)."""
        return self.priority + age_weight_per_hour * max(0.0, now - self.submitted_at) / 3600.0

    def to_wire(self) -> Wire:
        return {
            "request_id": self.request_id,
            "service_name": self.service_name,
            "workload_type": self.workload_type,
            "priority": self.priority,
            "requirements": self.requirements.to_wire(),
            "ttl_s": self.ttl_s,
            "submitted_at": self.submitted_at,
            "queue": self.queue,
            "workload_data": dict(self.workload_data),
            "webhook_url": self.webhook_url,
            "workflow_id": self.workflow_id,
            "decided_by": self.decided_by,
            "estimate": dict(self.estimate),
            "queue_name": self.queue_name,
            "preemptible": self.preemptible,
        }

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> AllocationRequest:
        return cls(
            request_id=str(w["request_id"]),
            service_name=str(w["service_name"]),
            workload_type=str(w["workload_type"]),
            priority=int(w["priority"]),
            requirements=Requirements.from_wire(w["requirements"]),
            ttl_s=float(w["ttl_s"]),
            submitted_at=float(w["submitted_at"]),
            queue=bool(w["queue"]),
            workload_data=dict(w["workload_data"]),
            webhook_url=w.get("webhook_url"),
            workflow_id=w.get("workflow_id"),
            decided_by=str(w["decided_by"]),
            estimate=dict(w["estimate"]),
            queue_name=str(w.get("queue_name", "default")),
            preemptible=bool(w.get("preemptible", True)),
        )


@dataclass(frozen=True, slots=True)
class AllocatedGpu:
    """One GPU of an allocation, as the caller needs it to run there."""

    node: str
    index: int
    uuid: str
    name: str
    memory_total_mb: int
    # For a MIG slice: its profile and its GPU's UUID (`uuid` is the slice's "MIG-…").
    mig_profile: str | None = None
    parent_uuid: str | None = None

    @property
    def ref(self) -> GpuRef:
        return GpuRef(self.node, self.index)

    def to_wire(self) -> Wire:
        wire: Wire = {
            "node": self.node,
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_mb": self.memory_total_mb,
        }
        if self.mig_profile is not None:
            # Left out for whole GPUs, so records without MIG encode as they always did.
            wire["mig_profile"] = self.mig_profile
            wire["parent_uuid"] = self.parent_uuid
        return wire

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> AllocatedGpu:
        mig_profile = w.get("mig_profile")
        parent = w.get("parent_uuid")
        return cls(
            node=str(w["node"]),
            index=int(w["index"]),
            uuid=str(w["uuid"]),
            name=str(w["name"]),
            memory_total_mb=int(w["memory_total_mb"]),
            mig_profile=None if mig_profile is None else str(mig_profile),
            parent_uuid=None if parent is None else str(parent),
        )


@dataclass(frozen=True, slots=True)
class AllocationTopology:
    """How an allocation's GPUs are wired together, as placement chose them (coordinator/topology.py).

    `score` sums the link weights of every pair of the GPUs (0 for one GPU);
    `links` names the weakest pair in `nvidia-smi topo -m`'s words ("NV18",
    "PIX", "PXB", "PHB", "NODE", "SYS", "?"; None for one GPU); `numa_node` is
    the NUMA node all of them sit on (None when they span several or it is
    unknown); `cpu_list` the CPUs close to them, in Linux cpulist form
    ("0-31,64-95"; None when unknown).
    """

    score: int
    links: str | None
    numa_node: int | None
    cpu_list: str | None

    def to_wire(self) -> Wire:
        return {"score": self.score, "links": self.links, "numa_node": self.numa_node, "cpu_list": self.cpu_list}

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> AllocationTopology:
        numa = w.get("numa_node")
        return cls(
            score=int(w["score"]),
            links=w.get("links"),
            numa_node=None if numa is None else int(numa),
            cpu_list=w.get("cpu_list"),
        )


@dataclass(frozen=True, slots=True)
class GangMembership:
    """Where one allocation stands in a gang (coordinator/gang_placement.py): a lease on one of its nodes.

    Every member of a gang has the same `gang_id`, `size` and rendezvous; `rank`
    is its node's place (0 = the first node, whose address is the rendezvous).
    The rendezvous is a hint for a torch.distributed launcher
    (`--master_addr`/`--master_port`): the first node's address and a port
    from the configured range, `ports` being that whole range.
    """

    gang_id: str
    rank: int
    size: int
    rendezvous_address: str
    rendezvous_port: int
    rendezvous_ports: tuple[int, int]

    def to_wire(self) -> Wire:
        return {
            "gang_id": self.gang_id,
            "rank": self.rank,
            "size": self.size,
            "rendezvous_address": self.rendezvous_address,
            "rendezvous_port": self.rendezvous_port,
            "rendezvous_ports": list(self.rendezvous_ports),
        }

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> GangMembership:
        low, high = w["rendezvous_ports"]
        return cls(
            gang_id=str(w["gang_id"]),
            rank=int(w["rank"]),
            size=int(w["size"]),
            rendezvous_address=str(w["rendezvous_address"]),
            rendezvous_port=int(w["rendezvous_port"]),
            rendezvous_ports=(int(low), int(high)),
        )


@dataclass(frozen=True, slots=True)
class Allocation:
    """A lease: GPUs on one node held for one request until released or expired.

    A gang's lease is several of these, one per node, each with `gang` set;
    the lease table grants and ends them only all together.
    """

    allocation_id: str
    request: AllocationRequest
    node: str
    gpus: tuple[AllocatedGpu, ...]
    allocated_at: float
    expires_at: float | None
    # None where the node reported no topology (and in records written before it existed).
    topology: AllocationTopology | None = None
    # Set only for a member of a gang; None for every single-node lease.
    gang: GangMembership | None = None
    # Set only for a share of a GPU (`request.requirements.share_mb`): the sharing
    # group it packs with, its queue's name or SHARE_GROUP_ANY (coordinator/share_placement.py).
    share_group: str | None = None

    def to_wire(self) -> Wire:
        wire: Wire = {
            "allocation_id": self.allocation_id,
            "request": self.request.to_wire(),
            "node": self.node,
            "gpus": [g.to_wire() for g in self.gpus],
            "allocated_at": self.allocated_at,
            "expires_at": self.expires_at,
        }
        if self.topology is not None:
            # Left out when unknown, so records without it encode as they always did.
            wire["topology"] = self.topology.to_wire()
        if self.gang is not None:
            wire["gang"] = self.gang.to_wire()
        if self.share_group is not None:
            wire["share_group"] = self.share_group
        return wire

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> Allocation:
        expires = w.get("expires_at")
        share_group = w.get("share_group")
        topology = w.get("topology")
        gang = w.get("gang")
        return cls(
            allocation_id=str(w["allocation_id"]),
            request=AllocationRequest.from_wire(w["request"]),
            node=str(w["node"]),
            gpus=tuple(AllocatedGpu.from_wire(g) for g in w["gpus"]),
            allocated_at=float(w["allocated_at"]),
            expires_at=None if expires is None else float(expires),
            topology=None if topology is None else AllocationTopology.from_wire(topology),
            gang=None if gang is None else GangMembership.from_wire(gang),
            share_group=None if share_group is None else str(share_group),
        )


# Lifecycle of a request id, as GET /gpu/requests/{id} reports it.
QUEUED = "queued"
ALLOCATED = "allocated"
RELEASED = "released"
EXPIRED = "expired"
CANCELLED = "cancelled"
# The lease's host stopped gossiping for the leader's grace period (MarkHostLost).
LOST = "lost"
TERMINAL_STATUSES = frozenset({RELEASED, EXPIRED, CANCELLED, LOST})


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Where one request id stands; kept after it ends so retries stay idempotent."""

    request_id: str
    service_name: str
    status: str
    submitted_at: float
    updated_at: float
    allocation_id: str | None = None
    reason: str | None = None

    def to_wire(self) -> Wire:
        return {
            "request_id": self.request_id,
            "service_name": self.service_name,
            "status": self.status,
            "submitted_at": self.submitted_at,
            "updated_at": self.updated_at,
            "allocation_id": self.allocation_id,
            "reason": self.reason,
        }

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> RequestRecord:
        return cls(
            request_id=str(w["request_id"]),
            service_name=str(w["service_name"]),
            status=str(w["status"]),
            submitted_at=float(w["submitted_at"]),
            updated_at=float(w["updated_at"]),
            allocation_id=w.get("allocation_id"),
            reason=w.get("reason"),
        )


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting in the queue, with the time it gives up (None = never)."""

    request: AllocationRequest
    deadline: float | None

    def to_wire(self) -> Wire:
        return {"request": self.request.to_wire(), "deadline": self.deadline}

    @classmethod
    def from_wire(cls, w: Mapping[str, Any]) -> QueuedRequest:
        deadline = w.get("deadline")
        return cls(
            request=AllocationRequest.from_wire(w["request"]),
            deadline=None if deadline is None else float(deadline),
        )


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    """A lifecycle change that the outside world hears about (webhooks, graph service).

    kind: queued | allocated | renewed | released | expired | cancelled | gpu_unhealthy | lost
    | preempting (grace period started, `deadline` set) | preempted (ended by preemption).
    `reason` narrows it: "lease_ttl" or "queue_timeout" for expired, "host_lost"
    for lost, the release reason otherwise. `allocation` is set for every kind but queued/cancelled and
    a queue timeout. `was_queued` tells webhook delivery that the caller was told
    202 and waits for this event.
    """

    kind: str
    at: float
    request: AllocationRequest
    allocation: Allocation | None = None
    reason: str | None = None
    was_queued: bool = False
    # For preempting: when the lease ends unless released earlier.
    deadline: float | None = None
    # For a gang: every member, rank order (`allocation` is the first). One
    # event stands for the whole gang, so its owner hears of it once.
    gang: tuple[Allocation, ...] = ()
