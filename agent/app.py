"""The agent process: builds the parts and runs them as trio tasks until SIGTERM.

Resource handling
-----------------
Tasks, nested as hypercorn nests its own: the log writer, the device sampler,
the scheduler loop, the outbox deliverer, the gossip membership service, on a
Raft leader the host-loss watcher (agent/host_loss.py), and a small
housekeeping task run in one nursery; the HTTP server runs beside them
with a shutdown trigger. Start-up order is what makes an acknowledgement mean something: the state file is
opened and replayed before the HTTP port is bound, so the first answer already
reflects every earlier acknowledged write.

systemd (agent/systemd_notify.py): READY=1 once the HTTP port is bound (the
gossip port already is), STATUS= whenever the one-line summary changes,
WATCHDOG=1 while the device sampler is not stuck, STOPPING=1 on SIGTERM. All of
it is a no-op without $NOTIFY_SOCKET.

Reload (SIGHUP): the config file is read again and its log level applied, the
API keys file and the cluster key file are re-read. A file that no longer
loads is logged and the settings in force are kept; changed keys that need a
restart are named in the log.

Shutdown (SIGTERM or SIGINT): hypercorn stops accepting and lets in-flight
requests finish (their proposals complete, since the log writer still runs),
the agent gossips that it leaves the cluster (bounded by 2 s), the outbox
gets a short grace period to deliver what is due, then everything is
cancelled and the state file closed. Exit status 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from coordinator.backoff import CircuitBreaker
from coordinator.lease_table import LeaseTable
from coordinator.raft_config import lan
from coordinator.raft import RaftState
from coordinator.gpu_health import GpuHealth, HealthPolicy
from coordinator.model import UNHEALTHY, GpuRef
from coordinator.scheduler import Scheduler, SchedulerConfig
from coordinator.swim_config import profile as swim_profile
from coordinator.views import graph_event, webhook_payload

from agent.advisor import DeepAgentsAdvisor
from agent.api_keys import ApiKeyError, ApiKeyring
from agent.cluster import ClientLog, ClusterRuntime, CommandLog, raft_mode, run_while
from agent.config import AgentConfig, ConfigError, graph_events_url, restart_needed_keys
from agent.context import AgentContext
from agent.device_sampler import DeviceSampler
from agent.devices import backend_from_config
from agent.host_loss import HostLossWatcher
from agent.http_listener import ApiTls, advertised_http_url, hypercorn_config
from agent.http_api import create_app
from agent.lease_service import LeaseService
from agent.local_log import Applied, LocalLog
from agent.membership import MembershipService
from agent.node_meta import gossiped_reasons
from agent.metrics import AgentMetrics, GossipCollector, RaftCollector, StateCollector
from agent.outbox import OutboxDeliverer
from agent.raft_log import RaftLog
from agent.raft_storage import AsyncRaftStorage, RaftStorage
from agent.raft_transport import RaftTransport, local_address_for
from agent.storage import AsyncStateStore, OutboxRow, StateStore
from agent.systemd_notify import (
    Notifier,
    SampleWatch,
    reloading_assignments,
    run_status,
    run_watchdog,
    watchdog_interval,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.db"
# Events a request's webhook hears about: the outcome of a queued request (the
# caller was told 202 and waits), a lease's expiry, a GPU under a lease failing,
# and a lease lost with its host (the holder may not even know its host is gone).
_WEBHOOK_KINDS = frozenset({"allocated", "expired", "cancelled", "gpu_unhealthy", "lost"})
# Time the outbox gets at shutdown to deliver what is already due.
_SHUTDOWN_FLUSH_S = 2.0
# How long a leader that is stopping waits for another server to take over.
_HAND_OVER_S = 2.0
# How often the leader compares the health members gossip with the table's record.
_REMOTE_HEALTH_POLL_S = 1.0


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
    store = StateStore(Path(config.agent.data_dir) / STATE_FILE)
    astore = AsyncStateStore(store)
    metrics = AgentMetrics()
    node = config.agent.node_name

    # A simulated fleet is seeded by the node name so its GPU UUIDs survive a
    # restart, as real ones do: leases in the state file name GPUs by UUID.
    seed = zlib.crc32(node.encode())
    backend = backend_from_config(config.devices.backend, config.devices.simulate, seed=seed)
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
    await sampler.open()

    mode = raft_mode(config)
    cluster_rt: ClusterRuntime | None = None
    raft_storage: RaftStorage | None = None
    # The log in force, once built (gossip metadata reads the table through it).
    log_box: list[CommandLog] = []

    def current_table() -> LeaseTable:
        return log_box[0].table if log_box else LeaseTable()

    # `early` runs what a Raft server needs before its log can be recovered (gossip
    # for the bootstrap, the Raft transport); alone, nothing runs in it.
    async with (
        httpx.AsyncClient(headers={"User-Agent": f"gpu-orchestrator/{version}"}) as client,
        # Requests to other agents (forwarding, leader lookups) leave from the HTTP
        # bind address when it names one; webhooks and the advisor keep `client`.
        httpx.AsyncClient(
            headers={"User-Agent": f"gpu-orchestrator/{version}"},
            transport=httpx.AsyncHTTPTransport(local_address=local_address_for(config.http.bind), verify=tls.peer),
        ) as peer_client,
        trio.open_nursery() as early,
    ):
        deliverer = OutboxDeliverer(
            astore,
            client,
            timeout_s=config.integrations.webhook_timeout_s,
            max_attempts=config.integrations.webhook_max_attempts,
            rng=rng,
            on_outcome=lambda kind, outcome: metrics.outbox.labels(kind, outcome).inc(),
        )
        graph_url = graph_events_url(config.integrations.graph_service_url)

        async def on_applied(entries: Sequence[Applied]) -> None:
            rows = _outbox_rows(entries, node, graph_url)
            if rows:
                await astore.add_outbox(rows)
                deliverer.wake()
            if cluster_rt is not None:
                cluster_rt.last_applied_at = time.time()
            table = lease_log.table
            backend.set_leases({ref.index: aid for ref, aid in table.held_gpus().items() if ref.node == node})
            if entries and not entries[0].replayed:
                metrics.log_append.observe(lease_log.last_append_seconds)
                metrics.log_batch.observe(len(entries))
                for entry in entries:
                    _count_events(metrics, entry)

        async def on_restored() -> None:
            backend.set_leases({ref.index: aid for ref, aid in lease_log.table.held_gpus().items() if ref.node == node})

        # Every agent gossips, joined or not, so another can join it later.
        membership = MembershipService(
            config,
            swim_profile(config.cluster.profile),
            version=version,
            sampler=sampler,
            drained=lambda: current_table().drained(),
            holders=lambda: current_table().held_gpus(),
            rng=rng,
        )
        lease_log: CommandLog
        raft_log: RaftLog | None = None
        transport: RaftTransport | None = None
        if mode is None:
            lease_log = LocalLog(astore, on_applied=on_applied)
        else:
            araft: AsyncRaftStorage | None = None
            state = RaftState()
            if mode == "server":
                raft_storage = RaftStorage(Path(config.agent.data_dir) / STATE_FILE)
                araft = AsyncRaftStorage(raft_storage)
                state = await araft.load()
                if state != RaftState():
                    # Gossip "holds Raft state" from the first packet on: a blank server
                    # must never take a restarting server for a founder still to bootstrap.
                    membership.set_bootstrapped()
            await early.start(membership.run)
            cluster_rt = ClusterRuntime(config, membership, None, peer_client)
            if araft is None:
                lease_log = ClientLog()
            else:
                transport = RaftTransport(
                    node,
                    config.cluster.bind,
                    config.cluster.raft_port,
                    membership.keyring,
                    rng=random.Random(rng.getrandbits(64)),
                )
                await transport.open()
                early.start_soon(cluster_rt.feed_peers, transport.set_peers)
                voters = None
                if state == RaftState():
                    # None: a cluster already runs; start blank and wait to be added.
                    voters = await cluster_rt.wait_for_bootstrap(config.cluster.bootstrap_expect)
                raft_log = RaftLog(
                    araft,
                    transport,
                    node_id=node,
                    on_applied=on_applied,
                    config=lan(),
                    rng=random.Random(rng.getrandbits(64)),
                    bootstrap_voters=voters,
                    on_restored=on_restored,
                )
                raft_log.on_proposal_seconds = metrics.raft_proposal.observe
                cluster_rt.raft = raft_log
                lease_log = raft_log
                await early.start(transport.run, raft_log.receive)
        log_box.append(lease_log)
        sampler.holders = lambda: {
            ref.index: aid for ref, aid in lease_log.table.held_gpus().items() if ref.node == node
        }
        replayed = await lease_log.recover() if isinstance(lease_log, (LocalLog, RaftLog)) else 0
        if raft_log is not None:
            # Gossip "holds Raft state" (metadata `b`) as soon as it is true, so a
            # blank server started later joins this cluster instead of founding one.
            early.start_soon(_advertise_raft_state, raft_log, membership)
        sampler.restore_health(
            {
                snap.reading.index: reasons
                for snap in sampler.snapshots()
                for state, reasons in [lease_log.table.gpu_health(GpuRef(node, snap.reading.index))]
                if state == UNHEALTHY
            },
            time.time(),
        )
        log.info(
            "state file %s: %d allocations, %d queued (%d log entries replayed)",
            store.path,
            len(lease_log.table.allocations()),
            lease_log.table.queue_length(),
            replayed,
        )

        advisor = None
        if config.integrations.deepagents_url:
            advisor = DeepAgentsAdvisor(
                config.integrations.deepagents_url,
                client,
                timeout_s=config.integrations.deepagents_timeout_s,
                breaker=CircuitBreaker(),
            )
        service = LeaseService(
            lease_log,
            Scheduler(
                SchedulerConfig(
                    queue_timeout_s=config.scheduler.queue_timeout_s, max_queue=config.scheduler.max_queue
                ),
                rng,
            ),
            sampler.gpu_views if cluster_rt is None else cluster_rt.inventory(sampler.gpu_views, current_table),
            default_ttl_s=config.scheduler.default_ttl_s,
            max_ttl_s=config.scheduler.max_ttl_s,
            tick_interval_s=config.scheduler.tick_interval_s,
            advisor=advisor,
            clock=time.time,
            rng=rng,
            on_decision=metrics.count_decision,
            on_advice=lambda decided_by, reason: metrics.advisor.labels(decided_by, reason).inc(),
        )
        keyring = ApiKeyring.load(Path(config.auth.keys_file)) if config.auth.enabled else None
        ctx = AgentContext(
            config=config,
            service=service,
            log=lease_log,
            sampler=sampler,
            metrics=metrics,
            keyring=keyring,
            version=version,
            started_at=time.time(),
            membership=membership,
            cluster=cluster_rt,
            tls=tls,
        )
        metrics.attach_state(
            StateCollector(
                node_name=node,
                sampler=sampler,
                table=lambda: lease_log.table,
                clock=time.time,
                is_leader=(lambda: True) if cluster_rt is None else cluster_rt.is_leader,
                term=(lambda: 1) if cluster_rt is None else cluster_rt.known_term,
                members=membership.member_counts,
                outbox_pending=lambda: ctx.outbox_pending,
                disk_stalled=lease_log.disk_stalled_seconds,
            )
        )
        metrics.attach_gossip(GossipCollector(membership))
        if raft_log is not None and transport is not None:
            metrics.attach_raft(RaftCollector(raft_log, transport.stats))
        sampler.subscribe(service.wake)
        health_send, health_recv = trio.open_memory_channel[tuple[int, GpuHealth]](math.inf)
        if mode != "client":
            sampler.on_health_change(lambda index, health: health_send.send_nowait((index, health)))
        app = create_app(ctx)
        hconfig = hypercorn_config(config, tls)

        shutdown, served = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            if isinstance(lease_log, (LocalLog, RaftLog)):
                await nursery.start(lease_log.run)
            await nursery.start(sampler.run)
            if cluster_rt is None:
                await nursery.start(service.run_scheduler)
                await nursery.start(deliverer.run)
                await nursery.start(membership.run)
                nursery.start_soon(_report_health, service, sampler, health_recv)
            elif raft_log is not None:
                # Only the leader schedules and delivers the outbox (every server writes it).
                leading = cluster_rt.is_leader
                nursery.start_soon(run_while, leading, service.run_scheduler)
                nursery.start_soon(run_while, leading, deliverer.run)
                nursery.start_soon(run_while, leading, lambda: _report_health(service, sampler, health_recv))
                quiet_s = config.devices.health_quiet_period_s
                nursery.start_soon(run_while, leading, lambda: _record_remote_health(service, cluster_rt, quiet_s))
                if config.cluster.host_lost_grace_s > 0:
                    watcher = HostLossWatcher(
                        service,
                        lambda: {m.view.name: m.view.status for m in membership.members()},
                        node=node,
                        grace_s=config.cluster.host_lost_grace_s,
                    )
                    nursery.start_soon(run_while, leading, watcher.run)
                else:
                    log.info("[cluster] host_lost_grace_s = 0: leases of a lost host are never marked lost")
                nursery.start_soon(_watch_term, raft_log, metrics)
            nursery.start_soon(_housekeeping, ctx, astore, sampler, metrics)
            nursery.start_soon(_wait_for_signal, shutdown, notifier)
            nursery.start_soon(_reload_on_sighup, ctx, notifier, reload_config)
            bound: list[str] = await nursery.start(_serve, app, hconfig, shutdown, served)
            ctx.advertise_http = advertised_http_url(config, membership.advertise)
            log.info(
                "gpu-agent %s serving on %s as node %r with %d GPU(s) (%s backend)",
                version,
                ", ".join(bound),
                node,
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
            # flight are answered (bounded by its graceful_timeout); the log writer
            # still runs meanwhile, so their proposals complete.
            if raft_log is not None:
                # A leader hands over first (bounded; meanwhile Hypercorn stops
                # accepting), so a graceful restart costs the cluster one round of
                # messages rather than an election timeout.
                successor = await raft_log.hand_over(_HAND_OVER_S)
                if successor is not None:
                    log.info("raft: leadership handed over to %s", successor)
            await served.wait()
            # Tell the cluster we are leaving (bounded), so peers list us as
            # left at once instead of suspecting us for seconds.
            await membership.leave()
            with trio.move_on_after(_SHUTDOWN_FLUSH_S if cluster_rt is None or cluster_rt.is_leader() else 0):
                while ctx.outbox_pending and await astore.next_outbox_due() is not None:
                    deliverer.wake()
                    await trio.sleep(0.1)
                    ctx.outbox_pending = (await astore.outbox_counts()).pending
            nursery.cancel_scope.cancel()
        early.cancel_scope.cancel()
    await sampler.close()
    if raft_storage is not None:
        raft_storage.close()
    store.close()
    notifier.close()
    log.info("gpu-agent stopped")


async def _advertise_raft_state(raft_log: RaftLog, membership: MembershipService) -> None:
    """Set the gossip flag once this server's log holds anything (at once for a founder or a restart;
    for a blank server, when the leader's first entries or snapshot reach it). Raft state is never
    deleted, so the flag is never withdrawn."""
    while raft_log.last_index == 0:
        await trio.sleep(0.2)
    membership.set_bootstrapped()


async def _watch_term(raft_log: RaftLog, metrics: AgentMetrics) -> None:
    """Count term changes (elections) for gpu_orchestrator_raft_elections_total."""
    term = raft_log.term
    while True:
        await trio.sleep(0.1)
        if raft_log.term != term:
            metrics.raft_elections.inc(raft_log.term - term)
            log.info("raft: term %d, role %s, leader %s", raft_log.term, raft_log.role.value, raft_log.leader_id)
            term = raft_log.term


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
            done.append(f"config NOT reloaded, keeping log level {ctx.config.agent.log_level} ({error})")
        else:
            root = logging.getLogger()
            old_level = logging.getLevelName(root.level).lower()
            root.setLevel(fresh.agent.log_level.upper())
            done.append(f"log level {old_level} -> {fresh.agent.log_level}")
            ignored = restart_needed_keys(ctx.config, fresh)
            # The configuration in force: what started, with the reloadable keys applied.
            ctx.config = replace(ctx.config, agent=replace(ctx.config.agent, log_level=fresh.agent.log_level))
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
        await trio.sleep(2.0)


async def _report_health(
    service: LeaseService, sampler: DeviceSampler, changes: trio.MemoryReceiveChannel[tuple[int, GpuHealth]]
) -> None:
    """Write this host's GPU health changes into the lease table, in order.

    First reconcile: the table may still hold a state from before a restart
    that the fresh sampler no longer sees (or the reverse).
    """
    node = sampler.node_name
    for snap in sampler.snapshots():
        recorded = service.table.gpu_health(GpuRef(node, snap.reading.index))
        if recorded != (snap.health.state, snap.health.reasons):
            await _report_one(service, node, snap.reading.index, snap.health)
    async for index, health in changes:
        await _report_one(service, node, index, health)


async def _record_remote_health(service: LeaseService, cluster: ClusterRuntime, quiet_s: float) -> None:
    """On the Raft leader: record the health other members gossip for their GPUs, as they change.

    Each agent's health policy decides its own GPUs' health; only the leader
    may write the table, so it copies what the others announce (a change is
    gossiped at once). Recording it is what tells a lease holder its remote
    GPU failed (the gpu_unhealthy event). Hosts that are not alive are left to
    host loss.

    An unhealthy verdict is kept for `quiet_s` (the health policy's quiet
    period) from when this leader first saw it, even if the host gossips
    healthy sooner: its own policy would not have, so the host restarted and
    forgot (a client holds no replica to restore it from). The inventory reads
    the table's verdict too (ClusterRuntime.inventory), so such a GPU is not
    scheduled meanwhile. A new leader starts its clocks afresh: late, never early.
    """
    unhealthy_since: dict[GpuRef, float] = {}
    while True:
        now = trio.current_time()
        for node, index, state, reasons in cluster.gossiped_health():
            ref = GpuRef(node, index)
            recorded, why = service.table.gpu_health(ref)
            if recorded == UNHEALTHY:
                unhealthy_since.setdefault(ref, now)
            else:
                unhealthy_since.pop(ref, None)
            # Compared as gossip would carry the record (reasons cut short), so a verdict
            # that host recorded in full while it led is not re-proposed for nothing.
            if (recorded, gossiped_reasons(recorded, why)) == (state, reasons):
                continue
            if recorded == UNHEALTHY and state != UNHEALTHY and now - unhealthy_since[ref] < quiet_s:
                continue  # lifted before its quiet period: the host forgot it, the leader has not
            await _report_one(service, node, index, GpuHealth(state, reasons))
        await trio.sleep(_REMOTE_HEALTH_POLL_S)


async def _report_one(service: LeaseService, node: str, index: int, health: GpuHealth) -> None:
    try:
        await service.report_health(node, index, health.state, health.reasons)
    except Exception:
        # Health still shows in /gpu/status and metrics and still guides the
        # scheduler from the sampler; only the durable record missed this change.
        log.exception("could not record health of GPU %s/%d", node, index)


def _outbox_rows(entries: Sequence[Applied], node: str, graph_url: str | None) -> list[OutboxRow]:
    """The deliveries each applied event causes, keyed by log index so a replay re-creates, never duplicates."""
    rows: list[OutboxRow] = []
    for entry in entries:
        for seq, event in enumerate(entry.result.events):
            targets: list[tuple[str, str, dict[str, object]]] = []
            webhook = event.request.webhook_url
            if webhook and event.kind in _WEBHOOK_KINDS and (event.was_queued or event.kind != "allocated"):
                targets.append(("webhook", webhook, webhook_payload(event)))
            if graph_url:
                targets.append(("graph", graph_url, graph_event(event, node)))
            rows.extend(
                OutboxRow(
                    id=f"{entry.index}.{seq}.{kind}",
                    log_index=entry.index,
                    kind=kind,
                    url=url,
                    payload=json.dumps(payload).encode(),
                    created_at=event.at,
                )
                for kind, url, payload in targets
            )
    return rows


def _count_events(metrics: AgentMetrics, entry: Applied) -> None:
    for event in entry.result.events:
        if event.kind == "allocated" and event.was_queued and event.allocation is not None:
            metrics.observe_queue_wait(max(0.0, event.allocation.allocated_at - event.request.submitted_at))
        elif event.kind == "expired" and event.reason == "lease_ttl":
            metrics.leases_expired.inc()
        elif event.kind == "gpu_unhealthy":
            metrics.allocations_hit_by_unhealthy_gpu.inc()
        elif event.kind == "lost":
            metrics.allocations_lost.inc()
