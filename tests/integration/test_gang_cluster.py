"""A gang across a real 3-server cluster: granted whole, survives a leader kill -9 whole, released whole.

Three servers on 127.0.0.135..137, four simulated H100s each, rendezvous ports
from 29610. One GPU on the leader is taken first, so a gang of 2 nodes × 4
GPUs can only go to the two other servers. It is granted in one answer with
every node's GPUs and a rendezvous at its first node's address; every server's
replica shows it whole (read locally with ?stale=true). The leader is killed
(SIGKILL); a survivor is elected, and on both survivors the gang is still
whole (two member rows, 8 GPUs held; gpuctl list ties them by the GANG
column); it is then released by its id, which frees all 8 GPUs at once. Refused gangs (more nodes than the
cluster has, `nodes` without gpus_per_node) answer 400 and change nothing.

Then the old leader comes back, a second gang is granted (asked as a total,
`gpu_count` 8 with `gpus_per_node` 4, so split into 2 nodes × 4), and one of its
member hosts (not the leader) is killed: after gossip declares it dead and
`[cluster] host_lost_grace_s` (3 s here) passes, the gang is lost whole: its
request says `lost`, the other member's GPUs are free, and its webhook
receiver (127.0.0.138) got one `lost` event naming both nodes.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from agent import gpuctl
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.integration.test_integrations import Receiver
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = [f"127.0.0.{i}" for i in range(135, 138)]
NAMES = ["gang-srv-a", "gang-srv-b", "gang-srv-c"]
HOOK_HOST = "127.0.0.138"
GRACE_S = 3.0
# Dead on the "local" profile takes the suspicion timeout, then the grace, then a commit.
LOST_WITHIN_S = 60.0
# Rendezvous ports are a hint handed to the gang's launcher: nothing in the test
# (or the agent) listens on them, so no other test can be holding them.
EXTRA = """
[scheduler]
rendezvous_port_min = 29610
rendezvous_port_max = 29619
"""


def get(agent: AgentProcess, path: str) -> Any:
    return httpx.get(agent.url + path, timeout=10.0).json()


def post(agent: AgentProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(agent.url + path, json=body, timeout=20.0)


def allocate(agent: AgentProcess, body: dict[str, Any]) -> httpx.Response:
    """POST /gpu/allocate, retrying (same request_id) while the cluster settles."""
    body = {"request_id": uuid.uuid4().hex, **body}
    answer: list[httpx.Response] = []

    def answered() -> bool:
        try:
            resp = post(agent, "/gpu/allocate", body)
        except httpx.HTTPError:
            return False
        answer[:] = [resp]
        return resp.status_code < 500

    wait_for(answered, timeout=30.0, interval=0.2)
    return answer[0]


def leader_of(agents: list[AgentProcess]) -> str:
    def known() -> str | None:
        for agent in agents:
            try:
                name = get(agent, "/cluster/leader").get("leader")
            except httpx.HTTPError:
                continue
            if name:
                return str(name)
        return None

    return wait_for(known, timeout=30.0, interval=0.2)


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    root: Path = tmp_path_factory.mktemp("gang-cluster")
    made = cluster_agents(
        root,
        HOSTS,
        NAMES,
        servers=3,
        simulate="4xH100-80GB",
        cluster_settings=f"host_lost_grace_s = {GRACE_S}\n",
        extra_config=EXTRA,
    )
    try:
        start_together(made)
        yield made
    finally:
        for agent in made:
            agent.kill()


def test_a_two_node_gang_is_granted_whole_survives_a_leader_kill_and_is_released_whole(
    agents: list[AgentProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    # Every server's GPUs are known to the scheduler before anything is asked.
    wait_for(lambda: len(get(agents[0], "/gpu/status")["gpus"]) == 12, timeout=30.0, interval=0.2)
    leader = leader_of(agents)
    by_name = {a.node_name: a for a in agents}
    others = sorted(n for n in NAMES if n != leader)
    pinned = allocate(by_name[leader], {"service_name": "small", "gpu_count": 1, "constraints": {"node": leader}})
    assert pinned.status_code == 200, pinned.text

    # Refusals first: they change nothing.
    too_wide = allocate(agents[0], {"service_name": "trainer", "nodes": 4, "gpus_per_node": 1})
    assert too_wide.status_code == 400 and too_wide.json()["error"]["code"] == "unsatisfiable", too_wide.text
    half = allocate(agents[0], {"service_name": "trainer", "nodes": 2})
    assert half.status_code == 400 and half.json()["error"]["code"] == "invalid_gang", half.text
    assert len(get(agents[0], "/gpu/list")["allocations"]) == 1

    # Granted in one answer, through a follower: both other servers, four GPUs each.
    follower = by_name[others[0]]
    resp = allocate(follower, {"service_name": "trainer", "nodes": 2, "gpus_per_node": 4, "ttl_seconds": 600})
    assert resp.status_code == 200, resp.text
    gang = resp.json()
    gang_id = gang["id"]
    assert gang["gang_id"] == gang_id == gang["allocation_id"]
    assert [(n["rank"], n["node"], n["gpu_ids"]) for n in gang["nodes"]] == [
        (0, others[0], [0, 1, 2, 3]),
        (1, others[1], [0, 1, 2, 3]),
    ]
    assert len(gang["gpus"]) == 8
    # The rendezvous: the first node's advertised address (from gossip) and the configured port.
    assert gang["rendezvous"] == {
        "address": by_name[others[0]].host,
        "port": 29610,
        "port_range": [29610, 29619],
        "nnodes": 2,
    }

    def whole_on(agent: AgentProcess) -> bool:
        try:
            view = get(agent, f"/gpu/allocations/{gang_id}")
            rows = get(agent, "/gpu/list?stale=true")["allocations"]
        except httpx.HTTPError:
            return False
        members = [r for r in rows if (r.get("gang") or {}).get("gang_id") == gang_id]
        return view.get("gang_id") == gang_id and len(view["gpus"]) == 8 and len(members) == 2

    for agent in agents:
        wait_for(lambda: whole_on(agent), timeout=10.0, interval=0.2)

    # Kill -9 the leader: a survivor elects, and the gang is whole on every survivor.
    by_name[leader].kill()
    survivors = [by_name[n] for n in others]
    new_leader = wait_for(
        lambda: (name := leader_of(survivors)) != leader and name, timeout=30.0, interval=0.2
    )
    assert new_leader in others
    for agent in survivors:
        wait_for(lambda: whole_on(agent), timeout=30.0, interval=0.2)
    held = {(g["node"], g["index"]) for g in get(survivors[1], "/gpu/status")["gpus"] if g["allocated"]}
    assert {(n, i) for n in others for i in range(4)} <= held

    # gpuctl shows it: a row per node, tied by the GANG column, and the rendezvous.
    address = f"{survivors[1].host}:{survivors[1].port}"
    assert gpuctl.main(["--address", address, "list"]) == 0
    listing, _ = capsys.readouterr()
    assert "GANG" in listing and listing.count(f"{gang_id} rank") == 2, listing

    # Released by its id through a survivor: all eight GPUs at once.
    released = post(survivors[1], "/gpu/release", {"allocation_id": gang_id})
    assert released.status_code == 200, released.text
    assert sorted(released.json()["released"]) == [f"{gang_id}.0", f"{gang_id}.1"]

    def freed() -> bool:
        rows = get(survivors[0], "/gpu/status")["gpus"]
        return not any(g["allocated"] for g in rows if g["node"] in others)

    wait_for(freed, timeout=10.0, interval=0.2)
    record = get(survivors[0], f"/gpu/allocations/{gang_id}")
    assert record["error"]["code"] == "not_found"


def test_a_gang_whose_member_host_is_lost_is_lost_whole(agents: list[AgentProcess]) -> None:
    by_name = {a.node_name: a for a in agents}
    for agent in agents:
        if agent.proc is None or agent.proc.poll() is not None:
            agent.start()  # the leader the first test killed rejoins
    wait_for(lambda: len(get(agents[0], "/gpu/status")["gpus"]) == 12, timeout=30.0, interval=0.2)
    hook = Receiver(lambda n, body: (200, {}, 0.0), host=HOOK_HOST)
    try:
        resp = allocate(
            agents[0],
            # Sized from its total: 8 GPUs on nodes of at most 4 is a gang of 2 nodes x 4.
            {"service_name": "trainer", "gpu_count": 8, "gpus_per_node": 4, "webhook_url": f"{hook.url}/hook"},
        )
        assert resp.status_code == 200, resp.text
        gang = resp.json()
        members = [n["node"] for n in gang["nodes"]]
        assert len(members) == 2 and [len(n["gpu_ids"]) for n in gang["nodes"]] == [4, 4], gang
        leader = leader_of(agents)
        victim = next(n for n in members if n != leader)
        survivor = by_name[leader]
        by_name[victim].kill()

        def lost() -> dict[str, Any] | None:
            try:
                record = get(survivor, f"/gpu/requests/{gang['request_id']}")
            except httpx.HTTPError:
                return None
            return record if record.get("status") == "lost" else None

        record = wait_for(lost, timeout=LOST_WITHIN_S, interval=0.5)
        assert record["allocation_id"] == gang["id"] and record["reason"] == "host_lost"
        # The other member is gone too: its host's GPUs are free, nothing of the gang is listed.
        other = next(n for n in members if n != victim)
        rows = get(survivor, "/gpu/status")["gpus"]
        assert not any(g["allocated"] for g in rows if g["node"] == other), rows
        assert not [a for a in get(survivor, "/gpu/list")["allocations"] if (a.get("gang") or {}).get("gang_id") == gang["id"]]
        # Its owner heard it once, for the whole gang.
        events = wait_for(lambda: [b for b in hook.bodies() if b["event"] == "lost"], timeout=10.0, interval=0.2)
        assert len(events) == 1
        assert events[0]["allocation"]["gang_id"] == gang["id"]
        assert sorted(events[0]["nodes"]) == sorted(members)
    finally:
        hook.close()
