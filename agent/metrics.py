"""Prometheus metrics: dcgm-exporter's per-GPU series and gpu_orchestrator_* state.

Collection is cheap by construction: per-GPU series are rendered from the
sampler's latest snapshot and orchestrator gauges from the in-memory lease
table at scrape time, so a scrape never calls NVML or touches disk.

Per-GPU series use dcgm-exporter's names, units and labels (gpu, UUID, device,
modelName, Hostname, pci_bus_id) so its Grafana dashboard works unchanged.
dcgm-exporter types the energy and PCIe replay series as counters without the
`_total` suffix; the Prometheus client (and promtool's lint) require the suffix
on counters, so they are exported untyped under dcgm's exact names - PromQL's
rate() and increase() work on them the same way.

Each agent exports its own GPUs. Cluster-wide figures (allocations, queue) come
from the leader only, so a sum over agents never double counts. So do the
largest requests each node can take now (coordinator/fragmentation.py: whole
GPUs, all-NVLink sets, MIG instances by profile, shares), node by node as well
as for the cluster: only the leader's table knows which GPUs every lease holds,
a client's not even its own.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from coordinator.fragmentation import SHAPES, LargestRequest, cluster_largest_request, largest_requests
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.mig import slice_index
from coordinator.model import DEGRADED, HEALTHY, UNHEALTHY, GpuRef

from agent.device_sampler import DeviceSampler, GpuSnapshot
from agent.devices.base import GpuReading
from agent.membership import MembershipService
from agent.raft_log import RaftLog
from agent.raft_transport import RaftTransportStats

# (metric name, help, reading attribute)
_DCGM_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "utilization_gpu_pct"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", "utilization_memory_pct"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "memory_used_mb"),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "memory_free_mb"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "temperature_c"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "memory_temperature_c"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_draw_w"),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        "total_energy_mj",
    ),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz"),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "mem_clock_mhz"),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", "last_xid"),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries.", "pcie_replay_counter"),
    (
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "Ratio of time the graphics engine is active (NVML: utilization.gpu / 100).",
        "gr_engine_active",
    ),
)
# dcgm-exporter types these as counters, yet without the `_total` suffix that the
# Prometheus client adds to counters and promtool requires; exported untyped under
# dcgm's exact names so dashboards match and promtool's type lints do not apply.
_DCGM_UNTYPED = frozenset({"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER"})
_DCGM_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id")
# Our scheduling outcome -> the Go service's gpu_scheduler_scheduled_total status.
_SEED_SCHEDULED = {"allocated": "immediate", "queued": "queued", "allocated_from_queue": "allocated_from_queue"}


class AgentMetrics:
    """The agent's registry: counters updated by the code, gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.http_requests = Counter(
            "gpu_orchestrator_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "gpu_orchestrator_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["method", "route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5),
            registry=r,
        )
        self.scheduling = Counter(
            "gpu_orchestrator_scheduling_outcomes",
            "Scheduling decisions: allocated, queued, allocated_from_queue, lease_expired, "
            "queue_timeout, preemption_started, lease_preempted, rejected_<code>.",
            ["outcome"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpu_orchestrator_queue_wait_seconds",
            "Time from submission to allocation for requests that waited in the queue.",
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.leases_expired = Counter(
            "gpu_orchestrator_leases_expired", "Leases ended by their TTL.", registry=r
        )
        self.log_append = Histogram(
            "gpu_orchestrator_log_append_seconds",
            "Time to write and fsync one group-committed batch of log entries.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1.0),
            registry=r,
        )
        self.log_batch = Histogram(
            "gpu_orchestrator_log_batch_entries",
            "Log entries per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.outbox = Counter(
            "gpu_orchestrator_outbox_deliveries",
            "Webhook and workflow-event delivery attempts by outcome (delivered, retry, gave_up).",
            ["kind", "outcome"],
            registry=r,
        )
        self.advisor = Counter(
            "gpu_orchestrator_advisor_decisions",
            "Who decided a request's figures (advisor or analyzer), and why the advisor was not used.",
            ["decided_by", "reason"],
            registry=r,
        )
        self.allocations_hit_by_unhealthy_gpu = Counter(
            "gpu_orchestrator_allocations_hit_by_unhealthy_gpu",
            "Times a GPU under a live lease turned unhealthy (its owner's webhook is told).",
            registry=r,
        )
        self.allocations_lost = Counter(
            "gpu_orchestrator_allocations_lost",
            "Leases ended because their host stayed dead or left in gossip for [cluster] "
            "host_lost_grace_s (each is a lost event; counted when applied, not on replay).",
            registry=r,
        )
        self.preemptions = Counter(
            "gpu_orchestrator_preemptions",
            "Leases whose preemption started (lease_preempting), by the victim's queue and why: reclaim "
            "(a guarantee or fair share taken back), priority (by the priority gap) or idle (idle reclaim). "
            "Counted by the leader as it applies them (leader only).",
            ["queue", "reason"],
            registry=r,
        )
        self.device_sample_failures = Counter(
            "gpu_orchestrator_device_sample_failures",
            "Device telemetry samples that failed or timed out.",
            registry=r,
        )

        self.raft_elections = Counter(
            "gpu_orchestrator_raft_elections",
            "Raft term changes this server observed (each is an election).",
            registry=r,
        )
        self.raft_proposal = Histogram(
            "gpu_orchestrator_raft_proposal_seconds",
            "Time from a proposal on the leader to its entry applied (committed by a majority).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )

        self.audit_writes = Counter(
            "gpu_orchestrator_audit_writes",
            "Write requests answered by this agent (each is an audit log line), by action and outcome "
            "(ok, queued, denied, rate_limited, rejected, unavailable, error).",
            ["action", "outcome"],
            registry=r,
        )

        # The Go service's own series, kept under its names and labels so its
        # dashboards and alerts work unchanged (docs/migrating-from-the-go-service.md).
        # Counted where the scheduler decides, i.e. on the leader, like the seed's one process.
        self.seed_allocations = Counter(
            "gpu_allocator_allocations",
            "Go-service compatible: GPU allocations made, by status (only \"success\", as in the Go service).",
            ["status"],
            registry=r,
        )
        self.seed_scheduled = Counter(
            "gpu_scheduler_scheduled",
            "Go-service compatible: scheduled requests by status (immediate, queued, allocated_from_queue).",
            ["status"],
            registry=r,
        )
        self.seed_queue_wait = Histogram(
            "gpu_scheduler_queue_wait_seconds",
            "Go-service compatible: time requests spent waiting in the queue (the Go service's buckets).",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )

    def count_decision(self, outcome: str) -> None:
        """Count one scheduling decision, in ours and in the Go service's series."""
        self.scheduling.labels(outcome).inc()
        seed_status = _SEED_SCHEDULED.get(outcome)
        if seed_status is not None:
            self.seed_scheduled.labels(seed_status).inc()
        if outcome in ("allocated", "allocated_from_queue"):
            self.seed_allocations.labels("success").inc()

    def observe_queue_wait(self, seconds: float) -> None:
        """Record how long a request that was queued waited for its allocation."""
        self.queue_wait.observe(seconds)
        self.seed_queue_wait.observe(seconds)

    def attach_raft(self, raft: RaftCollector) -> None:
        self.registry.register(raft)

    def attach_state(self, state: StateCollector) -> None:
        self.registry.register(state)

    def attach_gossip(self, gossip: GossipCollector) -> None:
        self.registry.register(gossip)

    def render(self) -> bytes:
        return render_text(self.registry)


def _escape_label(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _format_value(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_text(registry: CollectorRegistry) -> bytes:
    """The text exposition format (0.0.4), as prometheus_client's generate_latest writes it.

    Written here because generate_latest validates and escapes every label name
    of every sample (two regex matches each): most of a scrape's cost, spent on
    names that are constants. Only label values can need escaping. The
    `_created` series are left out, as Prometheus ignores them by default.
    tests/unit/test_metrics_render.py checks the output parses to the same samples.
    """
    out: list[str] = []
    for metric in registry.collect():
        name = metric.name + "_total" if metric.type == "counter" else metric.name
        kind = "untyped" if metric.type == "unknown" else metric.type
        doc = metric.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            if sample.labels:
                labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels.items())
                out.append(f"{sample.name}{{{labels}}} {_format_value(sample.value)}\n")
            else:
                out.append(f"{sample.name} {_format_value(sample.value)}\n")
    return "".join(out).encode()


def _shape_values(largest: LargestRequest) -> list[tuple[str, int]]:
    """(shape, value) for each shape known: nvlink is left out where the topology is unknown."""
    values = dict(largest.to_wire())
    return [(shape, value) for shape in SHAPES if (value := values[shape]) is not None]


class StateCollector(Collector):
    """Gauges computed at scrape time from the sampler snapshot and the lease table."""

    def __init__(
        self,
        *,
        node_name: str,
        sampler: DeviceSampler,
        table: Callable[[], LeaseTable],
        clock: Callable[[], float],
        is_leader: Callable[[], bool],
        term: Callable[[], int],
        members: Callable[[], dict[str, int]],
        outbox_pending: Callable[[], int],
        disk_stalled: Callable[[], float] = lambda: 0.0,
        queues: Callable[[], list[dict[str, Any]]] = lambda: [],
        inventory: Callable[[], Inventory] = Inventory,
    ) -> None:
        self.node_name = node_name
        self._inventory = inventory
        self._sampler = sampler
        self._table = table
        self._clock = clock
        self._is_leader = is_leader
        self._term = term
        self._members = members
        self._outbox_pending = outbox_pending
        self._disk_stalled = disk_stalled
        self._queues = queues

    def collect(self) -> Iterable[Metric]:
        snapshots = self._sampler.snapshots()
        yield from self._dcgm([s.reading for s in snapshots if s.present])
        yield from self._per_gpu(snapshots)
        degraded = self._sampler.degraded_reason
        yield GaugeMetricFamily(
            "gpu_orchestrator_device_backend_degraded",
            "1 while device telemetry is failing or partial (see /healthz for why).",
            value=1.0 if degraded else 0.0,
        )
        leader = self._is_leader()
        yield GaugeMetricFamily(
            "gpu_orchestrator_leader", "1 on the agent that is the current leader.", value=1.0 if leader else 0.0
        )
        yield GaugeMetricFamily("gpu_orchestrator_term", "The current leadership term.", value=float(self._term()))
        members = GaugeMetricFamily(
            "gpu_orchestrator_cluster_members", "Cluster members by status.", labels=["status"]
        )
        for status, count in sorted(self._members().items()):
            members.add_metric([status], float(count))
        yield members
        yield GaugeMetricFamily(
            "gpu_orchestrator_outbox_pending",
            "Webhook and workflow events waiting for delivery.",
            value=float(self._outbox_pending()),
        )
        yield GaugeMetricFamily(
            "gpu_orchestrator_state_write_stall_seconds",
            "How long the state-file write in flight has run (0 when idle); grows while the disk makes no progress.",
            value=self._disk_stalled(),
        )
        if leader:
            yield from self._cluster(self._table())
            yield from self._largest_requests(self._table(), self._inventory())

    def _per_gpu(self, snapshots: list[GpuSnapshot]) -> Iterable[Metric]:
        table = self._table()
        labels = ["Hostname", "gpu", "UUID"]
        allocated = GaugeMetricFamily(
            "gpu_orchestrator_gpu_allocated",
            "1 when the GPU is held by a lease (in MIG mode: when any of its slices is).",
            labels=labels,
        )
        health = GaugeMetricFamily(
            "gpu_orchestrator_gpu_health",
            "1 on the GPU's current health state (healthy, degraded, unhealthy), 0 on the others.",
            labels=[*labels, "state"],
        )
        drained = GaugeMetricFamily(
            "gpu_orchestrator_gpu_drained", "1 when an operator drained the GPU.", labels=labels
        )
        unleased = GaugeMetricFamily(
            "gpu_orchestrator_gpu_unleased_in_use",
            "1 when the GPU runs work (processes, or utilization above the idle threshold) without a lease.",
            labels=labels,
        )
        shares = GaugeMetricFamily(
            "gpu_orchestrator_gpu_shares", "Shares of the GPU held (0 when it is leased whole or free).", labels=labels
        )
        share_budget = GaugeMetricFamily(
            "gpu_orchestrator_gpu_share_budget_bytes",
            "The memory budgets of the GPU's shares together, bytes (0 without shares).",
            labels=labels,
        )
        over_budget = GaugeMetricFamily(
            "gpu_orchestrator_gpu_share_over_budget",
            "1 when the GPU's used memory is above the sum of its shares' budgets (per GPU: NVML reports memory per GPU).",
            labels=labels,
        )
        idle = GaugeMetricFamily(
            "gpu_orchestrator_lease_idle_seconds",
            "Seconds the GPU has been idle under its current lease (0 when busy or unleased).",
            labels=labels,
        )
        now = self._clock()
        usage = self._sampler.usage
        for snap in snapshots:
            r = snap.reading
            ref = GpuRef(self.node_name, r.index)
            values = [self.node_name, str(r.index), r.uuid]
            # No allocation id label: one series per GPU, not one per lease ever made.
            units = [ref] + [GpuRef(self.node_name, slice_index(r.index, i.mig_index)) for i in r.mig_instances]
            allocated.add_metric(values, 1.0 if any(table.holder(u) for u in units) else 0.0)
            for state in (HEALTHY, DEGRADED, UNHEALTHY):
                health.add_metric([*values, state], 1.0 if snap.health.state == state else 0.0)
            drained.add_metric(values, 1.0 if ref in table.drained() else 0.0)
            unleased.add_metric(values, 1.0 if usage.unleased_in_use(r.index) else 0.0)
            idle.add_metric(values, usage.idle_seconds(r.index, now))
            count, budget_mb, over = usage.shares(r.index)
            shares.add_metric(values, float(count))
            share_budget.add_metric(values, float(budget_mb) * 1024 * 1024)
            over_budget.add_metric(values, 1.0 if over else 0.0)
        yield from (allocated, health, drained, unleased, idle, shares, share_budget, over_budget)

    def _cluster(self, table: LeaseTable) -> Iterable[Metric]:
        """Figures about the whole cluster: exported by the leader only, so sums never double count."""
        by_service: dict[str, int] = {}
        for alloc in table.allocations():
            by_service[alloc.request.service_name] = by_service.get(alloc.request.service_name, 0) + 1
        allocations = GaugeMetricFamily(
            "gpu_orchestrator_allocations", "Live allocations by service (leader only).", labels=["service"]
        )
        for service, count in sorted(by_service.items()):
            allocations.add_metric([service], float(count))
        yield allocations
        yield GaugeMetricFamily(
            "gpu_orchestrator_queue_depth",
            "Requests waiting in the queue (leader only).",
            value=float(table.queue_length()),
        )
        oldest = min((q.request.submitted_at for q in table.queue()), default=None)
        yield GaugeMetricFamily(
            "gpu_orchestrator_queue_oldest_submitted_timestamp_seconds",
            "Submission time of the oldest waiting request, 0 when the queue is empty (leader only).",
            value=0.0 if oldest is None else oldest,
        )
        yield GaugeMetricFamily(
            "gpu_orchestrator_allocations_on_unhealthy_gpus",
            "Live allocations holding at least one GPU last reported unhealthy (leader only).",
            value=float(len(table.unhealthy_allocations())),
        )
        # Lifetime totals up to the table's own clock (the last applied command), not the
        # wall clock: a lease's running share then becomes exactly what its end credits,
        # so the counter never steps back when the lease ends (LeaseTable.usage_totals).
        usage = CounterMetricFamily(
            "gpu_orchestrator_usage_gpu_seconds",
            "GPU-seconds by queue and service: allocated (GPUs held × seconds) and utilized (the same "
            "weighted by measured utilization), since the series began (leader only).",
            labels=["queue", "service", "kind"],
        )
        for (queue, service), (allocated, utilized) in sorted(table.usage_totals(table.clock).items()):
            usage.add_metric([queue, service, "allocated"], allocated)
            usage.add_metric([queue, service, "utilized"], utilized)
        yield usage
        yield from self._queue_gauges(self._queues())
        # The Go service's gauges, under its names (its `_total` on a gauge included).
        yield GaugeMetricFamily(
            "gpu_allocator_allocations_active",
            "Go-service compatible: live allocations (leader only).",
            value=float(len(table.allocations())),
        )
        yield GaugeMetricFamily(
            "gpu_allocator_gpus_allocated_total",
            "Go-service compatible: GPUs held by live allocations (a gauge, as in the Go service; leader only).",
            value=float(len(table.held_gpus())),
        )
        yield GaugeMetricFamily(
            "gpu_scheduler_queue_depth",
            "Go-service compatible: requests waiting in the queue (leader only).",
            value=float(table.queue_length()),
        )

    def _largest_requests(self, table: LeaseTable, inventory: Inventory) -> Iterable[Metric]:
        """The largest request each node, and the cluster, can take now, by shape (leader only)."""
        per_node = largest_requests(inventory, lambda ref: table.holder(ref) is not None, table.shares.gpus)
        cluster = cluster_largest_request(per_node.values())
        nodes = GaugeMetricFamily(
            "gpu_orchestrator_node_largest_request_gpus",
            "The most GPUs one request could get on the node now: any free ones (shape=gpus), or free ones "
            "all joined by NVLink (shape=nvlink; absent where the topology is unknown) (leader only).",
            labels=["node", "shape"],
        )
        for node, largest in per_node.items():
            for shape, value in _shape_values(largest):
                nodes.add_metric([node, shape], float(value))
        yield nodes
        whole = GaugeMetricFamily(
            "gpu_orchestrator_cluster_largest_request_gpus",
            "The most GPUs one request could get now anywhere in the cluster, by shape (leader only).",
            labels=["shape"],
        )
        for shape, value in _shape_values(cluster):
            whole.add_metric([shape], float(value))
        yield whole
        # One series per MIG profile a node has: a handful per GPU model, whatever the load.
        node_mig = GaugeMetricFamily(
            "gpu_orchestrator_node_free_mig_instances",
            "MIG instances of each profile on the node that a request could get now: schedulable, held by no "
            "lease; every profile the node has, 0 included (leader only).",
            labels=["node", "profile"],
        )
        for node, largest in per_node.items():
            for profile, count in largest.mig or ():
                node_mig.add_metric([node, profile], float(count))
        yield node_mig
        cluster_mig = GaugeMetricFamily(
            "gpu_orchestrator_cluster_free_mig_instances",
            "MIG instances of each profile a request could get now, all nodes together (leader only).",
            labels=["profile"],
        )
        for profile, count in cluster.mig or ():
            cluster_mig.add_metric([profile], float(count))
        yield cluster_mig
        node_share = GaugeMetricFamily(
            "gpu_orchestrator_node_largest_share_bytes",
            "The largest memory budget one share could get on the node now, bytes: a free whole GPU's memory, "
            "or the room left on a GPU already shared (for its sharing group only) (leader only).",
            labels=["node"],
        )
        for node, largest in per_node.items():
            node_share.add_metric([node], float(largest.share_mb) * 1024 * 1024)
        yield node_share
        yield GaugeMetricFamily(
            "gpu_orchestrator_cluster_largest_share_bytes",
            "The largest memory budget one share could get now anywhere in the cluster, bytes (leader only).",
            value=float(cluster.share_mb) * 1024 * 1024,
        )

    def _queue_gauges(self, queues: list[dict[str, Any]]) -> Iterable[Metric]:
        """Each queue's figures (coordinator/queue_views.py; a parent's include its children's; leader only)."""
        families = [
            (key, GaugeMetricFamily(f"gpu_orchestrator_queue_{key}", text, labels=["queue"]))
            for key, text in (
                ("gpus_in_use", "GPUs the queue's leases hold (leader only)."),
                ("guaranteed_gpus", "GPUs guaranteed to the queue, all models together (leader only)."),
                ("fair_share_gpus", "The queue's fair share of the fleet: its guarantee and its weight's part "
                 "of what is beyond guarantees (leader only)."),
                ("pending_requests", "Requests of the queue waiting for GPUs (leader only)."),
            )
        ]
        source = {
            "gpus_in_use": "in_use_gpus",
            "guaranteed_gpus": "guaranteed_gpus",
            "fair_share_gpus": "fair_share_gpus",
            "pending_requests": "pending_requests",
        }
        for view in queues:
            for key, family in families:
                family.add_metric([str(view["name"])], float(view[source[key]]))
        for _, family in families:
            yield family

    def _dcgm(self, readings: list[GpuReading]) -> Iterable[Metric]:
        for name, help_text, attr in _DCGM_FIELDS:
            family_type = UnknownMetricFamily if name in _DCGM_UNTYPED else GaugeMetricFamily
            family = family_type(name, help_text, labels=list(_DCGM_LABELS))
            for r in readings:
                value = getattr(r, attr)
                if value is None:
                    continue
                family.add_metric(
                    [str(r.index), r.uuid, f"nvidia{r.index}", r.name, self.node_name, r.pci_bus_id or ""],
                    float(value),
                )
            yield family


class GossipCollector(Collector):
    """The gossip layer's counters, read at scrape time from the membership service."""

    def __init__(self, membership: MembershipService) -> None:
        self._membership = membership

    def collect(self) -> Iterable[Metric]:
        m = self._membership
        stats = m.stats
        core = m.core.stats if m.started else None
        yield CounterMetricFamily(
            "gpu_orchestrator_gossip_probes",
            "SWIM probes this agent started (direct pings).",
            value=float(core.probes if core else 0),
        )
        yield CounterMetricFamily(
            "gpu_orchestrator_gossip_suspicions",
            "Members this agent started suspecting.",
            value=float(core.suspicions if core else 0),
        )
        packets = CounterMetricFamily(
            "gpu_orchestrator_gossip_packets",
            "Gossip UDP datagrams sent (out) and received (in), dropped ones included.",
            labels=["direction"],
        )
        sizes = CounterMetricFamily(
            "gpu_orchestrator_gossip_bytes",
            "Gossip bytes on the wire (UDP datagrams and TCP push-pull frames), sealed size.",
            labels=["direction"],
        )
        for direction in ("in", "out"):
            packets.add_metric([direction], float(stats.packets[direction]))
            sizes.add_metric([direction], float(stats.bytes[direction]))
        yield packets
        yield sizes
        dropped = CounterMetricFamily(
            "gpu_orchestrator_gossip_dropped_packets",
            "Gossip datagrams and push-pull frames refused: decrypt (wrong or no key), "
            "malformed (not a valid SWIM encoding), oversized.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.dropped.items()):
            dropped.add_metric([reason], float(count))
        yield dropped
        push_pulls = CounterMetricFamily(
            "gpu_orchestrator_gossip_push_pulls",
            "Full-state TCP exchanges this agent started, by result (ok, failed).",
            labels=["result"],
        )
        for result, count in sorted(stats.push_pulls.items()):
            push_pulls.add_metric([result], float(count))
        yield push_pulls
        yield GaugeMetricFamily(
            "gpu_orchestrator_gossip_health_score",
            "Lifeguard local health score: 0 = healthy; higher = this agent misses acks and "
            "stretches its timeouts by (score + 1).",
            value=float(m.health_score),
        )


class RaftCollector(Collector):
    """The Raft log's indexes and the transport's drops, read at scrape time (servers whose log runs)."""

    def __init__(self, raft: Callable[[], RaftLog | None], stats: Callable[[], RaftTransportStats | None]) -> None:
        self._raft_now = raft
        self._stats_now = stats

    def collect(self) -> Iterable[Metric]:
        raft, stats = self._raft_now(), self._stats_now()
        if raft is None or stats is None:
            return
        self._raft, self._stats = raft, stats
        yield GaugeMetricFamily(
            "gpu_orchestrator_raft_commit_index", "Highest log index known committed.", value=float(self._raft.commit_index)
        )
        yield GaugeMetricFamily(
            "gpu_orchestrator_raft_applied_index",
            "Highest log index applied to this server's lease table.",
            value=float(self._raft.applied_index),
        )
        # This server's latest configuration (uncommitted changes included, as the core uses it).
        # 0 on a blank server that has not been added yet.
        yield GaugeMetricFamily(
            "gpu_orchestrator_raft_voters",
            "Voting servers in this server's latest Raft configuration.",
            value=float(len(self._raft.voters)),
        )
        yield GaugeMetricFamily(
            "gpu_orchestrator_raft_voter",
            "1 if this server is a voter in its latest configuration, else 0 (blank or removed).",
            value=1.0 if self._raft.is_voter else 0.0,
        )
        dropped = CounterMetricFamily(
            "gpu_orchestrator_raft_transport_dropped",
            "Raft messages the transport dropped, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self._stats.dropped.items()):
            dropped.add_metric([reason], float(count))
        yield dropped
        yield CounterMetricFamily(
            "gpu_orchestrator_raft_inbox_dropped",
            "Raft messages dropped because the log's input queue was full.",
            value=float(self._raft.dropped_messages),
        )
