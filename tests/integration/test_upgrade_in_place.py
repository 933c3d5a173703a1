"""Upgrade in place: a state file the lone agent wrote before it ran on Raft opens with everything it held.

The files in tests/fixtures/ were written by the release at 580c749 (LocalLog),
one with log entries only and one with that release's snapshot at entry 6
(tests/fixtures/README.md). Each is copied into a data dir and opened:

- directly (`adopt_lone_agent_log`): the Raft snapshot holds exactly the lease
  table the old agent served — the allocations and queue of its last
  `/gpu/list`, the drain — the old tables are gone, the undelivered outbox
  rows are kept, and a second run changes nothing;
- by a real agent started on it: it serves those leases (by request id, as
  their times now say), the drain, the outbox, and new writes continue the
  old log's indices.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import httpx
import msgpack
import pytest

from coordinator.lease_table import LeaseTable
from coordinator.model import GpuRef
from agent.raft_storage import RaftStorage
from agent.state_migration import Adopted, adopt_lone_agent_log
from tests.agent_process import AgentProcess
from tests.waiting import wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED = json.loads((FIXTURES / "lone-agent-0.1.0.expected.json").read_text())
STATE_FILES = ["lone-agent-0.1.0.state.db", "lone-agent-0.1.0-snapshot.state.db"]
NODE = "legacy-host"


def copied(name: str, data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / "state.db"
    shutil.copyfile(FIXTURES / name, target)
    return target


def outbox_rows(path: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(path) as db:
        return [(str(i), int(n), int(d)) for i, n, d in db.execute(
            "SELECT id, log_index, delivered_at IS NOT NULL FROM outbox ORDER BY log_index, id"
        )]


@pytest.mark.parametrize("name", STATE_FILES)
def test_the_old_log_becomes_a_raft_snapshot_of_the_same_table(name: str, tmp_path: Path) -> None:
    path = copied(name, tmp_path)
    rows_before = outbox_rows(path)
    assert len(rows_before) == 9 and not any(delivered for _, _, delivered in rows_before)
    storage = RaftStorage(path)
    adopted = adopt_lone_agent_log(storage, NODE)
    assert adopted == Adopted(last_index=10, replayed=10 if "snapshot" not in name else 4, allocations=2, queued=1)
    state = storage.load()
    assert state.snapshot is not None and (state.snapshot.index, state.snapshot.term, state.snapshot.voters) == (10, 1, (NODE,))
    assert (state.hard_state.term, state.hard_state.commit) == (1, 10) and state.entries == ()
    table = LeaseTable.restore(msgpack.unpackb(state.snapshot.data, raw=False))
    assert sorted(a.allocation_id for a in table.allocations()) == sorted(a["allocation_id"] for a in EXPECTED["allocations"])
    for expected in EXPECTED["allocations"]:
        alloc = table.allocation(expected["allocation_id"])
        assert alloc is not None and alloc.request.request_id == expected["request_id"]
        assert [g.index for g in alloc.gpus] == expected["gpu_ids"]
    assert [q.request.request_id for q in table.queue()] == [q["request_id"] for q in EXPECTED["queue"]]
    assert table.queued("wait-1") is not None and table.queued("wait-1").request.webhook_url == "http://127.0.0.1:9/hook"  # type: ignore[union-attr]
    assert table.drained() == {GpuRef(NODE, 3): "fan replaced"}
    # Idempotent: the old tables are gone, a second start finds nothing to adopt.
    assert adopt_lone_agent_log(storage, NODE) is None
    assert storage.load() == state
    storage.close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"log", "snapshot"}.isdisjoint(tables)
    assert outbox_rows(path) == rows_before


def _epoch(rfc3339: str | None) -> float | None:
    return None if rfc3339 is None else datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


@pytest.mark.integration
@pytest.mark.parametrize("name", STATE_FILES)
def test_an_agent_started_on_an_old_state_file_serves_what_it_held(name: str, tmp_path: Path) -> None:
    path = copied(name, tmp_path / "data")
    agent = AgentProcess(data_dir=tmp_path / "data", host="127.0.0.29", node_name=NODE, simulate="4xH100-80GB")
    agent.start()
    try:
        with httpx.Client(base_url=agent.url, timeout=10) as api:
            check_served(api)
    finally:
        agent.stop()
    old_rows = [row for row in outbox_rows(path) if row[1] <= 10]
    assert len(old_rows) == 9


def check_served(api: httpx.Client) -> None:
    """The migrated leases, queue, drain and outbox, and a new write after the old log."""
    now = time.time()
    # The leases and the queued request, under their request ids, as their own times now say
    # (the fixture is fixed; its leases and queue deadline pass as the calendar moves on).
    for expected in EXPECTED["allocations"]:
        record = api.get(f"/gpu/requests/{expected['request_id']}").json()
        assert record["allocation_id"] == expected["allocation_id"]
        live = (_epoch(expected["expires_at"]) or float("inf")) > now + 60
        if live:
            assert record["status"] == "allocated"
            assert api.get(f"/gpu/allocations/{expected['allocation_id']}").json()["gpu_ids"] == expected["gpu_ids"]
    queued = api.get("/gpu/requests/wait-1").json()
    assert queued["status"] in ("queued", "allocated", "expired")
    if (_epoch(EXPECTED["queue"][0]["queue_deadline"]) or float("inf")) > now + 60:
        assert queued["status"] in ("queued", "allocated")
    gpu3 = next(g for g in api.get("/gpu/status").json()["gpus"] if g["index"] == 3)
    assert (gpu3["drained"], gpu3["drain_reason"]) == (True, "fan replaced")
    # The undelivered rows of the old log wait in the outbox (their target is a closed port).
    wait_for(lambda: api.get("/healthz").json()["outbox"]["pending"] >= 9)
    # New writes continue after the old log's last index (10): outbox rows keyed by index never collide.
    released = api.post("/gpu/release", json={"service_name": "inference"})
    assert released.status_code == 200
    assert api.get("/healthz").json()["lease_table"]["applied_index"] > 10
