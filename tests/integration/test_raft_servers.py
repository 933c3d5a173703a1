"""Adding, removing and replacing Raft servers on real agent processes, through gpuctl.

Three founders (bootstrap_expect = 3) on 127.0.0.20..22 and, started later, a
blank server on 127.0.0.23 with the same configuration. In order, on one cluster:

1. the blank server sees through gossip that a cluster runs, so it does not
   bootstrap: it serves HTTP as a non-voter (forwarding to the leader) and never
   campaigns; `gpuctl servers` through it lists three voters and itself waiting;
2. refusals change nothing: an unknown name, a non-voter to remove, a voter to add;
3. `gpuctl servers add` makes it a voter, and its own replica then lists every
   allocation made before it joined;
4. replace a dead server: kill -9 a founder, `gpuctl servers remove` it, and the
   three remaining voters (quorum two) go on allocating;
5. remove the leader itself: the caller gets the answer, the leader steps down and
   another leads; then the old leader is added back by several callers at once —
   exactly one change happens, the others get 409.

Robust on a busy machine: the servers gossip with the `lan` profile, not `local`,
whose 0.2 s probe timeout let a loaded two-core machine mark live servers suspect
(test 4 then saw "2 alive"). What Raft decides (the voters) is asserted at once;
what gossip reports (alive) is waited for, since gossip may lag behind but settles.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from agent import gpuctl
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = [f"127.0.0.{i}" for i in range(20, 24)]
NAMES = ["srv-a", "srv-b", "srv-c", "srv-d"]
FOUNDERS = 3
FAILOVER_S = 15.0


def get(agent: AgentProcess, path: str) -> Any:
    return httpx.get(agent.url + path, timeout=10.0).json()


class Cluster:
    def __init__(self, root: Path) -> None:
        # The same configuration for founders and the server added later.
        self.agents = cluster_agents(
            root, HOSTS, NAMES, servers=len(NAMES), bootstrap_expect=FOUNDERS, profile=None  # lan: see above
        )
        self.acknowledged: set[str] = set()

    def by_name(self, name: str) -> AgentProcess:
        return next(a for a in self.agents if a.node_name == name)

    def live(self) -> list[AgentProcess]:
        return [a for a in self.agents if a.proc is not None and a.proc.poll() is None]

    def leader(self, among: list[AgentProcess] | None = None, other_than: str | None = None) -> str:
        """The leader every given live voter agrees on, `other_than` excluded (waits for one)."""

        def agreed() -> str | None:
            names = {get(a, "/cluster/leader")["leader"] for a in among or self.live()}
            return names.pop() if len(names) == 1 and not names & {None, other_than} else None

        return str(wait_for(agreed, timeout=FAILOVER_S, interval=0.2))

    def allocate(self, agent: AgentProcess, service: str) -> None:
        """Allocate through `agent`, retrying (same request_id) while an election settles."""
        body = {"service_name": service, "gpu_count": 1, "ttl_seconds": 3600, "queue": False,
                "request_id": uuid.uuid4().hex}
        last = ""

        def placed() -> bool:
            nonlocal last
            try:
                resp = httpx.post(agent.url + "/gpu/allocate", json=body, timeout=20.0)
            except httpx.HTTPError as exc:
                last = repr(exc)
                return False
            last = f"{resp.status_code} {resp.text[:300]}"
            if resp.status_code == 200:
                self.acknowledged.add(resp.json()["allocation_id"])
            return resp.status_code == 200

        try:
            wait_for(placed, timeout=FAILOVER_S, interval=0.2)
        except AssertionError:
            raise AssertionError(f"allocation through {agent.node_name} kept failing: {last}") from None

    def replica_lists_everything(self, agent: AgentProcess) -> bool:
        """`agent`'s own replica (stale read: not forwarded) holds every acknowledged allocation."""
        resp = httpx.get(agent.url + "/gpu/list?stale=true", timeout=10.0)
        return resp.status_code == 200 and self.acknowledged <= {a["allocation_id"] for a in resp.json()["allocations"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("raft-servers"))
    try:
        start_together(c.agents[:FOUNDERS])
        yield c
    finally:
        for agent in c.agents:
            agent.kill()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gpuctl.ADDRESS_ENV, raising=False)
    monkeypatch.delenv(gpuctl.API_KEY_ENV, raising=False)


def ctl(capsys: pytest.CaptureFixture[str], agent: AgentProcess, *argv: str) -> tuple[int, str, str]:
    code = gpuctl.main(["--address", f"{agent.host}:{agent.port}", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def settled_servers(capsys: pytest.CaptureFixture[str], via: AgentProcess, summary: str) -> str:
    """`gpuctl servers` through `via`, once its summary line reads `summary` (gossip's alive count settles)."""
    last = ""

    def shows_it() -> bool:
        nonlocal last
        code, last, err = ctl(capsys, via, "servers")
        return code == 0 and summary in last

    wait_for(shows_it, timeout=FAILOVER_S, interval=0.2)
    return last


def servers_table(out: str) -> dict[str, dict[str, str]]:
    """`gpuctl servers` rows by name (cells are two or more spaces apart; LEADER may be empty)."""
    lines = out.strip().splitlines()
    header = lines[0]
    starts = [header.index(h) for h in ("NAME", "VOTER", "ALIVE", "LEADER", "ADDRESS")]
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows[cells[0]] = dict(zip(("name", "voter", "alive", "leader", "address"), cells))
    return rows


def test_1_a_blank_server_joins_as_a_non_voter_and_waits(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    leader = cluster.leader()
    for i in range(3):
        cluster.allocate(cluster.agents[i], f"before-{i}")
    blank = cluster.agents[3]
    blank.start()  # returns once /healthz answers: it serves while it waits to be added
    health = get(blank, "/healthz")
    assert health["role"] == "non_voter" and health["raft"]["voter"] is False
    assert health["raft"]["voters"] == [] and health["raft"]["term"] == 0
    assert "already hold Raft state; starting as a blank server" in blank.log()

    # Through the non-voter: forwarded to the leader (which it had to look up), once the
    # leader's gossip has heard of it (a join reaches the others within a gossip round or two).
    wait_for(lambda: "srv-d" in {s["name"] for s in get(blank, "/cluster/servers")["servers"]}, timeout=10.0)
    out = settled_servers(capsys, blank, "3 voter(s), 3 alive; quorum 2")
    rows = servers_table(out)
    assert {n: (r["voter"], r["alive"]) for n, r in rows.items()} == {
        "srv-a": ("yes", "yes"), "srv-b": ("yes", "yes"), "srv-c": ("yes", "yes"), "srv-d": ("no", "yes"),
    }
    assert rows[leader]["leader"] == "*" and rows["srv-d"]["address"] == f"{blank.host}:{blank.raft_port}"
    # Still not a voter after several election timeouts: a blank server never campaigns.
    assert get(blank, "/healthz")["raft"]["term"] == 0
    assert get(cluster.agents[0], "/healthz")["raft"]["voters"] == ["srv-a", "srv-b", "srv-c"]


def test_2_refusals_change_nothing(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    blank = cluster.agents[3]
    for argv, code_word in (
        (["servers", "add", "nobody"], "not_found"),
        (["servers", "remove", "srv-d"], "not_found"),  # a non-voter
        (["servers", "add", "srv-a"], "already_voter"),
        (["servers", "add", "not a name"], "invalid_name"),
    ):
        code, out, err = ctl(capsys, blank, *argv)
        assert code == gpuctl.EXIT_API_ERROR and f"error: {code_word}: " in err, (argv, err)
    assert get(cluster.agents[0], "/cluster/servers")["servers"][:3] == [
        s for s in get(cluster.agents[1], "/cluster/servers")["servers"] if s["voter"]
    ]
    assert [s["name"] for s in get(cluster.agents[0], "/cluster/servers")["servers"] if s["voter"]] == NAMES[:3]


def test_3_gpuctl_servers_add_makes_it_a_voter_with_every_allocation(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = cluster.agents[3]
    code, out, err = ctl(capsys, cluster.agents[1], "--json", "servers", "add", "srv-d")
    assert code == 0, err
    answer = json.loads(out)
    assert [(s["name"], s["voter"]) for s in answer["servers"]] == [(n, True) for n in NAMES]
    wait_for(lambda: get(blank, "/healthz")["raft"]["voter"], timeout=10.0)
    wait_for(lambda: cluster.replica_lists_everything(blank), timeout=10.0)
    assert get(blank, "/healthz")["role"] in ("follower", "leader")
    metrics = httpx.get(blank.url + "/metrics", timeout=5.0).text
    assert "gpu_orchestrator_raft_voters 4.0" in metrics and "gpu_orchestrator_raft_voter 1.0" in metrics


def test_4_replace_a_dead_server(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    leader = cluster.leader()
    dead = next(a for a in cluster.agents[:FOUNDERS] if a.node_name != leader)
    dead.kill()
    survivor = next(a for a in cluster.live() if a.node_name != leader)
    # Four voters, one dead: quorum 3 of the 3 alive still holds, so the removal commits.
    code, out, err = ctl(capsys, survivor, "servers", "remove", dead.node_name)
    assert code == 0, err
    rows = servers_table(out)
    assert dead.node_name not in rows or rows[dead.node_name]["voter"] == "no"
    assert sorted(n for n, r in rows.items() if r["voter"] == "yes") == sorted(a.node_name for a in cluster.live())
    assert "3 voter(s), " in out and "quorum 2" in out
    # Gossip's view of the live voters may trail on a loaded machine (a late ack makes a
    # live server suspect until it refutes); it must settle on all three alive.
    settled_servers(capsys, survivor, "3 voter(s), 3 alive; quorum 2")
    cluster.allocate(survivor, "after-replace")
    for agent in cluster.live():
        wait_for(lambda: cluster.replica_lists_everything(agent), timeout=10.0)
        assert len(get(agent, "/healthz")["raft"]["voters"]) == 3


def test_5_remove_the_leader_then_add_it_back_concurrently(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    leader_name = cluster.leader()
    leader = cluster.by_name(leader_name)
    others = [a for a in cluster.live() if a is not leader]
    code, out, err = ctl(capsys, leader, "--json", "servers", "remove", leader_name)
    assert code == 0, err
    assert sorted(s["name"] for s in json.loads(out)["servers"] if s["voter"]) == sorted(a.node_name for a in others)
    # The followers elect another within an election timeout of hearing nothing more from it.
    cluster.leader(others, other_than=leader_name)
    wait_for(lambda: get(leader, "/healthz")["role"] == "non_voter", timeout=10.0)
    cluster.allocate(leader, "via-removed-leader")  # a non-voter still forwards

    # Several callers add it back at once, through different agents: one change, the rest 409.
    results: list[int] = []
    barrier = threading.Barrier(3)

    def add_back(via: AgentProcess) -> None:
        barrier.wait()
        resp = httpx.post(via.url + "/cluster/servers", json={"name": leader_name}, timeout=20.0)
        results.append(resp.status_code)
        if resp.status_code == 409:
            assert resp.json()["error"]["code"] in ("membership_change_in_progress", "already_voter")

    threads = [threading.Thread(target=add_back, args=(via,)) for via in (*others, leader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30.0)
    assert sorted(results) == [200, 409, 409], results
    voters = get(others[0], "/cluster/servers")["servers"]
    assert sorted(s["name"] for s in voters if s["voter"]) == sorted([leader_name, *(a.node_name for a in others)])
    wait_for(lambda: cluster.replica_lists_everything(leader), timeout=10.0)
