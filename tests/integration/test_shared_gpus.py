"""Shares of a GPU through a real agent (docs/shapes.md#shared-gpus-by-memory).

A lone agent on 4 simulated H100s (127.0.0.140) whose file names MPS directories
and a queue that allows no shares: shares pack onto one GPU up to its memory,
the next opens another, the answer carries the budget and the MPS hints, the
queue counts each shared GPU once, the metrics show the shares, bad requests
get a 400 or 403 that changes nothing, and the last share's release frees the GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import gpuctl
from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOST = "127.0.0.140"
CONFIG = """
[agent]
mps_pipe_directory = "/run/nvidia-mps"
mps_log_directory = "/var/log/nvidia-mps"

[queues.solo]
allow_shares = false
services = ["trainer"]
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    process = AgentProcess(
        data_dir=tmp_path / "data", host=HOST, simulate="4xH100-80GB", extra_args=["--config", str(config)]
    ).start()
    yield process
    process.kill()


def allocate(agent: AgentProcess, **body: Any) -> httpx.Response:
    return httpx.post(agent.url + "/gpu/allocate", json={"service_name": "embedder", **body}, timeout=10.0)


def queues_of(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    return {q["name"]: q for q in httpx.get(agent.url + "/queues", timeout=10.0).json()["queues"]}


def share_gauges(agent: AgentProcess) -> dict[str, dict[str, float]]:
    families = text_string_to_metric_families(httpx.get(agent.url + "/metrics", timeout=10.0).text)
    gauges: dict[str, dict[str, float]] = {}
    for family in families:
        if family.name.startswith("gpu_orchestrator_gpu_share"):
            for sample in family.samples:
                gauges.setdefault(sample.name, {})[sample.labels["gpu"]] = sample.value
    return gauges


def test_shares_pack_report_their_budget_and_free_the_gpu(agent: AgentProcess) -> None:
    wait_for(lambda: queues_of(agent).get("solo", {}).get("declared"), timeout=20.0)
    first = allocate(agent, sharing="shared", gpu_memory_mb=30_000)
    assert first.status_code == 200, first.text
    one = first.json()
    total = one["gpus"][0]["memory_total_mb"]
    assert one["shared"] == {
        "gpu_memory_mb": 30_000,
        "gpu_memory_total_mb": total,
        "cross_queue": False,
        "co_tenants": 0,
        "mps": {
            "CUDA_MPS_PIPE_DIRECTORY": "/run/nvidia-mps",
            "CUDA_MPS_LOG_DIRECTORY": "/var/log/nvidia-mps",
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=30000M",
        },
    }
    assert one["cuda_visible_devices"] == one["gpus"][0]["uuid"]
    two = allocate(agent, sharing="shared", gpu_memory_mb=30_000).json()
    assert two["cuda_visible_devices"] == one["cuda_visible_devices"] and two["shared"]["co_tenants"] == 1
    # 60,000 MB promised: another 30,000 does not fit this GPU and opens a second.
    three = allocate(agent, sharing="shared", gpu_memory_mb=30_000).json()
    assert three["cuda_visible_devices"] != one["cuda_visible_devices"]
    seen = httpx.get(f"{agent.url}/gpu/allocations/{one['allocation_id']}", timeout=10.0).json()
    assert seen["shared"]["co_tenants"] == 1

    # The queue counts each shared GPU once; the shared GPUs are held for whole-GPU work.
    assert queues_of(agent)["default"]["in_use_gpus"] == 2
    whole = allocate(agent, gpu_count=3, queue=False)
    assert whole.status_code == 409, whole.text
    gauges = wait_for(lambda: (g := share_gauges(agent)).get("gpu_orchestrator_gpu_shares", {}).get(str(one["gpu_ids"][0])) == 2 and g, timeout=10.0)
    index = str(one["gpu_ids"][0])
    assert gauges["gpu_orchestrator_gpu_share_budget_bytes"][index] == 60_000 * 1024 * 1024
    assert index in gauges["gpu_orchestrator_gpu_share_over_budget"]

    for alloc in (one, two, three):
        released = httpx.post(agent.url + "/gpu/release", json={"allocation_id": alloc["allocation_id"]}, timeout=10.0)
        assert released.status_code == 200, released.text
    assert queues_of(agent)["default"]["in_use_gpus"] == 0
    assert allocate(agent, gpu_count=4, queue=False).status_code == 200


def test_bad_shares_are_refused_and_change_nothing(agent: AgentProcess) -> None:
    wait_for(lambda: queues_of(agent).get("solo", {}).get("declared"), timeout=20.0)
    for body in (
        {"sharing": "shared"},
        {"gpu_memory_mb": 1000},
        {"sharing": "shared", "gpu_memory_mb": 1000, "gpu_count": 2},
        {"sharing": "shared", "gpu_memory_mb": 1000, "nodes": 2, "gpus_per_node": 1},
    ):
        answer = allocate(agent, **body)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_share", answer.text
    refused = httpx.post(
        agent.url + "/gpu/allocate",
        json={"service_name": "trainer", "sharing": "shared", "gpu_memory_mb": 1000},
        timeout=10.0,
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "sharing_not_allowed"
    assert "'solo'" in refused.json()["error"]["message"]
    too_big = allocate(agent, sharing="shared", gpu_memory_mb=10**6)
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "unsatisfiable"
    assert httpx.get(agent.url + "/gpu/list", timeout=10.0).json()["allocations"] == []
    assert queues_of(agent)["solo"]["allow_shares"] is False


def test_gpuctl_asks_for_a_share(agent: AgentProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpuctl.main(["--address", agent.url, "--json", "allocate", "--service", "embed", "--share-mb", "8000"]) == 0
    alloc = json.loads(capsys.readouterr().out)
    assert alloc["shared"]["gpu_memory_mb"] == 8000
