"""TLS, per-key rate limits and the audit trail, through real agent processes on loopback.

Agents here use 127.0.0.75-78. The TLS material is a throw-away CA
(tests/tls_certs.py) whose leaf certificates name each agent's IP address, as
docs/operations.md asks of real deployments.
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import ssl
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from agent import gpuctl
from tests.agent_process import AgentProcess, cluster_agents, start_together
from tests.tls_certs import TestCa
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def peer_common_name(agent: AgentProcess) -> str:
    """The CN of the certificate a new TLS connection to `agent` is shown."""
    assert agent.ca_file is not None
    context = ssl.create_default_context(cafile=str(agent.ca_file))
    with socket.create_connection((agent.host, agent.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=agent.host) as tls:
            cert: Any = tls.getpeercert()
    return str(dict(pair[0] for pair in cert["subject"])["commonName"])


def tls_section(cert: Path, key: Path, ca: Path) -> str:
    return f'[http]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\ntls_ca_file = "{ca}"\n'


@pytest.fixture
def tls_agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, TestCa]]:
    ca = TestCa(tmp_path / "pki")
    leaf = ca.issue("agent", "127.0.0.75")
    config = tmp_path / "agent.toml"
    config.write_text(tls_section(leaf.cert, leaf.key, ca.cert_file))
    agent = AgentProcess(
        data_dir=tmp_path / "data",
        host="127.0.0.75",
        node_name="tls-a",
        simulate="2xH100-80GB",
        extra_args=["--config", str(config)],
        ca_file=ca.cert_file,
    )
    agent.start()
    yield agent, ca
    agent.kill()


def test_the_api_is_https_only_and_gpuctl_verifies_it(
    tls_agent: tuple[AgentProcess, TestCa], capsys: pytest.CaptureFixture[str]
) -> None:
    agent, ca = tls_agent
    assert agent.url.startswith("https://")
    health = httpx.get(f"{agent.url}/healthz", verify=agent.verify, timeout=5).json()
    assert health["warnings"] == []  # loopback: nothing to warn about
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{agent.host}:{agent.port}/healthz", timeout=5)

    assert gpuctl.main(["--address", agent.url, "--cacert", str(ca.cert_file), "--json", "status"]) == 0
    assert len(__import__("json").loads(capsys.readouterr().out)["gpus"]) == 2
    # Without the CA the certificate cannot be verified: unreachable, not a silent downgrade.
    assert gpuctl.main(["--address", agent.url, "status"]) == gpuctl.EXIT_UNREACHABLE
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


def test_sighup_loads_a_renewed_certificate_and_keeps_it_when_the_next_is_broken(
    tls_agent: tuple[AgentProcess, TestCa],
) -> None:
    agent, ca = tls_agent
    assert agent.proc is not None
    assert peer_common_name(agent) == "agent"
    # Renewal: a new certificate and key written over the same files, then SIGHUP.
    renewed = ca.issue("agent-renewed", "127.0.0.75")
    cert, key = ca.root / "agent.crt", ca.root / "agent.key"
    cert.write_bytes(renewed.cert.read_bytes())
    key.write_bytes(renewed.key.read_bytes())
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "TLS certificate reloaded" in agent.log())
    assert peer_common_name(agent) == "agent-renewed"

    # A broken renewal is refused and the certificate in force stays.
    cert.write_text("not a certificate\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "TLS certificate NOT reloaded" in agent.log())
    assert peer_common_name(agent) == "agent-renewed"
    assert httpx.get(f"{agent.url}/healthz", verify=agent.verify, timeout=5).status_code == 200


def test_a_client_forwards_to_the_leader_over_tls_and_the_leader_audits_once(tmp_path: Path) -> None:
    ca = TestCa(tmp_path / "pki")
    hosts, names = ["127.0.0.76", "127.0.0.77"], ["tls-server", "tls-client"]
    agents = cluster_agents(tmp_path, hosts, names, servers=1, simulate="1xH100-80GB")
    for agent, host in zip(agents, hosts):
        leaf = ca.issue(agent.node_name, host)
        config = tmp_path / f"{agent.node_name}.toml"
        config.write_text(config.read_text() + tls_section(leaf.cert, leaf.key, ca.cert_file))
        agent.ca_file = ca.cert_file
    server, client = agents
    try:
        start_together(agents)
        with httpx.Client(base_url=client.url, verify=client.verify, timeout=10) as api:
            wait_for(lambda: len(api.get("/cluster/members").json()["members"]) == 2, timeout=30)

            members = api.get("/cluster/members").json()["members"]
            http = {m["name"]: m["addresses"]["http"] for m in members}
            assert http == {"tls-server": server.url, "tls-client": client.url}
            assert api.get("/cluster/leader").json()["address"] == server.url

            answer = wait_for(lambda: (r := api.post("/gpu/allocate", json={"service_name": "fwd"})).status_code == 200 and r)
            assert answer.headers["X-Forwarded-To"] == "tls-server"
            allocation_id = answer.json()["allocation_id"]
            assert api.post("/gpu/release", json={"allocation_id": allocation_id}).status_code == 200

            audit = wait_for(lambda: re.findall(r"gpu_orchestrator\.audit: write (.*)", server.log()))
            assert any(
                line.startswith("action=allocate outcome=ok status=200 key=- service=fwd")
                and allocation_id in line
                and line.endswith("via=tls-client")
                for line in audit
            ), audit
            assert "gpu_orchestrator.audit" not in client.log()  # forwarded: the leader's to record
    finally:
        for agent in agents:
            agent.kill()


def test_rate_limit_per_key_answers_429_and_every_write_is_audited(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys.toml"
    keys.write_text(
        "".join(
            f'[keys.{name}]\nsha256 = "{hashlib.sha256(name.encode()).hexdigest()}"\nservice = "{name}"\n'
            for name in ("alpha", "beta")
        )
    )
    config = tmp_path / "agent.toml"
    # One token per 20 s: nothing refills while the test runs, so counts are exact.
    config.write_text(
        f'[auth]\nenabled = true\nkeys_file = "{keys}"\nrate_limit = true\nrate_per_s = 0.05\nburst = 3\n'
    )
    agent = AgentProcess(
        data_dir=tmp_path / "data", host="127.0.0.78", node_name="limited", simulate="2xH100-80GB",
        extra_args=["--config", str(config)],
    )
    agent.start()
    try:
        with (
            httpx.Client(base_url=agent.url, headers={"X-API-Key": "alpha"}, timeout=10) as alpha,
            httpx.Client(base_url=agent.url, headers={"Authorization": "Bearer beta"}, timeout=10) as beta,
        ):
            assert [alpha.get("/gpu/list").status_code for _ in range(3)] == [200, 200, 200]
            refused = alpha.post("/gpu/allocate", json={"service_name": "alpha"})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(refused.headers["Retry-After"]) <= 20
            # Probes and scrapes are never limited; another key has its own bucket.
            assert all(alpha.get(path).status_code == 200 for path in ("/healthz", "/metrics") * 3)
            assert beta.post("/gpu/allocate", json={"service_name": "alpha"}).status_code == 403
            allocated = beta.post("/gpu/allocate", json={"service_name": "beta", "gpu_count": 1})
            assert allocated.status_code == 200
            allocation_id = allocated.json()["allocation_id"]

            lines = wait_for(lambda: len(found := re.findall(r"audit: write (.*)", agent.log())) >= 3 and found)
            assert lines[0].startswith("action=allocate outcome=rate_limited status=429 key=alpha service=alpha ")
            assert lines[1].startswith("action=allocate outcome=denied status=403 key=beta service=alpha ")
            assert lines[2].startswith(f"action=allocate outcome=ok status=200 key=beta service=beta ids={allocation_id},")
            assert all(line.endswith("via=-") for line in lines)
            # Without a valid key a client is counted by its address, so guessing keys is throttled too.
            guesses = [
                httpx.get(f"{agent.url}/gpu/list", headers={"X-API-Key": f"guess-{n}"}, timeout=10).status_code
                for n in range(4)
            ]
            assert guesses == [401, 401, 401, 429]
            metrics = beta.get("/metrics").text
            for outcome in ("rate_limited", "denied", "ok"):
                assert f'gpu_orchestrator_audit_writes_total{{action="allocate",outcome="{outcome}"}} 1.0' in metrics
    finally:
        agent.kill()
