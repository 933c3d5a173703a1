"""Safe by default: loopback bind, TLS and rate-limit keys, exposure warnings, the graph URL rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.config import AgentConfig, AgentSection, exposure_warnings, graph_events_url
from agent.config_checks import ConfigError
from agent.config_loading import build_arg_parser, load_config


def base() -> AgentConfig:
    return AgentConfig(agent=AgentSection(node_name="gpu-host-1", data_dir=Path("/var/lib/x")))


def with_(config: AgentConfig, section: str, **changes: object) -> AgentConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def pem_files(tmp_path: Path) -> tuple[Path, Path]:
    # validate() checks the files exist; their contents are checked when the agent loads them.
    cert, key = tmp_path / "agent.crt", tmp_path / "agent.key"
    cert.write_text("cert")
    key.write_text("key")
    return cert, key


def test_a_hand_started_agent_listens_on_loopback_only(tmp_path: Path) -> None:
    args = build_arg_parser().parse_args([])
    config = load_config(args, {"HOME": str(tmp_path)}, default_config_path=tmp_path / "none.toml")
    assert config.http.bind == "127.0.0.1"
    assert exposure_warnings(config) == []


def test_listening_beyond_loopback_without_auth_is_warned_about() -> None:
    config = with_(base(), "http", bind="0.0.0.0")
    (warning,) = exposure_warnings(config)
    assert "0.0.0.0:8086" in warning and "[auth] enabled = false" in warning


def test_auth_without_tls_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    config = with_(with_(base(), "http", bind="10.0.0.5"), "auth", enabled=True)
    (warning,) = exposure_warnings(config)
    assert "without TLS" in warning
    cert, key = pem_files(tmp_path)
    assert exposure_warnings(with_(config, "http", tls_cert_file=cert, tls_key_file=key)) == []


def test_ipv6_loopback_is_loopback() -> None:
    assert exposure_warnings(with_(base(), "http", bind="::1")) == []


def test_tls_needs_both_certificate_and_key(tmp_path: Path) -> None:
    cert, key = pem_files(tmp_path)
    with pytest.raises(ConfigError, match=r"\[http\] tls_key_file must be set as well"):
        with_(base(), "http", tls_cert_file=cert).validate()
    with pytest.raises(ConfigError, match=r"\[http\] tls_cert_file must be set as well"):
        with_(base(), "http", tls_key_file=key).validate()
    config = with_(base(), "http", tls_cert_file=cert, tls_key_file=key)
    config.validate()
    assert config.http.tls_enabled and config.http.scheme == "https"
    assert base().http.scheme == "http"


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert, key = pem_files(tmp_path)
    with pytest.raises(ConfigError, match=r"\[http\] tls_key_file = .* is not a readable file"):
        with_(base(), "http", tls_cert_file=cert, tls_key_file=tmp_path / "missing.key").validate()
    with pytest.raises(ConfigError, match=r"\[http\] tls_ca_file"):
        with_(base(), "http", tls_ca_file=tmp_path / "missing-ca.crt").validate()


def test_tls_keys_load_from_the_file(tmp_path: Path) -> None:
    cert, key = pem_files(tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text('[http]\ntls_cert_file = "agent.crt"\ntls_key_file = "agent.key"\ntls_ca_file = "agent.crt"\n')
    config = load_config(build_arg_parser().parse_args(["--config", str(path)]), {"HOME": str(tmp_path)})
    assert (config.http.tls_cert_file, config.http.tls_key_file, config.http.tls_ca_file) == (cert, key, cert)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rate_limit": True, "rate_per_s": 0.0}, r"\[auth\] rate_per_s must be a number greater than 0"),
        ({"rate_limit": True, "rate_per_s": -5.0}, r"\[auth\] rate_per_s must be"),
        ({"rate_limit": True, "rate_per_s": float("inf")}, r"\[auth\] rate_per_s must be"),
        ({"rate_limit": True, "burst": 0}, r"\[auth\] burst must be at least 1"),
        ({"rate_limit": False, "burst": -1}, r"\[auth\] burst must be at least 1"),
    ],
)
def test_rate_limit_nonsense_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_(base(), "auth", **changes).validate()


def test_rate_limit_is_off_by_default_with_sane_figures() -> None:
    auth = base().auth
    assert not auth.rate_limit and auth.rate_per_s > 0 and auth.burst >= 1


def test_unknown_keys_in_the_new_sections_stay_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[auth]\nrate = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rate' in \[auth\]"):
        load_config(build_arg_parser().parse_args(["--config", str(path)]), {"HOME": str(tmp_path)})


@pytest.mark.parametrize(
    ("given", "posted_to"),
    [
        ("", None),
        ("http://localhost:8081", "http://localhost:8081/events"),
        ("http://localhost:8081/", "http://localhost:8081/events"),
        ("https://graph.example/hooks/gpu", "https://graph.example/hooks/gpu"),
        ("http://graph:8081/?token=x", "http://graph:8081/?token=x"),
    ],
)
def test_a_bare_graph_service_url_gets_the_events_path(given: str, posted_to: str | None) -> None:
    assert graph_events_url(given) == posted_to
