"""Healing after a partition: how soon a cut-off Raft peer is reached again.

A TCP stream whose packets stop arriving stays ESTABLISHED in the kernel,
retransmitting with exponential backoff; after a 15 s cut the next
retransmission can be 13 s away. The Raft transport sets TCP_USER_TIMEOUT, so
a stream left unanswered for an election timeout is dropped and redialled
(docs/raft.md, "Transport"). Two scenarios, on 127.0.0.90-99:

- two RaftTransports in this process, the link between them cut by nftables:
  the sender notices the silence and drops its stream while the cut lasts,
  and messages flow again soon after the heal;
- three agent processes, the leader isolated for 15 s then healed: writes
  through the old leader succeed again within seconds (the measured figure
  is printed), well before the kernel's own retransmission would have
  reached it; a request in flight through a follower when the cut begins
  follows the new leader;
- the leader paused (SIGSTOP): a request forwarded to it follows the new
  leader instead of waiting for SIGCONT.

Needs root and the `nft` tool (skipped otherwise, the SIGSTOP case too). Rules go on an input hook in
a table of this test's own, always deleted.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from coordinator.raft_messages import Message, MessageKind
from agent.raft_transport import SILENCE_TIMEOUT_S, RaftTransport
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.nftables import Firewall, nft_unavailable
from tests.waiting import wait_for



pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(nft_unavailable() is not None, reason=str(nft_unavailable())),
]


class Cut:
    """Drop every packet between one address and others (both ways), on the input hook."""

    def __init__(self, isolated: str, others: list[str]) -> None:
        self.isolated, self.others = isolated, others
        self.firewall = Firewall("gpuorch_heal")

    def __enter__(self) -> Cut:
        self.firewall.create()
        self.firewall.cut(self.isolated, self.others)
        return self

    def heal(self) -> None:
        self.firewall.delete()

    def __exit__(self, *exc: object) -> None:
        self.heal()


# --- two transports in this process ---------------------------------------------------


def test_a_silent_stream_is_dropped_and_redialled() -> None:
    a_host, b_host = "127.0.0.90", "127.0.0.91"
    received: list[float] = []

    async def main() -> None:
        a = RaftTransport("a", a_host, 0, None, rng=random.Random(1))
        b = RaftTransport("b", b_host, 0, None, rng=random.Random(2))
        await a.open()
        b_port = await b.open()
        a.set_peer("b", (b_host, b_port))

        async def wait(check: object, timeout: float) -> None:
            with trio.fail_after(timeout):
                while not check():  # type: ignore[operator]
                    await trio.sleep(0.02)

        async def heartbeats() -> None:
            term = 0
            while True:
                term += 1
                a.send(Message(MessageKind.HEARTBEAT, "a", "b", term))
                await trio.sleep(0.05)

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run, lambda m: None)
                await nursery.start(b.run, lambda m: received.append(trio.current_time()))
                nursery.start_soon(heartbeats)
                await wait(lambda: received and a.connected("b"), 5.0)
                connects = a.stats.connects
                with Cut(b_host, [a_host]) as cut:
                    # Heartbeats stay unacknowledged: the kernel drops the stream after
                    # the silence timeout (without it, it would stay up for minutes).
                    await wait(lambda: not a.connected("b"), 3 * SILENCE_TIMEOUT_S + 1.0)
                    await trio.sleep(3.0)  # the cut goes on: redials fail meanwhile
                    assert a.stats.connects == connects, "no connection can be made while the link is cut"
                    cut.heal()
                    healed = trio.current_time()
                    before = len(received)
                    await wait(lambda: len(received) > before, 5.0)
                print(f"\nmessages flowed again {received[before] - healed:.2f}s after the heal")
                assert a.stats.connects > connects, "the stream was redialled"
                nursery.cancel_scope.cancel()
        finally:
            await a.aclose()
            await b.aclose()

    trio.run(main)


# --- three agents, the leader isolated for 15 s ------------------------------------------

HOSTS = ["127.0.0.93", "127.0.0.94", "127.0.0.95"]
NAMES = ["heal-s0", "heal-s1", "heal-s2"]
ISOLATION_S = 15.0
# After a 15 s cut the kernel's next retransmission on a stream that stayed up is
# about 13 s away (200 ms doubling); the transport must do far better than that.
HEALED_WITHIN_S = 5.0


@pytest.fixture()
def servers(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    agents = cluster_agents(tmp_path, HOSTS, NAMES, servers=3)
    try:
        start_together(agents)
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def leader_of(agent: AgentProcess) -> str | None:
    try:
        name = httpx.get(agent.url + "/cluster/leader", timeout=2.0).json()["leader"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return None if name is None else str(name)


def allocate(
    agent: AgentProcess, service: str, timeout: float = 10.0, request_id: str | None = None
) -> httpx.Response | None:
    body: dict[str, object] = {"service_name": service, "gpu_count": 1, "ttl_seconds": 3600, "queue": False}
    if request_id is not None:
        body["request_id"] = request_id
    try:
        return httpx.post(agent.url + "/gpu/allocate", json=body, timeout=timeout)
    except httpx.TimeoutException:
        return None


def role_of(agent: AgentProcess) -> str | None:
    try:
        return str(httpx.get(agent.url + "/healthz", timeout=2.0).json()["raft"]["role"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def test_the_old_leader_serves_again_soon_after_a_15s_isolation(servers: list[AgentProcess]) -> None:
    def agreed() -> str | None:
        names = {leader_of(a) for a in servers}
        return names.pop() if len(names) == 1 and None not in names else None

    leader = wait_for(agreed, timeout=20.0, interval=0.1)
    old = next(a for a in servers if a.node_name == leader)
    majority = [a for a in servers if a is not old]
    assert wait_for(lambda: (r := allocate(old, "before")) is not None and r.status_code == 200, timeout=15.0)
    # A forward through a follower leaves a keep-alive connection to the leader behind:
    # the request below is sent on it, into the cut, and must not hang there.
    assert wait_for(lambda: (r := allocate(majority[0], "warm")) is not None and r.status_code == 200, timeout=15.0)

    with Cut(old.host, [a.host for a in majority]) as cut:
        cut_at = time.monotonic()
        # In flight through a follower while the leader is cut off: answered within the
        # request bound (5 s) by following the new leader — or honestly, and then a
        # retry with the same request_id gets the original answer.
        inflight = allocate(majority[0], "inflight", timeout=15.0, request_id="inflight-1")
        took = time.monotonic() - cut_at
        assert inflight is not None, "the forwarded request hung"
        print(f"\na request in flight through a follower was answered {inflight.status_code} after {took:.2f}s")
        assert took < 6.0, took
        if inflight.status_code != 200:
            assert inflight.status_code == 503 and inflight.json()["error"]["code"] == "outcome_unknown", inflight.text

            def retried() -> httpx.Response | None:
                r = allocate(majority[0], "inflight", request_id="inflight-1")
                return r if r is not None and r.status_code == 200 else None

            wait_for(retried, timeout=15.0, interval=0.2)

        def new_leader() -> str | None:
            name = leader_of(majority[0])
            return name if name not in (None, leader) and leader_of(majority[1]) == name else None

        wait_for(new_leader, timeout=15.0, interval=0.1)
        assert wait_for(lambda: (r := allocate(majority[1], "during")) is not None and r.status_code == 200, timeout=15.0)

        # The cut-off old leader, once it has stepped down, knows no leader: no_leader, within 2.5 s.
        wait_for(lambda: role_of(old) not in (None, "leader"), timeout=15.0, interval=0.1)
        started = time.monotonic()
        refused = allocate(old, "isolated")
        assert refused is not None and refused.status_code == 503, refused
        assert refused.json()["error"]["code"] == "no_leader", refused.text
        assert time.monotonic() - started < 2.5 + 1.0

        wait_for(lambda: time.monotonic() - cut_at >= ISOLATION_S, timeout=ISOLATION_S + 1.0, interval=0.2)
        cut.heal()
        healed_at = time.monotonic()

    def served() -> httpx.Response | None:
        r = allocate(old, "after", timeout=HEALED_WITHIN_S)
        return r if r is not None and r.status_code == 200 else None

    wait_for(served, timeout=HEALED_WITHIN_S + 5.0, interval=0.05)
    took = time.monotonic() - healed_at
    print(f"the old leader served a write {took:.2f}s after the heal")
    assert took < HEALED_WITHIN_S, f"writes through the old leader failed for {took:.1f}s after the heal"


def test_requests_follow_a_new_leader_while_the_leader_is_paused(servers: list[AgentProcess]) -> None:
    """SIGSTOP the leader: its kernel still accepts and acknowledges, so only the Raft
    core notices; a request forwarded to it follows the new leader instead of waiting
    for SIGCONT, and after SIGCONT the old leader steps down and serves again."""

    def agreed() -> str | None:
        names = {leader_of(a) for a in servers}
        return names.pop() if len(names) == 1 and None not in names else None

    leader = wait_for(agreed, timeout=20.0, interval=0.1)
    old = next(a for a in servers if a.node_name == leader)
    follower = next(a for a in servers if a is not old)
    assert wait_for(lambda: (r := allocate(follower, "warm")) is not None and r.status_code == 200, timeout=15.0)
    assert old.proc is not None
    old.proc.send_signal(signal.SIGSTOP)
    try:
        paused_at = time.monotonic()
        answer = allocate(follower, "paused", timeout=15.0, request_id="paused-1")
        took = time.monotonic() - paused_at
        assert answer is not None, "the forwarded request waited for the paused leader"
        print(f"\nwith the leader paused, a request through a follower was answered {answer.status_code} after {took:.2f}s")
        assert took < 6.0, took
        if answer.status_code != 200:
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "outcome_unknown", answer.text
    finally:
        old.proc.send_signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    wait_for(lambda: (r := allocate(old, "resumed", timeout=5.0)) is not None and r.status_code == 200, timeout=15.0)
    print(f"the resumed old leader served a write {time.monotonic() - resumed_at:.2f}s after SIGCONT")
    retry = allocate(follower, "paused", request_id="paused-1")
    assert retry is not None and retry.status_code == 200, retry
