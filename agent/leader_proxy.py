"""Finding the Raft leader and forwarding requests to it over HTTP.

A follower or a client answers lease writes and linearizable reads by sending
them to the leader's HTTP API (docs/api.md, "Forwarding to the Raft leader").
`LeaderProxy` is that road: who leads (the Raft core's view on a voter, the
servers' /cluster/leader on a client or non-voter), and the forwarding itself
over one shared keep-alive httpx client.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import trio

from agent.config import AgentConfig
from agent.raft_log import RaftLog

if TYPE_CHECKING:
    from agent.cluster import ClusterRuntime

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


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    node: str | None
    term: int
    address: str | None  # http://host:port


class ForwardFailed(Exception):
    """No leader could be reached: answer 503 no_leader."""


class LeaderProxy:
    """The leader look-up and forwarding of one agent in a Raft cluster (server or client)."""

    def __init__(self, cluster: ClusterRuntime, client: httpx.AsyncClient) -> None:
        self._cluster = cluster
        self.config: AgentConfig = cluster.config
        self.node = cluster.node
        self._client = client
        # A client's idea of the leader, learnt from the servers' /cluster/leader.
        self._client_leader: LeaderInfo | None = None
        self._client_leader_at = 0.0
        self._term_seen = 0  # the highest term a client learnt (kept when the cached leader is dropped)
        self.forwarded = 0

    @property
    def raft(self) -> RaftLog | None:
        """The Raft log on a server (set once it is built), None on a client."""
        return self._cluster.raft

    @property
    def cached_leader(self) -> LeaderInfo | None:
        """The leader last learnt by asking the servers (client or non-voter), if any."""
        return self._client_leader

    @property
    def term_seen(self) -> int:
        """The highest term learnt by asking the servers (0: none yet)."""
        return self._term_seen

    def alive_servers(self) -> list[str]:
        return self._cluster.alive_servers()

    def http_address(self, node: str) -> str | None:
        return self._cluster.http_address(node)


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
