"""The Go service's documented calls, replayed against a lone agent: its clients work unchanged.

The calls are those of the Go service's README (services/gpu-orchestrator in
plturrell/aModels: allocate a large training job, release it by
allocation_id, GPU status) and its other documented endpoints (/healthz,
/gpu/list, /gpu/workload, release by service_name, /metrics), sent as its
curl examples send them. Each answer is checked for the fields that service
returned, under the same names. Its GRAPH_SERVICE_URL was a bare base URL
(http://localhost:8081): set the same way here, events arrive at <base>/events.
Remaining differences: docs/migrating-from-the-go-service.md.
"""

from __future__ import annotations

import datetime
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOST = "127.0.0.79"
SEED_METRICS = (
    'gpu_allocator_allocations_total{status="success"}',
    "gpu_allocator_allocations_active",
    "gpu_allocator_gpus_allocated_total",
    "gpu_scheduler_queue_depth",
    "gpu_scheduler_queue_wait_seconds_bucket",
    'gpu_scheduler_scheduled_total{status="immediate"}',
)


class GraphService:
    """Records the paths and bodies POSTed to it; answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.posts.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://{HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def seed_like(tmp_path: Path) -> Iterator[tuple[httpx.Client, GraphService]]:
    graph = GraphService()
    agent = AgentProcess(
        data_dir=tmp_path / "data",
        host=HOST,
        node_name="go-compat",
        simulate="4xH100-80GB",
        env={"GRAPH_SERVICE_URL": graph.base_url},  # a base URL, as the Go service's default was
    )
    agent.start()
    try:
        with httpx.Client(base_url=agent.url, timeout=10) as client:
            yield client, graph
    finally:
        agent.kill()
        graph.close()


def rfc3339(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_the_go_services_documented_calls_work_unchanged(seed_like: tuple[httpx.Client, GraphService]) -> None:
    api, graph = seed_like
    json_headers = {"Content-Type": "application/json"}

    health = api.get("/healthz").json()
    assert (health["status"], health["service"]) == ("ok", "gpu-orchestrator")
    assert rfc3339(health["timestamp"]).tzinfo is not None

    # README: "Allocate GPUs" (the analyzer makes this 4 GPUs of 16 GiB).
    body = '{"service_name": "training", "workload_type": "training", "workload_data": {"model_size": "large", "batch_size": 128}}'
    allocated = api.post("/gpu/allocate", content=body, headers=json_headers)
    assert allocated.status_code == 200, allocated.text
    allocation = allocated.json()
    # The Go service's Allocation: id, service_name, gpu_ids, allocated_at, expires_at, priority.
    assert allocation["id"] == allocation["allocation_id"]
    assert allocation["service_name"] == "training"
    assert sorted(allocation["gpu_ids"]) == [0, 1, 2, 3]
    assert allocation["priority"] == 5
    assert rfc3339(allocation["allocated_at"]) < rfc3339(allocation["expires_at"])

    # README: "Check GPU Status"; the Go service's GPUInfo fields.
    gpus = api.get("/gpu/status").json()["gpus"]
    seed_fields = {"id", "name", "memory_total", "memory_used", "memory_free", "utilization", "temperature",
                   "power_draw", "last_updated", "allocated", "allocated_to", "allocated_at"}
    assert len(gpus) == 4 and all(seed_fields <= set(g) for g in gpus)
    assert {g["allocated_to"] for g in gpus} == {"training"}

    listing = api.get("/gpu/list").json()
    assert set(listing) >= {"gpus", "allocations", "queue"}
    assert [a["id"] for a in listing["allocations"]] == [allocation["id"]]

    # README: "Release GPUs" by allocation_id; the Go service answered {"status": "released"}.
    released = api.post("/gpu/release", content=json.dumps({"allocation_id": allocation["id"]}), headers=json_headers)
    assert released.status_code == 200 and released.json()["status"] == "released"

    # /gpu/workload: the Go service's WorkloadRequirements names and, for a model name without a
    # parameter count, its figures (a name with one, such as gemma-7b, is sized from the count here).
    analysis = api.post("/gpu/workload", json={"workload_type": "inference", "workload_data": {"model_name": "vaultgemma"}})
    assert {k: analysis.json()[k] for k in ("required_gpus", "min_memory_mb", "priority", "max_utilization")} == {
        "required_gpus": 1, "min_memory_mb": 2048, "priority": 6, "max_utilization": 75,
    }

    # Workflow context as the Go service read it from workload_data, and the top-level webhook_url it took.
    workflow = api.post(
        "/gpu/allocate",
        json={
            "service_name": "pipeline",
            "workload_type": "embedding",
            "workload_data": {"workflow_id": "wf-7", "workflow_priority": 9, "workflow_dependencies": ["wf-6"]},
            "webhook_url": f"{graph.base_url}/hook",
        },
    )
    assert workflow.status_code == 200, workflow.text
    assert (workflow.json()["priority"], workflow.json()["workflow_id"]) == (9, "wf-7")

    # Release by service_name, the Go service's other form.
    by_service = api.post("/gpu/release", json={"service_name": "pipeline"})
    assert by_service.status_code == 200 and by_service.json()["status"] == "released"

    metrics = api.get("/metrics").text
    for series in SEED_METRICS:
        assert any(line.startswith(series) for line in metrics.splitlines()), series

    # Lifecycle events reach <GRAPH_SERVICE_URL>/events.
    wait_for(lambda: len([p for p, _ in graph.posts if p == "/events"]) >= 4)
    events = {body["event"] for path, body in graph.posts if path == "/events"}
    assert {"allocated", "released"} <= events
    assert {path for path, _ in graph.posts} == {"/events"}
