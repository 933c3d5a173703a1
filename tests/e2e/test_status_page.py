"""The status page in a real browser (headless Chromium) against a real three-agent gossip cluster.

Three agents on 127.0.0.2-4 join through the first ("local" SWIM profile, two
simulated GPUs each). Chromium loads the first agent's `/` and dumps the DOM
once the page's script has run: every GPU of the cluster is there, by node, with
the queue. After an allocation and a queued request, a second dump shows who
holds the GPUs and what waits. A screenshot lands in test-artifacts/ (gitignored)
for a human to look at. Skipped, with the reason, where Chromium is not installed
(.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
NAMES = ["page-a", "page-b", "page-c"]
GPUS_PER_AGENT = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does)")
    root = tmp_path_factory.mktemp("status-page")
    config = root / "agent.toml"
    config.write_text('[cluster]\nprofile = "local"\n')
    agents: list[AgentProcess] = []
    try:
        for host, name in zip(HOSTS, NAMES):
            agent = AgentProcess(
                data_dir=root / name, host=host, node_name=name, simulate=f"{GPUS_PER_AGENT}xH100-80GB",
                join=[agents[0].gossip_address] if agents else [], extra_args=["--config", str(config)],
            )
            agents.append(agent.start())
        wait_for(
            lambda: len(httpx.get(agents[0].url + "/gpu/status", timeout=5).json()["gpus"])
            == GPUS_PER_AGENT * len(HOSTS),
            timeout=30.0,
        )
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def chromium(url: str, profile: Path, *args: str) -> str:
    """Run headless Chromium on `url` with `args`; return its stdout (the DOM for --dump-dom)."""
    assert CHROMIUM is not None
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_page_shows_every_gpu_then_the_allocation_and_the_queue(
    cluster: list[AgentProcess], tmp_path: Path
) -> None:
    """First dump: six GPUs on three nodes, three members, an empty queue. Then allocate both GPUs of
    page-a and queue a request: the second dump shows the holder and the waiting request."""
    url = cluster[0].url + "/"
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    for name in NAMES:
        assert f'data-node="{name}"' in dom and f'data-member="{name}"' in dom
        for index in range(GPUS_PER_AGENT):
            assert f'data-gpu="{name}/{index}"' in dom
    assert '<div id="queue"><p class="empty">The queue is empty.</p></div>' in dom
    assert '<span id="state">updated ' in dom

    held = httpx.post(cluster[0].url + "/gpu/allocate", json={"service_name": "trainer", "gpu_count": 2}, timeout=5)
    assert held.status_code == 200
    queued = httpx.post(
        cluster[0].url + "/gpu/allocate",
        json={"service_name": "waiter", "gpu_count": 2, "request_id": "waits-for-page-a"},
        timeout=5,
    )
    assert queued.status_code == 202
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    assert f'data-allocation="{held.json()["allocation_id"]}"' in dom
    assert 'data-request="waits-for-page-a"' in dom and '<p class="empty">The queue is empty.' not in dom
    gpu_row = dom.split('data-gpu="page-a/0"', 1)[1].split("</tr>", 1)[0]
    assert "trainer" in gpu_row

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    chromium(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,1000")
    assert shot.stat().st_size > 10_000
    phone = ARTIFACTS / "status-page-phone.png"
    chromium(url, tmp_path / "profile", f"--screenshot={phone}", "--window-size=390,1200")
    assert phone.stat().st_size > 5_000
