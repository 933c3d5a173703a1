"""Host loss between real agent processes: a client killed with its lease, then brought back.

Three servers (bootstrap_expect = 3) and one client with one simulated GPU on
127.0.0.30..33, gossip on the "local" profile, and `[cluster] host_lost_grace_s`
of a few seconds on the servers. A webhook receiver in the test runs on
127.0.0.34. In order:

1. a lease on the client's GPU (constraints {"node": ...}, with a webhook) and
   one on a server's, then kill -9 the client;
2. its GPU leaves the schedulable pool: a request constrained to its node can
   never fit any more (400 unsatisfiable, where before it was 409 no_capacity);
3. after the grace the lease is lost: /gpu/requests says so, the webhook
   receiver got one "lost" event naming the host, the leader's
   gpu_orchestrator_allocations_lost_total counted it, the leader logged its
   decision, and the server's lease is untouched;
4. restart the client: its GPU is allocatable again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.integration.test_integrations import Receiver
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = [f"127.0.0.{i}" for i in range(30, 34)]
HOOK_HOST = "127.0.0.34"
NAMES = ["hl-s0", "hl-s1", "hl-s2", "hl-c0"]
SERVERS = 3
CLIENT = NAMES[3]
GRACE_S = 3.0
# Dead on the "local" profile takes the suspicion timeout (4 s to 24 s at four
# members), then the grace, then a Raft commit: well inside a minute.
LOST_WITHIN_S = 60.0


def get(agent: AgentProcess, path: str) -> Any:
    return httpx.get(agent.url + path, timeout=10.0).json()


def allocate(agent: AgentProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(agent.url + "/gpu/allocate", json=body, timeout=20.0)


def on_node(node: str, **extra: Any) -> dict[str, Any]:
    return {"service_name": "probe", "gpu_count": 1, "queue": False, "constraints": {"node": node}, **extra}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    agents = cluster_agents(
        tmp_path, HOSTS, NAMES, servers=SERVERS, simulate="1xH100-80GB",
        cluster_settings=f"host_lost_grace_s = {GRACE_S}\n",
    )
    try:
        start_together(agents)
        yield agents
    finally:
        for agent in agents:
            agent.kill()


@pytest.fixture
def hook() -> Iterator[Receiver]:
    receiver = Receiver(lambda n, body: (200, {}, 0.0), host=HOOK_HOST)
    yield receiver
    receiver.close()


def leader_of(servers: list[AgentProcess]) -> AgentProcess:
    def agreed() -> str | None:
        names = {get(a, "/cluster/leader")["leader"] for a in servers}
        return names.pop() if len(names) == 1 and None not in names else None

    name = wait_for(agreed, timeout=20.0, interval=0.2)
    return next(a for a in servers if a.node_name == name)


def answered(send: Callable[[], httpx.Response], status: int) -> Callable[[], httpx.Response | None]:
    """A wait_for check: the response once it has `status` (connection errors count as not yet)."""

    def check() -> httpx.Response | None:
        try:
            resp = send()
        except httpx.HTTPError:
            return None
        return resp if resp.status_code == status else None

    return check


def test_a_killed_hosts_lease_is_marked_lost_after_the_grace_and_its_gpu_returns_with_it(
    cluster: list[AgentProcess], hook: Receiver
) -> None:
    servers, client = cluster[:SERVERS], cluster[SERVERS]
    entry = servers[0]
    leader = leader_of(servers)
    survivor = next(a for a in servers if a is not leader)

    # 1. A lease on the client's only GPU (once gossip shows it to the leader), one on a server's.
    body = on_node(CLIENT, service_name="train", request_id="on-client", ttl_seconds=3600, webhook_url=f"{hook.url}/hook")
    lease = wait_for(answered(lambda: allocate(entry, body), 200), timeout=20.0, interval=0.2).json()
    assert lease["node"] == CLIENT
    kept = allocate(entry, on_node(survivor.node_name, service_name="kept", ttl_seconds=3600))
    assert kept.status_code == 200, kept.text
    # While the client is alive its GPU is merely busy.
    busy = allocate(entry, on_node(CLIENT))
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "no_capacity", busy.text

    client.kill()
    killed_at = time.monotonic()

    # 2. Its GPU leaves the pool: a request for that node can never fit.
    gone = wait_for(answered(lambda: allocate(entry, on_node(CLIENT)), 400), timeout=LOST_WITHIN_S, interval=0.2)
    assert gone.json()["error"]["code"] == "unsatisfiable"

    # 3. After the grace, the lease is lost.
    def lost() -> dict[str, Any] | None:
        record: dict[str, Any] = get(entry, "/gpu/requests/on-client")
        return record if record["status"] == "lost" else None

    try:
        record = wait_for(lost, timeout=LOST_WITHIN_S, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not marked lost; leader {leader.node_name} log:\n{leader.log()[-6000:]}") from None
    assert time.monotonic() - killed_at >= GRACE_S
    assert (record["reason"], record["allocation_id"]) == ("host_lost", lease["allocation_id"])
    ids = {a["allocation_id"] for a in get(entry, "/gpu/list")["allocations"]}
    assert lease["allocation_id"] not in ids and kept.json()["allocation_id"] in ids
    assert httpx.get(f"{entry.url}/gpu/allocations/{lease['allocation_id']}", timeout=10.0).status_code == 404

    def lost_events() -> list[tuple[dict[str, str], Any]]:
        return [(h, b) for _, h, b in list(hook.requests) if b["status"] == "lost"]

    wait_for(lost_events, timeout=10.0)
    time.sleep(0.5)  # a duplicate delivery would arrive within this
    events = lost_events()
    assert len({h["X-Event-Id"] for h, _ in events}) == 1, events
    payload = events[0][1]
    assert (payload["event"], payload["reason"], payload["node"]) == ("lost", "host_lost", CLIENT)
    assert (payload["request_id"], payload["allocation"]["id"]) == ("on-client", lease["allocation_id"])

    metrics = httpx.get(leader.url + "/metrics", timeout=10.0).text
    assert "gpu_orchestrator_allocations_lost_total 1.0" in metrics
    assert f"host {CLIENT} gone for" in leader.log()

    # 4. The host returns: its GPU is allocatable again (the lost lease no longer holds it).
    client.start()
    back = wait_for(answered(lambda: allocate(entry, on_node(CLIENT, service_name="again")), 200), timeout=30.0, interval=0.2)
    assert back.json()["gpu_ids"] == lease["gpu_ids"]
    assert get(entry, "/gpu/requests/on-client")["status"] == "lost"
