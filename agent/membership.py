"""The membership shell: drives the SWIM core over the gossip transport.

Theory of operation
-------------------
`MembershipService` owns one `SwimCore` (coordinator/swim.py) and is the only
code that touches it. Every input reaches the core on the trio thread with
`now` = `trio.current_time()` (monotonic: wall-clock jumps must not fire or
stall failure detection):

* a datagram from the transport → `core.receive`;
* a push-pull state (either direction) → `core.merge_remote_state`;
* a fresh device sample → new metadata (agent/node_meta.py) → `core.set_meta`,
  only when the builder says it is worth announcing;
* the driver task's timer → `core.tick` at `core.next_deadline()`.

After each input the driver is woken; it sends `take_datagrams()` and
publishes `take_events()` (logged: join/alive at info, suspect/dead at
warning, left at info) and refreshes the decoded metadata of changed members.

Joining: the seeds of ``[cluster] join`` are resolved, the core is told to
join them over UDP (it repeats that every probe interval until someone
answers), and a TCP push-pull with each seed fetches the whole membership at
once, and tells the seed about us. Until one push-pull succeeds this repeats
with jittered exponential backoff capped at 30 s, so agents may start in any
order; once gossip shows other members it gives up after a few rounds (a
seed that answered over UDP alone may not know us yet, hence not at once). A restarted agent joins like a new one; the
core refutes the verdicts on its previous life by raising its incarnation.

Push-pull: every `push_pull_interval · push_pull_scale(N)` (30 s on "lan",
15 s on "local") with a random alive member, to repair anything gossip missed.

Leaving: `leave()` (called by the app on SIGTERM, before the nursery is
cancelled) has the core gossip "left" and waits, at most `LEAVE_TIMEOUT_S`,
until that message has been retransmitted its full count, so peers list the
agent as left rather than suspect and then dead.

Error handling
--------------
Garbage from the network never leaves this module: the transport drops what
is oversized or does not decrypt, and the core's `MalformedPacket` is counted
here (`GossipStats.dropped["malformed"]`). A member whose metadata does not
decode is listed with no GPUs (logged once per blob). Failed push-pulls are
logged at debug and retried at the next interval.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import trio

from coordinator.backoff import retry_delay
from coordinator.model import GpuRef
from coordinator.mig import gpu_of_slice, slice_index
from coordinator.swim import MalformedPacket, MemberEvent, MemberView, SwimCore
from coordinator.swim_config import SwimConfig

from agent.config import AgentConfig
from agent.config_checks import split_host_port
from agent.device_sampler import DeviceSampler
from agent.gossip_transport import Address, GossipStats, GossipTransport, PushPullError
from agent.cluster_keyring import KeyringFile
from agent.node_meta import (
    ROLE_CLIENT,
    ROLE_SERVER,
    GpuMeta,
    GpuState,
    NodeMeta,
    NodeMetaBuilder,
    NodeMetaError,
    decode_node_meta,
)

log = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 2.0  # how long shutdown waits for "left" to be gossiped
KEY_FILE_CHECK_S = 5.0  # how often the key file is checked for a rotation step
JOIN_RETRY_CAP_S = 30.0
# Push-pull rounds a joining agent tries even after gossip shows it peers (see _join).
JOIN_PUSH_PULL_ATTEMPTS = 5
# A push-pull state is every member's row; 8 MiB holds ~7,000 members with full
# 1 KiB metadata, far above any cluster this agent is meant for, and bounds
# what a peer can make us buffer.
MAX_STATE_BYTES = 8 * 1024 * 1024
# Statuses whose GPUs are listed cluster-wide: a suspect may well be alive.
_LIVE = ("alive", "suspect")
_EVENT_WORDS = {
    "join": "joined",
    "alive": "is alive again",
    "suspect": "is suspected to have failed",
    "dead": "is dead",
    "left": "left",
    "meta": "updated its metadata",
}


@dataclass(frozen=True, slots=True)
class Member:
    """A member as the gossip view shows it, with its decoded metadata (None if unreadable)."""

    view: MemberView
    meta: NodeMeta | None
    meta_received_at: float  # wall clock: when this agent last saw the metadata change


@dataclass(frozen=True, slots=True)
class RemoteGpu:
    """One GPU of another live member, from its gossip metadata."""

    node: str
    gpu: GpuMeta
    received_at: float  # wall clock
    # For a GPU in MIG mode: its slices as gossiped (each a GpuMeta with mig_profile set).
    slices: tuple[GpuMeta, ...] = ()


def advertise_address(bind: str, advertise: str | None) -> str:
    """The IP address peers should use: `advertise`, else `bind`, else this host's outbound address."""
    if advertise:
        return advertise
    if bind not in ("0.0.0.0", "::"):
        return bind
    family = socket.AF_INET6 if bind == "::" else socket.AF_INET
    probe = ("2001:db8::1", 9) if family == socket.AF_INET6 else ("192.0.2.1", 9)
    try:
        # Connecting a UDP socket sends nothing; it only asks the kernel which
        # source address it would route from (memberlist does the same).
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(probe)
            return str(s.getsockname()[0])
    except OSError:
        loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        log.warning("cannot find a routable address; advertising %s (set [cluster] advertise)", loopback)
        return loopback


class MembershipService:
    """One agent's membership: the SWIM core, its transport, and the view others read."""

    def __init__(
        self,
        config: AgentConfig,
        swim: SwimConfig,
        *,
        version: str,
        sampler: DeviceSampler,
        drained: Callable[[], Mapping[GpuRef, str]],
        holders: Callable[[], Mapping[GpuRef, str]],
        rng: random.Random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        cluster = config.cluster
        self.name = config.agent.node_name
        self.swim = swim
        self.stats = GossipStats()
        self._sampler = sampler
        self._drained = drained
        self._holders = holders
        self._rng = rng
        self._clock = clock
        self._seeds = cluster.join
        self._profile = cluster.profile
        self._default_port = cluster.gossip_port
        self.keyring = KeyringFile(cluster.key_file) if cluster.key_file is not None else None
        if self.keyring is None:
            log.warning(
                "cluster traffic is NOT encrypted or authenticated: no [cluster] key_file is set; "
                "anyone who can reach port %d can join this cluster (docs/membership.md)",
                cluster.gossip_port,
            )
        self.transport = GossipTransport(
            cluster.bind,
            cluster.gossip_port,
            self.keyring,
            max_packet_bytes=swim.packet_size,
            max_state_bytes=MAX_STATE_BYTES,
            tcp_timeout_s=swim.tcp_timeout,
            stats=self.stats,
        )
        self.advertise = advertise_address(cluster.bind, cluster.advertise)
        http_bind = config.http.bind
        self._builder = NodeMetaBuilder(
            NodeMeta(
                name=self.name,
                role=ROLE_SERVER if cluster.server else ROLE_CLIENT,
                advertise_ip=self.advertise,
                http_port=config.http.port,
                gossip_port=cluster.gossip_port,
                raft_port=cluster.raft_port,
                version=version,
                http_ip=None if http_bind in ("0.0.0.0", "::") else http_bind,
                tls=config.http.tls_enabled,
                labels=dict(label.split("=", 1) for label in config.agent.labels),
            ),
            # Telemetry-only changes at most every few probe intervals: fresh
            # enough for placement, without an alive broadcast every sample.
            min_interval_s=5.0 * swim.probe_interval,
            max_bytes=swim.max_meta_size,
        )
        self._min_meta_interval_s = 5.0 * swim.probe_interval
        self._swim = swim
        self._core: SwimCore | None = None
        self._wake = trio.Event()
        self._decoded: dict[str, Member] = {}
        self._bad_meta_logged: set[bytes] = set()
        self._change_listeners: list[Callable[[str], None]] = []
        self.joined = trio.Event()

    # --- what others read ----------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._core is not None

    @property
    def health_score(self) -> int:
        """Lifeguard's local health score (0 = healthy; higher = this agent is slow or cut off)."""
        return self._core.health_score if self._core is not None else 0

    @property
    def core(self) -> SwimCore:
        assert self._core is not None, "run() first"
        return self._core

    def members(self) -> list[Member]:
        """Every member known (this agent included), by name, with decoded metadata."""
        if self._core is None:
            return []
        views = self._core.members()
        for gone in set(self._decoded) - {v.name for v in views}:
            del self._decoded[gone]
        return [self._decode(view) for view in views]

    def member(self, name: str) -> Member | None:
        """One member by name, with decoded metadata (None when gossip does not know it)."""
        if self._core is None:
            return None
        view = self._core.member(name)
        return None if view is None else self._decode(view)

    def on_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(name)` whenever a member joins, changes status or metadata, or leaves.

        Returns the function that stops it.
        """
        self._change_listeners.append(listener)
        return lambda: self._change_listeners.remove(listener)

    def member_counts(self) -> dict[str, int]:
        """Members by status, for gpu_orchestrator_cluster_members (every status present, 0 included)."""
        counts = dict.fromkeys(("alive", "suspect", "dead", "left"), 0)
        for view in self._core.members() if self._core is not None else ():
            counts[view.status] = counts.get(view.status, 0) + 1
        return counts

    def live_gpus(self, name: str) -> list[RemoteGpu]:
        """The GPUs a live (alive or suspect) member other than this one gossips, in index order."""
        member = self.member(name)
        if member is None or name == self.name or member.view.status not in _LIVE or member.meta is None:
            return []
        slices: dict[int, list[GpuMeta]] = {}
        for gpu in member.meta.gpus:
            parent = gpu_of_slice(gpu.index) if gpu.mig_profile is not None else None
            if parent is not None:
                slices.setdefault(parent, []).append(gpu)
        return sorted(
            (
                RemoteGpu(name, gpu, member.meta_received_at, tuple(slices.get(gpu.index, ())))
                for gpu in member.meta.gpus
                if gpu.mig_profile is None
            ),
            key=lambda r: r.gpu.index,
        )

    def _decode(self, view: MemberView) -> Member:
        """The member with its metadata decoded; decoded once per distinct blob."""
        cached = self._decoded.get(view.name)
        if cached is not None and cached.view.meta == view.meta:
            member = Member(view, cached.meta, cached.meta_received_at)
            self._decoded[view.name] = member
            return member
        meta: NodeMeta | None = None
        if view.meta:
            try:
                meta = decode_node_meta(view.meta)
            except NodeMetaError as error:
                if view.meta not in self._bad_meta_logged:
                    self._bad_meta_logged.add(view.meta)
                    log.warning("member %s gossips unreadable metadata (%s); listing it without GPUs", view.name, error)
        member = Member(view, meta, self._clock())
        self._decoded[view.name] = member
        return member

    # --- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the gossip port, then run until cancelled. Reports started once bound.

        Raises OSError when the gossip port cannot be bound.
        """
        port = await self.transport.open()
        now = trio.current_time()
        blob = self._builder.update(self._local_gpus(), now, self._sampler.topology) or self._builder.blob
        if self._builder.truncated:
            gossiped = decode_node_meta(blob).gpus
            slices = sum(len(r.mig_instances) for r in self._sampler.readings if r.mig_mode)
            log.warning(
                "this node's %d GPUs and %d MIG slices do not all fit in gossip metadata (%d bytes); "
                "other agents see the first %d GPUs (with the total) and %d slices",
                len(self._sampler.readings),
                slices,
                self.swim.max_meta_size,
                sum(1 for g in gossiped if g.mig_profile is None),
                sum(1 for g in gossiped if g.mig_profile is not None),
            )
        self._core = SwimCore(
            self.swim, self.name, (self.advertise, port), blob, random.Random(self._rng.getrandbits(64)), now
        )
        self._sampler.subscribe(self._on_sample)
        log.info(
            "gossip on %s:%d (udp+tcp), advertising %s:%d, %s profile, %s, %s",
            self.transport.bind,
            port,
            self.advertise,
            port,
            self._profile,
            "encrypted" if self.keyring else "UNENCRYPTED",
            f"joining {', '.join(self._seeds)}" if self._seeds else "no join addresses (waiting to be joined)",
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.transport.serve_udp, self._on_datagram)
                await nursery.start(self.transport.serve_tcp, self._state_for_peer, self._on_state)
                nursery.start_soon(self._drive)
                nursery.start_soon(self._push_pull_periodically)
                if self._seeds:
                    nursery.start_soon(self._join)
                if self.keyring is not None:
                    nursery.start_soon(self._watch_key_file)
                task_status.started()
        finally:
            await self.transport.aclose()

    async def leave(self) -> None:
        """Gossip that this agent leaves, and wait (bounded) until that has been sent enough times."""
        if self._core is None:
            return
        if not any(m.status == "alive" and m.name != self._core.name for m in self._core.members()):
            return  # alone: nobody to tell, so no reason to wait
        self._core.leave(trio.current_time())
        self._wake.set()
        with trio.move_on_after(LEAVE_TIMEOUT_S):
            while not self._core.leave_complete:
                await trio.sleep(self.swim.gossip_interval)
        log.info("left the cluster (incarnation %d)", self._core.incarnation)

    async def _drive(self) -> None:
        core = self.core
        while True:
            core.tick(trio.current_time())
            await self._flush()
            with trio.move_on_at(core.next_deadline()):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _flush(self) -> None:
        core = self.core
        for event in core.take_events():
            self._publish(event)
        for address, payload in core.take_datagrams():
            await self.transport.send_datagram(address, payload)

    def _publish(self, event: MemberEvent) -> None:
        member = event.member
        self._decode(member)
        for listener in self._change_listeners:
            listener(member.name)
        if event.kind == "meta":
            log.debug("member %s updated its metadata (incarnation %d)", member.name, member.incarnation)
            return
        level = logging.WARNING if event.kind in ("suspect", "dead") else logging.INFO
        where = f"{member.address[0]}:{member.address[1]}"
        log.log(level, "member %s at %s %s (incarnation %d)", member.name, where, _EVENT_WORDS[event.kind], member.incarnation)
        if event.kind == "join" and member.name != self.name:
            self.joined.set()

    def _on_datagram(self, payload: bytes, source: Address) -> None:
        try:
            self.core.receive(payload, source, trio.current_time())
        except MalformedPacket:
            self.stats.count_malformed()
            return
        self._wake.set()

    def _state_for_peer(self) -> bytes:
        return self.core.local_state()

    def _on_state(self, payload: bytes, source: Address) -> None:
        try:
            self.core.merge_remote_state(payload, trio.current_time())
        except MalformedPacket:
            self.stats.count_malformed()
            log.debug("malformed push-pull state from %s:%d", *source)
            return
        self._wake.set()

    def set_bootstrapped(self) -> None:
        """Gossip from now on that this server holds Raft state (metadata key ``b``; docs/raft.md).

        Blank servers that see it join the running cluster rather than bootstrap another.
        """
        if self._builder.identity.bootstrapped:
            return
        now = trio.current_time()
        blob = self._builder.set_identity(replace(self._builder.identity, bootstrapped=True), now)
        if blob is None or self._core is None:
            return  # not started yet: run() announces the builder's blob
        try:
            self._core.set_meta(blob, now)
        except ValueError as error:
            log.error("cannot gossip that this server holds Raft state: %s", error)
            return
        self._wake.set()

    def _on_sample(self) -> None:
        if self._core is None:
            return
        now = trio.current_time()
        # Telemetry-only changes are paced by cluster size: each costs every member
        # N * retransmit_limit(N) alive messages, so the interval that keeps gossip
        # within ~10 KB/s per member grows with N (8 s at 50 members, ~5 min at 1,000).
        alive = sum(1 for m in self._core.members() if m.status == "alive")
        self._builder.min_interval_s = max(
            self._min_meta_interval_s,
            self._swim.meta_update_interval(max(alive, 1), len(self._builder.blob)),
        )
        blob = self._builder.update(self._local_gpus(), now, self._sampler.topology)
        if blob is None:
            return
        try:
            self._core.set_meta(blob, now)
        except ValueError as error:
            # Over the core's cap: keep announcing the previous metadata.
            log.error("cannot gossip this node's GPU state: %s", error)
            return
        self._wake.set()

    def _local_gpus(self) -> list[GpuState]:
        drained, holders = self._drained(), self._holders()
        states: list[GpuState] = []
        for snap in self._sampler.snapshots():
            r = snap.reading
            ref = GpuRef(self.name, r.index)
            states.append(
                GpuState(
                    index=r.index,
                    uuid=r.uuid,
                    model=r.name,
                    memory_total_mb=r.memory_total_mb,
                    memory_free_mb=r.memory_free_mb,
                    utilization_pct=r.utilization_gpu_pct,
                    health=snap.health.state,
                    reasons=snap.health.reasons,
                    drained=ref in drained,
                    allocated=ref in holders,
                    mig_mode=bool(r.mig_mode),
                )
            )
            for instance in r.mig_instances if r.mig_mode else ():
                unit = GpuRef(self.name, slice_index(r.index, instance.mig_index))
                states.append(
                    GpuState(
                        index=unit.index,
                        uuid=instance.uuid,
                        model=f"{r.name} MIG {instance.profile}",
                        memory_total_mb=instance.memory_total_mb,
                        memory_free_mb=instance.memory_free_mb,
                        utilization_pct=None,
                        health=snap.health.state,
                        drained=unit in drained or ref in drained,
                        allocated=unit in holders,
                        mig_profile=instance.profile,
                    )
                )
        return states

    # --- joining and push-pull -----------------------------------------------------------

    async def _resolve(self, entries: Sequence[str]) -> list[Address]:
        addresses: list[Address] = []
        for entry in entries:
            host, port = split_host_port(entry, self._default_port)
            try:
                infos = await trio.socket.getaddrinfo(
                    host, port, family=self.transport.family, type=socket.SOCK_DGRAM
                )
            except OSError as error:
                log.warning("cannot resolve join address %s: %s", entry, error)
                continue
            for *_, sockaddr in infos[:1]:
                addresses.append((str(sockaddr[0]), int(sockaddr[1])))
        return addresses

    def _has_peers(self) -> bool:
        return any(v.status == "alive" and v.name != self.name for v in self.core.members())

    async def _join(self) -> None:
        """Join through the seeds: done when a push-pull with one of them succeeded.

        A seed that answered our UDP join but whose push-pull failed (a TCP
        timeout on a loaded host) has told us about the cluster, yet may know
        nothing of us: only our own alive broadcast, sent a few times, would tell
        it. So seeing peers is not enough; the push-pull is retried, up to
        JOIN_PUSH_PULL_ATTEMPTS rounds once peers are seen (after that, gossip
        and the periodic push-pull carry the rest).
        """
        attempt = 0
        while True:
            attempt += 1
            seeds = [a for a in await self._resolve(self._seeds) if a != (self.advertise, self.transport.port)]
            if seeds:
                self.core.join(seeds, trio.current_time())
                self._wake.set()
                for seed in seeds:
                    if await self._exchange(seed):
                        log.info("joined the cluster through %s:%d: %d member(s) known", *seed, len(self.core.members()))
                        return
            peers = self._has_peers()
            if peers and attempt >= JOIN_PUSH_PULL_ATTEMPTS:
                log.warning(
                    "joined the cluster by gossip (%d member(s) known), but no push-pull with %s succeeded",
                    len(self.core.members()),
                    ", ".join(self._seeds),
                )
                return
            delay = retry_delay(attempt, self._rng, base_s=self.swim.probe_interval, cap_s=JOIN_RETRY_CAP_S)
            if not peers:
                log.info("no member answered yet at %s; retrying in %.1fs", ", ".join(self._seeds), delay)
            await trio.sleep(max(delay, self.swim.probe_interval))

    async def _exchange(self, address: Address) -> bool:
        """One push-pull with `address`; True if its state was merged."""
        try:
            theirs = await self.transport.push_pull(address, self.core.local_state())
        except PushPullError as error:
            log.debug("%s", error)
            return False
        self._on_state(theirs, address)
        return True

    async def _push_pull_periodically(self) -> None:
        while True:
            n = len(self.core.members())
            await trio.sleep(self.swim.push_pull_interval * self.swim.push_pull_scale(n))
            peer = self.core.push_pull_peer()
            if peer is not None:
                await self._exchange(peer)

    async def _watch_key_file(self) -> None:
        assert self.keyring is not None
        while True:
            await trio.sleep(KEY_FILE_CHECK_S)
            # A stat (and, on a change, a small read) in a worker thread: no
            # task on the trio thread waits on the disk.
            await trio.to_thread.run_sync(self.keyring.reload_if_changed)
