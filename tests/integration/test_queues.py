"""Queues through a real agent: the configured policy becomes the cluster's, requests are held to it.

One lone agent (4 simulated H100s, 127.0.0.110) whose file declares two queues:
`research` (guarantee 4 GPUs, priority ceiling 8) for the service `trainer`,
and `batch` (no guarantee; its preempted leases get 1 s of grace) for `etl`. It leads, so it
proposes its policy at once; the scenarios check what the API then says and
does: GET /queues, the 403 above a ceiling, why queued requests wait, a
guarantee taken back by preemption, and a SIGHUP that changes the queues (and
one whose file is broken, which changes nothing).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent import gpuctl
from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOST = "127.0.0.110"
QUEUES = """
[queues.research]
guaranteed_gpus = 4
max_priority = 8
preemption_grace_s = 1
services = ["trainer"]

[queues.batch]
preemption_grace_s = 1
services = ["etl"]
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    config = tmp_path / "agent.toml"
    config.write_text(QUEUES)
    process = AgentProcess(
        data_dir=tmp_path / "data", host=HOST, simulate="4xH100-80GB", extra_args=["--config", str(config)]
    ).start()
    yield process
    process.kill()


def queues_of(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    doc = httpx.get(agent.url + "/queues", timeout=10.0).json()
    return {q["name"]: q for q in doc["queues"]}


def declared(agent: AgentProcess, *names: str) -> dict[str, dict[str, Any]] | None:
    """The queues once the leader's policy (declaring `names`) is in force, else None."""
    queues = queues_of(agent)
    return queues if all(queues.get(n, {}).get("declared") for n in names) else None


def allocate(agent: AgentProcess, **body: Any) -> httpx.Response:
    return httpx.post(agent.url + "/gpu/allocate", json=body, timeout=10.0)


def test_queues_ceiling_reasons_and_a_guarantee_taken_back(agent: AgentProcess) -> None:
    queues = wait_for(lambda: declared(agent, "research", "batch"), timeout=20.0)
    research = queues["research"]
    assert (research["guaranteed_gpus"], research["max_priority"], research["services"]) == (4, 8, ["trainer"])
    assert research["in_use_gpus"] == 0 and queues["default"]["declared"] is False

    # Above the ceiling: refused, naming the limit; nothing is queued or held.
    refused = allocate(agent, service_name="trainer", gpu_count=1, priority=9)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "priority_ceiling" and "max_priority 8" in error["message"]
    # Not preemptible needs a guarantee: batch has none.
    refused = allocate(agent, service_name="etl", gpu_count=1, preemptible=False)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "preemptible_without_guarantee"

    # batch borrows the whole fleet (research's guarantee is idle and lendable).
    borrowed = allocate(agent, service_name="etl", gpu_count=4, request_id="etl-1")
    assert borrowed.status_code == 200, borrowed.text
    assert borrowed.json()["queue_name"] == "batch"
    wait_for(lambda: queues_of(agent)["batch"]["in_use_gpus"] == 4)

    # A second batch request waits; the listing says why, in a word and in words.
    waiting = allocate(agent, service_name="etl", gpu_count=1, request_id="etl-2")
    assert waiting.status_code == 202, waiting.text
    assert waiting.json()["reason"] is not None and waiting.json()["queue_name"] == "batch"
    listing = httpx.get(agent.url + "/gpu/list", timeout=10.0).json()
    [item] = [q for q in listing["queue"] if q["request_id"] == "etl-2"]
    assert item["reason"] in ("queue_quota", "priority", "resources", "reservation") and item["reason_detail"]
    assert item["preempting_deadline"] is None

    # research claims its guarantee: batch's lease is preempted (1 s of grace) and research placed.
    claim = allocate(agent, service_name="trainer", gpu_count=2, request_id="train-1")
    assert claim.status_code == 202, claim.text

    def preempted() -> dict[str, Any] | None:
        record = httpx.get(agent.url + "/gpu/requests/etl-1", timeout=10.0).json()
        return record if record["status"] != "allocated" else None

    record = wait_for(preempted, timeout=20.0)
    assert (record["status"], record["reason"]) == ("released", "preempted")
    placed = wait_for(
        lambda: (r := httpx.get(agent.url + "/gpu/requests/train-1", timeout=10.0).json())["status"] == "allocated" and r,
        timeout=20.0,
    )
    assert placed["allocation"]["queue_name"] == "research"
    metrics = httpx.get(agent.url + "/metrics", timeout=10.0).text
    assert re.search(r'^gpu_orchestrator_preemptions_total\{queue="batch",reason="reclaim"\} 1\.0$', metrics, re.M)
    assert re.search(r'^gpu_orchestrator_scheduling_outcomes_total\{outcome="lease_preempted"\} 1\.0$', metrics, re.M)
    assert re.search(r'^gpu_orchestrator_queue_guaranteed_gpus\{queue="research"\} 4\.0$', metrics, re.M)
    assert re.search(r'^gpu_orchestrator_queue_gpus_in_use\{queue="research"\} 2\.0$', metrics, re.M)


def test_a_reload_changes_the_queues_and_a_broken_file_changes_nothing(
    agent: AgentProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for(lambda: declared(agent, "research", "batch"), timeout=20.0)
    config = tmp_path / "agent.toml"
    config.write_text(QUEUES + '\n[queues.vision]\nweight = 2\nservices = ["detector"]\n')
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    queues = wait_for(lambda: declared(agent, "research", "batch", "vision"), timeout=20.0)
    assert queues["vision"]["weight"] == 2.0
    assert allocate(agent, service_name="detector", gpu_count=1).json()["queue_name"] == "vision"

    config.write_text(QUEUES + '\n[queues.vision]\nweight = 0\n')  # refused: weight must be positive
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config NOT reloaded" in agent.log() and "weight must be a positive number" in agent.log())
    assert queues_of(agent)["vision"]["weight"] == 2.0
    # gpuctl queues shows the policy in force, the reloaded queue among them.
    assert gpuctl.main(["--address", agent.url, "queues"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    assert names == ["batch", "default", "research", "vision"]
