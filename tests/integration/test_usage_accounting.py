"""Usage accounting through a real agent: the leader measures utilization and the log carries it.

One lone agent on simulated GPUs (a leased simulated GPU gets busy, as a job
would make it), with `[accounting] record_interval_s = 1` so a record comes
every second. A lease's utilized GPU-seconds must reach GET /usage and the
leader's counter, stay at most its allocated GPU-seconds, and survive a restart
(they are in the replicated state, not in the process).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def usage_of(agent: AgentProcess, service: str) -> dict[str, Any] | None:
    doc = httpx.get(agent.url + "/usage", params={"since": "1h"}).json()
    return next((row for row in doc["usage"] if row["service"] == service), None)


def test_utilized_seconds_are_measured_recorded_and_kept_across_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[accounting]\nrecord_interval_s = 1.0\n")
    agent = AgentProcess(
        data_dir=tmp_path / "data", host="127.0.0.121", simulate="2xH100-80GB", extra_args=["--config", str(config)]
    ).start()
    try:
        alloc = httpx.post(agent.url + "/gpu/allocate", json={"service_name": "busy", "gpu_count": 2}).json()
        row = wait_for(lambda: (r := usage_of(agent, "busy")) and r["utilized_gpu_seconds"] > 1.0 and r, timeout=20.0)
        assert row["utilized_gpu_seconds"] <= row["allocated_gpu_seconds"]
        assert httpx.post(agent.url + "/gpu/release", json={"allocation_id": alloc["id"]}).status_code == 200
        # The last second's utilization is recorded after the release; then nothing more comes:
        # two reads a record interval and more apart agree (the first read only sets the mark).
        last: list[Any] = [None]

        def settled() -> bool:
            now = usage_of(agent, "busy")
            unchanged = last[0] is not None and now == last[0]
            last[0] = now
            return unchanged

        wait_for(settled, timeout=20.0, interval=1.5)
        before = last[0]
        assert before is not None
        text = httpx.get(agent.url + "/metrics").text
        counted = re.search(
            r'^gpu_orchestrator_usage_gpu_seconds_total\{queue="default",service="busy",kind="utilized"\} (\S+)', text, re.M
        )
        assert counted is not None and float(counted.group(1)) == pytest.approx(before["utilized_gpu_seconds"])
    finally:
        agent.kill()
    again = AgentProcess(
        data_dir=tmp_path / "data", host="127.0.0.121", simulate="2xH100-80GB", extra_args=["--config", str(config)]
    ).start()
    try:
        after = usage_of(again, "busy")
        assert after is not None
        assert after["allocated_gpu_seconds"] == before["allocated_gpu_seconds"]
        assert after["utilized_gpu_seconds"] == before["utilized_gpu_seconds"]
    finally:
        again.kill()
