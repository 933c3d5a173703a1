"""GPU health end to end: a simulated XID takes a GPU out, tells its lease's owner, and it comes back.

The simulated fleet raises XID 79 on GPU 1 shortly after start (`--simulate`'s
fault schedule); the agent's quiet period is a few seconds so recovery is seen.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent_process import AgentProcess
from tests.waiting import wait_for
from tests.integration.test_integrations import Receiver

pytestmark = pytest.mark.integration


def _gpu(api: httpx.Client, index: int) -> dict[str, Any]:
    return next(g for g in api.get("/gpu/status").json()["gpus"] if g["index"] == index)


def test_xid_unhealthy_reported_avoided_and_recovered(tmp_path: Path) -> None:
    """XID 79 on a leased GPU: unhealthy with the reason, webhook + metrics, never chosen, back after quiet."""
    hook = Receiver(lambda n, body: (200, {}, 0.0))
    config = tmp_path / "agent.toml"
    config.write_text("[devices]\nhealth_quiet_period_s = 4.0\n")
    agent = AgentProcess(
        data_dir=tmp_path / "data",
        simulate="2xH100-80GB;xid=1:79@2",
        extra_args=["--config", str(config)],
    )
    agent.start()
    try:
        with httpx.Client(base_url=agent.url, timeout=10.0) as api:
            lease = api.post(
                "/gpu/allocate", json={"service_name": "victim", "gpu_count": 2, "webhook_url": hook.url}
            ).json()
            sick = wait_for(lambda: (g := _gpu(api, 1))["health"] == "unhealthy" and g)
            assert sick["health_reasons"] == ["XID 79"] and sick["healthy_again_at"]
            assert sick["telemetry"]["last_xid"] == 79
            event = wait_for(lambda: hook.bodies())[0]
            assert (event["status"], event["allocation"]["id"]) == ("gpu_unhealthy", lease["id"])
            assert "XID 79" in event["reason"]
            metrics = api.get("/metrics").text
            assert re.search(r'gpu_orchestrator_gpu_health\{[^}]*gpu="1"[^}]*state="unhealthy"\} 1\.0', metrics)
            assert "gpu_orchestrator_allocations_on_unhealthy_gpus 1.0" in metrics
            assert re.search(r'DCGM_FI_DEV_XID_ERRORS\{[^}]*gpu="1"[^}]*\} 79\.0', metrics)
            assert api.get("/healthz").json()["devices"]["unhealthy"] == 1
            # The lease is kept (its owner decides); a new request never lands on the sick GPU.
            api.post("/gpu/release", json={"allocation_id": lease["id"]})
            one = api.post("/gpu/allocate", json={"service_name": "next", "gpu_count": 1}).json()
            assert one["gpu_ids"] == [0]
            refused = api.post("/gpu/allocate", json={"service_name": "more", "gpu_count": 1, "queue": False})
            assert refused.status_code == 409
            wait_for(lambda: _gpu(api, 1)["health"] == "healthy", timeout=15.0)
            again = api.post("/gpu/allocate", json={"service_name": "more", "gpu_count": 1, "queue": False})
            assert again.status_code == 200 and again.json()["gpu_ids"] == [1]
    finally:
        agent.kill()
        hook.close()


def test_health_state_survives_a_restart_in_the_lease_table(tmp_path: Path) -> None:
    """A drained GPU stays drained across kill -9: drains are durable commands."""
    agent = AgentProcess(data_dir=tmp_path / "data", simulate="2xH100-80GB")
    agent.start()
    try:
        with httpx.Client(base_url=agent.url, timeout=10.0) as api:
            api.post("/gpu/drain", json={"index": 0, "reason": "RMA pending"})
        agent.kill()
        agent.start()
        with httpx.Client(base_url=agent.url, timeout=10.0) as api:
            row = _gpu(api, 0)
            assert (row["drained"], row["drain_reason"]) == (True, "RMA pending")
            assert api.post("/gpu/allocate", json={"service_name": "s", "gpu_count": 1}).json()["gpu_ids"] == [1]
    finally:
        agent.kill()
