"""Raft-mode wiring: the command-log protocol, the client's log, and the cluster as gossip shows it.

Modes (docs/raft.md, "The agent in a cluster"):
- alone (`[cluster] bootstrap_expect = 1`, `server = true`): LocalLog, no Raft;
- Raft server (`server = true`, `bootstrap_expect >= 3`): RaftLog replicates the table;
- client (`server = false`): ClientLog — no table of its own, every lease call forwarded.

`ClusterRuntime` is what the HTTP layer and the app read in the two Raft modes:
where each member's HTTP API is (from gossip metadata), the Raft peers to feed
the transport, and the cluster inventory the leader schedules on. Who leads and
the forwarding of requests to it are its `proxy` (agent/leader_proxy.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx
import trio

from coordinator.commands import Command
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import UNHEALTHY, GpuRef, GpuView
from coordinator.raft import NotLeader

from agent.config import AgentConfig
from agent.leader_proxy import LeaderProxy
from agent.membership import MembershipService
from agent.node_meta import ROLE_SERVER
from agent.raft_log import RaftLog

log = logging.getLogger(__name__)

class CommandLog(Protocol):
    """What LeaseService and AgentContext need of a log: LocalLog, RaftLog or ClientLog."""

    @property
    def table(self) -> LeaseTable: ...
    @property
    def last_index(self) -> int: ...
    @property
    def applied_index(self) -> int: ...
    @property
    def snapshot_index(self) -> int: ...
    @property
    def last_append_seconds(self) -> float: ...

    def disk_stalled_seconds(self) -> float: ...
    async def read_barrier(self) -> None: ...
    async def propose(self, command: Command) -> ApplyResult: ...
    async def propose_many(self, commands: Sequence[Command]) -> list[ApplyResult]: ...


class ClientLog:
    """A client's log: it holds no lease table and proposes nothing (the leader does)."""

    def __init__(self) -> None:
        self.table = LeaseTable()
        self.last_index = 0
        self.applied_index = 0
        self.snapshot_index = 0
        self.last_append_seconds = 0.0

    def disk_stalled_seconds(self) -> float:
        return 0.0  # a client writes no log

    async def read_barrier(self) -> None:
        raise NotLeader(None, "a client holds no lease table")

    async def propose(self, command: Command) -> ApplyResult:
        raise NotLeader(None, "a client holds no lease table")

    async def propose_many(self, commands: Sequence[Command]) -> list[ApplyResult]:
        raise NotLeader(None, "a client holds no lease table")


def server_problem(membership: MembershipService, name: str) -> str | None:
    """Why gossip says `name` cannot become a voter now — "unknown", "not_a_server", "not_alive" — or None."""
    for m in membership.members():
        if m.view.name != name:
            continue
        if m.meta is None or m.meta.role != ROLE_SERVER:
            return "not_a_server"
        return None if m.view.status == "alive" else "not_alive"
    return "unknown"


def raft_mode(config: AgentConfig) -> str | None:
    """"server", "client", or None (alone: LocalLog)."""
    cluster = config.cluster
    if not cluster.server:
        return "client"
    if cluster.bootstrap_expect >= 3:
        return "server"
    return None


class ClusterRuntime:
    """The cluster as this agent sees it (Raft modes only)."""

    def __init__(
        self,
        config: AgentConfig,
        membership: MembershipService,
        raft: RaftLog | None,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.node = config.agent.node_name
        self.membership = membership
        self.raft = raft
        self._clock = clock
        self.last_applied_at = clock()
        # Who leads, and the road to it (reads `raft` through this runtime once it is set).
        self.proxy = LeaderProxy(self, client)

    @property
    def is_server(self) -> bool:
        return self.raft is not None

    def is_leader(self) -> bool:
        return self.raft is not None and self.raft.is_leader

    # --- gossip ------------------------------------------------------------------------

    def alive_servers(self) -> list[str]:
        """Names of alive members whose metadata says server (this one included when it is one)."""
        return sorted(
            m.view.name
            for m in self.membership.members()
            if m.view.status == "alive" and m.meta is not None and m.meta.role == ROLE_SERVER
        )

    def raft_peers(self) -> dict[str, tuple[str, int]]:
        """Raft addresses of every server gossip knows (not left), keyed by node name."""
        return {
            m.view.name: (m.meta.advertise_ip, m.meta.raft_port)
            for m in self.membership.members()
            if m.meta is not None and m.meta.role == ROLE_SERVER and m.view.status != "left" and m.view.name != self.node
        }

    def http_address(self, node: str) -> str | None:
        for m in self.membership.members():
            if m.view.name == node and m.meta is not None and m.view.status in ("alive", "suspect"):
                return f"http://{m.meta.http_address}"
        return None

    def inventory(
        self, local: Callable[[], Sequence[GpuView]], table: Callable[[], LeaseTable]
    ) -> Callable[[], list[GpuView]]:
        """The scheduler's view: this host's GPUs plus those alive members gossip.

        A remote GPU the table holds unhealthy is unhealthy here whatever its host
        gossips: the leader keeps a verdict for its quiet period even when the host
        forgot it (a client restarting; see _record_remote_health in agent/app.py).
        """

        def views() -> list[GpuView]:
            out = list(local())
            recorded = table().gpu_health
            for m in self.membership.members():
                if m.view.name == self.node or m.view.status != "alive" or m.meta is None:
                    continue
                received = m.meta_received_at
                out.extend(
                    GpuView(
                        node=m.view.name,
                        index=g.index,
                        uuid=g.uuid,
                        name=g.model,
                        memory_total_mb=g.memory_total_mb,
                        memory_free_mb=g.memory_free_mb,
                        utilization_pct=None if g.utilization_pct is None else float(g.utilization_pct),
                        health=UNHEALTHY if recorded(GpuRef(m.view.name, g.index))[0] == UNHEALTHY else g.health,
                        drained=g.drained,
                        sampled_at=received,
                    )
                    for g in m.meta.gpus
                )
            return out

        return views

    def gossiped_health(self) -> list[tuple[str, int, str, tuple[str, ...]]]:
        """(node, index, state, reasons) of every GPU that alive members other than this one gossip."""
        return [
            (m.view.name, g.index, g.health, g.reasons)
            for m in self.membership.members()
            if m.view.name != self.node and m.view.status == "alive" and m.meta is not None
            for g in m.meta.gpus
        ]

    def bootstrapped_servers(self) -> list[str]:
        """Alive servers other than this one whose metadata says they hold Raft state (a running cluster)."""
        return sorted(
            m.view.name
            for m in self.membership.members()
            if m.view.status == "alive"
            and m.view.name != self.node
            and m.meta is not None
            and m.meta.role == ROLE_SERVER
            and m.meta.bootstrapped
        )

    async def wait_for_bootstrap(self, expect: int) -> list[str] | None:
        """For a server with no Raft state: the founders to bootstrap with, or None to start blank.

        None as soon as gossip shows an alive server that holds Raft state: a
        cluster already runs, and this server waits (never campaigning) until its
        leader adds it (`POST /cluster/servers`). That check comes first, so a
        replacement never founds a second cluster even when it makes the alive
        count equal `expect` again. Otherwise block until gossip shows exactly
        `expect` alive servers (this one included) and return their sorted names:
        every founder computes the same list. A founder that sees a peer which
        bootstrapped a moment earlier starts blank instead — safe too, since that
        peer's first configuration already names it a voter, and it receives that
        entry from the leader.
        """
        logged = 0.0
        while True:
            running = self.bootstrapped_servers()
            if running:
                log.info(
                    "raft: %s already hold Raft state; starting as a blank server that waits to be added "
                    "(gpuctl servers add %s)",
                    ", ".join(running),
                    self.node,
                )
                return None
            servers = self.alive_servers()
            if len(servers) == expect and self.node in servers:
                log.info("raft: %d servers alive (%s); bootstrapping", expect, ", ".join(servers))
                return servers
            if len(servers) > expect:
                log.error(
                    "raft: %d servers alive but bootstrap_expect = %d; not bootstrapping (ambiguous founders)",
                    len(servers),
                    expect,
                )
            now = trio.current_time()
            if now - logged > 5.0:
                logged = now
                log.info("raft: waiting for %d servers to bootstrap; alive: %s", expect, ", ".join(servers) or "none")
            await trio.sleep(0.1)

    async def feed_peers(self, set_peers: Callable[[Mapping[str, tuple[str, int]]], None]) -> None:
        """Keep the transport's peer map equal to the servers gossip knows."""
        current: dict[str, tuple[str, int]] | None = None
        while True:
            peers = self.raft_peers()
            if peers != current:
                set_peers(peers)
                current = peers
            await trio.sleep(0.2)

    def known_term(self) -> int:
        """The Raft term: the core's on a server, the last one a client learnt from the servers (0: none yet)."""
        if self.raft is not None:
            return self.raft.term
        return self.proxy.term_seen

    def raft_health(self) -> dict[str, Any]:
        """The /healthz `raft` object.

        `role` is the core's, except `non_voter` for a server outside its latest
        configuration (blank and waiting to be added, or removed) that does not lead.
        """
        if self.raft is None:
            info = self.proxy.cached_leader
            return {"role": "client", "term": info.term if info else None, "leader": info.node if info else None}
        r = self.raft
        role = r.role.value
        if not r.is_voter and not r.is_leader:
            role = "non_voter"
        leader = r.leader_id
        cached = self.proxy.cached_leader
        if leader is None and not r.is_voter and cached is not None:
            leader = cached.node  # learnt by asking the servers (see LeaderProxy.leader())
        return {
            "role": role,
            "voter": r.is_voter,
            "term": r.term,
            "leader": leader,
            "voters": list(r.voters),
            "commit_index": r.commit_index,
            "applied_index": r.applied_index,
            "last_persist_seconds": round(r.last_append_seconds, 6),
        }

    def servers(self) -> list[dict[str, Any]]:
        """GET /cluster/servers rows: this server's latest configuration, plus the non-voter servers gossip knows.

        Voters first, in configuration order, then non-voters by name. `alive` and
        `status` are gossip's view; `address` is the Raft address the member
        advertises (None when gossip does not know it).
        """
        assert self.raft is not None, "servers() is answered by a Raft server"
        voters = self.raft.voters
        leader = self.raft.leader_id
        members = {m.view.name: m for m in self.membership.members()}

        def row(name: str, voter: bool) -> dict[str, Any]:
            member = members.get(name)
            meta = member.meta if member is not None else None
            return {
                "name": name,
                "voter": voter,
                "alive": member is not None and member.view.status == "alive",
                "status": member.view.status if member is not None else "unknown",
                "leader": name == leader,
                "address": meta.raft_address if meta is not None else None,
            }

        rows = [row(name, True) for name in voters]
        rows += [
            row(name, False)
            for name, m in sorted(members.items())
            if name not in voters and m.meta is not None and m.meta.role == ROLE_SERVER and m.view.status in ("alive", "suspect")
        ]
        return rows


async def run_while(is_leader: Callable[[], bool], task: Callable[[], Awaitable[None]], poll_s: float = 0.1) -> None:
    """Run `task` only while `is_leader()`: start it on gaining leadership, cancel it on losing it."""
    while True:
        while not is_leader():
            await trio.sleep(poll_s)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)
            while is_leader():
                await trio.sleep(poll_s)
            nursery.cancel_scope.cancel()
