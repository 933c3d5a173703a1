"""The API listener's address, TLS contexts and the audit line's parts, without a running agent."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.audit import AUDIT_LOGGER, AuditTrail, ids_in, outcome_of
from agent.config import AgentConfig, AgentSection, HttpSection
from agent.config_checks import ConfigError
from agent.http_listener import ApiTls, advertised_http_url, hypercorn_config
from agent.node_meta import NodeMeta, decode_node_meta, encode_node_meta
from tests.tls_certs import TestCa


def config(**http: object) -> AgentConfig:
    base = AgentConfig(agent=AgentSection(node_name="gpu-host-1", data_dir=Path("/var/lib/x")))
    return dataclasses.replace(base, http=dataclasses.replace(base.http, **http))


@pytest.mark.parametrize(
    ("bind", "advertise", "url"),
    [
        ("0.0.0.0", "10.0.0.5", "http://10.0.0.5:8086"),  # never the unusable wildcard
        ("::", "fd00::5", "http://[fd00::5]:8086"),
        ("10.0.0.7", "10.0.0.5", "http://10.0.0.7:8086"),  # a named address is what clients reach
        ("127.0.0.1", "10.0.0.5", "http://127.0.0.1:8086"),
    ],
)
def test_the_advertised_api_address(bind: str, advertise: str, url: str) -> None:
    assert advertised_http_url(config(bind=bind), advertise) == url


def test_the_scheme_follows_the_tls_config(tmp_path: Path) -> None:
    ca = TestCa(tmp_path)
    leaf = ca.issue("a", "10.0.0.5")
    assert advertised_http_url(config(tls_cert_file=leaf.cert, tls_key_file=leaf.key), "10.0.0.5").startswith("https://")


def test_members_gossip_whether_they_serve_tls() -> None:
    meta = NodeMeta(name="a", role="server", advertise_ip="10.0.0.5", http_port=8086, gossip_port=7946,
                    raft_port=7947, version="1")
    assert decode_node_meta(encode_node_meta(meta)).http_url == "http://10.0.0.5:8086"
    secure = dataclasses.replace(meta, tls=True, http_ip="10.0.0.9")
    assert decode_node_meta(encode_node_meta(secure)).http_url == "https://10.0.0.9:8086"


def test_tls_off_means_plain_http_and_a_default_peer_context() -> None:
    tls = ApiTls(HttpSection())
    assert not tls.enabled and tls.reload() == "TLS: off"
    assert not hypercorn_config(config(), tls).ssl_enabled


def test_a_key_that_does_not_match_the_certificate_is_a_config_error(tmp_path: Path) -> None:
    ca = TestCa(tmp_path)
    one, other = ca.issue("one", "10.0.0.5"), ca.issue("other", "10.0.0.5")
    with pytest.raises(ConfigError, match=r"\[http\] tls_cert_file .* do not load"):
        ApiTls(HttpSection(tls_cert_file=one.cert, tls_key_file=other.key))


def test_reload_keeps_the_context_object_and_refuses_a_broken_chain(tmp_path: Path) -> None:
    ca = TestCa(tmp_path)
    leaf = ca.issue("agent", "10.0.0.5")
    tls = ApiTls(HttpSection(tls_cert_file=leaf.cert, tls_key_file=leaf.key, tls_ca_file=ca.cert_file))
    hconfig = hypercorn_config(config(bind="10.0.0.5"), tls)
    context = hconfig.create_ssl_context()
    assert hconfig.ssl_enabled and context is tls.server
    assert tls.reload().startswith("TLS certificate reloaded")
    assert hconfig.create_ssl_context() is context  # the same object hypercorn's listener holds
    leaf.cert.write_text("garbage\n")
    assert tls.reload().startswith("TLS certificate NOT reloaded")


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "ok"), (202, "queued"), (401, "denied"), (403, "denied"), (429, "rate_limited"),
     (400, "rejected"), (404, "rejected"), (409, "rejected"), (503, "unavailable"), (500, "error")],
)
def test_audit_outcomes(status: int, outcome: str) -> None:
    assert outcome_of(status) == outcome


def test_audit_ids_come_from_request_and_answer_once_each() -> None:
    asked = {"allocation_id": "svc-1", "service_name": "svc"}
    answered = {"status": "released", "released": ["svc-1", "svc-2"], "cancelled": ["req-9"]}
    assert ids_in(asked, answered) == ["svc-1", "svc-2", "req-9"]
    assert ids_in({"node": "gpu-2", "index": 3}, None, "not json") == ["gpu-2/3"]


def test_a_quiet_log_level_does_not_silence_the_audit_trail() -> None:
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)
        AuditTrail(Counter("writes", "test", ["action", "outcome"], registry=CollectorRegistry()))
        assert logging.getLogger(AUDIT_LOGGER).isEnabledFor(logging.INFO)
    finally:
        root.setLevel(level)


def test_an_audit_line_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    counter = Counter("audit_writes", "test", ["action", "outcome"], registry=registry)
    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        AuditTrail(counter).record(
            action="release", status=403, key="ci bot", service="training", ids=["training-1"],
            client="10.0.0.9", via=None,
        )
    assert caplog.messages == [
        'write action=release outcome=denied status=403 key="ci bot" service=training ids=training-1 '
        "client=10.0.0.9 via=-"
    ]
    assert registry.get_sample_value("audit_writes_total", {"action": "release", "outcome": "denied"}) == 1.0


def test_listening_beyond_loopback_with_auth_off_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.http_listener"):
        hypercorn_config(config(bind="127.0.0.1"), ApiTls(HttpSection()))
        assert caplog.messages == []
        hypercorn_config(config(bind="0.0.0.0"), ApiTls(HttpSection()))
    (warning,) = caplog.messages
    assert "0.0.0.0:8086" in warning and "[auth] enabled = false" in warning
