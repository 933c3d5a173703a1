"""gpuctl against real agents on loopback.

Each scenario starts an agent on simulated GPUs, drives it through
`agent.gpuctl.main([...])` in this process (stdout and stderr captured), and
checks the printed tables against what the HTTP API itself says. One scenario
runs the installed `gpuctl` console script in a subprocess, to prove the entry
point and the shell idiom `gpuctl allocate ... && run-job`.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from agent import gpuctl
from agent.api_keys import hash_key
from agent.gpuctl_render import render_status
from tests.agent_process import AgentProcess, free_port

pytestmark = pytest.mark.integration

StartAgent = Callable[..., AgentProcess]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # An operator's own settings must not leak into the scenarios.
    monkeypatch.delenv(gpuctl.ADDRESS_ENV, raising=False)
    monkeypatch.delenv(gpuctl.API_KEY_ENV, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """gpuctl's exit status, stdout and stderr for `argv`."""
    code = gpuctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[dict[str, str]]:
    """The first table in `out` as dicts by header (cells are two or more spaces apart)."""
    lines = out.strip().splitlines()
    headers = re.split(r"\s{2,}", lines[0].strip())
    rows = []
    for line in lines[1:]:
        if not line.strip():
            break
        rows.append(dict(zip(headers, re.split(r"\s{2,}", line.strip()))))
    return rows


def field(out: str, key: str) -> str:
    """The value of `key` in a key/value block."""
    match = re.search(rf"^{re.escape(key)}\s+(.*)$", out, re.MULTILINE)
    assert match, f"no {key!r} line in:\n{out}"
    return match.group(1)


def api_get(agent: AgentProcess, path: str, **kwargs: Any) -> Any:
    response = httpx.get(agent.url + path, **kwargs)
    response.raise_for_status()
    return response.json()


def test_allocate_shows_in_status_list_show_and_goes_on_release(
    start_agent: StartAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = start_agent()
    # The address as an operator would export it: host:port, no scheme.
    monkeypatch.setenv(gpuctl.ADDRESS_ENV, f"{agent.host}:{agent.port}")

    code, out, _ = run(capsys, "status")
    assert code == 0
    rows = table_rows(out)
    assert [(r["NODE"], r["IDX"]) for r in rows] == [("node-a", str(i)) for i in range(4)]
    assert all(r["MODEL"] == "NVIDIA H100 80GB HBM3" for r in rows)
    assert all(re.fullmatch(r"\d+\.\d/79\.6 GiB", r["MEMORY"]) for r in rows)
    assert all(r["HEALTH"] == "healthy" and r["LEASE"] == "-" for r in rows)
    assert "4 GPU(s) on 1 node(s), 0 leased" in out

    code, out, _ = run(
        capsys, "allocate", "--service", "trainer", "--gpus", "2", "--ttl", "1h", "--data", "workflow_id=wf-1"
    )
    assert code == 0
    alloc_id = field(out, "allocation")
    api_alloc = api_get(agent, f"/gpu/allocations/{alloc_id}")
    held = {str(i) for i in api_alloc["gpu_ids"]}
    assert len(held) == 2
    assert field(out, "cuda_visible_devices") == api_alloc["cuda_visible_devices"]
    assert field(out, "workflow") == "wf-1"

    code, out, _ = run(capsys, "status")
    for row in table_rows(out):
        leased = row["IDX"] in held
        assert row["LEASE"] == ("trainer" if leased else "-"), out
        assert row["ALLOCATION"] == (alloc_id if leased else "-"), out
    assert "2 leased" in out

    # The forms a 1,000-host cluster needs: counts per node, and one node's GPUs.
    code, out, _ = run(capsys, "status", "--summary")
    assert code == 0
    [node_row] = table_rows(out)
    assert (node_row["NODE"], node_row["GPUS"], node_row["LEASED"]) == ("node-a", "4", "2")
    assert "4 GPU(s) on 1 node(s), 2 leased" in out
    code, out, _ = run(capsys, "status", "--node", "node-a")
    assert code == 0 and len(table_rows(out)) == 4
    code, out, _ = run(capsys, "status", "--node", "elsewhere")
    assert code == 0 and out.strip() == "no GPUs"

    code, out, _ = run(capsys, "list")
    assert code == 0
    assert out.startswith("ALLOCATIONS (1)\n")
    [row] = table_rows(out.split("\n", 1)[1])
    assert row["ID"] == alloc_id and row["SERVICE"] == "trainer" and row["NODE"] == "node-a"
    assert row["GPUS"] == ",".join(str(i) for i in api_alloc["gpu_ids"])
    assert re.fullmatch(r"in (59m(\d\ds)?|1h)", row["EXPIRES"]), row
    assert "QUEUE (0)" in out

    code, out, _ = run(capsys, "renew", alloc_id, "--ttl", "2h")
    assert code == 0
    assert re.search(r"\(in (1h59m|2h)\)$", field(out, "expires_at")), out
    assert api_get(agent, f"/gpu/allocations/{alloc_id}")["expires_at"] > api_alloc["expires_at"]

    code, out, _ = run(capsys, "show", alloc_id)
    assert code == 0
    assert field(out, "service") == "trainer"
    assert field(out, "gpus").startswith(", ".join(str(i) for i in api_alloc["gpu_ids"]))

    code, out, _ = run(capsys, "request", api_alloc["request_id"])
    assert code == 0
    assert field(out, "status") == "allocated"
    assert field(out, "allocation") == alloc_id

    code, out, _ = run(capsys, "release", alloc_id)
    assert (code, out) == (0, f"released {alloc_id}\n")
    code, out, _ = run(capsys, "status")
    assert all(r["LEASE"] == "-" for r in table_rows(out))
    code, out, _ = run(capsys, "release", "--service", "trainer")
    assert (code, out) == (0, "nothing to release\n")


def test_analyze_members_leader_health(start_agent: StartAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent = start_agent(node_name="gpu-host-7")
    address = ["--address", agent.url]

    code, out, _ = run(capsys, *address, "analyze", "--type", "inference", "--data", "model_name=llama-3-70b")
    assert code == 0
    expected = httpx.post(
        agent.url + "/gpu/workload",
        json={"workload_type": "inference", "workload_data": {"model_name": "llama-3-70b"}},
    ).json()
    assert field(out, "gpus") == str(expected["required_gpus"])
    assert field(out, "memory_per_gpu").startswith(f"{expected['min_memory_mb']} MB")
    assert field(out, "decided_by") == "analyzer"
    assert "  - model_name 'llama-3-70b' -> 70B parameters" in out
    assert api_get(agent, "/gpu/list")["allocations"] == []  # analysing allocates nothing

    code, out, _ = run(capsys, *address, "members")
    assert code == 0
    [row] = table_rows(out)
    assert row["NAME"] == "gpu-host-7" and row["STATUS"] == "alive" and row["LEADER"] == "*"
    assert row["GPUS"] == "4"

    code, out, _ = run(capsys, *address, "leader")
    assert code == 0
    assert field(out, "leader") == "gpu-host-7 (this agent)"

    code, out, _ = run(capsys, *address, "health")
    assert code == 0
    assert field(out, "status") == "ok"
    assert field(out, "node") == "gpu-host-7"
    assert field(out, "devices").startswith("simulated, 4 GPU(s)")


def test_json_output_is_the_apis_json(start_agent: StartAgent, capsys: pytest.CaptureFixture[str]) -> None:
    agent = start_agent()
    address = ["--address", agent.url]

    code, out, _ = run(capsys, *address, "--json", "allocate", "--service", "svc", "--gpus", "1")
    assert code == 0
    allocated = json.loads(out)
    assert allocated == api_get(agent, f"/gpu/allocations/{allocated['allocation_id']}")
    assert out.startswith("{\n  ")  # indented for people, still one JSON document

    # --json works after the command too.
    code, out, _ = run(capsys, *address, "list", "--json")
    listed, api_list = json.loads(out), api_get(agent, "/gpu/list")
    assert listed["allocations"] == api_list["allocations"] == [allocated]
    assert listed["queue"] == api_list["queue"] == []
    # Telemetry moves between two reads; the lease columns do not.
    lease_fields = ("node", "index", "uuid", "allocated", "allocated_to", "allocation_id")
    _, out, _ = run(capsys, *address, "status", "--json")
    assert [{k: g[k] for k in lease_fields} for g in json.loads(out)["gpus"]] == [
        {k: g[k] for k in lease_fields} for g in api_list["gpus"]
    ]
    for command, path in (("members", "/cluster/members"), ("leader", "/cluster/leader")):
        _, out, _ = run(capsys, *address, "--json", command)
        assert json.loads(out) == api_get(agent, path)
    _, out, _ = run(capsys, *address, "--json", "show", allocated["allocation_id"])
    assert json.loads(out) == allocated
    _, out, _ = run(capsys, *address, "--json", "analyze", "--type", "training", "--data", "model_size=large")
    body = {"workload_type": "training", "workload_data": {"model_size": "large"}}
    assert json.loads(out) == httpx.post(agent.url + "/gpu/workload", json=body).json()
    _, out, _ = run(capsys, *address, "--json", "release", "--service", "svc")
    assert json.loads(out) == {"status": "released", "released": [allocated["allocation_id"]], "cancelled": []}


def test_queued_allocate_exits_4_and_no_queue_exits_1(
    start_agent: StartAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = start_agent(simulate="4xH100-80GB")
    address = ["--address", agent.url]
    assert run(capsys, *address, "allocate", "--service", "big", "--gpus", "4")[0] == 0

    code, out, _ = run(capsys, *address, "allocate", "--service", "small", "--gpus", "1", "--request-id", "wait-1")
    assert code == gpuctl.EXIT_QUEUED == 4
    assert out.startswith("queued: nothing is allocated yet\n")
    assert field(out, "position") == "1"
    assert "gpuctl request wait-1" in out
    code, out, _ = run(capsys, *address, "--json", "allocate", "--service", "small", "--request-id", "wait-2")
    assert code == 4 and json.loads(out) == api_get(agent, "/gpu/requests/wait-2")["queue"]
    assert run(capsys, *address, "release", "--request-id", "wait-2") == (0, "cancelled wait-2\n", "")

    code, out, _ = run(capsys, *address, "list")
    queue = out.split("QUEUE (1)\n", 1)[1]
    [row] = table_rows(queue)
    assert (row["POS"], row["REQUEST"], row["SERVICE"], row["GPUS"]) == ("1", "wait-1", "small", "1")

    code, out, _ = run(capsys, *address, "request", "wait-1")
    assert (code, field(out, "status"), field(out, "position")) == (0, "queued", "1")

    code, out, err = run(capsys, *address, "allocate", "--service", "small", "--gpus", "1", "--no-queue")
    assert code == 1 and out == ""
    assert err.startswith("error: no_capacity: "), err  # the API's 409 conflict

    code, out, _ = run(capsys, *address, "release", "--request-id", "wait-1")
    assert (code, out) == (0, "cancelled wait-1\n")
    code, out, _ = run(capsys, *address, "request", "wait-1")
    assert field(out, "status") == "cancelled"


def test_drain_keeps_new_leases_off_a_gpu_until_undrain(
    start_agent: StartAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = start_agent(simulate="2xH100-80GB")
    address = ["--address", agent.url]

    code, out, _ = run(capsys, *address, "drain", "node-a:1", "--reason", "fan swap")
    assert code == 0, out
    assert field(out, "gpu") == "node-a:1"
    assert field(out, "model") == "NVIDIA H100 80GB HBM3"
    assert field(out, "health") == "healthy"
    assert field(out, "drained") == "yes: fan swap"
    assert field(out, "lease") == "-"

    code, out, _ = run(capsys, *address, "status")
    assert [(r["IDX"], r["HEALTH"]) for r in table_rows(out)] == [("0", "healthy"), ("1", "healthy,drained")]
    assert "2 GPU(s) on 1 node(s), 0 leased, 1 drained\n  node-a:1 drained: fan swap\n" in out

    # Draining again, with a bare index (the agent answering's own GPU), and --json.
    code, out, _ = run(capsys, *address, "--json", "drain", "1", "--reason", "fan swap")
    assert code == 0
    row = json.loads(out)
    assert (row["node"], row["index"], row["drained"], row["drain_reason"]) == ("node-a", 1, True, "fan swap")
    [api_row] = [g for g in api_get(agent, "/gpu/status")["gpus"] if g["index"] == 1]
    assert api_row["drained"] and api_row["drain_reason"] == "fan swap"

    # Only one GPU of the node can take a lease now: a two-GPU request waits.
    code, out, _ = run(capsys, *address, "allocate", "--service", "big", "--gpus", "2", "--request-id", "big-1")
    assert code == gpuctl.EXIT_QUEUED, out

    code, out, _ = run(capsys, *address, "undrain", "1")
    assert code == 0
    assert (field(out, "gpu"), field(out, "drained")) == ("node-a:1", "no")

    deadline = time.monotonic() + 10
    while (record := json.loads(run(capsys, *address, "--json", "request", "big-1")[1]))["status"] == "queued":
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    assert record["status"] == "allocated"
    assert sorted(record["allocation"]["gpu_ids"]) == [0, 1]

    code, out, err = run(capsys, *address, "drain", "7")
    assert (code, out) == (1, "")
    assert err.startswith("error: not_found: "), err
    code, _, err = run(capsys, *address, "undrain", "other-node:0")
    assert code == 1 and err.startswith("error: not_found: "), err


def test_status_marks_unhealthy_drained_unleased_and_idle_gpus() -> None:
    def row(index: int, **fields: Any) -> dict[str, Any]:
        base = {
            "node": "n1", "index": index, "name": "H100", "memory_used": 1024, "memory_total": 81920,
            "utilization": 0.0, "temperature": 40.0, "health": "healthy", "health_reasons": [],
            "healthy_again_at": None, "drained": False, "drain_reason": None, "allocated": False,
            "allocated_to": None, "allocation_id": None, "in_use_without_lease": False, "lease_idle_seconds": 0.0,
        }
        return {**base, **fields}

    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    gpus = [
        row(0, allocated=True, allocated_to="svc", allocation_id="svc-1", lease_idle_seconds=300.4),
        row(1, allocated=True, allocated_to="svc", allocation_id="svc-1", lease_idle_seconds=59.0),
        row(2, in_use_without_lease=True, utilization=97.0),
        row(3, health="unhealthy", health_reasons=["XID 79", "GPU lost"],
            healthy_again_at="2027-01-15T08:04:10Z", drained=True, drain_reason="RMA"),
        row(4, health="degraded", health_reasons=["row remap pending: reset the GPU"]),
    ]
    out = render_status({"gpus": gpus}, now)
    rows = table_rows(out)
    assert [r["LEASE"] for r in rows] == ["svc (idle 5m)", "svc", "(unleased use)", "-", "-"]
    assert [r["HEALTH"] for r in rows] == ["healthy", "healthy", "healthy", "unhealthy,drained", "degraded"]
    assert out.split("\n\n", 1)[1] == (
        "5 GPU(s) on 1 node(s), 2 leased, 1 degraded, 1 unhealthy, 1 drained, 1 in use without a lease\n"
        "  n1:3 unhealthy: XID 79; GPU lost (healthy again in 4m10s if nothing new happens)\n"
        "  n1:3 drained: RMA\n"
        "  n1:4 degraded: row remap pending: reset the GPU"
    )


def test_api_errors_exit_1_with_code_and_message(
    start_agent: StartAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = start_agent()
    address = ["--address", agent.url]
    for argv in (["show", "no-such-id"], ["renew", "no-such-id"], ["release", "no-such-id"], ["request", "nope"]):
        code, out, err = run(capsys, *address, *argv)
        assert (code, out) == (1, ""), argv
        assert err.startswith("error: not_found: "), (argv, err)
    code, _, err = run(capsys, *address, "allocate", "--service", "svc", "--gpus", "40")
    assert code == 1 and err.startswith("error: unsatisfiable: ")
    code, _, err = run(capsys, *address, "allocate", "--service", "svc", "--priority", "11")
    assert code == 1 and err.startswith("error: invalid_request: ") and "priority" in err


def test_unreachable_agent_exits_3_naming_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens there
    code, out, err = run(capsys, "--address", f"127.0.0.1:{port}", "status")
    assert (code, out) == (3, "")
    assert f"http://127.0.0.1:{port}" in err

    # Accepts the connection (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        where = f"127.0.0.1:{silent.getsockname()[1]}"
        code, _, err = run(capsys, "--address", where, "--timeout", "0.3", "list")
    assert code == 3
    assert err == f"error: the agent at http://{where} did not answer within 0.3 s\n"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["allocate", "--gpus", "1"],  # --service is required
        ["allocate", "--service", "s", "--gpus", "two"],
        ["allocate", "--service", "s", "--data", "no-equals-sign"],
        ["allocate", "--service", "s", "--data-json", "[1, 2]"],
        ["allocate", "--service", "s", "--ttl", "soon"],
        ["release"],  # nothing named
        ["release", "a-1", "--service", "s"],  # two things named
        ["--timeout", "0", "status"],
        ["--address", "ftp://host", "status"],
        ["--api-key", "k", "--api-key-file", "/dev/null", "status"],
        ["--api-key-file", "/nonexistent/key", "status"],
        ["drain"],  # no GPU
        ["drain", "gpu-host-1"],  # a node alone is not a GPU
        ["drain", ":3"],
        ["drain", "gpu-host-1:x"],
        ["undrain", "3", "--reason", "undrain takes no reason"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--address", "127.0.0.1:9", *argv)
    assert code == 2, (out, err)
    assert out == "" and err


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for line in (
        "0  ok",
        "1  the API answered an error",
        "2  usage error",
        "3  agent unreachable",
        "4  allocate was queued",
        "5  authentication refused",
    ):
        assert line in out


def test_allocate_flags_become_the_request_body() -> None:
    args = gpuctl.build_parser().parse_args(
        [
            "allocate", "--service", "inf", "--type", "inference", "--gpus", "2", "--memory-mb", "20000",
            "--priority", "8", "--ttl", "30m", "--no-queue", "--request-id", "r-9", "--gpu-model", "H100",
            "--node", "n1", "--webhook-url", "http://hook.example/x", "--data-json", '{"a": 1, "b": "x"}',
            "--data", "b=7", "--data", "dedicated=true", "--data", "model_name=qwen2.5-7b",
        ]
    )
    assert gpuctl.allocate_body(args) == {
        "service_name": "inf",
        "workload_type": "inference",
        "workload_data": {"a": 1, "b": 7, "dedicated": True, "model_name": "qwen2.5-7b"},
        "priority": 8,
        "gpu_count": 2,
        "min_memory_mb": 20000,
        "ttl_seconds": 1800.0,
        "request_id": "r-9",
        "webhook_url": "http://hook.example/x",
        "queue": False,
        "constraints": {"gpu_model": "H100", "node": "n1"},
    }


def test_auth_wrong_key_exits_5_right_key_works(
    start_agent: StartAgent,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = tmp_path / "api-keys.toml"
    keys.write_text(
        f'[keys.trainer]\nsha256 = "{hash_key("trainer-secret")}"\nservice = "trainer"\n\n'
        f'[keys.ops]\nsha256 = "{hash_key("ops-secret")}"\nadmin = true\n'
    )
    config = tmp_path / "agent.toml"
    config.write_text(f"[auth]\nenabled = true\nkeys_file = {json.dumps(str(keys))}\n")
    agent = start_agent(extra_args=["--config", str(config)])
    address = ["--address", agent.url]

    code, out, err = run(capsys, *address, "status")
    assert (code, out) == (5, "")
    assert err.startswith("error: unauthorized: ") and "--api-key" in err
    code, _, err = run(capsys, *address, "--api-key", "wrong", "status")
    assert code == gpuctl.EXIT_AUTH == 5 and err.startswith("error: unauthorized: ")

    assert run(capsys, *address, "--api-key", "ops-secret", "status")[0] == 0
    key_file = tmp_path / "trainer.key"
    key_file.write_text("trainer-secret\n")  # as `echo` writes it: the newline is not part of the key
    code, out, _ = run(capsys, *address, "--api-key-file", str(key_file), "allocate", "--service", "trainer")
    assert code == 0
    # A valid key acting for someone else's service: refused, also exit 5.
    code, _, err = run(capsys, *address, "--api-key-file", str(key_file), "allocate", "--service", "other")
    assert code == 5 and err.startswith("error: forbidden: ")

    # Draining is for admin keys: a service's key is refused (exit 5), an admin's works.
    code, out, err = run(capsys, *address, "--api-key-file", str(key_file), "drain", "0")
    assert (code, out) == (5, "") and err.startswith("error: forbidden: "), err
    code, out, _ = run(capsys, *address, "--api-key", "ops-secret", "drain", "0", "--reason", "maintenance")
    assert code == 0 and field(out, "drained") == "yes: maintenance"
    code, _, err = run(capsys, *address, "--api-key-file", str(key_file), "undrain", "0")
    assert code == 5 and err.startswith("error: forbidden: "), err
    assert run(capsys, *address, "--api-key", "ops-secret", "undrain", "0")[0] == 0

    monkeypatch.setenv(gpuctl.API_KEY_ENV, "trainer-secret")
    code, out, _ = run(capsys, *address, "list")
    assert code == 0 and "ALLOCATIONS (1)" in out
    monkeypatch.delenv(gpuctl.API_KEY_ENV)
    assert run(capsys, *address, "health")[0] == 0  # /healthz stays open


def test_console_script_and_the_shell_idiom(start_agent: StartAgent) -> None:
    agent = start_agent(simulate="1xH100-80GB")
    script = Path(sys.executable).with_name("gpuctl")
    assert script.exists(), "the project is not installed (pip install -e .)"
    shell = (
        f'"{script}" allocate --service a --gpus 1 && echo RAN-A; '
        f'"{script}" allocate --service b --gpus 1 && echo RAN-B; '
        'echo "exit=$?"'
    )
    env = {"PATH": "/usr/bin:/bin", gpuctl.ADDRESS_ENV: agent.url}
    done = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, env=env, timeout=30)
    assert "RAN-A" in done.stdout, done
    assert "RAN-B" not in done.stdout and "exit=4" in done.stdout, done  # b was queued


def test_keyring_generates_and_rotates_a_cluster_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gpuctl keyring: generate two keys, install both, make the new one primary, remove the old."""
    from agent.cluster_keyring import Keyring, decode_key
    from agent.gpuctl import main

    path = tmp_path / "cluster.key"
    keys = []
    for _ in range(2):
        assert main(["keyring", "generate"]) == 0
        keys.append(capsys.readouterr().out.strip())
    old, new = keys
    assert old != new and len(decode_key(old)) == 32
    assert main(["keyring", "install", str(path), old]) == 0
    assert main(["keyring", "install", str(path), new]) == 0
    assert Keyring.load(path).keys[0] == decode_key(old)
    assert main(["keyring", "use", str(path), new]) == 0
    assert main(["keyring", "remove", str(path), old]) == 0
    assert Keyring.load(path).keys == (decode_key(new),)
    capsys.readouterr()
    assert main(["keyring", "remove", str(path), new]) == 1  # the primary cannot go
    assert "primary" in capsys.readouterr().err
    assert main(["keyring", "rotate"]) == 2


def test_usage_shows_gpu_hours_per_service_and_queue(start_agent: StartAgent, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpuctl usage` prints what GET /usage says, as GPU-hours, with a total; bad times exit 1 with the API's 400."""
    agent = start_agent(host="127.0.0.120")
    address = ["--address", agent.url]
    alloc = httpx.post(agent.url + "/gpu/allocate", json={"service_name": "billing", "gpu_count": 2}).json()
    httpx.post(agent.url + "/gpu/release", json={"allocation_id": alloc["id"]}).raise_for_status()
    code, out, _ = run(capsys, *address, "usage", "--since", "1h")
    assert code == 0
    rows = table_rows(out)
    assert [r["SERVICE"] for r in rows] == ["billing", "TOTAL"]
    expected = api_get(agent, "/usage", params={"since": "1h"})
    assert rows[0]["ALLOCATED GPU-H"] == f"{expected['usage'][0]['allocated_gpu_seconds'] / 3600:.1f}"
    assert f"{expected['since']} .. {expected['until']}" in out
    code, out, _ = run(capsys, *address, "usage", "--by", "queue", "--since", "1h")
    assert code == 0 and [r["QUEUE"] for r in table_rows(out)] == ["default", "TOTAL"]
    code, out, err = run(capsys, *address, "usage", "--since", "last tuesday")
    assert (code, out) == (1, "") and err.startswith("error: invalid_request: ")
