"""Finding the Raft leader and forwarding requests to it over HTTP.

A follower or a client answers lease writes and linearizable reads by sending
them to the leader's HTTP API (docs/api.md, "Forwarding to the Raft leader").
`LeaderProxy` is that road: who leads (the Raft core's view on a voter, the
servers' /cluster/leader on a client or non-voter), and the forwarding itself
over one shared keep-alive httpx client.

Deadlines and honesty
---------------------
A forwarded request is answered within a bound, and a failure says what is
known about the write:

- **Finding a leader** — known, and accepting a connection within
  `CONNECT_TIMEOUT_S` — may take until `LEADER_WAIT_S` after the call
  reached this agent (`look_until`: an election in progress). If none is
  found by then, nothing was sent anywhere: `ForwardFailed` with code
  `no_leader`, at most LEADER_WAIT_S + CONNECT_TIMEOUT_S (2.5 s) after the
  call. A 503 `no_leader` / `not_leader` / `proposal_lost` from the target
  says it applied nothing, so it counts as not sent: look again.
- **Once sent**, the answer is awaited until the caller's deadline (the
  request bound), but only while the target still leads as far as this agent
  can tell: on a voter, its core names the target and has heard from it within
  an election timeout; on a client, a majority of the servers, asked every
  `CLIENT_WATCH_INTERVAL_S`, do not name another leader. When another leader
  is known, or the target has gone silent, waiting is pointless.
- A request sent and not conclusively answered (no answer, the connection
  reset mid-request, leadership moved on) **may have been applied**. If
  sending it again gives the original answer (`_resendable`: reads, allocate
  with its request_id, release of an allocation id, renew, drain, undrain) it
  goes to the new leader — or, when that is this agent, `LeadHere` tells the
  caller to handle it locally — if one is known by `look_until` (or within
  `REROUTE_GRACE_S` of the switch, when that is later). Otherwise, or once
  the deadline has passed: `ForwardFailed` with code `outcome_unknown`; the
  caller retries with the same request_id and gets the original answer.
  So a call that can reach no leader answers within about 2.5 s of reaching
  this agent, whatever it went through before; only a leader that is still
  heard from and answering slowly (a stalled disk) holds it to the deadline.
- Any other answer is the leader's, relayed unchanged (its own
  `outcome_unknown` included).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
# How long a forwarder looks for a reachable leader (an election in progress) before
# answering no_leader. An election takes one to two election timeouts (1-2 s).
LEADER_WAIT_S = 2.0
# One connection attempt to the leader's HTTP port. On a LAN a connect takes well under
# a millisecond; one that takes longer goes to a host that is cut off.
CONNECT_TIMEOUT_S = 0.5
# Between two sends, so a leader that refuses at once is not hammered.
RETRY_PAUSE_S = 0.1
# One round of asking the servers who leads (a client or non-voter asks them all at once;
# a round ends early once a majority of them name the same leader in the same term).
LOOKUP_TIMEOUT_S = 0.5
# After a sent request was given up on (leadership moved, the leader went silent), how long
# a new leader may still be looked for even when `look_until` has passed: the switch itself
# usually names the new leader, so this covers only its connect.
REROUTE_GRACE_S = 0.25
# The deadline of a forward whose caller names none.
FORWARD_TIMEOUT_S = 5.0
# While a sent request waits for its answer, how often leadership is checked: the
# core's view on a voter (free), the servers' on a client (one look-up each time).
WATCH_INTERVAL_S = 0.05
CLIENT_WATCH_INTERVAL_S = 0.25
# A resendable request still unanswered by a leader that is heard from this long is sent
# once more (a hedge, see `_send`). A healthy leader answers in milliseconds.
HEDGE_AFTER_S = 1.0
# How long a client trusts the leader it learnt before asking the servers again.
CLIENT_LEADER_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    node: str | None
    term: int
    address: str | None  # http://host:port


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The leader's answer, relayed: status, the headers passed back, and the body."""

    status: int
    headers: dict[str, str]
    content: bytes


class ForwardFailed(Exception):
    """The leader gave no answer. `code` is the 503's: "no_leader" or "outcome_unknown".

    no_leader: the request surely reached no leader (none known, none accepted a
    connection, or the one reached applied nothing). outcome_unknown: a write was
    sent and may have been applied; a retry with the same request_id tells.
    """

    def __init__(self, code: Literal["no_leader", "outcome_unknown"], message: str) -> None:
        super().__init__(message)
        self.code = code


class LeadHere(Exception):
    """This agent leads now: handle the request here, with `body` (its request_id stamped)."""

    def __init__(self, body: bytes) -> None:
        super().__init__("this agent leads now")
        self.body = body


@dataclass(frozen=True, slots=True)
class _Attempt:
    """How one send went: answered, not sent (nothing applied), or unknown (it may have been)."""

    kind: Literal["answered", "not_sent", "unknown"]
    detail: str = ""
    response: httpx.Response | None = None


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
        self.hedged = 0  # copies sent by _send's hedge

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
        auth = {self.config.auth.header_name.lower(), "authorization"}
        lookup_headers = {k: v for k, v in (headers or {}).items() if k.lower() in auth}
        # Marks a look-up, so a non-voter asked answers from its own core (no relay).
        lookup_headers[FORWARDED_BY] = self.node
        answers: list[LeaderInfo] = []
        asked = [s for s in self.alive_servers() if s != self.node and self.http_address(s) is not None]
        majority = len(asked) // 2 + 1

        async def ask_one(server: str, url: str, done: trio.CancelScope) -> None:
            try:
                resp = await self._client.get(
                    f"{url}/cluster/leader", headers=lookup_headers, timeout=LOOKUP_TIMEOUT_S
                )
                doc = resp.json()
                if resp.status_code == 200 and isinstance(doc, dict) and doc.get("leader"):
                    info = LeaderInfo(str(doc["leader"]), int(doc.get("term") or 0), None)
                    answers.append(info)
                    # A majority naming one leader in one term settles it: a leader of a later
                    # term was elected by a majority that overlaps this one, and the server in
                    # both would not name this leader. Waiting for a cut-off server's timeout
                    # would only delay every caller behind this look-up.
                    if answers.count(info) >= majority:
                        done.cancel()
            except Exception as error:  # noqa: BLE001 - a best-effort probe: the others may answer
                log.debug("leader lookup at %s failed: %r", server, error)

        # All at once, so a server that is cut off (its connect hangs) costs one
        # timeout, not one per server before it; the highest term wins.
        with trio.move_on_after(LOOKUP_TIMEOUT_S + 0.1):
            async with trio.open_nursery() as nursery:
                for server in asked:
                    url = self.http_address(server)
                    assert url is not None
                    nursery.start_soon(ask_one, server, url, nursery.cancel_scope)
        best = max(answers, key=lambda info: info.term, default=LeaderInfo(None, 0, None))
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

    def _leads(self) -> bool:
        return self.raft is not None and self.raft.is_leader

    async def _find(self, headers: Mapping[str, str], force: bool, until: float) -> LeaderInfo | None:
        """A leader other than this agent whose address is known, looking until `until`; None if none.

        Returns at once, with None, when this agent leads (the caller checks `_leads`).
        """
        while True:
            info = LeaderInfo(None, 0, None)
            with trio.move_on_at(until):
                info = await self.leader(headers, force=force)
            if self._leads():
                return None
            # A voter's core may still name a leader it has not heard from for an election
            # timeout (until its own timeout fires): sending there would only wait again.
            silent = self.raft is not None and self.raft.is_voter and not self.raft.hears_leader
            if info.node is not None and info.node != self.node and info.address is not None and not silent:
                return info
            if trio.current_time() >= until:
                return None
            force = True
            await trio.sleep_until(min(until, trio.current_time() + 0.1))

    async def _moved_on(self, target: LeaderInfo, headers: Mapping[str, str]) -> str:
        """Return, saying why, once `target` no longer leads as far as this agent can tell.

        That is: another leader is known (this agent included), or - on a voter -
        the core has not heard from `target` for an election timeout.
        """
        while True:
            if self.raft is not None and self.raft.is_voter:
                await trio.sleep(WATCH_INTERVAL_S)
                lead = self.node if self.raft.is_leader else self.raft.leader_id
                if lead == target.node and not self.raft.hears_leader:
                    return f"leader {target.node} has not been heard from for an election timeout"
            else:
                await trio.sleep(CLIENT_WATCH_INTERVAL_S)
                info = await self.leader(headers, force=True)
                lead = info.node if info.term >= target.term else None
            if lead is not None and lead != target.node:
                return f"leadership moved from {target.node} to {lead} meanwhile"

    async def _request(
        self, target: LeaderInfo, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> _Attempt:
        try:
            resp = await self._client.request(
                method, url, headers=headers, content=body, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            return _Attempt("not_sent", f"leader {target.node} unreachable: {error!r}")
        except httpx.TransportError as error:
            # Sent, or partly: the leader may have got it all and applied it.
            return _Attempt("unknown", f"the connection to leader {target.node} failed mid-request: {error!r}")
        if resp.status_code == 503 and _leaderless(resp):
            return _Attempt("not_sent", f"{target.node} answered 503 and applied nothing", resp)
        return _Attempt("answered", response=resp)

    async def _send(
        self,
        target: LeaderInfo,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        deadline: float,
        caller_headers: Mapping[str, str],
        resend: bool,
    ) -> _Attempt:
        """One send to `target`, awaited until `deadline` or until another leader is known.

        A request that may be sent again (`resend`) and is still unanswered after
        HEDGE_AFTER_S is sent once more, on another connection, and the first
        answer wins: on a lossy link an answer lost in TCP's retransmission backoff
        (0.2, 0.4, 0.8, 1.6 s...) would otherwise hold the caller for seconds
        while the leader is alive and has long decided. The copy gets the same
        answer (an allocate waits for the first and repeats it).
        """
        outcome = _Attempt("unknown", f"no answer from leader {target.node} in time")
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:

                async def answer() -> None:
                    nonlocal outcome
                    outcome = await self._request(target, method, url, headers, body)
                    nursery.cancel_scope.cancel()

                async def hedge() -> None:
                    nonlocal outcome
                    await trio.sleep(HEDGE_AFTER_S)
                    self.hedged += 1
                    copy = await self._request(target, method, url, headers, body)
                    if copy.kind == "answered":  # else the first send may still be answered
                        outcome = copy
                        nursery.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal outcome
                    outcome = _Attempt("unknown", await self._moved_on(target, caller_headers))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(answer)
                nursery.start_soon(watch)
                if resend:
                    nursery.start_soon(hedge)
        return outcome

    async def forward(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Mapping[str, str],
        body: bytes,
        stamp_request_id: bool,
        *,
        deadline: float | None = None,
        look_until: float | None = None,
    ) -> Forwarded:
        """Send the request to the leader and return its answer (see "Deadlines and honesty").

        `deadline` (trio time; default FORWARD_TIMEOUT_S from now) bounds the
        whole call; `look_until` (default LEADER_WAIT_S from now; the HTTP layer
        passes LEADER_WAIT_S after the request arrived) bounds the search for a
        leader. Raises ForwardFailed (code no_leader or outcome_unknown), or
        LeadHere when this agent leads now and should handle the request itself.
        """
        body = _stamp(body) if stamp_request_id else body
        started = trio.current_time()
        deadline = started + FORWARD_TIMEOUT_S if deadline is None else deadline
        find_by = min(deadline, started + LEADER_WAIT_S if look_until is None else look_until)
        resend = _resendable(method, path, body)
        wanted = {k.lower() for k in (*_PASS_HEADERS, self.config.auth.header_name)}
        out_headers = {k: v for k, v in headers.items() if k.lower() in wanted}
        out_headers[FORWARDED_BY] = self.node
        problem = "no leader is known"
        sent_to: str | None = None  # a leader that may have applied it
        force = False
        window = find_by
        reroute_by: float | None = None  # set at the first switch, never pushed back
        while True:
            target = await self._find(headers, force, window)
            if self._leads():
                if sent_to is not None and not resend:
                    raise _failed(method, sent_to, f"{problem}; this agent leads now")
                raise LeadHere(body)
            if target is None:
                raise _failed(method, sent_to, problem)
            url = f"{target.address}{path}" + (f"?{query.decode('latin-1')}" if query else "")
            attempt = await self._send(target, method, url, out_headers, body, deadline, headers, resend)
            if attempt.kind == "answered":
                assert attempt.response is not None
                self.forwarded += 1
                resp = attempt.response
                answer = {k: v for k, v in resp.headers.items() if k.lower() in _ANSWER_HEADERS}
                answer["X-Forwarded-To"] = target.node or ""
                return Forwarded(resp.status_code, answer, resp.content)
            problem = attempt.detail
            # Forget the leader only if it is still the one that failed: watching may
            # already have learnt its successor, which the next look then uses at once.
            cached = self._client_leader
            force = cached is None or cached.node == target.node
            if force:
                self._client_leader = None
            now = trio.current_time()
            if attempt.kind == "unknown":
                sent_to = target.node
                if not resend:
                    raise _failed(method, sent_to, problem)
                # A successor usually is known by now; give its look-up a moment even past find_by.
                reroute_by = now + REROUTE_GRACE_S if reroute_by is None else reroute_by
                window = min(deadline, max(find_by, reroute_by))
                if now >= window:
                    raise _failed(method, sent_to, problem)
                continue
            if now >= window:
                raise _failed(method, sent_to, problem)
            await trio.sleep_until(min(window, now + RETRY_PAUSE_S))

    async def leader_allocations(self, headers: Mapping[str, str]) -> list[dict[str, Any]] | None:
        """The live allocations as the leader lists them (GET /gpu/list), or None when it cannot be asked.

        A client holds no lease table, so its /gpu/status asks this to say who
        holds each GPU; `headers` carry the caller's API key.
        """
        try:
            answer = await self.forward("GET", "/gpu/list", b"", headers, b"", False)
            doc = json.loads(answer.content) if answer.status == 200 else None
        except (ForwardFailed, LeadHere, ValueError) as error:
            log.info("could not ask the leader who holds which GPU: %s", error)
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("allocations"), list):
            return None
        return list(doc["allocations"])


def _failed(method: str, sent_to: str | None, problem: str) -> ForwardFailed:
    """no_leader when the request surely reached no leader (or is a read), else outcome_unknown."""
    if sent_to is not None and method != "GET":
        return ForwardFailed(
            "outcome_unknown",
            f"sent to leader {sent_to}, whose answer is unknown ({problem}): it may have been applied; "
            "retry with the same request_id",
        )
    return ForwardFailed("no_leader", f"no leader is known or reachable (no quorum?): {problem}")


def _resendable(method: str, path: str, body: bytes) -> bool:
    """Whether sending the request again gives its original answer even if it was applied.

    Reads change nothing; an allocate carries its request_id (stamped if need be);
    a release of an allocation id answers `repeated` the second time; renew, drain
    and undrain set the same state again. Releases by service or request id and
    server changes are not: a second one answers differently.
    """
    if method == "GET" or path in ("/gpu/allocate", "/gpu/renew", "/gpu/drain", "/gpu/undrain"):
        return True
    if path == "/gpu/release":
        try:
            doc = json.loads(body) if body else None
        except (UnicodeDecodeError, ValueError):
            return False
        return isinstance(doc, dict) and set(doc) == {"allocation_id"}
    return False


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
