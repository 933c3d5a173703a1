"""Every request is answered within `[http] request_timeout_s`, whatever it waits on.

One agent on 127.0.0.96 whose DeepAgents advisor (on 127.0.0.97) never answers
in time, with a 30 s advisor timeout: analysing a workload then waits far
longer than the agent's 3 s request bound. The agent answers anyway, at the
bound: a read-only call with 503 `timeout`, an allocate (a write that may have
been proposed, as far as the bound can tell) with 503 `outcome_unknown`, both
with Retry-After; and it keeps answering other calls meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.agent_process import AgentProcess

pytestmark = pytest.mark.integration

AGENT_HOST = "127.0.0.96"
ADVISOR_HOST = "127.0.0.97"
BOUND_S = 3.0


@pytest.fixture()
def stuck_advisor() -> Iterator[str]:
    """An advisor that accepts requests and answers none until the test ends."""
    release = threading.Event()

    class Stuck(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            release.wait(timeout=60)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((ADVISOR_HOST, 0), Stuck)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{ADVISOR_HOST}:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_requests_stuck_on_a_dependency_are_answered_at_the_bound(tmp_path: Path, stuck_advisor: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"[http]\nrequest_timeout_s = {BOUND_S}\n[integrations]\ndeepagents_timeout_s = 30.0\n")
    agent = AgentProcess(
        data_dir=tmp_path / "agent",
        host=AGENT_HOST,
        simulate="2xH100-80GB",
        env={"CONFIG_PATH": str(config), "DEEPAGENTS_URL": stuck_advisor},
    )
    agent.start()
    try:
        body = {"service_name": "svc", "workload_type": "inference", "workload_data": {"model_name": "x"}}
        with httpx.Client(base_url=agent.url, timeout=30.0) as client:
            started = time.monotonic()
            workload = client.post("/gpu/workload", json=body)
            took = time.monotonic() - started
            assert workload.status_code == 503, workload.text
            assert workload.json()["error"]["code"] == "timeout"
            assert workload.headers["Retry-After"] == "1"
            assert BOUND_S - 0.5 <= took < BOUND_S + 2.0, took

            started = time.monotonic()
            allocate = client.post("/gpu/allocate", json=body | {"request_id": "bound-1"})
            took = time.monotonic() - started
            assert allocate.status_code == 503, allocate.text
            assert allocate.json()["error"]["code"] == "outcome_unknown"
            assert took < BOUND_S + 2.0, took

            # The agent itself is fine: other calls are answered at once.
            assert client.get("/healthz", timeout=2.0).status_code == 200
            assert client.get("/gpu/requests/bound-1", timeout=2.0).status_code == 404  # nothing was proposed
    finally:
        agent.kill()
