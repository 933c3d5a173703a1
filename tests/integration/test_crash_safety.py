"""Crash safety: `kill -9` right after allocations are acknowledged loses none of them.

Clients allocate and release as fast as they can; the agent is SIGKILLed while
requests are in flight and restarted on the same data dir. Every allocation
whose 200 reached a client (and whose release was never sent) must be listed
after the restart, and every acknowledged release must stay released.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.agent_process import AgentProcess

pytestmark = pytest.mark.integration


def _client_loop(
    url: str,
    name: str,
    stop: threading.Event,
    acked: dict[str, str],
    releasing: set[str],
    released: set[str],
) -> None:
    rng = random.Random(name)
    with httpx.Client(base_url=url, timeout=5.0) as client:
        held: list[str] = []
        while not stop.is_set():
            try:
                if held and rng.random() < 0.4:
                    alloc_id = held.pop(rng.randrange(len(held)))
                    # A release in flight at the kill may or may not have been applied.
                    releasing.add(alloc_id)
                    if client.post("/gpu/release", json={"allocation_id": alloc_id}).status_code == 200:
                        released.add(alloc_id)
                else:
                    response = client.post(
                        "/gpu/allocate",
                        json={"service_name": name, "gpu_count": 1, "queue": False, "ttl_seconds": 3600},
                    )
                    if response.status_code == 200:
                        alloc_id = response.json()["id"]
                        acked[alloc_id] = name
                        held.append(alloc_id)
            except httpx.HTTPError:
                return  # the agent died under us: what was acknowledged is recorded


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_loses_no_acknowledged_allocation(tmp_path: Path, seed: int) -> None:
    """SIGKILL during a burst of allocations and releases; after restart the table matches the acks."""
    rng = random.Random(seed)
    agent = AgentProcess(data_dir=tmp_path / "data", simulate="64xH100-80GB")
    agent.start()
    acked: dict[str, str] = {}
    releasing: set[str] = set()
    released: set[str] = set()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_client_loop, args=(agent.url, f"svc-{i}", stop, acked, releasing, released))
        for i in range(8)
    ]
    try:
        for t in threads:
            t.start()
        # Kill mid-burst: once some allocations are acknowledged (however slow the
        # machine is today), at a seeded moment after that.
        deadline = time.monotonic() + 20.0
        while len(acked) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        agent.kill()
        stop.set()
        for t in threads:
            t.join(timeout=10)
        assert acked, f"no allocation was acknowledged before the kill (seed {seed})"
        agent.start()
        with httpx.Client(base_url=agent.url, timeout=5.0) as client:
            live = {a["id"] for a in client.get("/gpu/list").json()["allocations"]}
        must_live = set(acked) - releasing
        assert must_live <= live, f"lost acknowledged allocations {sorted(must_live - live)} (seed {seed})"
        assert not (released & live), f"acknowledged releases came back {sorted(released & live)} (seed {seed})"
    finally:
        stop.set()
        agent.kill()
