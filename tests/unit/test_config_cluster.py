"""The membership keys and flags: profile, labels, --gossip-port, --raft-port, --cluster-bind, --join."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.config_checks import ConfigError
from agent.config_loading import build_arg_parser, load_config


def load(tmp_path: Path, argv: list[str], toml: str = "") -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    args = build_arg_parser().parse_args(["--config", str(path), *argv])
    return load_config(args, {"HOME": str(tmp_path)})


def test_flags_set_the_cluster_listeners_and_join_list(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        ["--cluster-bind", "127.0.0.5", "--gossip-port", "17946", "--raft-port", "17947",
         "--join", "127.0.0.2:7946", "--join", "10.0.0.1"],
        '[cluster]\njoin = ["ignored:1"]\n',
    )
    cluster = config.cluster
    assert (cluster.bind, cluster.gossip_port, cluster.raft_port) == ("127.0.0.5", 17946, 17947)
    assert cluster.join == ("127.0.0.2:7946", "10.0.0.1")


def test_profile_and_labels_from_the_file(tmp_path: Path) -> None:
    config = load(tmp_path, [], '[agent]\nlabels = ["rack=r3", "zone=eu-1a"]\n[cluster]\nprofile = "local"\n')
    assert config.cluster.profile == "local"
    assert config.agent.labels == ("rack=r3", "zone=eu-1a")


def test_host_lost_grace_defaults_to_five_minutes_and_zero_means_off(tmp_path: Path) -> None:
    assert load(tmp_path, []).cluster.host_lost_grace_s == 300.0
    assert load(tmp_path, [], "[cluster]\nhost_lost_grace_s = 0\n").cluster.host_lost_grace_s == 0.0
    assert load(tmp_path, [], "[cluster]\nhost_lost_grace_s = 2.5\n").cluster.host_lost_grace_s == 2.5


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[cluster]\nprofile = "wan"\n', r"\[cluster\] profile must be one of lan, local"),
        ("[cluster]\nhost_lost_grace_s = -1\n", r"\[cluster\] host_lost_grace_s must be a number of seconds >= 0"),
        ("[cluster]\nhost_lost_grace_s = nan\n", r"\[cluster\] host_lost_grace_s must be a number of seconds >= 0"),
        ('[agent]\nlabels = ["no-equals"]\n', r"\[agent\] labels entry 'no-equals' is not key=value"),
        ('[agent]\nlabels = ["a=1", "a=2"]\n', r"names 'a' twice"),
        ('[agent]\nlabels = [' + ", ".join(f'"k{i}=v"' for i in range(17)) + "]\n", r"at most 16"),
        ('[agent]\nnode_name = "' + "n" * 129 + '"\n', r"1-128 letters"),
    ],
)
def test_nonsense_is_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, [], toml)


def test_a_gossip_port_on_the_http_port_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gossip_port"):
        load(tmp_path, ["--port", "9000", "--gossip-port", "9000"])


def test_snapshot_every_has_etcds_default_and_refuses_a_tiny_round(tmp_path: Path) -> None:
    assert load(tmp_path, []).cluster.snapshot_every == 10_000
    assert load(tmp_path, [], "[cluster]\nsnapshot_every = 500\n").cluster.snapshot_every == 500
    with pytest.raises(ConfigError, match=r"\[cluster\] snapshot_every must be an integer >= 100"):
        load(tmp_path, [], "[cluster]\nsnapshot_every = 10\n")
