"""Webhooks, workflow events and the DeepAgents advisor, end to end through a real agent.

The receivers are real HTTP servers on 127.0.0.1 in threads of the test; the
agent is a real process that reaches them over loopback.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


class Receiver:
    """Records POSTs; `respond(n, body)` decides each answer (status, JSON body, delay)."""

    def __init__(self, respond: Callable[[int, Any], tuple[int, Any, float]], host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    receiver.requests.append((self.path, dict(self.headers), body))
                    n = len(receiver.requests)
                status, payload, delay = respond(n, body)
                time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[Any]:
        with self._lock:
            return [body for _, _, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(respond: Callable[[int, Any], tuple[int, Any, float]] = lambda n, b: (200, {}, 0.0)) -> Receiver:
        made.append(Receiver(respond))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def _agent(tmp_path: Path, toml: str = "", simulate: str = "1xH100-80GB", **env: str) -> AgentProcess:
    config = tmp_path / "agent.toml"
    config.write_text(toml)
    return AgentProcess(
        data_dir=tmp_path / "data", simulate=simulate, extra_args=["--config", str(config)], env=env
    ).start()


def test_webhook_is_retried_until_the_receiver_accepts(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """A queued request's webhook: two 500s, then delivered once with the seed's payload."""
    hook = receivers(lambda n, body: (500 if n <= 2 else 200, {}, 0.0))
    agent = _agent(tmp_path)
    try:
        with httpx.Client(base_url=agent.url) as api:
            first = api.post("/gpu/allocate", json={"service_name": "a", "gpu_count": 1}).json()
            queued = api.post(
                "/gpu/allocate",
                json={"service_name": "b", "gpu_count": 1, "webhook_url": f"{hook.url}/hook",
                      "request_id": "b-1", "workload_data": {"workflow_id": "wf-7"}},
            )
            assert queued.status_code == 202
            api.post("/gpu/release", json={"allocation_id": first["id"]})
            wait_for(lambda: len(hook.requests) >= 3)
            time.sleep(0.5)
        path, headers, body = hook.requests[-1]
        assert len(hook.requests) == 3 and path == "/hook"
        assert {h["X-Event-Id"] for _, h, _ in hook.requests} == {headers["X-Event-Id"]}
        assert body["status"] == "allocated" and body["request_id"] == "b-1"
        assert body["allocation"]["service_name"] == "b" and body["workflow_id"] == "wf-7"
        assert body["wait_time_seconds"] >= 0 and body["submitted_at"] and body["allocated_at"]
    finally:
        agent.kill()


def test_webhook_hears_queue_timeout_and_cancel(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """Queued requests that time out or are cancelled tell their webhook why."""
    hook = receivers()
    agent = _agent(tmp_path, "[scheduler]\nqueue_timeout_s = 0.5\n")
    try:
        with httpx.Client(base_url=agent.url) as api:
            api.post("/gpu/allocate", json={"service_name": "a", "gpu_count": 1})
            for rid in ("late", "gone"):
                api.post("/gpu/allocate", json={"service_name": "b", "gpu_count": 1, "request_id": rid,
                                                "webhook_url": hook.url})
            api.post("/gpu/release", json={"request_id": "gone"})
            wait_for(lambda: len(hook.requests) >= 2)
            assert api.get("/gpu/requests/late").json()["status"] == "expired"
        events = {(b["request_id"], b["status"], b["reason"]) for b in hook.bodies()}
        assert events == {("late", "expired", "queue_timeout"), ("gone", "cancelled", "cancelled")}
    finally:
        agent.kill()


def test_undelivered_webhooks_survive_a_restart(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """The outbox is durable: an event the receiver refused before a kill -9 is delivered after restart."""
    accepting = threading.Event()
    hook = receivers(lambda n, body: (200 if accepting.is_set() else 503, {}, 0.0))
    agent = _agent(tmp_path)
    try:
        with httpx.Client(base_url=agent.url) as api:
            first = api.post("/gpu/allocate", json={"service_name": "a", "gpu_count": 1}).json()
            api.post("/gpu/allocate", json={"service_name": "b", "gpu_count": 1, "request_id": "r",
                                            "webhook_url": hook.url})
            api.post("/gpu/release", json={"allocation_id": first["id"]})
            wait_for(lambda: hook.requests)
        agent.kill()
        refused = len(hook.requests)
        accepting.set()
        agent.start()
        wait_for(lambda: len(hook.requests) > refused, timeout=20)
        body = hook.bodies()[refused]
        assert (body["request_id"], body["status"]) == ("r", "allocated")
    finally:
        agent.kill()


def test_graph_service_gets_every_lifecycle_event(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """With GRAPH_SERVICE_URL set, queued/allocated/renewed/released/expired/cancelled reach it."""
    graph = receivers()
    agent = _agent(tmp_path, "[scheduler]\nqueue_timeout_s = 0.5\n", GRAPH_SERVICE_URL=f"{graph.url}/events")
    try:
        with httpx.Client(base_url=agent.url) as api:
            body = {"service_name": "wf", "gpu_count": 1, "workload_data": {"workflow_id": "wf-1"}}
            first = api.post("/gpu/allocate", json=body).json()
            api.post("/gpu/renew", json={"allocation_id": first["id"], "ttl_seconds": 600})
            api.post("/gpu/allocate", json=body | {"request_id": "q-cancel"})
            api.post("/gpu/release", json={"request_id": "q-cancel"})
            api.post("/gpu/allocate", json=body | {"request_id": "q-timeout"})
            wait_for(lambda: api.get("/gpu/requests/q-timeout").json()["status"] == "expired")
            api.post("/gpu/release", json={"allocation_id": first["id"]})
            wait_for(lambda: len(graph.requests) >= 7)
        kinds = [b["event"] for b in graph.bodies()]
        assert sorted(kinds) == sorted(
            ["allocated", "renewed", "queued", "cancelled", "queued", "expired", "released"]
        )
        assert all(b["workflow_id"] == "wf-1" and b["type"] == f"gpu.allocation.{b['event']}" for b in graph.bodies())
        assert {path for path, _, _ in graph.requests} == {"/events"}
    finally:
        agent.kill()


def test_a_dead_graph_service_delays_events_never_allocations(tmp_path: Path) -> None:
    """Events to an unreachable graph service wait in the outbox; allocations go on."""
    agent = _agent(tmp_path, simulate="2xH100-80GB", GRAPH_SERVICE_URL="http://127.0.0.1:9/events")
    try:
        with httpx.Client(base_url=agent.url, timeout=5.0) as api:
            started = time.monotonic()
            for _ in range(5):
                alloc = api.post("/gpu/allocate", json={"service_name": "s", "gpu_count": 1}).json()
                api.post("/gpu/release", json={"allocation_id": alloc["id"]})
            assert time.monotonic() - started < 5.0
            pending = wait_for(lambda: api.get("/healthz").json()["outbox"]["pending"])
            assert pending >= 10
    finally:
        agent.kill()


ADVICE = {"required_gpus": 2, "min_memory_mb": 20000, "priority": 9, "reasoning": "two shards"}


@pytest.mark.parametrize(
    "answer, decided_by, reason_prefix",
    [
        pytest.param((200, {"structured_output": ADVICE}, 0.0), "advisor", None, id="good"),
        pytest.param((200, {"structured_output": ADVICE | {"priority": 99}}, 0.0), "analyzer", "invalid_output",
                     id="bad-priority"),
        pytest.param((200, {"messages": []}, 0.0), "analyzer", "invalid_output", id="no-structured-output"),
        pytest.param((200, {"structured_output": ADVICE | {"min_memory_mb": 500_000}}, 0.0), "analyzer",
                     "invalid_output: min_memory_mb above every GPU", id="memory-no-gpu-has"),
        pytest.param((503, {}, 0.0), "analyzer", "http_503", id="http-error"),
        pytest.param((200, {"structured_output": ADVICE}, 2.0), "analyzer", "timeout", id="timeout"),
    ],
)
def test_advisor_decides_or_the_analyzer_falls_back(
    tmp_path: Path, receivers: Callable[..., Receiver], answer: tuple[int, Any, float], decided_by: str,
    reason_prefix: str | None,
) -> None:
    """The advisor's valid answer is used (and recorded); a bad or slow one falls back within the timeout."""
    advisor = receivers(lambda n, body: answer)
    agent = _agent(tmp_path, "[integrations]\ndeepagents_timeout_s = 0.5\n", simulate="4xH100-80GB",
                   DEEPAGENTS_URL=advisor.url)
    try:
        with httpx.Client(base_url=agent.url, timeout=10.0) as api:
            started = time.monotonic()
            alloc = api.post("/gpu/allocate", json={"service_name": "inf", "workload_type": "inference"})
            assert time.monotonic() - started < 1.5
            analysis = api.post("/gpu/workload", json={"workload_type": "inference"}).json()
        assert alloc.status_code == 200
        requirements = alloc.json()["requirements"]
        assert requirements["decided_by"] == decided_by
        assert analysis["decided_by"] == decided_by
        if decided_by == "advisor":
            assert (requirements["gpu_count"], requirements["min_memory_mb"], alloc.json()["priority"]) == (2, 20000, 9)
            assert requirements["estimate"]["reasoning"] == "two shards"
        else:
            assert (requirements["gpu_count"], requirements["min_memory_mb"]) == (1, 4096)
            assert analysis["advisor_fallback_reason"].startswith(reason_prefix)
        path, _, request = advisor.requests[0]
        assert path == "/invoke/structured" and request["response_format"]["type"] == "json_schema"
    finally:
        agent.kill()


def test_sigterm_lets_requests_in_flight_finish(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    """SIGTERM while an allocate waits on a slow advisor: it is still answered, then the agent exits 0."""
    advisor = receivers(lambda n, body: (200, {"structured_output": ADVICE}, 1.0))
    agent = _agent(tmp_path, "[integrations]\ndeepagents_timeout_s = 3.0\n", simulate="4xH100-80GB",
                   DEEPAGENTS_URL=advisor.url)
    answers: list[httpx.Response] = []

    def allocate() -> None:
        with httpx.Client(base_url=agent.url, timeout=10.0) as api:
            answers.append(api.post("/gpu/allocate", json={"service_name": "late", "workload_type": "ocr"}))

    worker = threading.Thread(target=allocate)
    try:
        worker.start()
        wait_for(lambda: advisor.requests)
        assert agent.stop() == 0
        worker.join(timeout=10)
        assert answers and answers[0].status_code == 200
        assert answers[0].json()["requirements"]["decided_by"] == "advisor"
    finally:
        agent.kill()
