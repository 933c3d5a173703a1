"""docs/deployment.md, run as written: the rehearsal on loopback and what can be checked of the real-host steps.

The guide marks each block the test runs with an HTML comment on the line before
its fence, `<!-- rehearsal: NAME -->` or `<!-- host: NAME -->`. A marked block that
is missing or renamed fails `test_the_guide_marks_every_block_this_test_runs`.

The rehearsal blocks run with `bash -euo pipefail`, in order, on one cluster
(module fixture), with only `GUIDE_DIR` set (the variable the guide tells the
reader to set) and `gpu-agent` / `gpuctl` on PATH running this checkout. They
start three servers and two clients on 127.0.0.41..45 with the guide's fixed
ports; a port already in use there fails the test at once, naming it. In order:

1. every agent's `gpuctl status` lists the 14 GPUs of all five, and the cluster
   key is really in use (traffic sealed with it opens, unsealed traffic is dropped);
2. two allocations through the clients are listed by every agent;
3. after the key rotation every agent opens traffic sealed with the new key and
   drops traffic sealed with the old one, and all five are still alive;
4. the rolling restart restarts all five (clients first, leader last), keeps a
   leader, and loses neither allocation;
4b. the replacement of a dead server (kill -9 of a follower, `gpuctl servers
   remove`, a blank srv-46 started and `gpuctl servers add`ed) leaves three live
   voters, and srv-46's own replica holds both allocations;
5. the stop block stops every agent still running.

Every process the blocks start is in a process group of its own bash; the
fixture kills those groups whatever happens.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from agent.api_keys import ApiKeyring
from agent.cluster_keyring import Keyring, decode_key, fingerprint
from agent.config_loading import load_config
from agent.gossip_transport import UDP_AAD
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "deployment.md"
MARKED_BLOCK = re.compile(r"^<!-- (rehearsal|host): ([a-z0-9-]+) -->\n```(\w+)\n(.*?)^```$", re.M | re.S)
REHEARSAL = (
    "prepare", "start-cluster", "check-cluster", "allocate", "rotate-key", "rolling-restart", "replace-server", "stop",
)
HOST = ("make-keys", "server-config", "client-config", "prometheus")

# What the guide's rehearsal sets up (its table): the test checks the cluster against these.
AGENTS = {"srv-41": 2, "srv-42": 2, "srv-43": 2, "cli-44": 4, "cli-45": 4}  # name -> GPUs
SERVERS = ("srv-41", "srv-42", "srv-43")
REPLACEMENT = "srv-46"  # the server the guide adds in place of a dead one
HTTP_PORT, GOSSIP_PORT, RAFT_PORT = 28086, 27946, 27947
BLOCK_TIMEOUT_S = 240.0


def address(name: str) -> str:
    return "127.0.0." + name.split("-")[1]


def guide_blocks() -> dict[tuple[str, str], tuple[str, str]]:
    """(kind, name) -> (fence language, body) of every marked block; a name marked twice fails."""
    blocks: dict[tuple[str, str], tuple[str, str]] = {}
    for kind, name, language, body in MARKED_BLOCK.findall(GUIDE.read_text()):
        assert (kind, name) not in blocks, f"docs/deployment.md marks `{kind}: {name}` twice"
        blocks[(kind, name)] = (language, body)
    return blocks


def block(kind: str, name: str, language: str = "sh") -> str:
    found = guide_blocks().get((kind, name))
    assert found is not None, f"docs/deployment.md has no block marked <!-- {kind}: {name} -->"
    assert found[0] == language, f"`{kind}: {name}` is a ```{found[0]} block, expected ```{language}"
    return found[1]


def command_shims(directory: Path) -> dict[str, str]:
    """`gpu-agent` and `gpuctl` that run this checkout (an installed console script may run another)."""
    directory.mkdir(parents=True, exist_ok=True)
    for command, module in (("gpu-agent", "agent"), ("gpuctl", "agent.gpuctl")):
        shim = directory / command
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG_PATH", "PORT", "GPU_AGENT_ADDR", "GPU_AGENT_API_KEY")}
    env["PATH"] = f"{directory}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    return env


def busy_ports() -> list[str]:
    """The guide's fixed address:port pairs that something else holds right now."""
    busy = []
    for name in (*AGENTS, REPLACEMENT):
        for port, kind in ((HTTP_PORT, socket.SOCK_STREAM), (GOSSIP_PORT, socket.SOCK_STREAM),
                           (GOSSIP_PORT, socket.SOCK_DGRAM), (RAFT_PORT, socket.SOCK_STREAM)):
            with socket.socket(socket.AF_INET, kind) as probe:
                # As the agent's listeners do: a TCP socket in TIME_WAIT is no obstacle, a listener is.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address(name), port))
                except OSError as error:
                    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
                    busy.append(f"{address(name)}:{port}/{proto} ({error.strerror})")
    return busy


@dataclass
class Rehearsal:
    """The guide's GUIDE_DIR, the environment its blocks run in, and the process groups they made."""

    guide_dir: Path
    env: dict[str, str]
    groups: list[int] = field(default_factory=list)
    admin_key: str = ""

    def run(self, name: str) -> str:
        """Run the rehearsal block `name` with bash; return its stdout, fail with its output and the logs."""
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", block("rehearsal", name)],
            cwd=self.guide_dir.parent,
            env={**self.env, "GUIDE_DIR": str(self.guide_dir)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # bash and every agent it backgrounds: one group to kill
        )
        self.groups.append(proc.pid)
        try:
            out, err = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"block `{name}` ran past {BLOCK_TIMEOUT_S}s\n{out}\n{err}\n{self.logs()}")
        if proc.returncode != 0:
            pytest.fail(f"block `{name}` exited {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}\n{self.logs()}")
        return out

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for name in (*AGENTS, REPLACEMENT):
            log = self.guide_dir / name / "agent.log"
            if log.exists():
                parts.append(f"--- {name}/agent.log\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def pid(self, name: str) -> int:
        return int((self.guide_dir / name / "agent.pid").read_text())

    def get(self, name: str, path: str) -> Any:
        resp = httpx.get(
            f"http://{address(name)}:{HTTP_PORT}{path}", headers={"X-API-Key": self.admin_key}, timeout=10.0
        )
        resp.raise_for_status()
        return resp.json()

    def kill_everything(self) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def counter(rehearsal: Rehearsal, name: str, metric: str, reason: str) -> float:
    text = httpx.get(f"http://{address(name)}:{HTTP_PORT}/metrics", timeout=5.0).text
    found = re.search(rf'^{metric}{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def seal_check(rehearsal: Rehearsal, name: str, opens: Keyring, drops: Keyring | None) -> None:
    """Send `name` gossip datagrams: garbage sealed with `opens` must open (counted malformed, not
    decrypt), and one sealed with `drops` (or not sealed at all, when None) must fail to open."""
    dropped = "gpu_orchestrator_gossip_dropped_packets_total"
    target = (address(name), GOSSIP_PORT)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))

        def sent_and_counted(payload: bytes, reason: str) -> bool:
            before = counter(rehearsal, name, dropped, reason)
            udp.sendto(payload, target)
            return bool(wait_for(lambda: counter(rehearsal, name, dropped, reason) > before, timeout=5.0))

        garbage = b"\xc1 not a gossip message"  # 0xc1 is never valid msgpack
        sent_and_counted(opens.seal(garbage, UDP_AAD), "malformed")
        sent_and_counted(garbage + bytes(40) if drops is None else drops.seal(garbage, UDP_AAD), "decrypt")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    busy = busy_ports()
    if busy:
        pytest.fail("the guide's rehearsal ports are in use, so it cannot run here: " + ", ".join(busy))
    root = tmp_path_factory.mktemp("deployment-guide")
    r = Rehearsal(guide_dir=root / "rehearsal", env=command_shims(root / "bin"))
    try:
        r.run("prepare")
        r.admin_key = (r.guide_dir / "admin.key").read_text().strip()
        r.run("start-cluster")
        yield r
    finally:
        r.kill_everything()


def test_the_guide_marks_every_block_this_test_runs() -> None:
    marked = set(guide_blocks())
    expected = {("rehearsal", n) for n in REHEARSAL} | {("host", n) for n in HOST}
    assert expected <= marked, f"missing or renamed in docs/deployment.md: {sorted(expected - marked)}"
    assert marked <= expected, f"marked but not run by this test: {sorted(marked - expected)}"


def test_1_every_agents_status_lists_every_gpu_and_the_key_is_in_use(rehearsal: Rehearsal) -> None:
    out = rehearsal.run("check-cluster")
    every_gpu = {(name, index) for name, count in AGENTS.items() for index in range(count)}
    sections = re.split(r"^== gpuctl --address (\S+):\d+ status$", out, flags=re.M)
    statuses = dict(zip(sections[1::2], sections[2::2]))
    assert sorted(statuses) == sorted(address(n) for n in AGENTS), out
    for addr, table in statuses.items():
        rows = {(m[1], int(m[2])) for m in re.finditer(r"^(\S+)\s+(\d+)\s+NVIDIA", table, re.M)}
        assert rows == every_gpu, f"gpuctl status on {addr} lists {sorted(rows)}"
        assert "14 GPU(s) on 5 node(s)" in table
    leader = rehearsal.get("cli-44", "/cluster/leader")["leader"]
    assert leader in SERVERS and re.search(rf"^leader\s+{leader}$", out, re.M), out
    # Sealed for real: gossip with the guide's key opens, unsealed traffic is dropped,
    # and the servers elected a leader over Raft sealed with the same keyring.
    key_1 = Keyring([decode_key((rehearsal.guide_dir / "cluster-key-1").read_text())])
    for name in AGENTS:
        assert "encrypted" in (rehearsal.guide_dir / name / "agent.log").read_text()
        seal_check(rehearsal, name, opens=key_1, drops=None)


def test_2_allocations_through_the_clients_are_listed_everywhere(rehearsal: Rehearsal) -> None:
    rehearsal.run("allocate")
    allocations = rehearsal.get("srv-41", "/gpu/list")["allocations"]
    assert sorted(len(a["gpu_ids"]) for a in allocations if a["service_name"] == "rehearsal") == [2, 4]
    ids = {a["allocation_id"] for a in allocations}
    for name in AGENTS:
        assert {a["allocation_id"] for a in rehearsal.get(name, "/gpu/list")["allocations"]} == ids
    rehearsal.allocations = ids  # type: ignore[attr-defined]


def test_3_key_rotation_leaves_every_agent_on_the_new_key(rehearsal: Rehearsal) -> None:
    out = rehearsal.run("rotate-key")
    key_1 = Keyring([decode_key((rehearsal.guide_dir / "cluster-key-1").read_text())])
    key_2 = Keyring([decode_key((rehearsal.guide_dir / "cluster-key-2").read_text())])
    for name in AGENTS:
        assert f"{name}: {fingerprint(key_2.primary)}  (primary)\n" in out, out
        assert Keyring.load(rehearsal.guide_dir / name / "cluster.key") == key_2
        # What the running agent holds, not just its file: the new key opens, the old one no longer does.
        wait_for(lambda: f"primary {fingerprint(key_2.primary)}, 1 key(s)"
                 in (rehearsal.guide_dir / name / "agent.log").read_text(), timeout=10.0)
        seal_check(rehearsal, name, opens=key_2, drops=key_1)
    for name in AGENTS:
        wait_for(lambda: {m["name"]: m["status"] for m in rehearsal.get(name, "/cluster/members")["members"]}
                 == dict.fromkeys(AGENTS, "alive"), timeout=20.0)


def test_4_rolling_restart_keeps_a_leader_and_every_allocation(rehearsal: Rehearsal) -> None:
    before = {name: rehearsal.pid(name) for name in AGENTS}
    old_leader = rehearsal.get("srv-41", "/cluster/leader")["leader"]
    out = rehearsal.run("rolling-restart")
    order = re.findall(r"^(\S+) restarted; leader\s+(\S+)", out, re.M)
    assert [name for name, _ in order][:2] == ["cli-44", "cli-45"] and order[-1][0] == old_leader, out
    assert sorted(name for name, _ in order) == sorted(AGENTS)
    assert all(leader in SERVERS for _, leader in order), out  # every check between hosts saw a leader
    for name, pid in before.items():
        assert rehearsal.pid(name) != pid and not alive(pid), f"{name} was not restarted"

    def agreed_leader() -> str | None:
        names = {rehearsal.get(name, "/cluster/leader")["leader"] for name in AGENTS}
        return names.pop() if len(names) == 1 and None not in names else None

    new_leader = wait_for(agreed_leader, timeout=15.0, interval=0.2)
    assert new_leader != old_leader  # the old leader handed over when it stopped
    kept: set[str] = rehearsal.allocations  # type: ignore[attr-defined]
    for name in AGENTS:
        assert {a["allocation_id"] for a in rehearsal.get(name, "/gpu/list")["allocations"]} >= kept


def test_4b_replace_a_dead_server(rehearsal: Rehearsal) -> None:
    leader = rehearsal.get("srv-41", "/cluster/leader")["leader"]
    pids = {name: rehearsal.pid(name) for name in SERVERS}
    out = rehearsal.run("replace-server")
    dead = [name for name in SERVERS if not (rehearsal.guide_dir / name / "agent.pid").exists()]
    assert len(dead) == 1 and dead[0] != leader and not alive(pids[dead[0]]), out
    survivors = [name for name in SERVERS if name not in dead]
    assert "already hold Raft state; starting as a blank server" in (
        rehearsal.guide_dir / REPLACEMENT / "agent.log"
    ).read_text()
    for name in (*survivors, REPLACEMENT, "cli-44"):
        rows = {row["name"]: row for row in rehearsal.get(name, "/cluster/servers")["servers"]}
        voters = {n for n, row in rows.items() if row["voter"]}
        assert voters == {*survivors, REPLACEMENT}, rows
        assert all(rows[n]["alive"] for n in voters), rows
    # The new server's own copy of the table (not forwarded) holds what was acknowledged before it came.
    kept: set[str] = rehearsal.allocations  # type: ignore[attr-defined]
    wait_for(lambda: {a["allocation_id"] for a in rehearsal.get(REPLACEMENT, "/gpu/list?stale=true")["allocations"]}
             >= kept, timeout=15.0)
    health = rehearsal.get(REPLACEMENT, "/healthz")
    assert health["role"] == "follower" and REPLACEMENT in health["raft"]["voters"], health


def test_5_stop_stops_every_agent(rehearsal: Rehearsal) -> None:
    running = [p.parent.name for p in rehearsal.guide_dir.glob("*/agent.pid")]
    assert REPLACEMENT in running and len(running) == len(AGENTS)  # one server replaced by srv-46
    pids = {name: rehearsal.pid(name) for name in running}
    rehearsal.run("stop")
    for name, pid in pids.items():
        wait_for(lambda: not alive(pid), timeout=30.0)


# --- the real-host steps, as far as they can run here --------------------------------------


def test_host_make_keys_makes_a_cluster_key_and_an_admin_key(tmp_path: Path) -> None:
    env = command_shims(tmp_path / "bin")
    subprocess.run(["bash", "-euo", "pipefail", "-c", block("host", "make-keys")], cwd=tmp_path, env=env,
                   check=True, timeout=60)
    assert len(Keyring.load(tmp_path / "cluster-key-1").keys) == 1
    admin = ApiKeyring.load(tmp_path / "api-keys.toml").authenticate((tmp_path / "admin.key").read_text().strip())
    assert admin is not None and admin.admin


@pytest.mark.parametrize("role", ["server", "client"])
def test_host_config_files_load(role: str, tmp_path: Path) -> None:
    """The file the guide has the operator write, as the agent's loader reads it."""
    script = block("host", f"{role}-config")
    target = "sudo tee /etc/gpu-orchestrator/agent.toml > /dev/null"
    assert target in script
    script = script.replace(target, 'cat > "$OUT"')
    script = "\n".join(line for line in script.splitlines() if not line.startswith("sudo install "))
    out = tmp_path / "agent.toml"
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], env={**os.environ, "OUT": str(out)},
                   check=True, timeout=30)
    config = load_config(argparse.Namespace(config=out), {})
    cluster = config.cluster
    assert cluster.key_file == Path("/etc/gpu-orchestrator/cluster.key") and config.auth.enabled
    assert cluster.advertise is not None and cluster.join and config.devices.backend == "nvml"
    if role == "server":
        assert cluster.server and cluster.bootstrap_expect == 3
    else:
        assert not cluster.server


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)")
def test_host_prometheus_scrape_config_passes_promtool(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(block("host", "prometheus", language="yaml"))
    checked = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
