"""A GPU failing on a host that is not the leader reaches its lease holder.

Three servers (bootstrap_expect = 3) on 127.0.0.50..52 and one client on
127.0.0.53 whose two simulated GPUs raise XID 79 ("fallen off the bus")
FAULT_AT_S seconds after it starts. A client never leads, so only the
leader's copy of the client's gossiped health can record it. Before the
fault, a lease is taken on the client with a webhook; after it, the leader
has recorded the GPU unhealthy (with the XID as the reason), the lease
holder's webhook hears gpu_unhealthy, the lease is kept, and the client's
GPUs are no longer handed out; after the client restarts without the fault
(forgetting the XID), the leader still holds the verdict and hands nothing out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.integration.test_integrations import Receiver
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = [f"127.0.0.{i}" for i in range(50, 54)]
NAMES = ["health-s0", "health-s1", "health-s2", "health-c0"]
# Long enough for the cluster to form and take the lease first, even on a slow machine.
FAULT_AT_S = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    faulty = f"2xH100-80GB;xid=0:79@{FAULT_AT_S};xid=1:79@{FAULT_AT_S}"
    agents = cluster_agents(tmp_path, HOSTS, NAMES, servers=3, simulate=["2xH100-80GB"] * 3 + [faulty])
    try:
        start_together(agents)
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def metric(agent: AgentProcess, name: str) -> float:
    text = httpx.get(agent.url + "/metrics", timeout=5.0).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_a_remote_gpu_failing_notifies_its_lease_holder(cluster: list[AgentProcess]) -> None:
    client = cluster[-1]
    started = time.monotonic()
    receiver = Receiver(lambda n, body: (200, {}, 0.0))
    try:
        leader_name = wait_for(lambda: httpx.get(client.url + "/cluster/leader", timeout=5).json()["leader"], timeout=20)
        leader = next(a for a in cluster if a.node_name == leader_name)
        body = {
            "service_name": "trainer",
            "gpu_count": 2,
            "ttl_seconds": 3600,
            "queue": False,
            "constraints": {"node": client.node_name},
            "webhook_url": receiver.url + "/hook",
        }

        def placed() -> dict[str, Any] | None:
            resp = httpx.post(client.url + "/gpu/allocate", json=body, timeout=10)
            return resp.json() if resp.status_code == 200 else None

        alloc = wait_for(placed, timeout=10, interval=0.2)
        assert time.monotonic() - started < FAULT_AT_S, "the lease must precede the fault for this test to mean anything"

        def heard() -> list[Any]:
            return [b for b in receiver.bodies() if b.get("event") == "gpu_unhealthy"]

        events = wait_for(heard, timeout=FAULT_AT_S + 30, interval=0.5)
        assert events[0]["allocation"]["allocation_id"] == alloc["allocation_id"], events
        assert "XID 79" in events[0]["reason"] and client.node_name in events[0]["reason"], events
        assert metric(leader, "gpu_orchestrator_allocations_hit_by_unhealthy_gpu_total") >= 1

        # The lease is kept (only its owner knows whether the job survived) ...
        lookup = httpx.get(f"{client.url}/gpu/allocations/{alloc['allocation_id']}", timeout=10)
        assert lookup.status_code == 200 and lookup.json()["status"] == "allocated", lookup.text
        # ... and once released, the unhealthy GPUs are not handed out again.
        released = httpx.post(client.url + "/gpu/release", json={"allocation_id": alloc["allocation_id"]}, timeout=10)
        assert released.status_code == 200, released.text
        again = httpx.post(client.url + "/gpu/allocate", json={**body, "webhook_url": None}, timeout=10)
        assert again.status_code in (400, 409), again.text

        # The client restarts without the fault (a client keeps no replica, so its agent
        # forgets the XID and gossips its GPUs healthy): the leader keeps the verdict for
        # the quiet period (300 s by default), so the GPUs are still not handed out.
        client.kill()
        client.simulate = "2xH100-80GB"
        client.start()

        def gossiped_healthy() -> bool:
            rows = httpx.get(client.url + "/gpu/status", timeout=10).json()["gpus"]
            return all(r["health"] == "healthy" for r in rows if r["node"] == client.node_name)

        wait_for(gossiped_healthy, timeout=15, interval=0.5)
        time.sleep(3.0)  # several of the leader's health rounds (1 s each)
        rows = httpx.get(leader.url + "/gpu/status", timeout=10).json()["gpus"]
        assert [r["health"] for r in rows if r["node"] == client.node_name] == ["unhealthy", "unhealthy"], rows
        held = httpx.post(client.url + "/gpu/allocate", json={**body, "gpu_count": 1, "webhook_url": None}, timeout=10)
        assert held.status_code in (400, 409), held.text
    finally:
        receiver.close()
