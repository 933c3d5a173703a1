"""Serve from the first second: a server that waits for its bootstrap peers still answers.

The first server of a new 3-server cluster starts alone. It must not hang
before HTTP (systemd would time it out and restart it in a loop): /healthz is
200 and says what it waits for, /cluster/members and /metrics answer, and a
write is refused with 503 no_leader and Retry-After. Once its peers arrive the
cluster bootstraps and the same server takes writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.agent_process import cluster_agents, start_together
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

HOSTS = ["127.0.0.36", "127.0.0.37", "127.0.0.38"]


def test_the_first_server_serves_alone_and_takes_writes_once_its_peers_arrive(tmp_path: Path) -> None:
    first, *peers = cluster_agents(tmp_path, HOSTS, ["sf-1", "sf-2", "sf-3"], servers=3, simulate="1xH100-80GB")
    try:
        started = time.monotonic()
        first.start()  # returns once /healthz answers 200
        print(f"/healthz answered {time.monotonic() - started:.2f} s after the process started")
        with httpx.Client(base_url=first.url, timeout=10) as api:
            health = api.get("/healthz").json()
            assert health["status"] == "ok"
            assert health["waiting_for"] == "bootstrap: 1 of 3 servers seen"
            assert health["role"] == "waiting" and health["leader"] is None
            assert [m["name"] for m in api.get("/cluster/members").json()["members"]] == ["sf-1"]
            assert api.get("/metrics").status_code == 200
            refused = api.post("/gpu/allocate", json={"service_name": "early", "gpu_count": 1})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "no_leader"
            assert int(refused.headers["Retry-After"]) >= 1

            start_together(peers)
            wait_for(lambda: api.get("/healthz").json().get("waiting_for") is None, timeout=30)
            wait_for(lambda: api.get("/healthz").json()["leader"] is not None, timeout=30)
            granted = api.post("/gpu/allocate", json={"service_name": "late", "gpu_count": 1, "request_id": "sf-late"})
            assert granted.status_code == 200, granted.text
            assert api.get("/gpu/requests/sf-late").json()["status"] == "allocated"
    finally:
        for agent in [first, *peers]:
            agent.kill()
