"""Two teams share a real 3-server cluster: borrowing, then reclaim with a grace period.

Three servers on 127.0.0.111..113, four simulated H100s each (12 GPUs), one
configuration: team A (`team-a`) is guaranteed 4 GPUs with a 6 s grace period,
team B (`team-b`) 8. Team A fills the whole cluster by borrowing; team B asks for
4 GPUs on one node, within its guarantee. The leader preempts the four youngest
of A's borrowed leases on one node: each holder's webhook hears `lease_preempting`
with the deadline, `gpuctl list` shows B's request waiting with reason
`preempting`; one holder releases early, the other three end as `preempted` at
the deadline, and B is placed there. A keeps 8 GPUs, its 4 guaranteed among them.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any, Iterator

import httpx
import pytest

from agent import gpuctl
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.integration.test_integrations import Receiver
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = [f"127.0.0.{i}" for i in range(111, 114)]
NAMES = ["q-srv-a", "q-srv-b", "q-srv-c"]
GRACE_S = 6.0
QUEUES = f"""
[queues.team-a]
guaranteed_gpus = 4
preemption_grace_s = {GRACE_S}
services = ["team-a"]

[queues.team-b]
guaranteed_gpus = 8
services = ["team-b"]
"""


def get(agent: AgentProcess, path: str) -> Any:
    return httpx.get(agent.url + path, timeout=10.0).json()


def queue_names(agent: AgentProcess) -> set[str]:
    """The queues `agent` reports (none while the cluster still elects: /queues answers 503)."""
    resp = httpx.get(agent.url + "/queues", timeout=10.0)
    return {q["name"] for q in resp.json()["queues"]} if resp.status_code == 200 else set()


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    root = tmp_path_factory.mktemp("queues-cluster")
    made = cluster_agents(root, HOSTS, NAMES, servers=3, simulate="4xH100-80GB", extra_config=QUEUES)
    try:
        start_together(made)
        yield made
    finally:
        for agent in made:
            agent.kill()


@pytest.fixture
def hook() -> Iterator[Receiver]:
    receiver = Receiver(lambda n, body: (200, {}, 0.0), host=HOSTS[0])
    yield receiver
    receiver.close()


def allocate(agent: AgentProcess, body: dict[str, Any]) -> httpx.Response:
    """POST /gpu/allocate through `agent`, retrying (same request_id) while the cluster settles."""
    body = {"request_id": uuid.uuid4().hex, **body}
    answer: list[httpx.Response] = []

    def answered() -> bool:
        try:
            resp = httpx.post(agent.url + "/gpu/allocate", json=body, timeout=20.0)
        except httpx.HTTPError:
            return False
        answer[:] = [resp]
        return resp.status_code in (200, 202)

    wait_for(answered, timeout=30.0, interval=0.2)
    return answer[0]


def test_team_b_reclaims_its_guarantee_from_team_a_after_the_grace_period(
    agents: list[AgentProcess], hook: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second, third = agents
    # The leader proposes the configured queues; every server's replica shows them.
    wait_for(lambda: all({"team-a", "team-b"} <= queue_names(a) for a in agents), timeout=30.0, interval=0.2)

    leases = []
    for i in range(12):
        resp = allocate(agents[i % 3], {"service_name": "team-a", "gpu_count": 1, "webhook_url": hook.url})
        assert resp.status_code == 200, resp.text
        leases.append(resp.json())
    team_a = {q["name"]: q for q in get(first, "/queues")["queues"]}["team-a"]
    assert team_a["in_use_gpus"] == 12 and team_a["borrowed_gpus"] == 8

    wanted = allocate(second, {"service_name": "team-b", "gpu_count": 4})
    assert wanted.status_code == 202, wanted.text
    request_id = wanted.json()["request_id"]

    # Four of A's leases, all on one node, hear lease_preempting with one deadline.
    preempting = wait_for(
        lambda: (found := [b for b in hook.bodies() if b["event"] == "lease_preempting"]) and len(found) >= 4 and found,
        timeout=30.0,
        interval=0.2,
    )
    assert len(preempting) == 4
    nodes = {b["allocation"]["node"] for b in preempting}
    assert len(nodes) == 1
    deadlines = {b["deadline"] for b in preempting}
    assert len(deadlines) == 1 and None not in deadlines
    victims = [b["allocation"]["allocation_id"] for b in preempting]
    assert len(set(victims)) == 4

    # Meanwhile B's request says why it waits, through any server and gpuctl.
    queued = get(third, f"/gpu/requests/{request_id}")
    assert queued["status"] == "queued" and queued["queue"]["reason"] == "preempting", queued
    assert queued["queue"]["preempting_deadline"] == next(iter(deadlines))
    code = gpuctl.main(["--address", f"{third.host}:{third.port}", "list"])
    out, _ = capsys.readouterr()
    assert code == 0 and "preempting" in out, out

    # One holder checkpoints and releases early; the rest end at the deadline.
    assert httpx.post(first.url + "/gpu/release", json={"allocation_id": victims[0]}, timeout=20.0).status_code == 200
    placed = wait_for(
        lambda: (r := get(first, f"/gpu/requests/{request_id}"))["status"] == "allocated" and r,
        timeout=GRACE_S + 30.0,
        interval=0.2,
    )
    allocation = get(first, f"/gpu/allocations/{placed['allocation_id']}")
    ended = wait_for(
        lambda: (found := [b for b in hook.bodies() if b["event"] == "preempted"]) and len(found) >= 3 and found,
        timeout=30.0,
        interval=0.2,
    )
    assert {b["allocation"]["allocation_id"] for b in ended} == set(victims[1:])
    deadline = datetime.datetime.fromisoformat(deadlines.pop().replace("Z", "+00:00"))
    for body in ended:
        record = get(first, f"/gpu/requests/{body['request_id']}")
        assert record["reason"] in ("preempted",), record
        assert datetime.datetime.fromisoformat(record["updated_at"].replace("Z", "+00:00")) >= deadline
    assert allocation["node"] in nodes
    queues = {q["name"]: q for q in get(third, "/queues")["queues"]}
    assert queues["team-a"]["in_use_gpus"] == 8 and queues["team-b"]["in_use_gpus"] == 4
