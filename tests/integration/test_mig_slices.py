"""MIG slices through real agents on simulated A100s in MIG mode (docs/shapes.md#mig-slices).

A lone agent on `--simulate "A100-80GB:mig=3g.40gb/2g.20gb/1g.10gb/1g.10gb,H100-80GB"`:
the A100's four GPU instances are leased one by one, by profile or by memory
("auto"), each allocation carrying its MIG UUID ready for CUDA_VISIBLE_DEVICES;
the H100 stays for whole-GPU requests; bad requests get a 400 that changes
nothing; /gpu/status shows which instance is whose.

Then a server with whole GPUs and a client whose GPU is in MIG mode: the
client's slices reach the leader by gossip and a slice request lands there.
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
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

FLEET = "A100-80GB:mig=3g.40gb/2g.20gb/1g.10gb/1g.10gb,H100-80GB"


@pytest.fixture
def mig(tmp_path: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(data_dir=tmp_path / "mig", host="127.0.0.130", node_name="mig-host", simulate=FLEET)
    yield agent.start()
    agent.kill()


def post(agent: AgentProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{agent.url}/gpu/allocate", json={"service_name": "infer", **body}, timeout=10)


def test_slices_leased_by_profile_and_by_memory(mig: AgentProcess) -> None:
    small = post(mig, {"mig_profile": "1g.10gb"})
    assert small.status_code == 200, small.text
    alloc = small.json()
    assert alloc["gpu_ids"] == [1002] and alloc["cuda_visible_devices"].startswith("MIG-")
    assert alloc["mig"]["profile"] == "1g.10gb"
    assert alloc["mig"]["instance_uuids"] == [alloc["cuda_visible_devices"]]
    assert alloc["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    assert alloc["gpus"][0]["memory_total_mb"] == 9728
    assert alloc["requirements"]["mig_profile"] == "1g.10gb"

    # By memory: 15 GB fits the 2g.20gb first (the other 1g.10gb is too small).
    mid = post(mig, {"mig_profile": "auto", "min_memory_mb": 15000}).json()
    assert mid["mig"]["profile"] == "2g.20gb" and mid["gpu_ids"] == [1001]
    # A whole GPU is the H100, never a slice.
    whole = post(mig, {"gpu_count": 1}).json()
    assert whole["gpu_ids"] == [1] and whole["mig"] is None and whole["cuda_visible_devices"].startswith("GPU-")

    status = httpx.get(f"{mig.url}/gpu/status", timeout=10).json()["gpus"]
    a100 = next(g for g in status if g["index"] == 0)
    instances = {i["index"]: i for i in a100["mig_instances"]}
    assert [i["profile"] for i in a100["mig_instances"]] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    assert instances[1002]["allocation_id"] == alloc["allocation_id"]
    assert instances[1002]["uuid"] == alloc["cuda_visible_devices"]
    assert instances[1001]["allocated_to"] == "infer" and not instances[1000]["allocated"]

    # Its slices' work runs on the GPU: leased slices are no unleased use of it.
    def a100_busy() -> dict[str, Any] | None:
        rows = httpx.get(f"{mig.url}/gpu/status", timeout=10).json()["gpus"]
        row = next(g for g in rows if g["index"] == 0)
        return row if row["processes"] else None

    assert wait_for(a100_busy, timeout=10)["in_use_without_lease"] is False
    allocated = {
        sample.labels["gpu"]: sample.value
        for family in text_string_to_metric_families(httpx.get(f"{mig.url}/metrics", timeout=10).text)
        for sample in family.samples
        if sample.name == "gpu_orchestrator_gpu_allocated"
    }
    assert allocated == {"0": 1.0, "1": 1.0}  # the A100 by its slices, the H100 whole

    # Released, the slice serves the next request of its profile.
    released = httpx.post(f"{mig.url}/gpu/release", json={"allocation_id": alloc["allocation_id"]}, timeout=10)
    assert released.status_code == 200
    again = post(mig, {"mig_profile": "1g.10gb"}).json()
    assert again["gpu_ids"] in ([1002], [1003])


def test_bad_slice_requests_are_refused_and_change_nothing(mig: AgentProcess) -> None:
    before = httpx.get(f"{mig.url}/gpu/list", timeout=10).json()
    missing = post(mig, {"mig_profile": "7g.80gb"})
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert error["code"] == "unsatisfiable"
    assert "'7g.80gb'" in error["message"] and "1g.10gb" in error["message"] and "3g.40gb" in error["message"]
    two = post(mig, {"mig_profile": "1g.10gb", "gpu_count": 2})
    assert two.status_code == 400 and "exactly one slice" in two.json()["error"]["message"]
    bogus = post(mig, {"mig_profile": "lots"})
    assert bogus.status_code == 400 and bogus.json()["error"]["code"] == "invalid_request"
    too_big = post(mig, {"mig_profile": "auto", "min_memory_mb": 50000})
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "unsatisfiable"
    after = httpx.get(f"{mig.url}/gpu/list", timeout=10).json()
    assert after["allocations"] == before["allocations"] == [] and after["queue"] == before["queue"] == []
    # Busy slices queue (202) like GPUs do, and queue=false says 409.
    for _ in range(2):
        assert post(mig, {"mig_profile": "1g.10gb"}).status_code == 200
    assert post(mig, {"mig_profile": "1g.10gb", "queue": False}).status_code == 409
    assert post(mig, {"mig_profile": "1g.10gb"}).status_code == 202


def test_a_client_s_slices_reach_the_leader_by_gossip(tmp_path: Path) -> None:
    server, client = cluster_agents(
        tmp_path, ["127.0.0.131", "127.0.0.132"], ["mig-server", "mig-client"], servers=1,
        simulate=["1xL4-24GB", "A100-80GB:mig=3g.40gb/3g.40gb"],
    )
    try:
        start_together([server, client])

        def slice_request() -> dict[str, Any] | None:
            response = httpx.post(
                f"{server.url}/gpu/allocate",
                json={"service_name": "infer", "mig_profile": "3g.40gb", "queue": False},
                timeout=20,
            )
            return response.json() if response.status_code == 200 else None

        # Until the client's metadata arrives the profile is unknown (400), then it is placed.
        alloc = wait_for(slice_request, timeout=30)
        shown = httpx.get(f"{client.url}/gpu/allocations/{alloc['allocation_id']}", timeout=10)
        status = httpx.get(f"{client.url}/gpu/status", timeout=10).json()["gpus"]
        # The leader lists the client's GPU once, with its slices (from gossip), none as a GPU.
        on_leader = httpx.get(f"{server.url}/gpu/status?node=mig-client", timeout=10).json()["gpus"]
    finally:
        server.kill()
        client.kill()

    assert alloc["node"] == "mig-client" and alloc["gpu_ids"] == [1000]
    assert alloc["cuda_visible_devices"].startswith("MIG-")
    parent = next(g for g in status if g["node"] == "mig-client" and g["index"] == 0)
    assert alloc["mig"]["gpu_uuids"] == [parent["uuid"]]
    assert alloc["cuda_visible_devices"] == parent["mig_instances"][0]["uuid"]
    assert shown.status_code == 200 and shown.json()["mig"] == alloc["mig"]
    assert [g["index"] for g in on_leader] == [0]
    assert [(i["index"], i["profile"], i["allocated"]) for i in on_leader[0]["mig_instances"]] == [
        (1000, "3g.40gb", True),
        (1001, "3g.40gb", False),
    ]
    assert on_leader[0]["mig_instances"][0]["allocation_id"] == alloc["allocation_id"]


def documented_requests(section: str) -> list[tuple[dict[str, Any], str]]:
    """The allocate bodies of one `### …` part of docs/shapes.md's MIG section, with each line's comment."""
    text = (Path(__file__).parents[2] / "docs" / "shapes.md").read_text()
    part = text[text.index(f"### {section}") :]
    part = part[: part.index("\n### ", 4)]
    found = []
    for line in part.splitlines():
        if "/gpu/allocate -d '" in line:
            body = line.split(" -d '", 1)[1].split("'", 1)[0]
            found.append((json.loads(body), line.partition("#")[2].strip()))
    return found


def test_the_documented_examples_work(mig: AgentProcess) -> None:
    asked = documented_requests("Asking for a slice")
    assert len(asked) == 3
    for body, _ in asked:
        assert httpx.post(f"{mig.url}/gpu/allocate", json=body, timeout=10).status_code == 200, body
    for alloc in httpx.get(f"{mig.url}/gpu/list", timeout=10).json()["allocations"]:
        httpx.post(f"{mig.url}/gpu/release", json={"allocation_id": alloc["allocation_id"]}, timeout=10)

    tried = documented_requests("Try it")
    assert [comment for _, comment in tried] == ["unit 1002", "2g.20gb, unit 1001", "the H100, GPU 1"]
    got = [httpx.post(f"{mig.url}/gpu/allocate", json=body, timeout=10).json() for body, _ in tried]
    assert [(a["gpu_ids"], (a["mig"] or {}).get("profile")) for a in got] == [
        ([1002], "1g.10gb"),
        ([1001], "2g.20gb"),
        ([1], None),
    ]


def test_gpuctl_asks_for_a_slice(mig: AgentProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpuctl.main(["--address", mig.url, "--json", "allocate", "--service", "embed", "--mig-profile", "1g.10gb"]) == 0
    alloc = json.loads(capsys.readouterr().out)
    assert alloc["mig"]["profile"] == "1g.10gb" and alloc["cuda_visible_devices"].startswith("MIG-")
    assert gpuctl.main(["--address", mig.url, "allocate", "--service", "embed", "--mig-profile", "4g.40gb"]) == 1
    assert "unsatisfiable" in capsys.readouterr().err
    # The status table lists each slice under its GPU, with its holder.
    assert gpuctl.main(["--address", mig.url, "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    a100 = next(i for i, line in enumerate(lines) if "A100" in line)
    assert "(MIG)" in lines[a100]
    slices = lines[a100 + 1 : a100 + 5]
    assert [line.split()[1:4] for line in slices] == [
        ["1000", "MIG", "3g.40gb"], ["1001", "MIG", "2g.20gb"], ["1002", "MIG", "1g.10gb"], ["1003", "MIG", "1g.10gb"],
    ]
    assert "embed" in slices[2] and alloc["allocation_id"] in slices[2] and "embed" not in slices[3]
    assert "2 GPU(s) on 1 node(s), 1 leased" in lines


def test_workload_analysis_answers_as_allocate_would(mig: AgentProcess) -> None:
    body = {"workload_type": "training", "workload_data": {"model_size": "large"}, "mig_profile": "3g.40gb"}
    analysis = httpx.post(f"{mig.url}/gpu/workload", json=body, timeout=10).json()
    assert (analysis["required_gpus"], analysis["min_memory_mb"]) == (1, 0)
