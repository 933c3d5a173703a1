"""Start real `gpu-agent` processes on loopback for integration tests and benchmarks.

Each agent gets its own data dir and free HTTP, gossip and Raft ports on a
127.0.0.x address (gossip and Raft bound there too, so agents never collide on
7946/7947); the helper waits until /healthz answers, and always kills what it
started. `join` lists gossip addresses of agents to join.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent.cluster_keyring import generate_key

STARTUP_TIMEOUT_S = 20.0


def free_port(host: str = "127.0.0.1", *, udp_too: bool = False) -> int:
    """A TCP port free on `host` right now (the agent binds it a moment later).

    With `udp_too`, the same port is free for UDP as well (the gossip port).
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
            return port


@dataclass
class AgentProcess:
    """One running agent: its address, data dir and process."""

    data_dir: Path
    host: str = "127.0.0.1"
    simulate: str = "4xH100-80GB"
    node_name: str = "node-a"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    gossip_port: int = 0
    raft_port: int = 0
    join: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # The CA that signed the agent's certificate when it serves TLS (its [http] tls_* keys
    # are the test's to configure): the URL is then https:// and readiness is checked with it.
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://{self.host}:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What httpx's `verify=` needs to talk to this agent."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    @property
    def gossip_address(self) -> str:
        return f"{self.host}:{self.gossip_port}"

    def start(self, *, wait: bool = True) -> AgentProcess:
        """Start the process; with `wait` (the default), return once /healthz answers."""
        if not self.port:
            self.port = free_port(self.host)
        # Each port is free when picked but released at once: pick again on a repeat.
        while not self.gossip_port or self.gossip_port == self.port:
            self.gossip_port = free_port(self.host, udp_too=True)
        while not self.raft_port or self.raft_port in (self.port, self.gossip_port):
            self.raft_port = free_port(self.host)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "agent.log"
        args = [
            sys.executable,
            "-m",
            "agent",
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--node-name",
            self.node_name,
            "--cluster-bind",
            self.host,
            "--gossip-port",
            str(self.gossip_port),
            "--raft-port",
            str(self.raft_port),
            *(arg for address in self.join for arg in ("--join", address)),
            *(["--simulate", self.simulate] if self.simulate else []),
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PORT", "CONFIG_PATH")}
        env.update(self.env)
        env.setdefault("CONFIG_PATH", str(self.data_dir / "no-config.toml"))
        if env["CONFIG_PATH"].endswith("no-config.toml"):
            (self.data_dir / "no-config.toml").write_text("")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"agent did not answer /healthz within {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the crash-safety case)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def cluster_agents(
    root: Path,
    hosts: Sequence[str],
    names: Sequence[str],
    *,
    servers: int,
    bootstrap_expect: int | None = None,
    simulate: str | Sequence[str] = "2xH100-80GB",
    profile: str | None = "local",
    cluster_settings: str = "",
    extra_config: str = "",
) -> list[AgentProcess]:
    """Agents (not started) that share a new cluster key and join through the first one.

    The first `servers` are Raft servers (`bootstrap_expect`, default `servers`),
    the rest clients. `simulate` is one fleet for all or one per agent; `profile`
    the gossip profile (None: the default, lan); `cluster_settings` extra
    `[cluster]` lines for every agent; `extra_config` other sections (such as
    `[queues.a]` or `[scheduler]`) for every agent.
    """
    key_file = root / "cluster.key"
    root.mkdir(parents=True, exist_ok=True)
    key_file.write_text(generate_key() + "\n")
    key_file.chmod(0o600)
    fleets = [simulate] * len(names) if isinstance(simulate, str) else list(simulate)
    seed_port = free_port(hosts[0], udp_too=True)
    agents: list[AgentProcess] = []
    for i, name in enumerate(names):
        server = i < servers
        config = root / f"{name}.toml"
        config.write_text(
            "[cluster]\n"
            + (f'profile = "{profile}"\n' if profile else "")
            + f'key_file = "{key_file}"\n'
            + f"server = {'true' if server else 'false'}\n"
            + f"bootstrap_expect = {(bootstrap_expect or servers) if server else 1}\n"
            + cluster_settings
            + extra_config
        )
        agents.append(
            AgentProcess(
                data_dir=root / name,
                host=hosts[i],
                node_name=name,
                simulate=fleets[i],
                gossip_port=seed_port if i == 0 else 0,
                join=[] if i == 0 else [f"{hosts[0]}:{seed_port}"],
                extra_args=["--config", str(config)],
            )
        )
    return agents


def start_together(agents: Sequence[AgentProcess]) -> None:
    """Start every agent, then wait until each answers /healthz (so they start about together)."""
    for agent in agents:
        agent.start(wait=False)
    for agent in agents:
        agent.wait_ready()
