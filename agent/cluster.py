"""Raft-mode wiring: the command-log protocol, the client's log, and the cluster as gossip shows it.

Modes (docs/raft.md, "The agent in a cluster"):
- alone (`[cluster] bootstrap_expect = 1`, `server = true`): LocalLog, no Raft;
- Raft server (`server = true`, `bootstrap_expect >= 3`): RaftLog replicates the table;
- client (`server = false`): ClientLog — no table of its own, every lease call forwarded.

`ClusterRuntime` is what the HTTP layer and the app read in the two Raft modes:
who leads, where its HTTP API is (from gossip metadata), the Raft peers to feed
the transport, the cluster inventory the leader schedules on, and the
forwarding of requests to the leader (shared keep-alive httpx client).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import trio

from coordinator.commands import Command
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import UNHEALTHY, GpuRef, GpuView
from coordinator.raft import NotLeader

from agent.config import AgentConfig
from agent.membership import MembershipService
from agent.node_meta import ROLE_SERVER
from agent.raft_log import RaftLog

log = logging.getLogger(__name__)

FORWARDED_BY = "X-Forwarded-By"
# Headers passed through to the leader (besides the configured API key header).
_PASS_HEADERS = ("content-type", "authorization", "accept")
# Headers of the leader's answer passed back to the caller.
_ANSWER_HEADERS = ("content-type", "retry-after", "x-stale-index", "x-stale-age-seconds")
FORWARD_TIMEOUT_S = 15.0
# How long a forwarder waits for a leader to become known (an election in progress).
LEADER_WAIT_S = 2.0
# How long a client trusts the leader it learnt before asking the servers again.
CLIENT_LEADER_TTL_S = 2.0


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


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    node: str | None
    term: int
    address: str | None  # http(s)://host:port


class ForwardFailed(Exception):
    """No leader could be reached: answer 503 no_leader."""


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
        self._client = client
        self._clock = clock
        # A client's idea of the leader, learnt from the servers' /cluster/leader.
        self._client_leader: LeaderInfo | None = None
        self._client_leader_at = 0.0
        self._term_seen = 0  # the highest term a client learnt (kept when the cached leader is dropped)
        self.last_applied_at = clock()
        self.forwarded = 0

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
                return m.meta.http_url  # https:// when that member serves TLS
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

    # --- leader ------------------------------------------------------------------------

    async def leader(
        self, headers: Mapping[str, str] | None = None, *, force: bool = False, ask: bool = True
    ) -> LeaderInfo:
        """Who leads: the Raft core's view on a voter; asked of the other servers on a client.

        A server that is not a voter (blank, waiting to be added, or removed)
        hears from no leader, so it asks like a client does — unless `ask` is
        False: it answers a peer's own look-up, and two non-voters must not ask
        each other in circles.
        """
        if self.raft is not None:
            lead = self.raft.leader_id
            # A non-voter's idea of the leader goes stale (nobody heartbeats it): on a retry, ask.
            if self.raft.is_voter or not ask or (lead is not None and not force):
                address = None if lead is None else self.http_address(lead)
                return LeaderInfo(lead, self.raft.term, address)
        cached = self._client_leader
        fresh = trio.current_time() - self._client_leader_at < CLIENT_LEADER_TTL_S
        if cached is not None and fresh and not force and cached.node is not None and self.http_address(cached.node):
            return cached
        best = LeaderInfo(None, 0, None)
        auth = {self.config.auth.header_name.lower(), "authorization"}
        lookup_headers = {k: v for k, v in (headers or {}).items() if k.lower() in auth}
        # Marks a look-up, so a non-voter asked answers from its own core (no relay).
        lookup_headers[FORWARDED_BY] = self.node
        for server in self.alive_servers():
            url = self.http_address(server)
            if url is None or server == self.node:
                continue
            try:
                resp = await self._client.get(f"{url}/cluster/leader", headers=lookup_headers, timeout=1.0)
                doc = resp.json()
            except Exception as error:  # noqa: BLE001 - a best-effort probe: try the next server
                log.debug("leader lookup at %s failed: %r", server, error)
                continue
            if resp.status_code != 200 or not isinstance(doc, dict) or not doc.get("leader"):
                continue
            info = LeaderInfo(str(doc["leader"]), int(doc.get("term") or 0), None)
            if info.term > best.term:
                best = info
            if doc.get("is_self"):
                break
        if best.node is not None:
            best = LeaderInfo(best.node, best.term, self.http_address(best.node))
            self._term_seen = max(self._term_seen, best.term)
        self._client_leader = best if best.node is not None else None
        self._client_leader_at = trio.current_time()
        return best

    async def leader_info(self, headers: Mapping[str, str] | None = None, *, ask: bool = True) -> dict[str, Any]:
        """GET /cluster/leader; `headers` are the request's, whose API key a look-up presents.

        With [auth] enabled the servers' /cluster/leader wants a key too: without the
        caller's, a client's look-up is refused and it reports no leader at all.
        `ask` is False when the caller is itself looking the leader up (no relays).
        """
        info = await self.leader(headers, ask=ask)
        return {
            "leader": info.node,
            "term": info.term,
            "address": info.address,
            "is_self": info.node == self.node,
        }

    async def _target(self, headers: Mapping[str, str], force: bool) -> LeaderInfo | None:
        deadline = trio.current_time() + LEADER_WAIT_S
        while True:
            info = await self.leader(headers, force=force)
            if info.node is not None and info.node != self.node and info.address is not None:
                return info
            if self.raft is not None and info.node == self.node:
                return None  # we lead after all: the caller answers 503 and the client retries here
            if trio.current_time() >= deadline:
                return None
            force = True
            await trio.sleep(0.1)

    async def forward(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Mapping[str, str],
        body: bytes,
        stamp_request_id: bool,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send the request to the leader; retry once on a connection error or a 503 after re-resolving.

        Raises ForwardFailed when no leader is known or reachable.
        """
        body = _stamp(body) if stamp_request_id else body
        wanted = {k.lower() for k in (*_PASS_HEADERS, self.config.auth.header_name)}
        out_headers = {k: v for k, v in headers.items() if k.lower() in wanted}
        out_headers[FORWARDED_BY] = self.node
        last_error = "no leader is known"
        for attempt in range(2):
            target = await self._target(headers, force=attempt > 0)
            if target is None:
                break
            url = f"{target.address}{path}" + (f"?{query.decode('latin-1')}" if query else "")
            try:
                resp = await self._client.request(
                    method, url, headers=out_headers, content=body, timeout=httpx.Timeout(FORWARD_TIMEOUT_S, connect=2.0)
                )
            except httpx.TransportError as error:
                last_error = f"leader {target.node} unreachable: {error!r}"
                self._client_leader = None
                continue
            if resp.status_code == 503 and _leaderless(resp) and attempt == 0:
                last_error = f"leader {target.node} answered 503"
                self._client_leader = None
                continue
            self.forwarded += 1
            answer = {k: v for k, v in resp.headers.items() if k.lower() in _ANSWER_HEADERS}
            answer["X-Forwarded-To"] = target.node or ""
            return resp.status_code, answer, resp.content
        raise ForwardFailed(last_error)

    async def leader_allocations(self, headers: Mapping[str, str]) -> list[dict[str, Any]] | None:
        """The live allocations as the leader lists them (GET /gpu/list), or None when it cannot be asked.

        A client holds no lease table, so its /gpu/status asks this to say who
        holds each GPU; `headers` carry the caller's API key.
        """
        try:
            status, _, content = await self.forward("GET", "/gpu/list", b"", headers, b"", False)
            doc = json.loads(content) if status == 200 else None
        except (ForwardFailed, ValueError) as error:
            log.info("could not ask the leader who holds which GPU: %s", error)
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("allocations"), list):
            return None
        return list(doc["allocations"])

    def known_term(self) -> int:
        """The Raft term: the core's on a server, the last one a client learnt from the servers (0: none yet)."""
        if self.raft is not None:
            return self.raft.term
        return self._term_seen

    def raft_health(self) -> dict[str, Any]:
        """The /healthz `raft` object.

        `role` is the core's, except `non_voter` for a server outside its latest
        configuration (blank and waiting to be added, or removed) that does not lead.
        """
        if self.raft is None:
            info = self._client_leader
            return {"role": "client", "term": info.term if info else None, "leader": info.node if info else None}
        r = self.raft
        role = r.role.value
        if not r.is_voter and not r.is_leader:
            role = "non_voter"
        leader = r.leader_id
        if leader is None and not r.is_voter and self._client_leader is not None:
            leader = self._client_leader.node  # learnt by asking the servers (see leader())
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


def _leaderless(resp: httpx.Response) -> bool:
    try:
        code = resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return code in ("no_leader", "not_leader", "proposal_lost")


def _stamp(body: bytes) -> bytes:
    """Give an allocate body a request_id when it has none, so a retry never allocates twice."""
    try:
        doc = json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError):
        return body  # the leader answers 400 for it
    if isinstance(doc, dict) and not doc.get("request_id"):
        doc["request_id"] = uuid.uuid4().hex
        return json.dumps(doc, separators=(",", ":")).encode()
    return body


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
