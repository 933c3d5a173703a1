"""Every endpoint and every error status, through real HTTP to a real agent process.

One agent (4 simulated H100s) serves the module; each test leaves it with no
allocations. Every response is recorded by (route template, method, status),
and the last test checks that this set equals what /openapi.json documents, so
the document cannot drift from the behaviour.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

OBSERVED: set[tuple[str, str, int]] = set()
_TEMPLATES = (
    (re.compile(r"^/gpu/allocations/[^/]+$"), "/gpu/allocations/{allocation_id}"),
    (re.compile(r"^/gpu/requests/[^/]+$"), "/gpu/requests/{request_id}"),
    (re.compile(r"^/cluster/servers/[^/]+$"), "/cluster/servers/{name}"),
)


def _template(path: str) -> str:
    path = path.split("?", 1)[0]  # the route, not its query
    for pattern, template in _TEMPLATES:
        if pattern.match(path):
            return template
    return path


class Api:
    """A client that records what it saw, for the OpenAPI check."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.client = httpx.Client(base_url=base, timeout=10.0, headers=headers or {})

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        OBSERVED.add((_template(path), method.lower(), response.status_code))
        if response.status_code != 200 or path not in ("/metrics", "/"):
            assert response.headers["content-type"].startswith("application/json"), response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"code", "message"} and error["code"] and error["message"]
        return response

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        if body is not None:
            kwargs["json"] = body
        return self.request("POST", path, **kwargs)

    def state(self) -> dict[str, Any]:
        """Allocations and queue, to prove a refused request changed nothing."""
        listing = self.get("/gpu/list").json()
        return {"allocations": listing["allocations"], "queue": listing["queue"]}


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(data_dir=tmp_path_factory.mktemp("api-agent"), simulate="4xH100-80GB")
    process.start()
    yield process
    process.kill()


@pytest.fixture
def api(agent: AgentProcess) -> Iterator[Api]:
    client = Api(agent.url)
    yield client
    for service in {a["service_name"] for a in client.state()["allocations"]} | {
        q["service_name"] for q in client.state()["queue"]
    }:
        client.post("/gpu/release", {"service_name": service})
    client.client.close()


SEED_ALLOCATE = {
    "service_name": "training",
    "workload_type": "training",
    "workload_data": {"model_size": "large", "batch_size": 128},
}


def test_healthz_reports_the_node_and_its_role(api: Api) -> None:
    """GET /healthz answers the seed's fields, plus why it is degraded if it is."""
    body = api.get("/healthz").json()
    assert body["status"] == "ok" and body["service"] == "gpu-orchestrator"
    assert body["node"] == "node-a" and body["role"] == "leader" and body["leader"] == "node-a"
    assert body["devices"] == body["devices"] | {"backend": "simulated", "gpus": 4, "degraded": None}


def test_the_seed_examples_allocate_status_release(api: Api) -> None:
    """The README's three curl examples: training large/128 takes 4 GPUs; status shows them; release frees them."""
    alloc = api.post("/gpu/allocate", SEED_ALLOCATE)
    assert alloc.status_code == 200
    body = alloc.json()
    assert body["id"] == body["allocation_id"] and body["service_name"] == "training"
    assert body["gpu_ids"] == [0, 1, 2, 3] and body["node"] == "node-a"
    assert body["requirements"]["gpu_count"] == 4 and body["requirements"]["decided_by"] == "analyzer"
    assert body["cuda_visible_devices"] == ",".join(g["uuid"] for g in body["gpus"])
    assert body["expires_at"] > body["allocated_at"]
    status = api.get("/gpu/status").json()["gpus"]
    assert [(g["node"], g["index"]) for g in status] == [("node-a", i) for i in range(4)]
    assert all(g["allocated"] and g["allocated_to"] == "training" for g in status)
    seed_fields = {"id", "name", "memory_total", "memory_used", "memory_free", "utilization", "temperature",
                   "power_draw", "last_updated", "allocated", "allocated_to", "allocated_at"}
    assert seed_fields | {"node", "index", "uuid", "health"} <= set(status[0])
    released = api.post("/gpu/release", {"allocation_id": body["id"]})
    assert released.json() == {"status": "released", "released": [body["id"]], "cancelled": []}
    # A retry (after a lost answer) gets the same answer, marked as a repeat.
    again = api.post("/gpu/release", {"allocation_id": body["id"]})
    assert again.status_code == 200, again.text
    assert again.json() == {"status": "released", "released": [body["id"]], "cancelled": [], "repeated": True}
    assert not any(g["allocated"] for g in api.get("/gpu/status").json()["gpus"])


def test_queue_then_allocate_on_release_and_request_status(api: Api) -> None:
    """A request that does not fit is queued (202) and placed as soon as GPUs free up."""
    first = api.post("/gpu/allocate", {"service_name": "big", "gpu_count": 4}).json()
    queued = api.post("/gpu/allocate", {"service_name": "waiter", "gpu_count": 2, "request_id": "wait-1"})
    assert queued.status_code == 202
    assert queued.json() | {"status": "queued", "request_id": "wait-1", "position": 1} == queued.json()
    assert api.get("/gpu/requests/wait-1").json()["status"] == "queued"
    listing = api.get("/gpu/list").json()
    assert [q["request_id"] for q in listing["queue"]] == ["wait-1"]
    # Why it waits: first in line, and no node has two GPUs free.
    assert listing["queue"][0]["reason"] == "resources" and listing["queue"][0]["reason_detail"]
    assert api.get("/gpu/requests/wait-1").json()["queue"]["reason"] == "resources"
    api.post("/gpu/release", {"allocation_id": first["id"]})
    record = wait_for(lambda: (r := api.get("/gpu/requests/wait-1").json())["status"] == "allocated" and r)
    assert record["allocation"]["gpu_ids"] and len(record["allocation"]["gpu_ids"]) == 2
    assert api.get(f"/gpu/allocations/{record['allocation_id']}").json()["service_name"] == "waiter"


def test_no_queue_gives_409_and_changes_nothing(api: Api) -> None:
    """queue=false and no capacity: 409 no_capacity, nothing queued."""
    api.post("/gpu/allocate", {"service_name": "big", "gpu_count": 4})
    before = api.state()
    refused = api.post("/gpu/allocate", {"service_name": "nope", "gpu_count": 1, "queue": False})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_capacity"
    assert api.state() == before


def test_idempotent_request_id(api: Api) -> None:
    """The same request_id returns the same allocation; reused after release it is a 409."""
    body = {"service_name": "idem", "gpu_count": 1, "request_id": "idem-1"}
    first, again = api.post("/gpu/allocate", body).json(), api.post("/gpu/allocate", body).json()
    assert first["id"] == again["id"] and len(api.state()["allocations"]) == 1
    # A retry is still a request: one the server would refuse gets its 400, not the earlier answer.
    too_long = api.post("/gpu/allocate", body | {"ttl_seconds": 2592001})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "invalid_request", too_long.text
    other = api.post("/gpu/allocate", body | {"service_name": "thief"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "request_id_conflict"
    api.post("/gpu/release", {"request_id": "idem-1"})
    reused = api.post("/gpu/allocate", body)
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "request_id_used"
    assert api.get("/gpu/requests/idem-1").json()["status"] == "released"


def test_renew_extends_the_lease(api: Api) -> None:
    """POST /gpu/renew moves expires_at; under the default 30-day cap a lease cannot be made endless."""
    alloc = api.post("/gpu/allocate", {"service_name": "renewer", "gpu_count": 1, "ttl_seconds": 60}).json()
    renewed = api.post("/gpu/renew", {"allocation_id": alloc["id"], "ttl_seconds": 3600}).json()
    assert renewed["expires_at"] > alloc["expires_at"]
    forever = api.post("/gpu/renew", {"allocation_id": alloc["id"], "ttl_seconds": 0})
    assert forever.status_code == 400 and "max_ttl_s" in forever.json()["error"]["message"]
    assert api.get(f"/gpu/allocations/{alloc['id']}").json()["expires_at"] == renewed["expires_at"]
    missing = api.post("/gpu/renew", {"allocation_id": "no-such-lease"})
    assert missing.status_code == 404


def test_renew_after_expiry_is_a_conflict_or_gone(api: Api) -> None:
    """A lease past its TTL is expired by the scheduler; renewing it then is refused."""
    alloc = api.post("/gpu/allocate", {"service_name": "short", "gpu_count": 1, "ttl_seconds": 0.3}).json()
    wait_for(lambda: api.get(f"/gpu/allocations/{alloc['id']}").status_code == 404)
    assert api.get(f"/gpu/requests/{alloc['request_id']}").json()["status"] == "expired"
    assert api.post("/gpu/renew", {"allocation_id": alloc["id"]}).status_code == 404


def test_release_by_service_and_by_request_id(api: Api) -> None:
    """Release all of a service (allocations and queued requests), and cancel one queued request."""
    ids = {api.post("/gpu/allocate", {"service_name": "svc", "gpu_count": 1}).json()["id"] for _ in range(2)}
    api.post("/gpu/allocate", {"service_name": "filler", "gpu_count": 2})
    api.post("/gpu/allocate", {"service_name": "svc", "gpu_count": 4, "request_id": "svc-wait"})
    api.post("/gpu/allocate", {"service_name": "other", "gpu_count": 4, "request_id": "other-wait"})
    result = api.post("/gpu/release", {"service_name": "svc"}).json()
    assert set(result["released"]) == ids and result["cancelled"] == ["svc-wait"]
    cancelled = api.post("/gpu/release", {"request_id": "other-wait"}).json()
    assert cancelled["cancelled"] == ["other-wait"]
    assert api.get("/gpu/requests/other-wait").json()["status"] == "cancelled"


def test_drain_keeps_new_work_off_a_gpu_until_undrained(api: Api) -> None:
    """A drained GPU takes no new allocation (a 4-GPU request waits); undrain lets it through."""
    row = api.post("/gpu/drain", {"index": 2, "reason": "fan noise"}).json()
    assert (row["index"], row["drained"], row["drain_reason"]) == (2, True, "fan noise")
    status = {g["index"]: g for g in api.get("/gpu/status").json()["gpus"]}
    assert status[2]["drained"] and not status[1]["drained"]
    waiting = api.post("/gpu/allocate", {"service_name": "all4", "gpu_count": 4, "request_id": "all4"})
    assert waiting.status_code == 202
    assert api.post("/gpu/undrain", {"index": 2}).json()["drained"] is False
    record = wait_for(lambda: (r := api.get("/gpu/requests/all4").json())["status"] == "allocated" and r)
    assert record["allocation"]["gpu_ids"] == [0, 1, 2, 3]


def test_workload_analysis_allocates_nothing(api: Api) -> None:
    """POST /gpu/workload returns the figures and how they were derived, and allocates nothing."""
    body = api.post(
        "/gpu/workload", {"workload_type": "inference", "workload_data": {"model_name": "llama-3-70b"}}
    ).json()
    assert body["required_gpus"] == 4 and body["estimate"]["method"] == "parameters"
    assert body["decided_by"] == "analyzer" and body["priority"] >= 1
    assert api.state()["allocations"] == []
    seed = api.post("/gpu/workload", SEED_ALLOCATE).json()
    assert (seed["required_gpus"], seed["min_memory_mb"], seed["priority"]) == (4, 16384, 5)


def test_status_page_is_static_html_with_a_strict_policy(api: Api) -> None:
    """GET / is the status page: HTML naming the node, with only its own inline script and style allowed."""
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>gpu-orchestrator: node-a</title>" in page.text and 'id="gpus"' in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_cluster_endpoints(api: Api) -> None:
    """A single agent is its own cluster: one alive server that leads."""
    members = api.get("/cluster/members").json()["members"]
    assert [(m["name"], m["status"], m["role"]) for m in members] == [("node-a", "alive", "server")]
    assert api.get("/cluster/leader").json()["leader"] == "node-a"


def test_cluster_servers_on_a_lone_agent(api: Api) -> None:
    """A lone agent is a Raft cluster of one voter; bad changes are refused with a reason, and nothing changes."""
    doc = api.get("/cluster/servers").json()
    (row,) = doc["servers"]
    assert {k: v for k, v in row.items() if k != "address"} == {
        "name": "node-a", "voter": True, "alive": True, "status": "alive", "leader": True
    }
    assert row["address"].startswith("127.0.0.1:")  # its Raft port: servers can be added to it
    for body, status, code in (
        ({"name": "ghost"}, 404, "not_found"),
        ({"name": "node-a"}, 409, "already_voter"),
        ({"name": "a/b"}, 400, "invalid_name"),
        ({"name": "x", "extra": 1}, 400, "unknown_field"),
        (["node-b"], 400, "invalid_request"),
    ):
        response = api.post("/cluster/servers", body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
    assert api.request("DELETE", "/cluster/servers/ghost").status_code == 404
    last = api.request("DELETE", "/cluster/servers/node-a")
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_voter"
    assert api.get("/cluster/servers").json() == doc


def test_cluster_servers_add_and_remove_on_a_raft_cluster(tmp_path: Path) -> None:
    """The successful changes need a Raft cluster: three founders, then a blank server that
    waits (a non-voter) until POST /cluster/servers adds it; DELETE removes it again."""
    from agent.cluster_keyring import generate_key
    from tests.agent_process import free_port

    key_file = tmp_path / "cluster.key"
    key_file.write_text(generate_key() + "\n")
    key_file.chmod(0o600)
    config = tmp_path / "agent.toml"
    config.write_text(f'[cluster]\nprofile = "local"\nkey_file = "{key_file}"\nserver = true\nbootstrap_expect = 3\n')
    seed = free_port("127.0.0.24", udp_too=True)
    agents = [
        AgentProcess(
            data_dir=tmp_path / f"s{i}", host=f"127.0.0.{24 + i}", node_name=f"api-s{i}", simulate="1xH100-80GB",
            gossip_port=seed if i == 0 else 0, join=[] if i == 0 else [f"127.0.0.24:{seed}"],
            extra_args=["--config", str(config)],
        )
        for i in range(4)
    ]
    try:
        for agent in agents[:3]:
            agent.start(wait=False)
        for agent in agents[:3]:
            agent.wait_ready()
        # Servers answer while they wait for their bootstrap peers: start the fourth only
        # once the three founders have a leader, or it could be counted as a founder.
        wait_for(lambda: httpx.get(f"{agents[0].url}/healthz", timeout=5).json()["leader"] is not None, timeout=30)
        agents[3].start()
        api = Api(agents[3].url)  # a non-voter: everything forwarded to the leader
        try:
            wait_for(lambda: "api-s3" in [s["name"] for s in api.get("/cluster/servers").json()["servers"]])
            added = api.post("/cluster/servers", {"name": "api-s3"})
            assert added.status_code == 200, added.text
            assert [(s["name"], s["voter"]) for s in added.json()["servers"]] == [(f"api-s{i}", True) for i in range(4)]
            removed = api.request("DELETE", "/cluster/servers/api-s3")
            assert removed.status_code == 200, removed.text
            assert [s["name"] for s in removed.json()["servers"] if s["voter"]] == ["api-s0", "api-s1", "api-s2"]
        finally:
            api.client.close()
    finally:
        for agent in agents:
            agent.kill()


def test_metrics_use_dcgm_names_and_route_templates(api: Api) -> None:
    """/metrics: dcgm-exporter's per-GPU series with its labels; HTTP counts by route template."""
    alloc = api.post("/gpu/allocate", {"service_name": "metered", "gpu_count": 1}).json()
    api.get(f"/gpu/allocations/{alloc['id']}")
    text = api.get("/metrics").text
    util = [dict(re.findall(r'(\w+)="([^"]*)"', labels))
            for labels in re.findall(r"^DCGM_FI_DEV_GPU_UTIL\{([^}]*)\}", text, re.M)]
    assert [u["gpu"] for u in util] == ["0", "1", "2", "3"]
    assert util[0] | {"device": "nvidia0", "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a"} == util[0]
    assert set(util[0]) == {"gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id"}
    assert 'route="/gpu/allocations/<allocation_id>"' in text
    assert alloc["id"] not in re.findall(r'route="([^"]+)"', text)
    assert re.search(r'gpu_orchestrator_allocations\{service="metered"\} 1\.0', text)
    assert "gpu_orchestrator_queue_depth 0.0" in text
    # A lone agent is a one-voter Raft cluster: its proposals are timed like a server's.
    proposals = re.search(r"^gpu_orchestrator_raft_proposal_seconds_count (\S+)", text, re.M)
    assert proposals is not None and float(proposals.group(1)) >= 1


def test_usage_counts_gpu_seconds_per_service_and_queue(api: Api) -> None:
    """/usage: a released lease's GPU-seconds by service and by queue, live ones up to now; the leader's counter."""
    alloc = api.post("/gpu/allocate", {"service_name": "accounted", "gpu_count": 2}).json()
    live = api.post("/gpu/allocate", {"service_name": "still-running", "gpu_count": 1}).json()
    wait_for(lambda: api.get("/usage?since=1h").json()["totals"]["allocated_gpu_seconds"] > 0, timeout=10.0)
    assert api.post("/gpu/release", {"allocation_id": alloc["id"]}).status_code == 200
    by_service = api.get("/usage", params={"since": "2h", "by": "service"}).json()
    assert by_service["by"] == "service" and by_service["since"].endswith(":00:00.000Z")
    rows = {row["service"]: row for row in by_service["usage"]}
    assert rows["accounted"]["allocated_gpu_seconds"] > 0 and rows["still-running"]["allocated_gpu_seconds"] > 0
    assert rows["accounted"]["utilized_gpu_seconds"] >= 0
    by_queue = api.get("/usage", params={"since": "2h", "by": "queue"}).json()
    assert [row["queue"] for row in by_queue["usage"]] == ["default"]
    # Nothing before the agent started: a window in the past is empty.
    assert api.get("/usage", params={"since": "1000000000", "until": "1000003600"}).json()["usage"] == []
    api.post("/gpu/release", {"allocation_id": live["id"]})
    text = api.get("/metrics").text
    counted = re.search(
        r'^gpu_orchestrator_usage_gpu_seconds_total\{queue="default",service="accounted",kind="allocated"\} (\S+)', text, re.M
    )
    assert counted is not None and float(counted.group(1)) > 0


@pytest.mark.parametrize(
    "query", ["since=yesterday", "until=-5", "since=2026-02-30T00:00:00Z", "since=2h&until=3h", "by=node", "since=1e400"]
)
def test_usage_refuses_bad_input_with_a_json_400(api: Api, query: str) -> None:
    response = api.get(f"/usage?{query}")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


BAD_ALLOCATE_BODIES = [
    pytest.param(b"{not json", "invalid_json", id="malformed-json"),
    pytest.param(b"", "invalid_json", id="empty-body"),
    pytest.param(b"[1, 2]", "invalid_request", id="not-an-object"),
    pytest.param({"workload_type": "training"}, "invalid_request", id="no-service"),
    pytest.param({"service_name": 7}, "invalid_request", id="service-not-string"),
    pytest.param({"service_name": "a b"}, "invalid_request", id="service-bad-chars"),
    pytest.param({"service_name": "s", "gpu_count": -1}, "invalid_request", id="negative-count"),
    pytest.param({"service_name": "s", "gpu_count": 10**9}, "invalid_request", id="huge-count"),
    pytest.param({"service_name": "s", "gpu_count": "2"}, "invalid_request", id="count-as-string"),
    pytest.param({"service_name": "s", "gpu_count": True}, "invalid_request", id="count-as-bool"),
    pytest.param({"service_name": "s", "priority": 11}, "invalid_request", id="priority-out-of-range"),
    pytest.param({"service_name": "s", "min_memory_mb": -5}, "invalid_request", id="negative-memory"),
    pytest.param({"service_name": "s", "ttl_seconds": -1}, "invalid_request", id="negative-ttl"),
    pytest.param({"service_name": "s", "ttl_seconds": 10**12}, "invalid_request", id="huge-ttl"),
    pytest.param({"service_name": "s", "workload_type": "mining"}, "unknown_workload_type", id="unknown-type"),
    pytest.param({"service_name": "s", "workload_data": []}, "invalid_request", id="data-not-object"),
    pytest.param({"service_name": "s", "gpu_cout": 2}, "unknown_field", id="typo-field"),
    pytest.param({"service_name": "s", "webhook_url": "ftp://x"}, "invalid_request", id="bad-webhook"),
    pytest.param({"service_name": "s", "queue": "yes"}, "invalid_request", id="queue-not-bool"),
    pytest.param({"service_name": "s", "workload_type": "training",
                  "workload_data": {"batch_size": 0}}, "invalid_request", id="bad-batch-size"),
    pytest.param({"service_name": "s", "gpu_count": 8}, "unsatisfiable", id="never-fits-count"),
    pytest.param({"service_name": "s", "min_memory_mb": 200000}, "unsatisfiable", id="never-fits-memory"),
    pytest.param({"service_name": "s", "constraints": {"gpu_model": "A100"}}, "unsatisfiable", id="no-model"),
]


@pytest.mark.parametrize("body, code", BAD_ALLOCATE_BODIES)
def test_bad_allocate_bodies_are_400_and_change_nothing(api: Api, body: Any, code: str) -> None:
    """Bad input gets the documented 400 with a precise code, and no state changes."""
    before = api.state()
    if isinstance(body, bytes):
        response = api.post("/gpu/allocate", content=body, headers={"content-type": "application/json"})
    else:
        response = api.post("/gpu/allocate", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert api.state() == before


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/gpu/release", {}, 400),
        ("/gpu/release", {"allocation_id": "a", "service_name": "b"}, 400),
        ("/gpu/release", {"allocation_id": 5}, 400),
        ("/gpu/release", {"allocation_id": "nope"}, 404),
        ("/gpu/release", {"request_id": "never-seen"}, 404),
        ("/gpu/renew", {"ttl_seconds": 5}, 400),
        ("/gpu/renew", {"allocation_id": "x", "ttl_seconds": "long"}, 400),
        ("/gpu/workload", {"workload_type": "nope"}, 400),
        ("/gpu/drain", {}, 400),
        ("/gpu/drain", {"index": "0"}, 400),
        ("/gpu/drain", {"index": 0, "why": "x"}, 400),
        ("/gpu/undrain", {"index": 0, "reason": "x"}, 400),
        ("/gpu/drain", {"index": 9}, 404),
        ("/gpu/undrain", {"index": 0, "node": "elsewhere"}, 404),
    ],
)
def test_bad_release_renew_workload_bodies(api: Api, path: str, body: Any, status: int) -> None:
    """Release, renew and workload validate their bodies the same way; unknown ids are 404."""
    before = api.state()
    assert api.post(path, body).status_code == status
    assert api.state() == before


def test_unknown_ids_routes_methods_and_oversized_bodies(api: Api) -> None:
    """404 for unknown ids and routes, 405 with Allow for a wrong method, 413 for a huge body."""
    assert api.get("/gpu/allocations/nope").status_code == 404
    assert api.get("/gpu/requests/nope").status_code == 404
    assert api.get("/no/such/route").json()["error"]["code"] == "not_found"
    wrong = api.get("/gpu/allocate")
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    for path, method in [("/gpu/release", "GET"), ("/gpu/renew", "GET"), ("/gpu/workload", "GET"),
                         ("/gpu/status", "POST"), ("/gpu/list", "POST"), ("/healthz", "POST"),
                         ("/cluster/members", "POST"), ("/cluster/leader", "POST"), ("/metrics", "POST"),
                         ("/openapi.json", "POST"), ("/gpu/allocations/x", "POST"), ("/gpu/requests/x", "POST"),
                         ("/", "POST")]:
        assert api.request(method, path).status_code == 405
    before = api.state()
    huge = {"service_name": "s", "workload_data": {"blob": "x" * 2_000_000}}
    for path in ("/gpu/allocate", "/gpu/release", "/gpu/renew", "/gpu/workload", "/gpu/drain", "/gpu/undrain",
                 "/cluster/servers"):
        response = api.post(path, huge)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
    assert api.state() == before


def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    """A full queue answers 503 queue_full with Retry-After, and queues nothing more."""
    config = tmp_path / "agent.toml"
    config.write_text("[scheduler]\nmax_queue = 1\n")
    agent = AgentProcess(data_dir=tmp_path / "d", simulate="1xH100-80GB", extra_args=["--config", str(config)])
    agent.start()
    try:
        api = Api(agent.url)
        api.post("/gpu/allocate", {"service_name": "a", "gpu_count": 1})
        assert api.post("/gpu/allocate", {"service_name": "b", "gpu_count": 1}).status_code == 202
        full = api.post("/gpu/allocate", {"service_name": "c", "gpu_count": 1})
        assert full.status_code == 503 and full.headers["retry-after"]
        assert full.json()["error"]["code"] == "queue_full"
        assert len(api.state()["queue"]) == 1
        api.client.close()
    finally:
        agent.kill()


def test_auth_keys_bind_services_and_leave_probes_open(tmp_path: Path) -> None:
    """With auth on: 401 without or with a wrong key on every API route, 403 for another service's
    allocation, admin keys act for all, and /healthz, /metrics and /openapi.json stay open."""
    from agent.api_keys import hash_key

    keys = tmp_path / "api-keys.toml"
    keys.write_text(
        f'[keys.trainer]\nsha256 = "{hash_key("train-key")}"\nservice = "training"\n'
        f'[keys.ops]\nsha256 = "{hash_key("ops-key")}"\nadmin = true\n'
    )
    config = tmp_path / "agent.toml"
    config.write_text(f'[auth]\nenabled = true\nkeys_file = "{keys}"\n')
    agent = AgentProcess(data_dir=tmp_path / "d", extra_args=["--config", str(config)])
    agent.start()
    anonymous, trainer = Api(agent.url), Api(agent.url, {"X-API-Key": "train-key"})
    ops, wrong = Api(agent.url, {"Authorization": "Bearer ops-key"}), Api(agent.url, {"X-API-Key": "nope"})
    try:
        for path in ("/", "/healthz", "/metrics", "/openapi.json"):
            assert anonymous.get(path).status_code == 200
        gets = ["/gpu/status", "/gpu/list", "/cluster/members", "/cluster/leader", "/cluster/servers",
                "/gpu/allocations/x", "/gpu/requests/x", "/usage", "/queues"]
        posts = ["/gpu/allocate", "/gpu/release", "/gpu/renew", "/gpu/workload", "/gpu/drain", "/gpu/undrain",
                 "/cluster/servers"]
        for client in (anonymous, wrong):
            for path in gets:
                assert client.get(path).status_code == 401
            for path in posts:
                assert client.post(path, {"service_name": "training"}).status_code == 401
            assert client.request("DELETE", "/cluster/servers/node-a").status_code == 401
        # Changing the Raft servers takes an admin key (checked before anything else).
        assert trainer.post("/cluster/servers", {"name": "ghost"}).status_code == 403
        assert trainer.request("DELETE", "/cluster/servers/node-a").status_code == 403
        assert ops.request("DELETE", "/cluster/servers/node-a").status_code == 409  # the last voter
        assert trainer.post("/gpu/allocate", {"service_name": "inference"}).status_code == 403
        mine = trainer.post("/gpu/allocate", {"service_name": "training", "gpu_count": 1}).json()
        theirs = ops.post("/gpu/allocate", {"service_name": "inference", "gpu_count": 1}).json()
        assert trainer.post("/gpu/renew", {"allocation_id": theirs["id"]}).status_code == 403
        assert trainer.post("/gpu/release", {"allocation_id": theirs["id"]}).status_code == 403
        assert len(ops.state()["allocations"]) == 2
        assert trainer.post("/gpu/renew", {"allocation_id": mine["id"]}).status_code == 200
        assert trainer.post("/gpu/release", {"allocation_id": mine["id"]}).status_code == 200
        assert ops.post("/gpu/release", {"service_name": "inference"}).json()["released"] == [theirs["id"]]
        assert trainer.post("/gpu/workload", {"workload_type": "ocr"}).status_code == 200
        for path in ("/gpu/drain", "/gpu/undrain"):
            assert trainer.post(path, {"index": 0}).status_code == 403
            assert ops.post(path, {"index": 0}).status_code == 200
    finally:
        for client in (anonymous, trainer, ops, wrong):
            client.client.close()
        agent.kill()


def test_queues_without_configuration_is_one_default_queue(api: Api) -> None:
    """No [queues]: GET /queues shows the implicit default queue, holding what is leased."""
    held = api.post("/gpu/allocate", {"service_name": "queued-svc", "gpu_count": 1}).json()
    assert held["queue_name"] == "default" and held["preemptible"] is True
    [default] = api.get("/queues").json()["queues"]
    assert default | {"name": "default", "declared": False, "in_use_gpus": 1, "guaranteed_gpus": 0} == default
    api.post("/gpu/release", {"allocation_id": held["allocation_id"]})


def test_gpu_status_pages_filters_and_summarizes(api: Api) -> None:
    """At a thousand hosts a caller asks for one node, a page, or counts, not every row."""
    every = api.get("/gpu/status").json()["gpus"]
    first = api.get("/gpu/status?limit=3").json()
    assert [g["index"] for g in first["gpus"]] == [0, 1, 2] and first["next_after"] == "node-a/2"
    rest = api.get(f"/gpu/status?limit=3&after={first['next_after']}").json()
    assert [g["index"] for g in rest["gpus"]] == [3] and rest["next_after"] is None
    assert first["gpus"] + rest["gpus"] == every
    assert api.get("/gpu/status?node=node-a").json()["gpus"] == every
    assert api.get("/gpu/status?node=elsewhere").json()["gpus"] == []
    held = api.post("/gpu/allocate", {"service_name": "summed", "gpu_count": 1}).json()
    summary = api.get("/gpu/status?summary=true").json()
    assert summary["summary"] == {
        "nodes": 1, "gpus": 4, "allocated": 1, "unhealthy": 0, "drained": 0,
        # Three free GPUs, all NVLink-joined (one H100 model: wired all-to-all); no MIG; a share of a whole H100.
        "largest_request": {"gpus": 3, "nvlink": 3, "mig": None, "share_mb": 81559},
    }
    assert summary["nodes"][0] | {"node": "node-a", "scheduled_here": True} == summary["nodes"][0]
    api.post("/gpu/release", {"allocation_id": held["allocation_id"]})
    for bad in ("limit=0", "limit=10001", "limit=x", "after=node-a", "after=/1", "node=a%20b", "summary=maybe"):
        for path in ("/gpu/status", "/gpu/list"):
            response = api.get(f"{path}?{bad}")
            assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request", (path, bad)


def test_gpu_list_caps_filters_and_counts(api: Api) -> None:
    held = [api.post("/gpu/allocate", {"service_name": "capped", "gpu_count": 1}).json() for _ in range(2)]
    everything = api.get("/gpu/list").json()
    capped = api.get("/gpu/list?limit=1").json()
    assert len(capped["gpus"]) == 1 and len(capped["allocations"]) == 1
    assert capped["totals"]["allocations"] == len(everything["allocations"]) >= 2
    assert api.get("/gpu/list?node=elsewhere").json()["allocations"] == []
    mine = api.get("/gpu/list?node=node-a").json()
    assert [a["allocation_id"] for a in mine["allocations"]] == [a["allocation_id"] for a in everything["allocations"]]
    summary = api.get("/gpu/list?summary=true").json()["summary"]
    assert summary | {"nodes": 1, "gpus": 4} == summary and summary["allocations"] == len(everything["allocations"])
    for alloc in held:
        api.post("/gpu/release", {"allocation_id": alloc["allocation_id"]})


def test_zz_openapi_document_matches_observed_behaviour(api: Api) -> None:
    """Every documented (route, method, status) was produced above, and nothing undocumented was."""
    document = api.get("/openapi.json").json()
    documented = {
        (path, method, int(status))
        for path, ops in document["paths"].items()
        for method, op in ops.items()
        for status in op["responses"]
    }
    operations = {(path, method) for path, method, _ in documented}
    for path, method, status in OBSERVED:
        if (path, method) not in operations:
            assert status == (404 if path not in document["paths"] else 405), (path, method, status)
    observed = {k for k in OBSERVED if k[:2] in operations}
    assert observed <= documented, f"undocumented behaviour: {sorted(observed - documented)}"
    missing = documented - observed
    assert not missing, f"documented but never produced: {sorted(missing)}"
    json.dumps(document)
    # Request bodies as the server reads them: unknown fields refused, and every optional
    # field may be null ("not given"); tests/integration/test_openapi_contract.py checks the rest.
    schemas = document["components"]["schemas"]
    bodies = {
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        for ops in document["paths"].values()
        for op in ops.values()
        if "requestBody" in op
    }
    assert bodies == {"AllocateRequest", "WorkloadRequest", "ReleaseRequest", "RenewRequest", "DrainRequest",
                      "UndrainRequest", "AddServerRequest"}
    for name in bodies:
        body = schemas[name]
        assert body["additionalProperties"] is False, name
        for field, schema in body["properties"].items():
            if field not in body.get("required", ()):
                assert {"type": "null"} in schema.get("anyOf", ()), (name, field)
    assert "security" not in json.dumps(document["paths"])  # auth is off on this agent

