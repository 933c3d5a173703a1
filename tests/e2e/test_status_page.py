"""The status page in a real browser (headless Chromium) against a real three-server Raft cluster.

Three Raft servers on 127.0.0.2-4 join through the first ("local" profile, two
simulated GPUs each). Chromium loads a follower's `/` (so the page's reads are
forwarded to the leader) and dumps the DOM once the page's script has run:
every GPU of the cluster is there, by node, with the members, the leader and the
queue. After an allocation of page-a's two GPUs and a queued request for them,
a second dump shows who holds the GPUs and what waits. A screenshot lands in test-artifacts/ (gitignored)
for a human to look at. Skipped, with the reason, where Chromium is not installed
(.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.agent_process import AgentProcess, cluster_agents, start_together
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
    fleet = f"{GPUS_PER_AGENT}xH100-80GB"
    # page-c's GPU 1 raises XID 79 (fallen off the bus) a second after start: unhealthy, with a reason.
    agents = cluster_agents(root, HOSTS, NAMES, servers=len(NAMES), simulate=[fleet, fleet, f"{fleet};xid=1:79@1"])
    try:
        start_together(agents)
        wait_for(
            lambda: len(httpx.get(agents[0].url + "/gpu/status", timeout=5).json()["gpus"])
            == GPUS_PER_AGENT * len(HOSTS),
            timeout=30.0,
        )
        yield agents
    finally:
        for agent in agents:
            agent.kill()


def row_of(dom: str, key: str, attribute: str = "data-gpu") -> str:
    """The <tr> of the dumped DOM whose `attribute` is `key`, with its attributes."""
    return dom.split(f'{attribute}="{key}"', 1)[1].split("</tr>", 1)[0]


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
    leader = wait_for(lambda: httpx.get(cluster[0].url + "/cluster/leader", timeout=5).json()["leader"], timeout=20)
    follower = next(a for a in cluster if a.node_name != leader)
    url = follower.url + "/"
    drained = httpx.post(
        follower.url + "/gpu/drain", json={"node": "page-b", "index": 0, "reason": "bios update"}, timeout=5
    )
    assert drained.status_code == 200, drained.text
    wait_for(
        lambda: [
            g for g in httpx.get(follower.url + "/gpu/list", timeout=5).json()["gpus"]
            if (g["node"], g["index"], g["health"]) == ("page-c", 1, "unhealthy")
        ],
        timeout=30.0,
    )
    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    for name in NAMES:
        assert f'data-node="{name}"' in dom and f'data-member="{name}"' in dom
        for index in range(GPUS_PER_AGENT):
            assert f'data-gpu="{name}/{index}"' in dom
    assert '<div id="queue"><p class="empty">The queue is empty.</p></div>' in dom
    assert f'<strong id="leader">{leader}</strong>' in dom  # the Raft leader, as the members list marks it
    assert '<span id="state">updated ' in dom

    # Drained and unhealthy are distinct states, each with its reason.
    drained_row = row_of(dom, "page-b/0")
    assert 'data-health="healthy" data-drained="true"' in drained_row
    assert "drained: bios update" in drained_row and "unhealthy" not in drained_row
    broken_row = row_of(dom, "page-c/1")
    assert 'data-health="unhealthy" data-drained="false"' in broken_row
    assert "XID 79" in broken_row and "in service" in broken_row
    # Temperature and power of the GPUs the answering agent samples itself.
    assert "\u00b0C</td>" in dom and " W</td>" in dom
    # One time format throughout: UTC to the second, never raw RFC 3339.
    assert re.search(r'<span id="state">updated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</span>', dom)
    assert not re.search(r">\d{4}-\d\d-\d\dT", dom)
    # Members show the address they advertise, never a wildcard.
    assert "0.0.0.0" not in dom
    for agent in cluster:
        assert f"<td class=\"wide\">{agent.url}</td>" in row_of(dom, agent.node_name, "data-member")
    assert '<div id="warnings"></div>' in dom  # loopback: nothing to warn about

    on_page_a = {"node": "page-a"}
    held = httpx.post(
        follower.url + "/gpu/allocate",
        json={"service_name": "trainer", "gpu_count": 2, "constraints": on_page_a},
        timeout=5,
    )
    assert held.status_code == 200
    queued = httpx.post(
        follower.url + "/gpu/allocate",
        json={"service_name": "waiter", "gpu_count": 2, "request_id": "waits-for-page-a", "constraints": on_page_a},
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
