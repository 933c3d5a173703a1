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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

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

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
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
