"""Random bytes at a running Raft server's two TCP ports: it stays up and counts every drop.

The decoders have their own hypothesis fuzzers (tests/unit/test_raft_messages.py,
tests/unit/test_swim_messages.py); this one aims at the wiring around them in a real
process: the Raft transport's frame reader and the gossip push-pull listener (plus
random UDP datagrams at the gossip port). Three encrypted Raft servers run on
loopback; the first is the target. Each connection carries at least a frame
header's worth of bytes, so each must end in exactly one counted drop (`oversized`
for an impossible length, `malformed` for a truncated frame, `decrypt` for a whole
frame that is not sealed with the cluster key). The counters are read from
/metrics, waited for, never slept for; the cluster must still have its leader after.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOST = "127.0.0.72"
EXAMPLES = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# Bytes as they come, or a well-formed length prefix around random bytes (so some
# frames are read whole and reach the decryption and the decoder).
raw_stream = st.binary(min_size=4, max_size=4096)
framed_stream = st.binary(max_size=2048).map(lambda body: struct.pack(">I", len(body)) + body)
streams = st.one_of(raw_stream, framed_stream)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    root: Path = tmp_path_factory.mktemp("wire-fuzz")
    agents = cluster_agents(root, [HOST] * 3, ["fuzz-0", "fuzz-1", "fuzz-2"], servers=3)
    try:
        start_together(agents)
        wait_for(lambda: _leader(agents[0]), timeout=30)
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def _leader(agent: AgentProcess) -> str | None:
    leader: str | None = httpx.get(f"{agent.url}/healthz", timeout=5).json()["leader"]
    return leader


def _dropped(agent: AgentProcess, series: str) -> int:
    text = httpx.get(f"{agent.url}/metrics", timeout=5).text
    return sum(int(float(v)) for v in re.findall(rf"^{series}_total\{{reason=\"\w+\"\}} (\S+)$", text, re.M))


def _send_tcp(port: int, data: bytes) -> None:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):  # until the server closes: it has read and judged the bytes
                pass
        except OSError:
            pass  # it may close (and reset) before reading all of an oversized frame


def _fuzz_tcp(agent: AgentProcess, port: int, series: str) -> None:
    before = _dropped(agent, series)
    sent = 0

    @EXAMPLES
    @given(streams)
    def throw(data: bytes) -> None:
        nonlocal sent
        _send_tcp(port, data)
        sent += 1

    throw()
    assert sent > 0
    wait_for(lambda: _dropped(agent, series) >= before + sent)
    assert httpx.get(f"{agent.url}/healthz", timeout=5).status_code == 200


def test_random_bytes_at_the_raft_port_are_dropped_and_counted(servers: list[AgentProcess]) -> None:
    target = servers[0]
    _fuzz_tcp(target, target.raft_port, "gpu_orchestrator_raft_transport_dropped")
    # The garbage cost no leader: the cluster still has one, and it answers writes.
    wait_for(lambda: _leader(target))
    allocation = httpx.post(f"{target.url}/gpu/allocate", json={"service_name": "after-fuzz", "gpu_count": 1}, timeout=10)
    assert allocation.status_code == 200, allocation.text


def test_random_bytes_at_the_gossip_push_pull_port_are_dropped_and_counted(servers: list[AgentProcess]) -> None:
    target = servers[0]
    _fuzz_tcp(target, target.gossip_port, "gpu_orchestrator_gossip_dropped_packets")


def test_random_datagrams_at_the_gossip_port_are_dropped_and_counted(servers: list[AgentProcess]) -> None:
    target = servers[0]
    before = _dropped(target, "gpu_orchestrator_gossip_dropped_packets")
    sent = 0

    @EXAMPLES
    @given(st.binary(min_size=1, max_size=2000))
    def throw(datagram: bytes) -> None:
        nonlocal sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(datagram, (HOST, target.gossip_port))
        sent += 1

    throw()
    wait_for(lambda: _dropped(target, "gpu_orchestrator_gossip_dropped_packets") >= before + sent)
    assert httpx.get(f"{target.url}/healthz", timeout=5).status_code == 200
