"""Gossip membership between real agent processes on loopback.

Five agents, each on its own address (127.0.0.2 .. 127.0.0.6), share a cluster
key and the "local" SWIM profile; four join through the first. The scenario
runs in order on one cluster (module fixture), because forming it is the
expensive part:

1. they form a cluster: every agent lists five alive members;
2. /gpu/status on any agent lists every GPU of the cluster, its own from the
   sampler and the others' from gossip; an allocation stays on the agent that
   made it and its lease shows on the others;
3. kill -9 one agent: the other four mark it dead;
4. restart it (same name, same data dir): it is alive everywhere again, at a
   higher incarnation;
5. agents with a wrong key, or none, are never admitted, and the members'
   decrypt-drop counter rises;
6. a few thousand garbage datagrams and TCP frames leave an agent answering,
   with the drop counters reflecting the garbage.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from agent.cluster_keyring import Keyring, decode_key, generate_key
from agent.gossip_transport import TCP_AAD, UDP_AAD
from coordinator.swim_messages import Alive, Ping, encode_header, encode_message
from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = [f"127.0.0.{i}" for i in range(2, 7)]
NAMES = [f"gossip-{i}" for i in range(len(HOSTS))]
GPUS_PER_AGENT = 2
FORM_TIMEOUT_S = 20.0
# local profile: suspicion of at most 4 · 3 s, plus probing and dissemination.
DEAD_TIMEOUT_S = 25.0


def write_config(path: Path, key_file: Path | None) -> Path:
    lines = ["[cluster]", 'profile = "local"']
    if key_file is not None:
        lines.append(f'key_file = "{key_file}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def get(agent: AgentProcess, path: str) -> Any:
    return httpx.get(agent.url + path, timeout=5.0).json()


def members(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in get(agent, "/cluster/members")["members"]}


def statuses(agent: AgentProcess) -> dict[str, str]:
    return {name: m["status"] for name, m in members(agent).items()}


def counter(agent: AgentProcess, name: str, **labels: str) -> float:
    text = httpx.get(agent.url + "/metrics", timeout=5.0).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{name}{{{want}}} not in /metrics"
    return float(found[1])


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = generate_key()
        self.key_file = root / "cluster.key"
        self.key_file.write_text(self.key + "\n")
        self.key_file.chmod(0o600)
        self.config = write_config(root / "agent.toml", self.key_file)
        self.agents: list[AgentProcess] = []

    def agent(self, i: int, join: list[str]) -> AgentProcess:
        return AgentProcess(
            data_dir=self.root / NAMES[i],
            host=HOSTS[i],
            node_name=NAMES[i],
            simulate=f"{GPUS_PER_AGENT}xH100-80GB",
            join=join,
            extra_args=["--config", str(self.config)],
        )

    def live(self) -> list[AgentProcess]:
        return [a for a in self.agents if a.proc is not None and a.proc.poll() is None]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("membership"))
    try:
        seed = c.agent(0, []).start()
        c.agents.append(seed)
        for i in range(1, len(HOSTS)):
            c.agents.append(c.agent(i, [seed.gossip_address]).start())
        yield c
    finally:
        for agent in c.agents:
            agent.kill()


def test_1_five_agents_form_a_cluster(cluster: Cluster) -> None:
    everyone_alive = dict.fromkeys(NAMES, "alive")
    for agent in cluster.agents:
        wait_for(lambda: statuses(agent) == everyone_alive, timeout=FORM_TIMEOUT_S)
    view = members(cluster.agents[2])
    first = view[NAMES[0]]
    assert first["role"] == "server" and first["gpus"] == GPUS_PER_AGENT
    assert first["addresses"]["http"] == cluster.agents[0].url
    assert first["addresses"]["gossip"] == cluster.agents[0].gossip_address
    assert [m["self"] for m in view.values()].count(True) == 1
    assert counter(cluster.agents[0], "gpu_orchestrator_cluster_members", status="alive") == 5


def test_2_gpu_status_lists_every_gpu_and_allocations_stay_local(cluster: Cluster) -> None:
    agent = cluster.agents[4]
    gpus = get(agent, "/gpu/status")["gpus"]
    assert [(g["node"], g["index"]) for g in gpus] == [
        (name, index) for name in sorted(NAMES) for index in range(GPUS_PER_AGENT)
    ]
    assert {g["source"] for g in gpus if g["node"] == NAMES[4]} == {"local"}
    remote = [g for g in gpus if g["node"] != NAMES[4]]
    assert {g["source"] for g in remote} == {"gossip"}
    assert all(g["uuid"].startswith("GPU-") and g["memory_total"] > 0 and g["state_age_seconds"] >= 0 for g in remote)

    # Remote GPUs are visible, not schedulable: agent 1 places on its own GPUs
    # only, and refuses what only the cluster as a whole could hold.
    allocator = cluster.agents[1]
    alloc = httpx.post(allocator.url + "/gpu/allocate", json={"service_name": "svc", "gpu_count": 1}, timeout=5)
    assert alloc.status_code == 200 and alloc.json()["node"] == NAMES[1]
    too_big = httpx.post(
        allocator.url + "/gpu/allocate",
        json={"service_name": "svc", "gpu_count": GPUS_PER_AGENT + 1, "queue": False},
        timeout=5,
    )
    assert too_big.status_code == 400
    # The lease reaches the others through gossip metadata.
    index = alloc.json()["gpu_ids"][0]

    def leased_seen_by_agent_4() -> bool:
        rows = get(agent, "/gpu/status")["gpus"]
        return any(g["node"] == NAMES[1] and g["index"] == index and g["allocated"] for g in rows)

    wait_for(leased_seen_by_agent_4, timeout=10.0)
    released = httpx.post(allocator.url + "/gpu/release", json={"allocation_id": alloc.json()["id"]}, timeout=5)
    assert released.status_code == 200


def test_3_a_killed_agent_is_marked_dead_by_the_other_four(cluster: Cluster) -> None:
    victim = cluster.agents[3]
    before = members(cluster.agents[0])[NAMES[3]]["incarnation"]
    victim.kill()
    for agent in cluster.live():
        wait_for(lambda: statuses(agent).get(NAMES[3]) == "dead", timeout=DEAD_TIMEOUT_S)
    # GPUs of a dead member are no longer listed cluster-wide.
    assert all(g["node"] != NAMES[3] for g in get(cluster.agents[0], "/gpu/status")["gpus"])
    cluster.dead_incarnation = before  # type: ignore[attr-defined]


def test_4_the_restarted_agent_rejoins_alive_everywhere(cluster: Cluster) -> None:
    victim = cluster.agents[3]
    victim.start()  # same name, data dir and ports
    everyone_alive = dict.fromkeys(NAMES, "alive")
    for agent in cluster.live():
        wait_for(lambda: statuses(agent) == everyone_alive, timeout=FORM_TIMEOUT_S)
    seen = members(cluster.agents[0])[NAMES[3]]
    assert seen["incarnation"] > getattr(cluster, "dead_incarnation", -1)
    nodes = {g["node"] for g in get(cluster.agents[0], "/gpu/status")["gpus"]}
    assert nodes == set(NAMES)


def test_5_agents_without_the_right_key_are_never_admitted(cluster: Cluster, tmp_path: Path) -> None:
    seed = cluster.agents[0]
    decrypt_before = counter(seed, "gpu_orchestrator_gossip_dropped_packets_total", reason="decrypt")
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(generate_key() + "\n")
    wrong_key.chmod(0o600)
    intruders = [
        AgentProcess(
            data_dir=tmp_path / name,
            host="127.0.0.7" if name == "wrong-key" else "127.0.0.8",
            node_name=name,
            simulate="1xH100-80GB",
            join=[seed.gossip_address],
            extra_args=["--config", str(write_config(tmp_path / f"{name}.toml", key))],
        )
        for name, key in (("wrong-key", wrong_key), ("no-key", None))
    ]
    try:
        for intruder in intruders:
            intruder.start()
        wait_for(
            lambda: counter(seed, "gpu_orchestrator_gossip_dropped_packets_total", reason="decrypt")
            >= decrypt_before + 4,
            timeout=10.0,
        )
        time.sleep(2.0)  # several join retries and probe rounds
        for agent in cluster.live():
            assert set(statuses(agent)) == set(NAMES)
        for intruder in intruders:
            assert set(statuses(intruder)) == {intruder.node_name}
    finally:
        for intruder in intruders:
            intruder.kill()


def _sealed(ring: Keyring, payload: bytes, aad: bytes) -> bytes:
    return ring.seal(payload, aad)


def test_6_garbage_datagrams_and_frames_are_dropped_and_counted(cluster: Cluster) -> None:
    target = cluster.agents[2]
    address = (target.host, target.gossip_port)
    ring = Keyring([decode_key(cluster.key)])
    rng = random.Random(2024)
    metric = "gpu_orchestrator_gossip_dropped_packets_total"
    before = {reason: counter(target, metric, reason=reason) for reason in ("decrypt", "malformed", "oversized")}

    valid = encode_header("fuzzer", 0) + encode_message(Ping(7, NAMES[2])) + encode_message(
        Alive(1, "fuzzer", ("127.0.0.9", 1), b"m" * 100)
    )
    random_garbage = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 1400))) for _ in range(1500)]
    sealed_garbage = [_sealed(ring, g, UDP_AAD) for g in random_garbage[:1000]]
    truncated = [_sealed(ring, valid[: rng.randrange(0, len(valid))], UDP_AAD) for _ in range(300)]
    oversized = [bytes(rng.getrandbits(8) for _ in range(3000)) for _ in range(200)]
    def dropped() -> float:
        return sum(counter(target, metric, reason=reason) - before[reason] for reason in before)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        sent = 0
        for batch, chunk in ((random_garbage, 50), (sealed_garbage, 50), (truncated, 50), (oversized, 20)):
            for start in range(0, len(batch), chunk):
                for datagram in batch[start : start + chunk]:
                    udp.sendto(datagram, address)
                sent += len(batch[start : start + chunk])
                # Paced by the agent's own count, not by a sleep: the next chunk goes once
                # most of this one was read, so a busy machine (the agent descheduled for
                # a while) does not overflow the socket's receive buffer.
                wait_for(lambda: dropped() >= 0.8 * sent, timeout=10.0)

    def tcp(frame: bytes) -> None:
        with socket.create_connection(address, timeout=2.0) as conn:
            try:
                conn.sendall(frame)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(65536)
            except OSError:
                pass

    for _ in range(20):
        tcp(struct.pack(">I", 100) + bytes(rng.getrandbits(8) for _ in range(100)))  # does not open
        tcp(struct.pack(">I", 500) + b"short")  # truncated
        tcp(struct.pack(">I", 1 << 31))  # declares far more than allowed
        body = _sealed(ring, bytes(rng.getrandbits(8) for _ in range(200)), TCP_AAD)
        tcp(struct.pack(">I", len(body)) + body)  # opens, is no state

    def after(reason: str) -> float:
        return counter(target, metric, reason=reason) - before[reason]

    # Kernel buffers may lose a few datagrams under the burst; most must be seen.
    wait_for(lambda: after("decrypt") >= 0.8 * 1500 + 20, timeout=10.0)
    wait_for(lambda: after("malformed") >= 0.8 * 1000 + 40, timeout=10.0)
    wait_for(lambda: after("oversized") >= 0.8 * 200 + 20, timeout=10.0)
    assert httpx.get(target.url + "/healthz", timeout=5.0).json()["status"] == "ok"
    assert target.proc is not None and target.proc.poll() is None
    # And it is still a member in good standing.
    assert statuses(cluster.agents[0])[NAMES[2]] == "alive"
    assert "fuzzer" not in statuses(target)
