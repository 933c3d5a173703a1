"""LeaderProxy.forward against scripted leaders: its time bounds and what its errors promise.

Each scenario runs on trio's MockClock (virtual time, jumping whenever every
task waits), with an httpx MockTransport in place of the network, so "a
leader that never answers" costs no real time and the bounds are exact:

- no leader known, or none accepting connections → no_leader within 2.5 s;
- a write sent to a leader that never answers → outcome_unknown at the
  deadline (a read → no_leader: it changed nothing);
- leadership moving on while a request waits → an idempotent request follows
  the new leader (or this agent, with LeadHere); any other → outcome_unknown;
- a leader that applied nothing (503 not_leader) → the request is sent again;
- the leader's own answers, outcome_unknown included, are relayed unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from agent.leader_proxy import (
    CONNECT_TIMEOUT_S,
    FORWARDED_BY,
    HEDGE_AFTER_S,
    LEADER_WAIT_S,
    ForwardFailed,
    LeaderProxy,
    LeadHere,
)

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


@dataclass
class FakeRaft:
    """The bits of RaftLog the proxy reads; a test moves leadership by setting them."""

    node: str
    leader_id: str | None = None
    term: int = 1
    is_voter: bool = True

    # Whether the core has heard from its leader within an election timeout.
    silent: bool = False

    @property
    def is_leader(self) -> bool:
        return self.leader_id == self.node

    @property
    def hears_leader(self) -> bool:
        return self.is_leader or (self.leader_id is not None and not self.silent)


@dataclass
class FakeCluster:
    node: str
    raft: FakeRaft | None
    servers: list[str] = field(default_factory=lambda: ["s1", "s2", "s3"])
    config: Any = field(default_factory=lambda: SimpleNamespace(auth=SimpleNamespace(header_name="X-API-Key")))

    def alive_servers(self) -> list[str]:
        return list(self.servers)

    def http_address(self, node: str) -> str | None:
        return f"http://{node}:8086"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def proxy_for(cluster: FakeCluster, handler: Handler) -> tuple[LeaderProxy, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return LeaderProxy(cluster, client), client  # type: ignore[arg-type]


def error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": code}})


async def never_answers(request: httpx.Request) -> httpx.Response:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


ALLOCATE = b'{"service_name":"svc","gpu_count":1}'


async def forward(
    proxy: LeaderProxy, method: str = "POST", path: str = "/gpu/allocate", body: bytes = ALLOCATE, deadline: float = 5.0
) -> Any:
    return await proxy.forward(
        method, path, b"", {}, body, path == "/gpu/allocate", deadline=trio.current_time() + deadline
    )


def test_no_leader_known_answers_no_leader_within_the_bound() -> None:
    async def scenario() -> None:
        cluster = FakeCluster("s1", FakeRaft("s1", leader_id=None))
        proxy, client = proxy_for(cluster, never_answers)
        started = trio.current_time()
        with pytest.raises(ForwardFailed) as failed:
            await forward(proxy)
        assert failed.value.code == "no_leader"
        assert trio.current_time() - started <= LEADER_WAIT_S + CONNECT_TIMEOUT_S
        await client.aclose()

    run(scenario)


def test_a_leader_refusing_connections_is_no_leader_within_the_bound() -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def scenario() -> None:
        cluster = FakeCluster("s1", FakeRaft("s1", leader_id="s2"))
        proxy, client = proxy_for(cluster, refuse)
        started = trio.current_time()
        with pytest.raises(ForwardFailed) as failed:
            await forward(proxy)
        assert failed.value.code == "no_leader"
        assert trio.current_time() - started <= LEADER_WAIT_S + CONNECT_TIMEOUT_S
        await client.aclose()

    run(scenario)


def test_a_sent_write_without_an_answer_is_outcome_unknown_at_the_deadline_and_a_read_no_leader() -> None:
    async def scenario() -> None:
        cluster = FakeCluster("s1", FakeRaft("s1", leader_id="s2"))
        proxy, client = proxy_for(cluster, never_answers)
        started = trio.current_time()
        with pytest.raises(ForwardFailed) as failed:
            await forward(proxy, deadline=4.0)
        assert failed.value.code == "outcome_unknown"
        assert trio.current_time() - started == pytest.approx(4.0)
        with pytest.raises(ForwardFailed) as failed:
            await forward(proxy, "GET", "/gpu/list", b"", deadline=4.0)
        assert failed.value.code == "no_leader"
        await client.aclose()

    run(scenario)


def test_when_this_agent_becomes_leader_the_request_is_handled_here_with_its_stamped_request_id() -> None:
    sent: list[bytes] = []

    async def record_then_hang(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return await never_answers(request)

    async def scenario() -> None:
        raft = FakeRaft("s1", leader_id="s2")
        cluster = FakeCluster("s1", raft)
        proxy, client = proxy_for(cluster, record_then_hang)

        async def elected() -> None:
            await trio.sleep(1.5)
            raft.leader_id, raft.term = "s1", 2

        async with trio.open_nursery() as nursery:
            nursery.start_soon(elected)
            with pytest.raises(LeadHere) as here:
                await forward(proxy)
            assert trio.current_time() < 1.7
        stamped = json.loads(here.value.body)
        assert stamped["request_id"] and stamped["request_id"] == json.loads(sent[0])["request_id"]
        await client.aclose()

    run(scenario)


def test_a_request_that_is_not_idempotent_is_outcome_unknown_once_leadership_moves() -> None:
    async def scenario() -> None:
        raft = FakeRaft("s1", leader_id="s2")
        proxy, client = proxy_for(FakeCluster("s1", raft), never_answers)

        async def moved() -> None:
            await trio.sleep(1.0)
            raft.leader_id, raft.term = "s3", 2

        async with trio.open_nursery() as nursery:
            nursery.start_soon(moved)
            with pytest.raises(ForwardFailed) as failed:
                await forward(proxy, "DELETE", "/cluster/servers/s9", b"")
            assert failed.value.code == "outcome_unknown"
            assert trio.current_time() < 1.2
        await client.aclose()

    run(scenario)


def test_a_reset_mid_request_is_resent_to_the_new_leader_with_the_same_request_id() -> None:
    bodies: dict[str, list[bytes]] = {"s2": [], "s3": []}
    raft = FakeRaft("s1", leader_id="s2")

    async def leaders(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        bodies[host].append(request.content)
        if host == "s2":
            raft.leader_id, raft.term = "s3", 2  # s2 dies mid-request; s3 takes over
            raise httpx.ReadError("connection reset by peer", request=request)
        assert request.headers[FORWARDED_BY] == "s1"
        return httpx.Response(200, json={"allocation_id": "svc-1"})

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("s1", raft), leaders)
        answer = await forward(proxy)
        assert answer.status == 200 and answer.headers["X-Forwarded-To"] == "s3"
        first, again = json.loads(bodies["s2"][0]), json.loads(bodies["s3"][0])
        assert first["request_id"] == again["request_id"]
        await client.aclose()

    run(scenario)


def test_a_reset_release_by_service_is_not_resent() -> None:
    calls: list[str] = []

    async def reset(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        raise httpx.ReadError("connection reset by peer", request=request)

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("s1", FakeRaft("s1", leader_id="s2")), reset)
        with pytest.raises(ForwardFailed) as failed:
            await forward(proxy, "POST", "/gpu/release", b'{"service_name":"svc"}')
        assert failed.value.code == "outcome_unknown" and calls == ["s2"]
        await client.aclose()

    run(scenario)


def test_a_leader_that_applied_nothing_is_asked_again_and_its_own_outcome_unknown_is_relayed() -> None:
    answers = [error(503, "not_leader"), error(503, "outcome_unknown")]

    async def scripted(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("s1", FakeRaft("s1", leader_id="s2")), scripted)
        answer = await forward(proxy)
        assert answer.status == 503 and json.loads(answer.content)["error"]["code"] == "outcome_unknown"
        assert not answers
        await client.aclose()

    run(scenario)


def test_a_client_asks_every_server_at_once_and_one_cut_off_costs_one_timeout() -> None:
    async def servers(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path == "/cluster/leader":
            if host == "s1":
                return await never_answers(request)  # cut off
            return httpx.Response(200, json={"leader": "s3", "term": 4, "is_self": host == "s3"})
        assert host == "s3"
        return httpx.Response(200, json={"gpus": [], "allocations": [], "queue": []})

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("c1", None), servers)
        started = trio.current_time()
        answer = await forward(proxy, "GET", "/gpu/list", b"")
        assert answer.status == 200 and answer.headers["X-Forwarded-To"] == "s3"
        assert trio.current_time() - started < 1.0
        assert proxy.term_seen == 4
        await client.aclose()

    run(scenario)


def test_a_client_look_up_ends_once_a_majority_names_the_leader() -> None:
    """One server cut off (its look-up hangs) must not delay every look-up by its timeout."""

    async def servers(request: httpx.Request) -> httpx.Response:
        if request.url.host == "s1":
            return await never_answers(request)
        return httpx.Response(200, json={"leader": "s3", "term": 4})

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("c1", None), servers)
        started = trio.current_time()
        info = await proxy.leader(force=True)
        assert info.node == "s3" and info.term == 4
        assert trio.current_time() - started < 0.01  # two of three agreed: no wait for s1
        await client.aclose()

    run(scenario)


def test_a_write_sent_to_a_leader_that_goes_silent_follows_the_successor_at_once() -> None:
    """Isolated leader: the core stops hearing it; once a successor is known the write goes there."""
    raft = FakeRaft("s1", leader_id="s2")
    hosts: list[str] = []

    async def leaders(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.host == "s2":
            return await never_answers(request)
        return httpx.Response(200, json={"allocation_id": "svc-1"})

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("s1", raft), leaders)

        async def isolated_then_replaced() -> None:
            await trio.sleep(1.0)
            raft.silent = True  # an election timeout without a heartbeat
            await trio.sleep(0.6)
            raft.leader_id, raft.term, raft.silent = "s3", 2, False

        async with trio.open_nursery() as nursery:
            nursery.start_soon(isolated_then_replaced)
            answer = await forward(proxy)
            assert answer.status == 200 and answer.headers["X-Forwarded-To"] == "s3"
            assert trio.current_time() == pytest.approx(1.6, abs=0.1)
        assert hosts[0] == "s2" and hosts[-1] == "s3" and set(hosts) == {"s2", "s3"}
        await client.aclose()

    run(scenario)


def test_a_write_sent_to_a_leader_that_goes_silent_with_no_successor_answers_within_the_no_leader_bound() -> None:
    """Not at the request deadline (5 s): an isolated leader's callers hear within about 2.5 s."""

    async def scenario() -> None:
        raft = FakeRaft("s1", leader_id="s2")
        proxy, client = proxy_for(FakeCluster("s1", raft), never_answers)

        async def isolated() -> None:
            await trio.sleep(1.0)
            raft.silent = True

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(isolated)
            with pytest.raises(ForwardFailed) as failed:
                await forward(proxy, deadline=5.0)
        assert failed.value.code == "outcome_unknown"
        assert trio.current_time() - started <= LEADER_WAIT_S + CONNECT_TIMEOUT_S
        await client.aclose()

    run(scenario)


def test_an_answer_lost_on_the_way_back_is_hedged_by_a_second_send_after_a_second() -> None:
    """30 % loss: the leader decided at once, but its answer sits in TCP's retransmission backoff."""
    sent: list[bytes] = []

    async def first_answer_lost(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        if len(sent) == 1:
            return await never_answers(request)
        return httpx.Response(200, json={"allocation_id": "svc-1", "repeated": True})

    async def scenario() -> None:
        proxy, client = proxy_for(FakeCluster("s1", FakeRaft("s1", leader_id="s2")), first_answer_lost)
        started = trio.current_time()
        answer = await forward(proxy)
        assert answer.status == 200 and trio.current_time() - started == pytest.approx(HEDGE_AFTER_S)
        assert len(sent) == 2 and json.loads(sent[0])["request_id"] == json.loads(sent[1])["request_id"]
        # Not every request may be sent twice: a release by service is not.
        sent.clear()
        with pytest.raises(ForwardFailed):
            await forward(proxy, "POST", "/gpu/release", b'{"service_name":"svc"}', deadline=3.0)
        assert len(sent) == 1
        await client.aclose()

    run(scenario)
