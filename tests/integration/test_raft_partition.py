"""Raft under a network partition: three server processes on loopback, the leader cut off by nftables.

Servers on 127.0.0.7..9 (outbound sockets bound to their own address, so
each one's traffic really comes from it). An nftables table of our own drops
every packet between the leader's address and the other two on the cluster's
gossip, Raft and HTTP ports (the test itself talks from 127.0.0.1, which the
rules leave alone). Then:

- the majority elects a new leader and accepts writes;
- a linearizable read on the isolated old leader answers 503 (it cannot
  confirm a majority), while `?stale=true` answers from its replica;
- the isolated old leader steps down (check-quorum) and, unable to reach a
  leader to forward to, answers its allocate with 503;
- once the rules are gone it rejoins as a follower, and every acknowledged
  allocation is listed by every server.

Needs root and the `nft` tool; skipped otherwise. The table is always deleted.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.nftables import Firewall, nft_unavailable
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = ["127.0.0.7", "127.0.0.8", "127.0.0.9"]
NAMES = ["part-s0", "part-s1", "part-s2"]
TABLE_PREFIX = "gpuorch_test"
SETTLE_S = 15.0


pytestmark = [pytestmark, pytest.mark.skipif(nft_unavailable() is not None, reason=str(nft_unavailable()))]


def leader_of(agent: AgentProcess) -> str | None:
    try:
        name = httpx.get(agent.url + "/cluster/leader", timeout=2.0).json()["leader"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return None if name is None else str(name)


def allocate(agent: AgentProcess, service: str) -> httpx.Response:
    body = {"service_name": service, "gpu_count": 1, "ttl_seconds": 3600, "queue": False}
    return httpx.post(agent.url + "/gpu/allocate", json=body, timeout=20.0)


@pytest.fixture()
def servers(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    agents = cluster_agents(tmp_path, HOSTS, NAMES, servers=3)
    try:
        start_together(agents)
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def test_isolated_leader_steps_down_and_rejoins(servers: list[AgentProcess]) -> None:
    started = time.monotonic()
    acknowledged: set[str] = set()

    def agreed() -> str | None:
        names = {leader_of(a) for a in servers}
        return names.pop() if len(names) == 1 and None not in names else None

    leader = wait_for(agreed, timeout=SETTLE_S, interval=0.1)
    old = next(a for a in servers if a.node_name == leader)
    majority = [a for a in servers if a is not old]
    first = wait_for(lambda: (r := allocate(majority[0], "before")).status_code == 200 and r, timeout=SETTLE_S)
    acknowledged.add(first.json()["allocation_id"])

    firewall = Firewall(TABLE_PREFIX)
    try:
        firewall.create()
        firewall.cut(old.host, [a.host for a in majority])

        # The majority elects a new leader among themselves and takes writes.
        def majority_leader() -> str | None:
            name = leader_of(majority[0])
            return name if name is not None and name != leader and leader_of(majority[1]) == name else None

        new_leader = wait_for(majority_leader, timeout=SETTLE_S, interval=0.1)
        assert new_leader in (a.node_name for a in majority)
        during = wait_for(lambda: (r := allocate(majority[1], "during")).status_code == 200 and r, timeout=SETTLE_S)
        acknowledged.add(during.json()["allocation_id"])

        # Reads are linearizable: the cut-off side cannot confirm a majority, so it
        # answers 503 rather than a list missing the write just acknowledged ...
        read = httpx.get(old.url + "/gpu/list", timeout=15.0)
        assert read.status_code == 503, read.text
        # ... unless the caller asks for its own replica, which says how old it is.
        stale = httpx.get(old.url + "/gpu/list?stale=true", timeout=5.0)
        assert stale.status_code == 200 and "X-Stale-Index" in stale.headers, stale.text
        assert during.json()["allocation_id"] not in {a["allocation_id"] for a in stale.json()["allocations"]}

        # Check-quorum: the old leader, hearing from no majority, steps down.
        def stepped_down() -> bool:
            return bool(httpx.get(old.url + "/healthz", timeout=5.0).json()["raft"]["role"] != "leader")

        wait_for(stepped_down, timeout=SETTLE_S, interval=0.1)
        # ... and, with no leader it can reach to forward to, refuses writes.
        refusal = allocate(old, "isolated")
        assert refusal.status_code == 503, refusal.text
        assert refusal.json()["error"]["code"] == "no_leader", refusal.text
    finally:
        firewall.delete()

    # Healed: the old leader follows the new one, and every acknowledged write is everywhere.
    wait_for(lambda: leader_of(old) == new_leader, timeout=SETTLE_S, interval=0.1)
    after = wait_for(lambda: (r := allocate(old, "after")).status_code == 200 and r, timeout=SETTLE_S)
    acknowledged.add(after.json()["allocation_id"])

    def listed_everywhere() -> bool:
        for agent in servers:
            resp = httpx.get(agent.url + "/gpu/list?stale=true", timeout=5.0)
            if resp.status_code != 200:
                return False
            if not acknowledged <= {a["allocation_id"] for a in resp.json()["allocations"]}:
                return False
        return True

    wait_for(listed_everywhere, timeout=SETTLE_S, interval=0.2)
    assert time.monotonic() - started < 60.0


def test_nft_table_is_gone() -> None:
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert Firewall(TABLE_PREFIX).table not in listed
