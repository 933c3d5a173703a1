"""Topology-aware placement through real agents on simulated hosts wired like real ones.

Two lone agents on loopback: one on `--simulate pcie-nvlink-pairs` (four H100
NVL, NVLink bridges joining 0-1 and 2-3), one on `--simulate hgx-h100` (eight
H100 behind NVSwitches, two sockets). Each reads its topology through the
device layer at start, the inventory hands it to placement, and the
allocation says how its GPUs are wired. The leader's metrics and `gpuctl
status` show the largest request each node can still take.

Then a cluster of one server and a client on `--simulate pcie-2socket`: the
client's topology reaches the leader by gossip, a pair takes one PCIe switch,
and a 4-GPU request after it takes the other socket whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import gpuctl
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def pairs(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(data_dir=tmp_path / "pairs", host="127.0.0.125", node_name="pairs", simulate="pcie-nvlink-pairs")
    yield agent.start()
    agent.kill()


@pytest.fixture
def hgx(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(data_dir=tmp_path / "hgx", host="127.0.0.126", node_name="hgx", simulate="hgx-h100")
    yield agent.start()
    agent.kill()


def allocate(agent: AgentProcess, gpus: int, service: str = "trainer") -> dict[str, Any]:
    response = httpx.post(f"{agent.url}/gpu/allocate", json={"service_name": service, "gpu_count": gpus}, timeout=10)
    assert response.status_code == 200, response.text
    alloc: dict[str, Any] = response.json()
    return alloc


def largest_requests(agent: AgentProcess) -> dict[tuple[str, ...], float]:
    """The leader's largest-request gauges: (node, shape) or (shape,) -> GPUs."""
    text = httpx.get(f"{agent.url}/metrics", timeout=10).text
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gpu_orchestrator_node_largest_request_gpus":
                found[(sample.labels["node"], sample.labels["shape"])] = sample.value
            elif sample.name == "gpu_orchestrator_cluster_largest_request_gpus":
                found[(sample.labels["shape"],)] = sample.value
    return found


def test_a_pair_gets_a_bridged_pair_and_says_so(pairs: AgentProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert largest_requests(pairs) == {("pairs", "gpus"): 4, ("pairs", "nvlink"): 2, ("gpus",): 4, ("nvlink",): 2}

    first = allocate(pairs, 2)
    assert first["gpu_ids"] == [0, 1]
    assert first["topology"] == {"score": 300, "links": "NV12", "numa_node": 0, "cpu_list": "0-31"}
    # What a lease is shown with later reads the same.
    shown = httpx.get(f"{pairs.url}/gpu/allocations/{first['allocation_id']}", timeout=10).json()
    assert shown["topology"] == first["topology"]

    # The other bridge is still whole, and the leader says so.
    assert largest_requests(pairs) == {("pairs", "gpus"): 2, ("pairs", "nvlink"): 2, ("gpus",): 2, ("nvlink",): 2}
    second = allocate(pairs, 2, service="other")
    assert second["gpu_ids"] == [2, 3] and second["topology"]["links"] == "NV12"

    httpx.post(f"{pairs.url}/gpu/release", json={"allocation_id": first["allocation_id"]}, timeout=10).raise_for_status()
    assert gpuctl.main(["--address", pairs.url, "status"]) == 0
    out = capsys.readouterr().out
    assert "largest request now: 2 GPU(s), 2 all-NVLink" in out
    assert gpuctl.main(["--address", pairs.url, "show", second["allocation_id"]]) == 0
    assert "NV12 (score 300), NUMA 0, CPUs 0-31" in capsys.readouterr().out


def test_four_gpus_on_hgx_get_an_nvlink_set_on_one_socket(hgx: AgentProcess, capsys: pytest.CaptureFixture[str]) -> None:
    quad = allocate(hgx, 4)

    assert quad["gpu_ids"] == [0, 1, 2, 3]
    assert quad["topology"] == {"score": 6 * 450, "links": "NV18", "numa_node": 0, "cpu_list": "0-55,112-167"}
    assert largest_requests(hgx)[("hgx", "nvlink")] == 4

    assert gpuctl.main(["--address", hgx.url, "status", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "largest request now: 4 GPU(s), 4 all-NVLink" in out
    status = httpx.get(f"{hgx.url}/gpu/status?summary=true", timeout=10).json()
    assert status["nodes"][0]["largest_request"] == {"gpus": 4, "nvlink": 4, "mig": None, "share_mb": 81559}


def test_a_client_s_topology_reaches_the_leader_by_gossip(tmp_path: Path) -> None:
    server, client = cluster_agents(
        tmp_path, ["127.0.0.127", "127.0.0.128"], ["topo-server", "topo-client"], servers=1,
        simulate=["1xL4-24GB", "pcie-2socket"],
    )
    try:
        start_together([server, client])

        def client_known() -> dict[str, Any] | None:
            nodes = httpx.get(f"{server.url}/gpu/status?summary=true", timeout=10).json()["nodes"]
            return next((n for n in nodes if n["node"] == "topo-client" and n["largest_request"]["nvlink"]), None)

        # No NVLink on L40S: the largest all-NVLink set is one GPU, and only a known topology says so.
        largest = wait_for(client_known, timeout=20)["largest_request"]
        assert largest == {"gpus": 8, "nvlink": 1, "mig": None, "share_mb": 46068}
        on_client = {"service_name": "trainer", "constraints": {"node": "topo-client"}}
        pair = httpx.post(f"{server.url}/gpu/allocate", json={**on_client, "gpu_count": 2}, timeout=20).json()
        quad = httpx.post(f"{server.url}/gpu/allocate", json={**on_client, "gpu_count": 4}, timeout=20).json()
    finally:
        server.kill()
        client.kill()

    assert pair["gpu_ids"] == [0, 1]
    assert pair["topology"] == {"score": 16, "links": "PIX", "numa_node": 0, "cpu_list": "0-31,64-95"}
    # By index the quad would be 2-5, across the sockets; it takes the other socket whole.
    assert quad["gpu_ids"] == [4, 5, 6, 7]
    assert quad["topology"] == {"score": 56, "links": "NODE", "numa_node": 1, "cpu_list": "32-63,96-127"}
