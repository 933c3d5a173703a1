"""Configuration loading: precedence, schema errors, defaults and validation.

Every test passes its own environment and default config path, so nothing here
reads /etc or the real environment.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.config import AgentConfig, AgentSection, DevicesSection, HttpSection, QUEUE_KEYS, QUEUES, default_data_dir
from agent.config_checks import ConfigError, split_host_port
from agent.config_loading import build_arg_parser, load_config
from agent.devices.simulated import SIMULATED_HOSTS

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "systemd" / "agent.toml.example"


def load(tmp_path: Path, argv: Sequence[str] = (), environ: dict[str, str] | None = None) -> AgentConfig:
    """Load with a default config path that does not exist unless the test writes it."""
    env = {"HOME": str(tmp_path / "home")} if environ is None else environ
    args = build_arg_parser().parse_args(list(argv))
    return load_config(args, env, default_config_path=tmp_path / "agent.toml")


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def base() -> AgentConfig:
    return AgentConfig(agent=AgentSection(node_name="gpu-host-1", data_dir=Path("/var/lib/x")))


# --- precedence: flag > environment > file > default -------------------------------


def test_port_defaults_to_8086(tmp_path: Path) -> None:
    assert load(tmp_path).http.port == 8086


def test_file_beats_default(tmp_path: Path) -> None:
    write(tmp_path, "[http]\nport = 9000\n")
    assert load(tmp_path).http.port == 9000


def test_environment_beats_file(tmp_path: Path) -> None:
    write(tmp_path, "[http]\nport = 9000\n")
    assert load(tmp_path, environ={"PORT": "9100"}).http.port == 9100


def test_flag_beats_environment(tmp_path: Path) -> None:
    write(tmp_path, "[http]\nport = 9000\n")
    assert load(tmp_path, ["--port", "9200"], environ={"PORT": "9100"}).http.port == 9200


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    write(tmp_path, "[http]\nport = 9000\n")
    assert load(tmp_path, environ={"PORT": ""}).http.port == 9000


def test_non_numeric_port_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PORT: expected an integer, got 'http'"):
        load(tmp_path, environ={"PORT": "http"})


def test_invalid_value_names_the_layer_that_set_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[http\] port must be a port in 1\.\.65535, got 70000 \(set by PORT\)"):
        load(tmp_path, environ={"PORT": "70000"})


def test_integration_urls_come_from_environment(tmp_path: Path) -> None:
    write(tmp_path, '[integrations]\ndeepagents_url = "http://file:1"\n')
    config = load(
        tmp_path,
        environ={"DEEPAGENTS_URL": "http://advisor:8000", "GRAPH_SERVICE_URL": "https://graph/events"},
    )
    assert config.integrations.deepagents_url == "http://advisor:8000"
    assert config.integrations.graph_service_url == "https://graph/events"


def test_flags_set_their_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        ["--bind", "127.0.0.1", "--data-dir", "/srv/state", "--node-name", "n1", "--log-level", "debug"],
    )
    assert (config.http.bind, config.agent.data_dir) == ("127.0.0.1", Path("/srv/state"))
    assert (config.agent.node_name, config.agent.log_level) == ("n1", "debug")


# --- which file ----------------------------------------------------------------------


def test_config_flag_beats_config_path_environment(tmp_path: Path) -> None:
    flagged = write(tmp_path, "[http]\nport = 9001\n", "flag.toml")
    from_env = write(tmp_path, "[http]\nport = 9002\n", "env.toml")
    config = load(tmp_path, ["--config", str(flagged)], environ={"CONFIG_PATH": str(from_env)})
    assert config.http.port == 9001


def test_config_path_environment_beats_default_file(tmp_path: Path) -> None:
    write(tmp_path, "[http]\nport = 9003\n")
    from_env = write(tmp_path, "[http]\nport = 9002\n", "env.toml")
    assert load(tmp_path, environ={"CONFIG_PATH": str(from_env)}).http.port == 9002


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml \(from --config\) does not exist"):
        load(tmp_path, ["--config", str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match=r"nope\.toml \(from CONFIG_PATH\) does not exist"):
        load(tmp_path, environ={"CONFIG_PATH": str(tmp_path / "nope.toml")})


def test_missing_default_config_file_is_fine(tmp_path: Path) -> None:
    assert not (tmp_path / "agent.toml").exists()
    assert load(tmp_path).http == HttpSection()


def test_bad_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path, "[http\nport = 1\n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load(tmp_path)


# --- schema: unknown keys and wrong types -------------------------------------------


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    write(tmp_path, "[http]\nprot = 9000\n")
    with pytest.raises(ConfigError, match=r"unknown key 'prot' in \[http\]; did you mean 'port'\?"):
        load(tmp_path)


def test_unknown_section_is_named_with_a_suggestion(tmp_path: Path) -> None:
    write(tmp_path, "[scheduling]\nmax_queue = 5\n")
    with pytest.raises(ConfigError, match=r"unknown section \[scheduling\]; did you mean 'scheduler'\?"):
        load(tmp_path)


def test_top_level_key_points_to_its_section(tmp_path: Path) -> None:
    write(tmp_path, "raft_port = 8000\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key 'raft_port'.*\[cluster\] raft_port"):
        load(tmp_path)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[http]\nport = "8086"\n', r"\[http\] port: expected an integer, got string '8086'"),
        ("[http]\nport = true\n", r"\[http\] port: expected an integer, got boolean True"),
        ("[scheduler]\nmax_queue = 10.5\n", r"\[scheduler\] max_queue: expected an integer"),
        ('[cluster]\nserver = "yes"\n', r"\[cluster\] server: expected a boolean"),
        ("[cluster]\nserver = 1\n", r"\[cluster\] server: expected a boolean"),
        ("[devices]\nsample_interval_s = false\n", r"\[devices\] sample_interval_s: expected a number"),
        ('[cluster]\njoin = "10.0.0.1"\n', r"\[cluster\] join: expected an array of strings"),
        ("[cluster]\njoin = [1]\n", r"\[cluster\] join: expected an array of strings"),
        ("[http]\nbind = 0\n", r"\[http\] bind: expected a string"),
        ("[auth]\nkeys_file = 3\n", r"\[auth\] keys_file: expected a path"),
        ("http = 3\n", r"\[http\] must be a table"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path: Path, toml: str, message: str) -> None:
    write(tmp_path, toml)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path)


def test_integer_is_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    write(tmp_path, "[scheduler]\ndefault_ttl_s = 600\n")
    ttl = load(tmp_path).scheduler.default_ttl_s
    assert ttl == 600.0 and isinstance(ttl, float)


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", '[agent]\ndata_dir = "state"\n[cluster]\nkey_file = "cluster.key"\n')
    config = load(tmp_path, ["--config", str(path)])
    assert config.agent.data_dir == tmp_path / "etc" / "state"
    assert config.cluster.key_file == tmp_path / "etc" / "cluster.key"


def test_tilde_in_a_file_path_is_refused(tmp_path: Path) -> None:
    write(tmp_path, '[agent]\ndata_dir = "~/state"\n')
    with pytest.raises(ConfigError, match=r"\[agent\] data_dir: '~' is not expanded"):
        load(tmp_path)


def test_empty_string_unsets_an_optional_key(tmp_path: Path) -> None:
    write(tmp_path, '[cluster]\nadvertise = ""\nkey_file = ""\n')
    config = load(tmp_path)
    assert (config.cluster.advertise, config.cluster.key_file) == (None, None)


# --- simulated devices ---------------------------------------------------------------


def test_simulate_flag_implies_the_simulated_backend(tmp_path: Path) -> None:
    write(tmp_path, '[devices]\nbackend = "nvml"\n')
    devices = load(tmp_path, ["--simulate", "4xH100-80GB"]).devices
    assert (devices.backend, devices.simulate) == ("simulated", "4xH100-80GB")


def test_simulate_in_the_file_without_backend_implies_simulated(tmp_path: Path) -> None:
    write(tmp_path, '[devices]\nsimulate = "2xA100-40GB"\n')
    assert load(tmp_path).devices.backend == "simulated"


def test_simulate_in_the_file_with_nvml_backend_is_a_contradiction(tmp_path: Path) -> None:
    write(tmp_path, '[devices]\nbackend = "nvml"\nsimulate = "2xA100-40GB"\n')
    with pytest.raises(ConfigError, match=r'\[devices\] simulate .* contradicts backend = "nvml"'):
        load(tmp_path)


def test_simulated_backend_without_a_spec_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, '[devices]\nbackend = "simulated"\n')
    with pytest.raises(ConfigError, match=r'\[devices\] backend = "simulated" needs a fleet'):
        load(tmp_path)


def test_the_simulate_help_names_every_whole_host_and_the_mig_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option, so no name is hyphen-wrapped
    [line] = [line for line in build_arg_parser().format_help().splitlines() if "--simulate SPEC " in line]
    assert "4xH100-80GB" in line and ":mig=" in line
    for host in SIMULATED_HOSTS:
        assert host in line, host


def test_the_default_backend_is_nvml(tmp_path: Path) -> None:
    assert load(tmp_path).devices == DevicesSection(backend="nvml", simulate=None)


# --- default data directory ------------------------------------------------------------


def test_data_dir_from_systemd_state_directory() -> None:
    environ = {"STATE_DIRECTORY": "/var/lib/gpu-orchestrator:/var/lib/other", "XDG_STATE_HOME": "/x", "HOME": "/h"}
    assert default_data_dir(environ) == Path("/var/lib/gpu-orchestrator")


def test_data_dir_from_xdg_state_home() -> None:
    assert default_data_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == Path("/x/state/gpu-orchestrator")


def test_relative_xdg_state_home_is_ignored() -> None:
    assert default_data_dir({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path("/h/.local/state/gpu-orchestrator")


def test_data_dir_from_home() -> None:
    assert default_data_dir({"HOME": "/home/ops"}) == Path("/home/ops/.local/state/gpu-orchestrator")


def test_data_dir_in_the_file_beats_state_directory(tmp_path: Path) -> None:
    write(tmp_path, '[agent]\ndata_dir = "/srv/gpu"\n')
    config = load(tmp_path, environ={"STATE_DIRECTORY": "/var/lib/gpu-orchestrator"})
    assert config.agent.data_dir == Path("/srv/gpu")


def test_load_uses_state_directory_for_the_default(tmp_path: Path) -> None:
    config = load(tmp_path, environ={"STATE_DIRECTORY": "/var/lib/gpu-orchestrator"})
    assert config.agent.data_dir == Path("/var/lib/gpu-orchestrator")


# --- validate() ----------------------------------------------------------------------------


def with_(config: AgentConfig, section: str, **changes: object) -> AgentConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def test_defaults_are_valid() -> None:
    base().validate()


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("http", {"port": 0}, r"\[http\] port must be a port in 1\.\.65535, got 0"),
        ("cluster", {"gossip_port": 65536}, r"\[cluster\] gossip_port must be a port"),
        ("cluster", {"raft_port": 7946}, r"\[cluster\] raft_port = 7946 is already \[cluster\] gossip_port"),
        ("http", {"port": 7947}, r"\[cluster\] raft_port = 7947 is already \[http\] port"),
        ("http", {"bind": "localhost"}, r"\[http\] bind must be an IP address"),
        ("http", {"max_body_bytes": 0}, r"\[http\] max_body_bytes must be at least 1"),
        ("http", {"request_timeout_s": 2.0}, r"\[http\] request_timeout_s must be at least 3 s"),
        ("http", {"request_timeout_s": float("inf")}, r"\[http\] request_timeout_s must be at least 3 s"),
        ("devices", {"sample_interval_s": 0.0}, r"\[devices\] sample_interval_s must be a number greater than 0"),
        ("devices", {"nvml_timeout_s": float("nan")}, r"\[devices\] nvml_timeout_s must be"),
        ("devices", {"backend": "cuda"}, r"\[devices\] backend must be one of nvml, simulated; got 'cuda'"),
        ("scheduler", {"max_queue": 0}, r"\[scheduler\] max_queue must be at least 1"),
        ("scheduler", {"queue_timeout_s": -1.0}, r"\[scheduler\] queue_timeout_s must be"),
        ("scheduler", {"tick_interval_s": 0.0}, r"\[scheduler\] tick_interval_s must be"),
        ("scheduler", {"default_ttl_s": 90.0, "max_ttl_s": 60.0}, r"default_ttl_s = 90\.0 exceeds max_ttl_s"),
        ("scheduler", {"default_ttl_s": 0.0}, r"default_ttl_s = 0 \(never expire\) exceeds max_ttl_s"),
        ("scheduler", {"max_ttl_s": float("inf")}, r"\[scheduler\] max_ttl_s must be a number >= 0"),
        ("cluster", {"bootstrap_expect": 2}, r"\[cluster\] bootstrap_expect must be an odd number >= 1"),
        ("cluster", {"bootstrap_expect": 0}, r"\[cluster\] bootstrap_expect must be an odd number >= 1"),
        ("cluster", {"advertise": "0.0.0.0"}, r"\[cluster\] advertise must be an address other hosts can reach"),
        ("cluster", {"join": ("10.0.0.1:99999",)}, r"\[cluster\] join entry '10\.0\.0\.1:99999'"),
        ("agent", {"log_level": "verbose"}, r"\[agent\] log_level must be one of debug, info, warning, error"),
        ("agent", {"node_name": "has space"}, r"\[agent\] node_name must be"),
        ("agent", {"node_name": ""}, r"\[agent\] node_name must be"),
        ("auth", {"header_name": "X Key"}, r"\[auth\] header_name must be an HTTP header name"),
        ("auth", {"header_name": "authorization"}, r"\[auth\] header_name must not be Authorization"),
        ("integrations", {"deepagents_url": "advisor:8000"}, r"\[integrations\] deepagents_url must be an http"),
        ("integrations", {"graph_service_url": "ftp://g/"}, r"\[integrations\] graph_service_url must be"),
        ("integrations", {"graph_service_url": "http://g:port/"}, r"\[integrations\] graph_service_url must be"),
        ("integrations", {"deepagents_timeout_s": 0.0}, r"\[integrations\] deepagents_timeout_s must be"),
        ("integrations", {"webhook_max_attempts": 0}, r"\[integrations\] webhook_max_attempts must be at least 1"),
    ],
)
def test_validate_rejects_nonsense(section: str, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        with_(base(), section, **changes).validate()


@pytest.mark.parametrize(
    ("section", "changes"),
    [
        ("cluster", {"bootstrap_expect": 3}),
        ("cluster", {"bootstrap_expect": 7}),
        ("scheduler", {"default_ttl_s": 0.0, "max_ttl_s": 0.0}),
        ("scheduler", {"default_ttl_s": 10.0 * 86400, "max_ttl_s": 0.0}),
        ("integrations", {"deepagents_url": "https://advisor.example:8443/v1"}),
        ("cluster", {"join": ("10.0.0.1", "gpu-2:7946", "[fd00::1]:7946"), "advertise": "10.0.0.5"}),
        ("devices", {"backend": "simulated", "simulate": "4xH100-80GB"}),
    ],
)
def test_validate_accepts_sensible_settings(section: str, changes: dict[str, object]) -> None:
    with_(base(), section, **changes).validate()


def test_listeners_on_different_addresses_may_share_a_port() -> None:
    config = with_(base(), "http", bind="127.0.0.1", port=7946)
    with pytest.raises(ConfigError, match="gossip_port"):
        config.validate()  # cluster.bind is 0.0.0.0, which overlaps 127.0.0.1
    with_(config, "cluster", bind="10.0.0.5").validate()


def test_a_wildcard_bind_overlaps_every_address() -> None:
    config = with_(with_(base(), "http", bind="0.0.0.0"), "cluster", bind="10.0.0.5", gossip_port=8086)
    with pytest.raises(ConfigError, match=r"\[cluster\] gossip_port = 8086 is already \[http\] port"):
        config.validate()  # http.bind is 0.0.0.0, which includes 10.0.0.5


def test_split_host_port() -> None:
    assert split_host_port("gpu-1", 7946) == ("gpu-1", 7946)
    assert split_host_port("10.0.0.1:8000", 7946) == ("10.0.0.1", 8000)
    assert split_host_port("[fd00::1]:8000", 7946) == ("fd00::1", 8000)
    assert split_host_port("[fd00::1]", 7946) == ("fd00::1", 7946)
    assert split_host_port("fd00::1", 7946) == ("fd00::1", 7946)
    for bad in ("", ":7946", "[fd00::1", "[fd00::1]x", "host:0", "host:http"):
        with pytest.raises(ValueError):
            split_host_port(bad, 7946)


# --- the shipped example ----------------------------------------------------------------


def test_example_file_loads_and_states_the_true_defaults(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path)}
    from_example = load(tmp_path, ["--config", str(EXAMPLE)], environ=environ)
    assert from_example == load(tmp_path, environ=environ)


def test_example_file_mentions_every_key() -> None:
    mentioned: set[str] = set()
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        # `# [queues.research]`: the queue tables are an example, commented out.
        if header := re.fullmatch(r"(?:# )?\[([a-z_]+)(?:\.[a-z_-]+)?\]", line):
            section = header[1]
        elif key := re.match(r"(?:# )?([a-z_]+) = ", line):
            mentioned.add(f"{section}.{key[1]}")
    every_key = {
        f"{section_field.name}.{key_field.name}"
        for section_field in dataclasses.fields(AgentConfig)
        if section_field.name != QUEUES
        for key_field in dataclasses.fields(getattr(base(), section_field.name))
    }
    assert mentioned == every_key | {f"{QUEUES}.{key}" for key in QUEUE_KEYS}


def test_version_flag_prints_the_program_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_arg_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("gpu-agent ")


@pytest.mark.parametrize("value", [-1, 1])
def test_nvlink_first_gpus_is_off_or_a_multi_gpu_count(tmp_path: Path, value: int) -> None:
    assert load(tmp_path).scheduler.nvlink_first_gpus == 0
    write(tmp_path, "[scheduler]\nnvlink_first_gpus = 4\n")
    assert load(tmp_path).scheduler.nvlink_first_gpus == 4
    write(tmp_path, f"[scheduler]\nnvlink_first_gpus = {value}\n")
    with pytest.raises(ConfigError, match=r"\[scheduler\] nvlink_first_gpus must be 0 \(off\) or a GPU count"):
        load(tmp_path)
