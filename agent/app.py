"""The agent process: builds its parts in order, runs them as trio tasks until SIGTERM.

Every agent is built the same way; its role decides only what its parts hold
(agent/replication.py: a replica on a server, none on a client;
agent/leadership.py: the leader's work while it leads). The parts, in the order
they are built and started:

1. devices: the backend (NVML or simulated) and its sampler, with a first sample;
2. the outbox store (the state file's outbox) and its deliverer;
3. membership (gossip), which reads the table's drains and holders for its metadata;
4. replication: a pre-Raft log adopted, the Raft state loaded, and on a server
   that can (a restart, or alone) the log recovered, before anything serves;
5. the inventory (agent/inventory_feed.py), workload analysis, the leader
   proxy (agent/cluster.py) and leadership, which follows the log's role events;
6. the tasks: gossip, the sampler, replication (bootstrap wait, transport, log),
   leadership, housekeeping, signals, then HTTP. READY goes to systemd once HTTP
   serves, on every role, waiting for peers or not.

Resource handling
-----------------
All tasks run in one nursery (hypercorn nests its own) with the HTTP server
beside them behind a shutdown trigger; the state file and the device backend
are closed after the nursery ends.

systemd (agent/systemd_notify.py): READY=1 once the HTTP port is bound (the
gossip port already is), STATUS= whenever the one-line summary changes,
WATCHDOG=1 while the device sampler is not stuck, STOPPING=1 on SIGTERM. All of
it is a no-op without $NOTIFY_SOCKET.

Reload (SIGHUP): the config file is read again and its log level, queues and
sharing knobs applied (a leader then proposes the new queue policy), the API
keys file and the cluster key file are re-read. A file that no longer loads is
logged and the settings in force are kept; changed keys that need a restart
are named in the log.

Shutdown (SIGTERM or SIGINT): hypercorn stops accepting and lets in-flight
requests finish (their proposals complete, since the log still runs); a leader
hands leadership over (bounded by 2 s); the agent gossips that it leaves the
cluster (bounded by 2 s); the outbox gets a short grace period to deliver what
is due; then everything is cancelled and the state file closed. Exit status 0.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Sequence

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from coordinator.admission import Admission
from coordinator.backoff import CircuitBreaker
from coordinator.commands import OutboxDelivered
from coordinator.gpu_health import HealthPolicy
from coordinator.lease_table import LeaseTable
from coordinator.model import UNHEALTHY, GpuRef
from coordinator.notifications import deliveries
from coordinator.queue_views import queue_views
from coordinator.queues import DEFAULT_QUEUE
from coordinator.raft_config import lan
from coordinator.scheduler import Scheduler, SchedulerConfig
from coordinator.swim_config import profile as swim_profile

from agent.advisor import DeepAgentsAdvisor
from agent.api_keys import ApiKeyError, ApiKeyring
from agent.cluster import ClusterRuntime
from agent.config import AgentConfig, graph_events_url, reloaded, restart_needed_keys
from agent.config_checks import ConfigError
from agent.context import AgentContext
from agent.device_sampler import DeviceSampler
from agent.devices import backend_from_config
from agent.devices.base import DeviceBackend
from agent.health_reporting import record_remote_health, report_local_health
from agent.host_loss import HostLossWatcher
from agent.http_listener import ApiTls, advertised_http_url, hypercorn_config
from agent.http_api import create_app
from agent.inventory_feed import InventoryFeed
from agent.leadership import LeaderTask, Leadership
from agent.lease_service import LeaseService
from agent.membership import MembershipService
from agent.metrics import AgentMetrics, GossipCollector, RaftCollector, StateCollector
from agent.outbox import OutboxDeliverer
from agent.queue_policy_sync import ConfiguredPolicy, sync_queue_policy
from agent.raft_log import Applied, RaftLog, RoleState
from agent.raft_transport import local_address_for
from agent.replication import STATE_FILE, Replication
from agent.storage import AsyncStateStore, OutboxRow, StateStore
from agent.systemd_notify import (
    Notifier,
    SampleWatch,
    reloading_assignments,
    run_status,
    run_watchdog,
    watchdog_interval,
)
from agent.usage_recorder import POLL_S, UsageRecorder
from agent.workload_analysis import WorkloadAnalysis

log = logging.getLogger(__name__)

# Time the outbox gets at shutdown to deliver what is already due.
_SHUTDOWN_FLUSH_S = 2.0
# How long a leader that is stopping waits for another server to take over.
_HAND_OVER_S = 2.0
# How often the leader replicates its outbox delivery progress (one small entry when it moved).
_OUTBOX_PROGRESS_S = 2.0


async def run_agent(
    config: AgentConfig,
    *,
    version: str,
    environ: Mapping[str, str] | None = None,
    reload_config: Callable[[], AgentConfig] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until SIGTERM/SIGINT. Reports the bound HTTP addresses once serving.

    `environ` (default os.environ) supplies systemd's NOTIFY_SOCKET, WATCHDOG_USEC
    and WATCHDOG_PID; `reload_config` re-reads the configuration on SIGHUP (without
    it, SIGHUP reloads only the key files).
    """
    env = os.environ if environ is None else environ
    # First: a certificate that does not load is a configuration error, before any state is opened.
    tls = ApiTls(config.http)
    notifier = Notifier.from_environ(env)
    rng = random.SystemRandom()
    metrics = AgentMetrics()
    node = config.agent.node_name

    # 1. Devices.
    backend, watched, sampler = _build_devices(config, env, rng)
    await sampler.open()
    # 2. The outbox.
    store = StateStore(Path(config.agent.data_dir) / STATE_FILE)
    astore = AsyncStateStore(store)
    replication: Replication | None = None
    try:
        async with (
            httpx.AsyncClient(headers={"User-Agent": f"gpu-orchestrator/{version}"}) as client,
            # Requests to other agents (forwarding, leader lookups) leave from the HTTP
            # bind address when it names one; webhooks and the advisor keep `client`.
            httpx.AsyncClient(
                headers={"User-Agent": f"gpu-orchestrator/{version}"},
                transport=httpx.AsyncHTTPTransport(local_address=local_address_for(config.http.bind), verify=tls.peer),
            ) as peer_client,
        ):
            deliverer = OutboxDeliverer(
                astore,
                client,
                timeout_s=config.integrations.webhook_timeout_s,
                max_attempts=config.integrations.webhook_max_attempts,
                rng=rng,
                on_outcome=lambda kind, outcome: metrics.outbox.labels(kind, outcome).inc(),
            )
            # 3. Membership: its metadata carries the table's drains and holders once a replica exists.
            membership = MembershipService(
                config,
                swim_profile(config.cluster.profile),
                version=version,
                sampler=sampler,
                drained=lambda: {} if replication is None or replication.log is None else replication.log.table.drained(),
                holders=lambda: {} if replication is None or replication.log is None else replication.log.table.held_gpus(),
                rng=rng,
            )
            # 4. Replication, with what every applied entry causes.
            effects = _AppliedEffects(node, graph_events_url(config.integrations.graph_service_url), astore, deliverer, backend, metrics)
            replication = Replication(
                config,
                membership,
                raft_config=lan().replace(snapshot_every=config.cluster.snapshot_every),
                on_applied=effects.on_applied,
                on_restored=effects.on_restored,
                on_compacted=astore.prune_outbox,
                rng=rng,
            )
            # 5. Inventory, analysis, the way to the leader, leadership.
            feed = InventoryFeed(
                node, sampler, membership, lambda: None if replication.log is None else replication.log.table, replication.voters
            )
            effects.attach(replication, feed)
            analysis = WorkloadAnalysis(
                feed.inventory,
                _build_advisor(config, client),
                on_advice=lambda decided_by, reason: metrics.advisor.labels(decided_by, reason).inc(),
            )
            cluster = ClusterRuntime(config, membership, lambda: replication.log if replication else None, peer_client)
            configured = ConfiguredPolicy(config.queue_policy)
            leadership = Leadership(
                node,
                lambda raft_log, term: _build_lease_service(config, raft_log, term, feed, analysis, metrics, rng),
                _leader_tasks(
                    config, sampler, membership, feed, deliverer, astore, lambda: replication.log if replication else None, configured
                ),
            )
            replication.on_log(leadership.follow)
            replication.on_log(lambda raft_log: raft_log.on_role(_ElectionCounter(metrics)))
            replication.on_log(_ProposalTimer(metrics))
            await replication.open()
            table = replication.log.table if replication.log is not None else None
            sampler.holders = lambda: {
                ref.index: aid
                for ref, aid in (replication.log.table.held_gpus().items() if replication.log is not None else ())
                if ref.node == node
            }
            sampler.shares = lambda: {
                ref.index: (tuple(sorted(shared.shares)), shared.budget_mb)
                for ref, shared in (replication.log.table.shares.gpus.items() if replication.log is not None else ())
                if ref.node == node
            }
            sampler.restore_health(
                {
                    snap.reading.index: reasons
                    for snap in sampler.snapshots()
                    for state, reasons in [table.gpu_health(GpuRef(node, snap.reading.index)) if table else ("", ())]
                    if state == UNHEALTHY
                },
                time.time(),
            )
            if table is not None:
                log.info(
                    "state file %s: %d allocations, %d queued (%d log entries replayed)",
                    store.path,
                    len(table.allocations()),
                    table.queue_length(),
                    replication.replayed,
                )
            keyring = ApiKeyring.load(Path(config.auth.keys_file)) if config.auth.enabled else None
            if keyring is not None and (unknown := _undeclared_key_queues(keyring, config)):
                log.warning("%s", unknown)
            ctx = AgentContext(
                config=config,
                sampler=sampler,
                metrics=metrics,
                keyring=keyring,
                version=version,
                started_at=time.time(),
                membership=membership,
                replication=replication,
                leadership=leadership,
                cluster=cluster,
                inventory=feed,
                analysis=analysis,
                tls=tls,
                configured_policy=configured,
            )
            effects.ctx = ctx
            _attach_metrics(metrics, ctx, replication)
            # 6. The tasks.
            await _run(ctx, config, sampler, watched, astore, deliverer, notifier, env, reload_config, backend, task_status)
    finally:
        await sampler.close()
        if replication is not None:
            replication.close()
        store.close()
        notifier.close()
    log.info("gpu-agent stopped")


def _build_devices(
    config: AgentConfig, env: Mapping[str, str], rng: random.Random
) -> tuple[DeviceBackend, SampleWatch, DeviceSampler]:
    node = config.agent.node_name
    # A simulated fleet is seeded by the node name so its GPU UUIDs survive a
    # restart, as real ones do: leases in the state file name GPUs by UUID.
    backend = backend_from_config(config.devices.backend, config.devices.simulate, seed=zlib.crc32(node.encode()))
    # A sample stuck in the backend beyond its timeout and a few intervals stops
    # the watchdog pings; one that fails quickly does not (agent/systemd_notify.py).
    watched = SampleWatch.from_environ(
        backend,
        stall_s=config.devices.nvml_timeout_s + 3 * config.devices.sample_interval_s,
        environ=env,
    )
    sampler = DeviceSampler(
        watched,
        node,
        interval_s=config.devices.sample_interval_s,
        timeout_s=config.devices.nvml_timeout_s,
        clock=time.time,
        rng=rng,
        health_policy=HealthPolicy(quiet_period_s=config.devices.health_quiet_period_s),
        idle_utilization_pct=config.devices.idle_utilization_pct,
    )
    return backend, watched, sampler


def _build_advisor(config: AgentConfig, client: httpx.AsyncClient) -> DeepAgentsAdvisor | None:
    if not config.integrations.deepagents_url:
        return None
    return DeepAgentsAdvisor(
        config.integrations.deepagents_url,
        client,
        timeout_s=config.integrations.deepagents_timeout_s,
        breaker=CircuitBreaker(),
    )


def _build_lease_service(
    config: AgentConfig,
    raft_log: RaftLog,
    term: int,
    feed: InventoryFeed,
    analysis: WorkloadAnalysis,
    metrics: AgentMetrics,
    rng: random.Random,
) -> LeaseService:
    """The lease service of the leadership of `term`, with a fresh admission core."""
    scheduler = Scheduler(
        SchedulerConfig(
            queue_timeout_s=config.scheduler.queue_timeout_s,
            max_queue=config.scheduler.max_queue,
            rendezvous_ports=(config.scheduler.rendezvous_port_min, config.scheduler.rendezvous_port_max),
            nvlink_first_gpus=config.scheduler.nvlink_first_gpus,
        ),
        rng,
    )
    return LeaseService(
        raft_log,
        Admission(scheduler),
        feed.inventory,
        analysis,
        term=term,
        default_ttl_s=config.scheduler.default_ttl_s,
        max_ttl_s=config.scheduler.max_ttl_s,
        tick_interval_s=config.scheduler.tick_interval_s,
        clock=time.time,
        on_decision=metrics.count_decision,
    )


def _leader_tasks(
    config: AgentConfig,
    sampler: DeviceSampler,
    membership: MembershipService,
    feed: InventoryFeed,
    deliverer: OutboxDeliverer,
    astore: AsyncStateStore,
    replication_log: Callable[[], RaftLog | None],
    configured: ConfiguredPolicy,
) -> list[LeaderTask]:
    """What a ready leader runs: the scheduler, the outbox, the health reporters, the usage recorder,
    the queue policy's sync, the host-loss watcher."""

    async def scheduler(service: LeaseService) -> None:
        # A sample may make a GPU eligible: wake the scheduler (the subscription ends with the term).
        stop = sampler.subscribe(service.wake)
        try:
            await service.run_scheduler()
        finally:
            stop()

    async def outbox(service: LeaseService) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliverer.run)
            while True:
                # Replicate how far delivery got, so every server drops those rows.
                await trio.sleep(_OUTBOX_PROGRESS_S)
                raft_log = replication_log()
                if raft_log is not None:
                    try:
                        await service.record_outbox_progress(await astore.delivered_through(raft_log.applied_index))
                    except Exception as error:  # noqa: BLE001 - retried at the next round; delivery goes on
                        log.info("outbox progress not recorded (%s); retrying", error)

    async def local_health(service: LeaseService) -> None:
        await report_local_health(service, sampler)

    async def remote_health(service: LeaseService) -> None:
        await record_remote_health(
            service,
            membership,
            lambda name: bool(feed.inventory().node_views(name)),
            config.devices.health_quiet_period_s,
        )

    async def usage(service: LeaseService) -> None:
        accounting = config.accounting
        await UsageRecorder(
            service,
            feed.inventory,
            record_interval_s=accounting.record_interval_s,
            retention_s=accounting.retention_days * 86_400.0,
            clock=time.time,
            # A record needs two looks at a GPU; a short interval (tests, trying it out) looks as often.
            poll_s=min(POLL_S, accounting.record_interval_s),
        ).run()

    async def queue_policy(service: LeaseService) -> None:
        await sync_queue_policy(service, configured)

    tasks: list[LeaderTask] = [scheduler, outbox, local_health, remote_health, usage, queue_policy]
    grace_s = config.cluster.host_lost_grace_s
    if grace_s > 0:

        async def host_loss(service: LeaseService) -> None:
            statuses = lambda: {m.view.name: m.view.status for m in membership.members()}  # noqa: E731
            await HostLossWatcher(service, statuses, node=config.agent.node_name, grace_s=grace_s).run()

        tasks.append(host_loss)
    else:
        log.info("[cluster] host_lost_grace_s = 0: leases of a lost host are never marked lost")
    return tasks


class _AppliedEffects:
    """What every applied entry causes outside the table: outbox rows, the device layer's lease map, metrics."""

    def __init__(
        self,
        node: str,
        graph_url: str | None,
        astore: AsyncStateStore,
        deliverer: OutboxDeliverer,
        backend: DeviceBackend,
        metrics: AgentMetrics,
    ) -> None:
        self.node = node
        self.graph_url = graph_url
        self._astore = astore
        self._deliverer = deliverer
        self._backend = backend
        self._metrics = metrics
        self._replication: Replication | None = None
        self._feed: InventoryFeed | None = None
        self.ctx: AgentContext | None = None
        # The table and holder version the device layer's lease map was last made from.
        self._shared_table: LeaseTable | None = None
        self._shared_version = -1

    def attach(self, replication: Replication, feed: InventoryFeed) -> None:
        self._replication, self._feed = replication, feed

    async def on_applied(self, entries: Sequence[Applied]) -> None:
        raft_log = self._replication.log if self._replication is not None else None
        # Rows at or below the replicated delivery progress are done: a replay must not re-create them.
        done = raft_log.table.outbox_delivered_through if raft_log is not None else 0
        rows = [
            OutboxRow(id=d.id, log_index=d.log_index, kind=d.kind, url=d.url, payload=_json_bytes(d.payload), created_at=d.created_at)
            for entry in entries
            if entry.index > done
            for d in deliveries(entry.index, entry.result.events, self.node, self.graph_url)
        ]
        if rows:
            await self._astore.add_outbox(rows)
            self._deliverer.wake()
        progress = [e.command.through for e in entries if isinstance(e.command, OutboxDelivered) and e.result.ok]
        if progress:
            await self._astore.drop_outbox_through(max(progress))
        if self.ctx is not None:
            self.ctx.last_applied_at = time.time()
        if self._feed is not None:
            self._feed.note_applied(entry.command for entry in entries)
        self._share_leases()
        if entries and not entries[0].replayed:
            if raft_log is not None:
                self._metrics.log_append.observe(raft_log.last_append_seconds)
            self._metrics.log_batch.observe(len(entries))
            # Preemptions are a cluster-wide figure: counted by the leader only, so sums never double count.
            leading = self.ctx is not None and self.ctx.leadership.service is not None
            for entry in entries:
                _count_events(self._metrics, entry, leading=leading)

    async def on_restored(self) -> None:
        self._share_leases(force=True)

    def _share_leases(self, *, force: bool = False) -> None:
        """Tell the device layer which of this host's GPUs are leased (the simulated fleet loads them).

        Only when this host's holders changed (the table's holder journal): the
        leader applies every lease of the cluster, and walking them all per entry
        would make each write cost as much as the cluster is big.
        """
        raft_log = self._replication.log if self._replication is not None else None
        if raft_log is None:
            return
        table = raft_log.table
        changed = table is not self._shared_table or self.node in table.holders_changed_since(self._shared_version)
        self._shared_table, self._shared_version = table, table.holder_version
        if changed or force:
            self._backend.set_leases({g.index: a.allocation_id for a in table.allocations_on(self.node) for g in a.gpus})


class _ElectionCounter:
    """Counts term changes for gpu_orchestrator_raft_elections_total."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics
        self._term: int | None = None

    def __call__(self, state: RoleState) -> None:
        if self._term is not None and state.term > self._term:
            self._metrics.raft_elections.inc(state.term - self._term)
        self._term = state.term


class _ProposalTimer:
    """Feeds gpu_orchestrator_raft_proposal_seconds from the log's proposals."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def __call__(self, raft_log: RaftLog) -> None:
        raft_log.on_proposal_seconds = self._metrics.raft_proposal.observe


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload).encode()


def _attach_metrics(metrics: AgentMetrics, ctx: AgentContext, replication: Replication) -> None:
    no_replica = LeaseTable()  # what a client (or a server before its log) reports: nothing held

    metrics.attach_state(
        StateCollector(
            node_name=ctx.node,
            sampler=ctx.sampler,
            table=lambda: no_replica if ctx.table is None else ctx.table,
            clock=time.time,
            is_leader=lambda: ctx.leadership.service is not None,
            term=lambda: int(ctx.raft_health().get("term") or 0),
            members=ctx.membership.member_counts,
            outbox_pending=lambda: ctx.outbox_pending,
            disk_stalled=ctx.disk_stalled_seconds,
            queues=lambda: [] if ctx.table is None else queue_views(ctx.table, ctx.inventory.inventory()),
            inventory=ctx.inventory.inventory,
        )
    )
    metrics.attach_gossip(GossipCollector(ctx.membership))
    metrics.attach_raft(
        RaftCollector(lambda: replication.log, lambda: None if replication.transport is None else replication.transport.stats)
    )
async def _run(
    ctx: AgentContext,
    config: AgentConfig,
    sampler: DeviceSampler,
    watched: SampleWatch,
    astore: AsyncStateStore,
    deliverer: OutboxDeliverer,
    notifier: Notifier,
    env: Mapping[str, str],
    reload_config: Callable[[], AgentConfig] | None,
    backend: DeviceBackend,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Start the tasks in order, serve HTTP until SIGTERM, then shut down (module docstring)."""
    app = create_app(ctx)
    assert ctx.tls is not None, "run_agent builds the API's TLS contexts first"
    hconfig = hypercorn_config(config, ctx.tls)
    shutdown, served = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        # Gossip first: /cluster/members never answers from a membership that is not running.
        await nursery.start(ctx.membership.run)
        await nursery.start(sampler.run)
        await nursery.start(ctx.leadership.run)
        await nursery.start(ctx.replication.run)
        nursery.start_soon(_housekeeping, ctx, astore, sampler, ctx.metrics)
        nursery.start_soon(_wait_for_signal, shutdown, notifier)
        nursery.start_soon(_reload_on_sighup, ctx, notifier, reload_config)
        bound: list[str] = await nursery.start(_serve, app, hconfig, shutdown, served)
        ctx.advertise_http = advertised_http_url(config, ctx.membership.advertise)
        log.info(
            "gpu-agent %s serving on %s as node %r with %d GPU(s) (%s backend)",
            ctx.version,
            ", ".join(bound),
            ctx.node,
            len(sampler.readings),
            backend.kind,
        )
        notifier.notify("READY=1", "STATUS=" + ctx.status_line())
        nursery.start_soon(run_status, notifier, ctx.status_line)
        ping_interval = watchdog_interval(env)
        if ping_interval is not None:
            nursery.start_soon(run_watchdog, notifier, ping_interval, watched.problem)
        task_status.started(bound)
        await shutdown.wait()
        # Hypercorn stops accepting at once and returns when the requests in
        # flight are answered (bounded by its graceful_timeout); the log still
        # runs meanwhile, so their proposals complete.
        raft_log = ctx.replication.log
        if raft_log is not None:
            # A leader hands over first (bounded; meanwhile Hypercorn stops accepting),
            # so a graceful restart costs the cluster one round of messages rather
            # than an election timeout. Alone, there is no one to hand over to.
            successor = await raft_log.hand_over(_HAND_OVER_S)
            if successor is not None:
                log.info("raft: leadership handed over to %s", successor)
        await served.wait()
        # Tell the cluster we are leaving (bounded), so peers list us as
        # left at once instead of suspecting us for seconds.
        await ctx.membership.leave()
        with trio.move_on_after(_SHUTDOWN_FLUSH_S if ctx.leadership.service is not None else 0):
            while ctx.outbox_pending and await astore.next_outbox_due() is not None:
                deliverer.wake()
                await trio.sleep(0.1)
                ctx.outbox_pending = (await astore.outbox_counts()).pending
        nursery.cancel_scope.cancel()


async def _serve(
    app: object,
    hconfig: HypercornConfig,
    shutdown: trio.Event,
    served: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve(app, hconfig, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
    finally:
        served.set()


async def _wait_for_signal(shutdown: trio.Event, notifier: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.info("received %s; shutting down", name)
            notifier.notify("STOPPING=1", f"STATUS=stopping ({name})")
            shutdown.set()
            return


async def _reload_on_sighup(
    ctx: AgentContext, notifier: Notifier, reload_config: Callable[[], AgentConfig] | None
) -> None:
    """On each SIGHUP, reload what can change at run time (module docstring)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            notifier.notify(*reloading_assignments())
            # File reads in a worker thread: no task on the trio thread waits on the disk.
            done = await trio.to_thread.run_sync(_reload, ctx, reload_config)
            log.info("SIGHUP: %s", "; ".join(done))
            # On the trio thread: wakes the leader's sync (agent/queue_policy_sync.py) if the queues changed.
            if ctx.configured_policy is not None:
                ctx.configured_policy.update(ctx.config.queue_policy)
            notifier.notify("READY=1", "STATUS=" + ctx.status_line())


def _reload(ctx: AgentContext, reload_config: Callable[[], AgentConfig] | None) -> list[str]:
    """Reload the log level, the API keys and the cluster keys; return what happened to each, for the log.

    Runs in a worker thread. The keyring swaps are single attribute assignments,
    so a request on the trio thread sees either the old keys or the new ones.
    """
    done: list[str] = []
    if reload_config is None:
        done.append("log level: no config to re-read")
    else:
        try:
            fresh = reload_config()
        except ConfigError as error:
            done.append(
                f"config NOT reloaded, keeping log level {ctx.config.agent.log_level} and "
                f"{_queues_text(ctx.config)} ({error})"
            )
        else:
            root = logging.getLogger()
            old_level = logging.getLevelName(root.level).lower()
            root.setLevel(fresh.agent.log_level.upper())
            done.append(f"log level {old_level} -> {fresh.agent.log_level}")
            ignored = restart_needed_keys(ctx.config, fresh)
            if fresh.queue_policy != ctx.config.queue_policy:
                done.append(f"queues: {_queues_text(fresh)} (the leader proposes them as the cluster's)")
            # The configuration in force: what started, with the reloadable keys applied.
            ctx.config = reloaded(ctx.config, fresh)
            if ignored:
                done.append("changed but need a restart: " + ", ".join(ignored))
    if ctx.keyring is None:
        done.append("API keys: auth is off")
    else:
        try:
            count = ctx.keyring.reload(ctx.config.auth.keys_file)
        except ApiKeyError as error:
            done.append(f"API keys NOT reloaded, keeping {len(ctx.keyring)} key(s) ({error})")
        else:
            done.append(f"API keys: {count} key(s) from {ctx.config.auth.keys_file}")
        if ctx.keyring is not None and (unknown := _undeclared_key_queues(ctx.keyring, ctx.config)):
            done.append(unknown)
    if ctx.tls is not None:
        done.append(ctx.tls.reload())
    keyring_file = ctx.membership.keyring if ctx.membership is not None else None
    if keyring_file is None:
        done.append("cluster key: none configured")
    else:
        # Logs its own outcome (new primary, or a broken file kept out).
        changed = keyring_file.reload_if_changed()
        done.append(f"cluster key file {keyring_file.path}: {'reloaded' if changed else 'unchanged'}")
    return done


def _undeclared_key_queues(keyring: ApiKeyring, config: AgentConfig) -> str | None:
    """A warning when keys name queues the configuration does not declare (their requests get 403), else None."""
    policy = config.queue_policy
    missing = sorted(q for q in keyring.queues() if q != DEFAULT_QUEUE and not policy.declared(q))
    if not policy.configured or not missing:
        return None
    return f"API keys name queue(s) not declared in [queues]: {', '.join(missing)} (their requests get 403 unknown_queue)"


def _queues_text(config: AgentConfig) -> str:
    names = [spec.name for spec in config.queues]
    return f"{len(names)} queue(s) ({', '.join(names)})" if names else "no queues (strict priority)"


async def _housekeeping(
    ctx: AgentContext, astore: AsyncStateStore, sampler: DeviceSampler, metrics: AgentMetrics
) -> None:
    """Refresh figures that handlers must not wait on disk for; mirror log timings to metrics."""
    failures_seen = 0
    while True:
        try:
            counts = await astore.outbox_counts()
            ctx.outbox_pending, ctx.outbox_gave_up = counts.pending, counts.gave_up
        except Exception:
            log.exception("could not read outbox counts")
        if sampler.failures > failures_seen:
            metrics.device_sample_failures.inc(sampler.failures - failures_seen)
        failures_seen = sampler.failures
        if ctx.audit is not None:
            ctx.audit.flush()  # a write's audit line reaches the log within 2 s
        await trio.sleep(2.0)


def _count_events(metrics: AgentMetrics, entry: Applied, *, leading: bool) -> None:
    for event in entry.result.events:
        if event.kind == "preempting" and leading:
            metrics.preemptions.labels(event.request.queue_name, event.reason or "").inc()
        if event.kind == "allocated" and event.was_queued and event.allocation is not None:
            metrics.observe_queue_wait(max(0.0, event.allocation.allocated_at - event.request.submitted_at))
        elif event.kind == "expired" and event.reason == "lease_ttl":
            metrics.leases_expired.inc()
        elif event.kind == "gpu_unhealthy":
            metrics.allocations_hit_by_unhealthy_gpu.inc()
        elif event.kind == "lost":
            metrics.allocations_lost.inc()
