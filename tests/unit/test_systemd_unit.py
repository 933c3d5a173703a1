"""The shipped systemd files: the unit verifies and is hardened, the examples load, MDWE is safe.

`systemd-analyze verify` and `security --offline=yes` read unit files without a
running systemd, so they work in a container; both are skipped, with the reason,
where systemd-analyze is missing. verify insists that ExecStart= exists, so it
checks a copy of the unit pointed at this environment's gpu-agent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent.cluster_keyring import decode_key, generate_key, write_keys
from agent.config_loading import build_arg_parser, load_config
from tests.agent_process import free_port

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "gpu-agent.service"
MAX_EXPOSURE = 4.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)")


def unit_for_this_host(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointed at this venv's gpu-agent (verify checks that the binary exists)."""
    agent = Path(sys.executable).parent / "gpu-agent"
    if not agent.exists():
        pytest.skip(f"{agent} is not installed (pip install -e .)")
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/gpu-agent\n" in text
    copy = tmp_path / "gpu-agent.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/gpu-agent", f"ExecStart={agent}"))
    return copy


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_states_the_contract() -> None:
    """Type=notify with the watchdog, restart policy, a dedicated user and NVML's devices only."""
    unit = directives(UNIT.read_text())
    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["30"], "Restart": ["on-failure"],
        "RestartSec": ["2"], "TimeoutStopSec": ["30"], "User": ["gpu-agent"], "Group": ["gpu-agent"],
        "StateDirectory": ["gpu-orchestrator"], "ConfigurationDirectory": ["gpu-orchestrator"],
        "EnvironmentFile": ["-/etc/gpu-orchestrator/gpu-agent.env"], "DevicePolicy": ["closed"],
        "CapabilityBoundingSet": [""], "UMask": ["0077"], "MemoryDenyWriteExecute": ["yes"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert unit["DeviceAllow"] == ["char-nvidia-frontend rw", "char-nvidia-caps r"]
    assert not any("uvm" in value for value in unit["DeviceAllow"])


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """No warnings at all: a typo in a directive would be one."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(unit_for_this_host(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_security_exposure_is_at_most_4(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the unit at most 4.0 ("OK"); the rest is in docs/operations.md."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(unit_for_this_host(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("name", ["agent-server.toml.example", "agent-client.toml.example"])
def test_example_configs_load(name: str) -> None:
    """The server and client examples are valid configurations for agent/config.py."""
    config = load_config(build_arg_parser().parse_args(["--config", str(REPO / "systemd" / name)]), {})
    assert config.cluster.server is (name == "agent-server.toml.example")
    assert config.auth.enabled and config.cluster.key_file == Path("/etc/gpu-orchestrator/cluster.key")
    assert len(config.cluster.join) == 3


def test_environment_file_names_only_known_variables() -> None:
    """gpu-agent.env sets (or shows, commented out) only variables the agent reads."""
    names = re.findall(r"^#?([A-Z_]+)=", (REPO / "systemd" / "gpu-agent.env").read_text(), re.M)
    assert names and set(names) <= {"CONFIG_PATH", "PORT", "DEEPAGENTS_URL", "GRAPH_SERVICE_URL"}


_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
_MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({_PR_SET_MDWE}, {_PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
    "    sys.exit(77)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


@pytest.mark.integration
def test_agent_runs_with_memory_deny_write_execute(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes is safe: with a cluster key (cryptography), the agent starts, allocates
    and serves /metrics under the kernel's own W^X lock (prctl PR_SET_MDWE, Linux 6.3+; kept across exec)."""
    probe = subprocess.run([sys.executable, "-c", _MDWE_EXEC, "-c", "pass"], timeout=30)
    if probe.returncode == 77:
        pytest.skip(f"this kernel ({os.uname().release}) has no PR_SET_MDWE")
    assert probe.returncode == 0
    key = tmp_path / "cluster.key"
    write_keys(key, [decode_key(generate_key())])
    config = tmp_path / "agent.toml"
    config.write_text(f'[cluster]\nkey_file = "{key}"\nprofile = "local"\n')
    port, gossip = free_port(), free_port(udp_too=True)
    args = ["-m", "agent", "--config", str(config), "--simulate", "2xH100-80GB", "--bind", "127.0.0.1",
            "--port", str(port), "--cluster-bind", "127.0.0.1", "--gossip-port", str(gossip),
            "--raft-port", str(free_port()), "--data-dir", str(tmp_path / "d"), "--node-name", "mdwe"]
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", _MDWE_EXEC, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            try:
                if httpx.get(base + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.1)
        alloc = httpx.post(base + "/gpu/allocate", json={"service_name": "wx", "gpu_count": 1}, timeout=5)
        assert alloc.status_code == 200
        assert "DCGM_FI_DEV_GPU_UTIL" in httpx.get(base + "/metrics", timeout=5).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
