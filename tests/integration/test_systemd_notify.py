"""The agent under a stand-in for systemd: sd_notify messages, the watchdog, and SIGHUP reloads.

The test owns the unix datagram socket that $NOTIFY_SOCKET names, as systemd
would, and records every message with the time it arrived. Scenarios:

1. a healthy agent says READY=1 and a STATUS= line, pings WATCHDOG=1 every
   WatchdogSec/2, and says STOPPING=1 on SIGTERM (abstract-namespace socket);
2. a device sampler that hangs (the documented test hook in
   agent/systemd_notify.py) stops the pings while the agent itself still answers,
   so systemd would restart it;
3. SIGHUP re-reads the log level, the API keys and the cluster key, announces
   RELOADING=1 then READY=1, and a broken keys file keeps the keys in force.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from agent.api_keys import hash_key
from agent.cluster_keyring import decode_key, generate_key, write_keys
from agent.systemd_notify import TEST_HANG_ENV, watchdog_interval
from tests.agent_process import AgentProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


class NotifySocket:
    """What systemd's end of $NOTIFY_SOCKET would see: (monotonic time, assignment) pairs."""

    def __init__(self, address: str) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.messages.extend((now, line) for line in data.decode().split("\n"))

    def seen(self, prefix: str, since: float = 0.0) -> list[float]:
        """Arrival times of assignments starting with `prefix`, at or after `since`."""
        return [at for at, line in list(self.messages) if line.startswith(prefix) and at >= since]

    def lines(self, prefix: str) -> list[str]:
        return [line for _, line in list(self.messages) if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_path() -> Iterator[NotifySocket]:
    # A short directory of our own: unix socket paths are limited to 108 bytes.
    directory = tempfile.mkdtemp(prefix="sdn-")
    notify = NotifySocket(os.path.join(directory, "notify.sock"))
    yield notify
    notify.close()
    os.unlink(notify.address)
    os.rmdir(directory)


@pytest.fixture
def notify_abstract() -> Iterator[NotifySocket]:
    notify = NotifySocket(f"@gpu-agent-test-{os.getpid()}-{time.monotonic_ns()}")
    yield notify
    notify.close()


def systemd_env(notify: NotifySocket, watchdog_usec: int = 1_000_000) -> dict[str, str]:
    return {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(watchdog_usec)}


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    """Half of WATCHDOG_USEC; none when unset, zero, garbage, or meant for another pid."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=7) is None


def test_ready_status_watchdog_and_stopping(tmp_path: Path, notify_abstract: NotifySocket) -> None:
    """READY=1 with a STATUS line once serving, WATCHDOG=1 every 0.5 s, STOPPING=1 on SIGTERM."""
    notify = notify_abstract
    agent = AgentProcess(data_dir=tmp_path / "d", simulate="4xH100-80GB", env=systemd_env(notify))
    agent.start()
    try:
        ready = wait_for(lambda: notify.seen("READY=1"))
        status = wait_for(lambda: notify.lines("STATUS="))
        assert "node-a" in status[0] and "4 GPU(s), 0 unhealthy" in status[0] and "1 member(s) alive" in status[0]
        time.sleep(3.0)
        pings = notify.seen("WATCHDOG=1", since=ready[0])
        # 0.5 s apart: about 6 in 3 s; allow for a slow CI machine, not for silence.
        assert len(pings) >= 4, pings
        assert max(b - a for a, b in zip(pings, pings[1:])) < 1.0
        assert not notify.seen("STOPPING=1")
        assert agent.stop() == 0
        assert notify.seen("STOPPING=1")
        assert notify.lines("STATUS=stopping (SIGTERM)")
    finally:
        agent.kill()


def test_a_hung_device_sampler_stops_the_watchdog_pings(tmp_path: Path, notify_path: NotifySocket) -> None:
    """The sampler's backend call hangs after 3 s: pings stop, while HTTP (the trio loop) still answers."""
    notify = notify_path
    config = tmp_path / "agent.toml"
    config.write_text("[devices]\nsample_interval_s = 0.2\nnvml_timeout_s = 1.0\n")
    env = systemd_env(notify) | {TEST_HANG_ENV: "3"}
    agent = AgentProcess(
        data_dir=tmp_path / "d", simulate="2xH100-80GB", env=env, extra_args=["--config", str(config)]
    )
    agent.start()
    try:
        wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 2)
        # The hang begins 3 s after start; the sample is abandoned after 1 s (degraded),
        # and after 1 s + 3 intervals of being stuck the pings stop.
        wait_for(lambda: httpx.get(agent.url + "/healthz", timeout=2.0).json()["status"] == "degraded", timeout=15.0)
        wait_for(lambda: "withholding the systemd watchdog ping" in agent.log(), timeout=10.0)
        quiet_from = time.monotonic() + 0.6  # a ping already in flight may still land
        time.sleep(3.0)
        assert notify.seen("WATCHDOG=1", since=quiet_from) == []
        health = httpx.get(agent.url + "/healthz", timeout=2.0).json()
        assert health["status"] == "degraded" and "hung" in health["devices"]["degraded"]
        assert agent.proc is not None and agent.proc.poll() is None
        assert "degraded:" in notify.lines("STATUS=")[-1]
        assert agent.stop() == 0
    finally:
        agent.kill()


def _keys_file(path: Path, **keys: str) -> None:
    path.write_text(
        "".join(f'[keys.{name}]\nsha256 = "{hash_key(key)}"\nadmin = true\n' for name, key in keys.items())
    )


def test_sighup_reloads_log_level_api_keys_and_cluster_key(tmp_path: Path, notify_path: NotifySocket) -> None:
    """SIGHUP applies a new log level and new API keys, re-reads the cluster key; broken files keep the old."""
    notify = notify_path
    keys, cluster_key, config = tmp_path / "api-keys.toml", tmp_path / "cluster.key", tmp_path / "agent.toml"
    _keys_file(keys, first="key-one")
    write_keys(cluster_key, [decode_key(generate_key())])
    base = f'[auth]\nenabled = true\nkeys_file = "{keys}"\n[cluster]\nkey_file = "{cluster_key}"\n'
    config.write_text(f'[agent]\nlog_level = "info"\n{base}')
    agent = AgentProcess(
        data_dir=tmp_path / "d", simulate="1xH100-80GB", env=systemd_env(notify),
        extra_args=["--config", str(config)],
    )
    agent.start()

    def status_with(key: str) -> int:
        return httpx.get(agent.url + "/gpu/status", headers={"X-API-Key": key}, timeout=2.0).status_code

    def hup_and_wait(count: int) -> str:
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        return wait_for(lambda: agent.log().count("SIGHUP:") >= count and agent.log())

    try:
        wait_for(lambda: notify.seen("READY=1"))
        assert (status_with("key-one"), status_with("key-two")) == (200, 401)
        config.write_text(f'[agent]\nlog_level = "debug"\n{base}[scheduler]\nmax_queue = 5\n')
        _keys_file(keys, second="key-two")
        write_keys(cluster_key, [decode_key(generate_key()), decode_key(generate_key())])
        log = hup_and_wait(1)
        assert "log level info -> debug" in log and "changed but need a restart: scheduler.max_queue" in log
        assert "API keys: 1 key(s)" in log and "cluster keyring reloaded" in log
        assert f"cluster key file {cluster_key}: reloaded" in log
        assert (status_with("key-one"), status_with("key-two")) == (401, 200)
        reloading = notify.seen("RELOADING=1")
        assert reloading and notify.seen("READY=1", since=reloading[0])
        assert notify.lines("MONOTONIC_USEC=")

        # Broken files: the settings in force stay, and the log says why.
        config.write_text("[agent]\nlog_level = 'loud'\n")
        keys.write_text("[keys.broken\n")
        log = hup_and_wait(2)
        assert "config NOT reloaded, keeping log level debug" in log
        assert "API keys NOT reloaded, keeping 1 key(s)" in log
        assert status_with("key-two") == 200
        assert agent.stop() == 0
    finally:
        agent.kill()
