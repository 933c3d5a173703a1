"""Real Prometheus tools against real agents: what an operator's monitoring will see.

`promtool check metrics` reads a live agent's /metrics (after an allocation, so
the orchestrator gauges have samples). It must parse the text. Its lint may
flag only what SPEC's dcgm-exporter names and labels force on the DCGM_* series
(see docs/monitoring.md); the gpu_orchestrator_* families must lint clean.

Then a real Prometheus server scrapes two agents (gpu-a on 127.0.0.2 and gpu-b
on 127.0.0.3, two simulated GPUs each) every second. The per-GPU series arrive
with the labels that tell the GPUs apart, an allocation on gpu-a shows in
`sum by (Hostname)`, and every query of the Grafana dashboard parses.

Needs Debian's `prometheus` package (prometheus and promtool); .ci/run installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx
import pytest

from tests.agent_process import AgentProcess, free_port
from tests.unit.test_dashboard import load as load_dashboard
from tests.unit.test_dashboard import panel_exprs, variable_exprs

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="prometheus and promtool not installed (Debian package `prometheus`; .ci/run installs it)",
    ),
]

SCRAPE_DEADLINE_S = 30.0
SIMULATED = "2xH100-80GB"

# promtool's lint problems that SPEC's dcgm-exporter compatibility forces, as
# (metric name pattern, message). dcgm-exporter's label `modelName` is camelCase;
# promlint flags a type name inside any metric name, whatever the type, and
# dcgm's own name for PCIe replays ends in `_COUNTER`.
ALLOWED_LINTS = (
    (re.compile(r"DCGM_\w+"), "label names should be written in 'snake_case' not 'camelCase'"),
    (re.compile(r"DCGM_FI_DEV_PCIE_REPLAY_COUNTER"), "metric name should not include type 'counter'"),
    # The Go service's own gauge name, kept for its dashboards (docs/monitoring.md).
    (re.compile(r"gpu_allocator_gpus_allocated_total"), 'non-counter metrics should not have "_total" suffix'),
)
_LINT_LINE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*) (?P<message>.+)$")

T = TypeVar("T")


def eventually(fetch: Callable[[], T], done: Callable[[T], bool], what: str, diagnose: Callable[[], str]) -> T:
    """Poll `fetch` until `done` holds (at most SCRAPE_DEADLINE_S); fail with the last value and `diagnose()`."""
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {SCRAPE_DEADLINE_S}s; last: {value!r}\n{diagnose()}")
        time.sleep(0.25)


def promtool_lint(text: str) -> tuple[int, list[tuple[str, str]], str]:
    """Run `promtool check metrics` on `text`: (exit code, [(metric, problem)], raw output)."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    problems = []
    for line in output.splitlines():
        match = _LINT_LINE.match(line)
        assert match, f"promtool printed something other than a lint problem: {line!r}\n{output}"
        problems.append((match.group("name"), match.group("message")))
    return done.returncode, problems, output


def families(text: str, prefix: str) -> str:
    """The metric families of an exposition whose names start with `prefix` (HELP, TYPE and samples)."""
    keep = [
        line
        for line in text.splitlines()
        if line.startswith(prefix) or line.startswith(f"# HELP {prefix}") or line.startswith(f"# TYPE {prefix}")
    ]
    return "\n".join(keep) + "\n"


def test_promtool_parses_metrics_and_lints_only_dcgm_names(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(host="127.0.0.2", node_name="gpu-a", simulate=SIMULATED)
    allocated = httpx.post(f"{agent.url}/gpu/allocate", json={"service_name": "lint", "gpu_count": 1}, timeout=10)
    assert allocated.status_code == 200, allocated.text
    text = httpx.get(f"{agent.url}/metrics", timeout=10).text
    assert re.search(r'^gpu_orchestrator_gpu_allocated\{[^}]*gpu="0"[^}]*\} 1\.0$', text, re.M), text

    code, problems, output = promtool_lint(text)
    # 1 is promtool's "could not parse"; 3 is "parsed, with lint problems".
    assert code in (0, 3), f"promtool exit {code}:\n{output}"
    assert (code == 3) == bool(problems), output
    unexpected = [
        (name, message)
        for name, message in problems
        if not any(pattern.fullmatch(name) and message == allowed for pattern, allowed in ALLOWED_LINTS)
    ]
    assert not unexpected, f"lint problems beyond the dcgm-exporter names and labels: {unexpected}"

    code, problems, output = promtool_lint(families(text, "gpu_orchestrator_"))
    assert (code, problems) == (0, []), f"gpu_orchestrator_* must lint clean:\n{output}"


class ScrapedCluster:
    """Two agents and a Prometheus server scraping both."""

    def __init__(self, agents: dict[str, AgentProcess], prometheus_url: str, log: Path) -> None:
        self.agents = agents
        self.prometheus_url = prometheus_url
        self.log = log

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query; fails the test on any Prometheus error."""
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def diagnose(self) -> str:
        """Scrape targets' health and the end of Prometheus's log, for a failure message."""
        try:
            targets = httpx.get(f"{self.prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            health = [("targets unavailable", str(e), "")]
        log_tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"targets: {health}\nprometheus log:\n{log_tail}"


def write_config(path: Path, targets: list[str]) -> None:
    quoted = ", ".join(f'"{t}"' for t in targets)
    path.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: gpu-orchestrator\n"
        "    static_configs:\n"
        f"      - targets: [{quoted}]\n"
    )


def start_prometheus(tmp: Path, targets: list[str]) -> tuple[subprocess.Popen[bytes], str, Path]:
    assert PROMETHEUS is not None
    config = tmp / "prometheus.yml"
    write_config(config, targets)
    address = f"127.0.0.1:{free_port('127.0.0.1')}"
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://{address}", log


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"prometheus not ready within {SCRAPE_DEADLINE_S}s:\n{log.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScrapedCluster]:
    tmp = tmp_path_factory.mktemp("prometheus")
    agents: dict[str, AgentProcess] = {}
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        for name, host in (("gpu-a", "127.0.0.2"), ("gpu-b", "127.0.0.3")):
            agents[name] = AgentProcess(data_dir=tmp / name, host=host, node_name=name, simulate=SIMULATED)
            agents[name].start()
        prometheus, url, log = start_prometheus(tmp, [f"{a.host}:{a.port}" for a in agents.values()])
        wait_ready(prometheus, url, log)
        yield ScrapedCluster(agents, url, log)
    finally:
        if prometheus is not None:
            stop(prometheus)
        for agent in agents.values():
            agent.kill()


def test_prometheus_scrapes_every_gpu_of_both_agents(cluster: ScrapedCluster) -> None:
    result = eventually(
        lambda: cluster.query("DCGM_FI_DEV_GPU_UTIL"),
        lambda r: len(r) >= 4,
        "4 DCGM_FI_DEV_GPU_UTIL series",
        cluster.diagnose,
    )
    assert {(s["metric"]["Hostname"], s["metric"]["gpu"]) for s in result} == {
        ("gpu-a", "0"),
        ("gpu-a", "1"),
        ("gpu-b", "0"),
        ("gpu-b", "1"),
    }
    assert all(s["metric"]["modelName"] and s["metric"]["UUID"].startswith("GPU-") for s in result)


def test_an_allocation_shows_in_the_allocated_sum_by_hostname(cluster: ScrapedCluster) -> None:
    response = httpx.post(
        f"{cluster.agents['gpu-a'].url}/gpu/allocate", json={"service_name": "e2e", "gpu_count": 1}, timeout=10
    )
    assert response.status_code == 200, response.text

    def allocated_by_host() -> dict[str, float]:
        result = cluster.query("sum by (Hostname) (gpu_orchestrator_gpu_allocated)")
        return {s["metric"]["Hostname"]: float(s["value"][1]) for s in result}

    by_host = eventually(
        allocated_by_host, lambda r: r.get("gpu-a") == 1.0, "gpu-a's allocated GPU", cluster.diagnose
    )
    assert by_host == {"gpu-a": 1.0, "gpu-b": 0.0}


# Grafana's variables, replaced as Grafana would with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$Hostname": ".*", "$gpu": ".*"}


def test_every_dashboard_query_parses(cluster: ScrapedCluster) -> None:
    dashboard = load_dashboard()
    exprs = panel_exprs(dashboard) + [
        (name, f"group by ({name}) ({expr})") for name, expr in variable_exprs(dashboard)
    ]
    for _, expr in exprs:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable left unreplaced in {expr!r}"
        cluster.query(expr)
