"""A Raft cluster's outbox holds only what is still to be delivered, however long the history.

Every server derives the same outbox rows from the log; only the leader
delivers them, and it replicates how far it got (OutboxDelivered), so every
server drops the rows behind that point. Before, a server's outbox was pruned
only by the lone agent's snapshot code and grew without bound on every server.

10,000 allocate/release pairs go through a 3-server cluster whose graph
service (a receiver in this test) hears every event; afterwards every event
has been delivered and no server's state file keeps a row of it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.agent_process import cluster_agents, free_port, start_together
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = ["127.0.0.56", "127.0.0.57", "127.0.0.58"]
PAIRS = 10_000
WORKERS = 4


class GraphReceiver:
    """The graph service: answers 204 to every event and remembers (event, allocation) pairs."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.posts = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    receiver.posts += 1
                    receiver.seen.add((body["event"], body["allocation_id"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port("127.0.0.1")), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GraphReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def outbox_rows(state_file: Path) -> int:
    with sqlite3.connect(state_file) as db:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])


def test_ten_thousand_pairs_leave_no_delivered_row_on_any_server(tmp_path: Path) -> None:
    with GraphReceiver() as graph:
        agents = cluster_agents(
            tmp_path, HOSTS, ["ob-1", "ob-2", "ob-3"], servers=3, simulate="8xH100-80GB",
            cluster_settings="snapshot_every = 1000\n",
        )
        for agent in agents:
            agent.env["GRAPH_SERVICE_URL"] = graph.url
        try:
            start_together(agents)
            leader_name = wait_for(lambda: httpx.get(f"{agents[0].url}/cluster/leader").json()["leader"], timeout=30)
            leader = next(a for a in agents if a.node_name == leader_name)

            def pairs(worker: int) -> None:
                with httpx.Client(base_url=leader.url, timeout=30) as api:
                    for n in range(worker, PAIRS, WORKERS):
                        granted = api.post("/gpu/allocate", json={"service_name": "churn", "gpu_count": 1, "request_id": f"p{n}"})
                        assert granted.status_code == 200, granted.text
                        released = api.post("/gpu/release", json={"allocation_id": granted.json()["allocation_id"]})
                        assert released.status_code == 200, released.text

            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(pairs, range(WORKERS)))
            # Every event is delivered, and the leader's progress reaches every server.
            wait_for(lambda: len(graph.seen) >= 2 * PAIRS, timeout=120)
            wait_for(lambda: httpx.get(f"{leader.url}/healthz").json()["outbox"]["pending"] == 0, timeout=60)
            wait_for(lambda: all(outbox_rows(a.data_dir / "state.db") == 0 for a in agents), timeout=60)
        finally:
            for agent in agents:
                agent.stop()
    assert {kind for kind, _ in graph.seen} == {"allocated", "released"}
    print(f"{graph.posts} POSTs for {len(graph.seen)} distinct events; outbox rows left: "
          f"{[outbox_rows(a.data_dir / 'state.db') for a in agents]}")
