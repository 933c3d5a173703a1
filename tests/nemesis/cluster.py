"""The cluster under test: five real agents on 127.0.0.81–85, and the nftables table that cuts them.

Three servers and two clients, configured as docs/deployment.md's rehearsal (a cluster
key, an admin API key with auth on, `bootstrap_expect = 3`, simulated GPUs, the `local`
gossip profile), each with its own data dir and free ports picked once, so a restarted
agent comes back where its peers expect it. Only these five addresses are used: other
tests own the rest of 127.0.0.0/8.

Every agent also gets `GPU_ORCH_FAILPOINT_DIR` (agent/storage.py): writing
`fsync_sleep_s` there stalls its disk while it runs.

Resource handling: `NemesisCluster.close()` continues paused agents and kills every
agent; `Firewall.delete()` (tests/nftables.py) deletes the table. Both are idempotent, and the runner calls
them in `finally` and from `atexit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.cluster_keyring import generate_key
from agent.storage import FAILPOINT_DIR_ENV, FSYNC_SLEEP_FILE
from tests.agent_process import AgentProcess, free_port

# name -> (address, GPUs); the first three are servers. The rehearsal's layout, on .81–.85.
LAYOUT = {
    "srv-81": ("127.0.0.81", "2xH100-80GB"),
    "srv-82": ("127.0.0.82", "2xH100-80GB"),
    "srv-83": ("127.0.0.83", "2xH100-80GB"),
    "cli-84": ("127.0.0.84", "4xL4-24GB"),
    "cli-85": ("127.0.0.85", "4xL4-24GB"),
}
SERVERS = ("srv-81", "srv-82", "srv-83")
CLIENTS = ("cli-84", "cli-85")
READY_TIMEOUT_S = 90.0  # a busy two-core machine starts five Python agents slowly


class NotRecovered(Exception):
    """The cluster did not come back within the run's generous bound."""


@dataclass
class Node:
    name: str
    agent: AgentProcess
    failpoints: Path
    paused: bool = False

    @property
    def server(self) -> bool:
        return self.name in SERVERS

    @property
    def url(self) -> str:
        return self.agent.url

    @property
    def host(self) -> str:
        return self.agent.host

    @property
    def running(self) -> bool:
        return self.agent.proc is not None and self.agent.proc.poll() is None


class NemesisCluster:
    """Start, stop, kill, pause and disk-stall the five agents; ask who leads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.admin_key = secrets.token_urlsafe(32)
        key_file = root / "cluster.key"
        key_file.write_text(generate_key() + "\n")
        key_file.chmod(0o600)
        keys_file = root / "api-keys.toml"
        digest = hashlib.sha256(self.admin_key.encode()).hexdigest()
        keys_file.write_text(f'[keys.admin]\nsha256 = "{digest}"\nadmin = true\n')
        ports = {name: (free_port(host), free_port(host, udp_too=True), free_port(host)) for name, (host, _) in LAYOUT.items()}
        join = [f"{LAYOUT[s][0]}:{ports[s][1]}" for s in SERVERS]
        self.nodes: dict[str, Node] = {}
        for name, (host, gpus) in LAYOUT.items():
            server = name in SERVERS
            config = root / f"{name}.toml"
            config.write_text(
                f'[agent]\nnode_name = "{name}"\nlog_level = "info"\n'
                f'[http]\nbind = "{host}"\nport = {ports[name][0]}\n'
                f'[cluster]\nserver = {"true" if server else "false"}\nbootstrap_expect = {3 if server else 1}\n'
                f'bind = "{host}"\nadvertise = "{host}"\ngossip_port = {ports[name][1]}\nraft_port = {ports[name][2]}\n'
                f"join = {json.dumps(join)}\n"
                f'key_file = "{key_file}"\nprofile = "local"\n'
                f'[auth]\nenabled = true\nkeys_file = "{keys_file}"\n'
            )
            failpoints = root / name / "failpoints"
            failpoints.mkdir(parents=True, exist_ok=True)
            agent = AgentProcess(
                data_dir=root / name / "data",
                host=host,
                simulate=gpus,
                node_name=name,
                port=ports[name][0],
                gossip_port=ports[name][1],
                raft_port=ports[name][2],
                join=[j for j in join if not j.startswith(host + ":")],
                extra_args=["--config", str(config)],
                env={FAILPOINT_DIR_ENV: str(failpoints)},
            )
            self.nodes[name] = Node(name, agent, failpoints)
        self.http = httpx.Client(headers={"X-API-Key": self.admin_key}, timeout=5.0)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, names: tuple[str, ...] | None = None) -> None:
        """Start these agents (default all) together; return once each answers /healthz."""
        names = names or tuple(self.nodes)
        for name in names:
            self.nodes[name].agent.start(wait=False)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name in names:
            while not self._answers(name):
                if not self.nodes[name].running:
                    raise NotRecovered(f"{name} exited with {self.nodes[name].agent.proc.returncode}:\n"  # type: ignore[union-attr]
                                       f"{self.nodes[name].agent.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise NotRecovered(f"{name} did not answer /healthz within {READY_TIMEOUT_S}s")
                time.sleep(0.1)

    def _answers(self, name: str) -> bool:
        try:
            return self.http.get(self.nodes[name].url + "/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, name: str) -> None:
        """kill -9: no goodbye, no hand-over."""
        node = self.nodes[name]
        node.agent.kill()
        node.paused = False

    def pause(self, name: str) -> None:
        node = self.nodes[name]
        if node.running:
            os.kill(node.agent.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            node.paused = True

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.paused and node.running:
            os.kill(node.agent.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        node.paused = False

    def stall_disk(self, name: str, seconds: float) -> None:
        (self.nodes[name].failpoints / FSYNC_SLEEP_FILE).write_text(f"{seconds}\n")

    def unstall_disk(self, name: str) -> None:
        (self.nodes[name].failpoints / FSYNC_SLEEP_FILE).unlink(missing_ok=True)

    def close(self) -> None:
        """Heal and stop everything this cluster started. Safe to call more than once."""
        for name, node in self.nodes.items():
            self.unstall_disk(name)
            self.resume(name)
            node.agent.kill()
        self.http.close()

    # --- asking ---------------------------------------------------------------------------

    def health(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self.http.get(self.nodes[name].url + "/healthz", timeout=2.0)
            return resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def leader(self) -> str | None:
        """The server that says it leads (the highest term, if two do), or None."""
        claims = []
        for name in SERVERS:
            node = self.nodes[name]
            if node.paused or not node.running:
                continue
            health = self.health(name)
            raft = (health or {}).get("raft") or {}
            if raft.get("role") == "leader":
                claims.append((int(raft.get("term", 0)), name))
        return max(claims)[1] if claims else None

    def wait_leader(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (leader := self.leader()) is None:
            if time.monotonic() > deadline:
                raise NotRecovered(f"no leader within {timeout}s")
            time.sleep(0.1)
        return leader

    def logs(self, tail: int = 2000) -> str:
        return "\n".join(f"--- {n}/agent.log\n{node.agent.log()[-tail:]}" for n, node in self.nodes.items())
