"""Loading the gpu-agent's configuration: defaults < config file < environment < flags.

`load_config` starts from the defaults (config.py's sections), lays the file,
the environment and the command-line flags over them key by key, and only then
runs `AgentConfig.validate()` (config_checks.py), so rules about combinations
see the final values whichever layer set them. Each layer's values are parsed
against the field's type hint, and an error names the key and the layer that
set it (the file, the variable such as `$PORT`, or the flag such as `--port`).
A misspelt section or key is an error with the nearest valid name
suggested, never a setting that silently does nothing.

This module never reads `os.environ`: callers pass the environment in, so tests
can use their own. It reads the config file, the host name (the default node
name) and the installed package's version (for `--version`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Final, get_type_hints

from agent.config import (
    DEFAULT_CONFIG_PATH,
    IDLE_RECLAIM_KEYS,
    QUEUE_KEYS,
    QUEUES,
    AgentConfig,
    AgentSection,
    default_data_dir,
    default_node_name,
    did_you_mean,
    section_fields,
)
from agent.config_checks import LOG_LEVELS, ConfigError
from coordinator.idle_reclaim import IdlePolicy
from coordinator.queues import QueueSpec
from coordinator.request_parsing import SERVICE_NAME_RE

# Environment variable -> the key it overrides. STATE_DIRECTORY is not here: it
# only changes the *default* data_dir, so a data_dir in the file still wins.
ENV_KEYS: Final[Mapping[str, str]] = {
    "PORT": "http.port",
    "DEEPAGENTS_URL": "integrations.deepagents_url",
    "GRAPH_SERVICE_URL": "integrations.graph_service_url",
}
# argparse dest -> the key the flag overrides. --simulate also sets backend.
FLAG_KEYS: Final[Mapping[str, str]] = {
    "node_name": "agent.node_name",
    "data_dir": "agent.data_dir",
    "log_level": "agent.log_level",
    "bind": "http.bind",
    "port": "http.port",
    "simulate": "devices.simulate",
    "cluster_bind": "cluster.bind",
    "gossip_port": "cluster.gossip_port",
    "raft_port": "cluster.raft_port",
    "join": "cluster.join",
}


def _package_version() -> str:
    try:
        return importlib.metadata.version("gpu-orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (package not installed)"


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `gpu-agent`; every option defaults to None (= not given)."""
    parser = argparse.ArgumentParser(
        prog="gpu-agent",
        description="Run the gpu-orchestrator agent on this host.",
        epilog="Precedence: flags > environment (PORT, CONFIG_PATH, DEEPAGENTS_URL, "
        "GRAPH_SERVICE_URL) > config file > defaults. Every key: docs/configuration.md.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML config file (default: $CONFIG_PATH, else {DEFAULT_CONFIG_PATH} if present)",
    )
    parser.add_argument(
        "--port", type=int, metavar="N", help="HTTP API and /metrics port ([http] port, PORT; default 8086)"
    )
    parser.add_argument(
        "--bind", metavar="ADDR", help="address the HTTP API listens on ([http] bind; default 127.0.0.1)"
    )
    parser.add_argument("--data-dir", type=Path, metavar="PATH", help="state directory ([agent] data_dir)")
    parser.add_argument(
        "--node-name", metavar="NAME", help="this agent's name ([agent] node_name; default: host name)"
    )
    parser.add_argument(
        "--simulate",
        metavar="SPEC",
        help="serve simulated GPUs instead of NVML: a fleet such as 4xH100-80GB "
        "(with MIG: 2xA100-80GB:mig=3g.40gb/2g.20gb/1g.10gb/1g.10gb), or a whole host wired "
        "like a real one: hgx-h100, pcie-nvlink-pairs or pcie-2socket "
        '(sets [devices] backend = "simulated"; docs/configuration.md#devices)',
    )
    parser.add_argument(
        "--cluster-bind",
        metavar="ADDR",
        help="address the gossip and Raft listeners bind to ([cluster] bind; default 0.0.0.0)",
    )
    parser.add_argument(
        "--gossip-port", type=int, metavar="N", help="gossip port, UDP and TCP ([cluster] gossip_port; default 7946)"
    )
    parser.add_argument("--raft-port", type=int, metavar="N", help="Raft port ([cluster] raft_port; default 7947)")
    parser.add_argument(
        "--join",
        action="append",
        metavar="HOST[:PORT]",
        help="an existing member to join; repeat for several (replaces [cluster] join)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, help="least severe level logged ([agent] log_level; default info)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    return parser


def _section_types() -> dict[str, type[Any]]:
    hints = get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in section_fields()}


def _key_types(section_type: type[Any]) -> dict[str, Any]:
    hints = get_type_hints(section_type)
    return {f.name: hints[f.name] for f in fields(section_type)}


def _describe(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{names.get(type(value), type(value).__name__)} {shown}"


def _file_value(raw: object, hint: Any, where: str, base_dir: Path) -> object:
    """Return `raw` converted to the field's type; raise ConfigError naming `where` if it does not fit."""
    if isinstance(hint, types.UnionType):
        # `T | None`: TOML has no null, so an empty string means "not set".
        (hint,) = [arg for arg in hint.__args__ if arg is not type(None)]
        if raw == "":
            return None
    expected: str
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        expected = "a boolean (true or false)"
    elif hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        expected = "an integer"
    elif hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        expected = "a number"
    elif hint is str:
        if isinstance(raw, str):
            return raw
        expected = "a string"
    elif hint is Path:
        if isinstance(raw, str) and raw:
            if raw.startswith("~"):
                raise ConfigError(f"{where}: '~' is not expanded in the config file; write an absolute path")
            # Relative paths are relative to the file, not to wherever the agent
            # happens to be started from.
            return base_dir / raw
        expected = "a path (a non-empty string)"
    elif hint == tuple[str, ...]:
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return tuple(raw)
        expected = "an array of strings"
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    raise ConfigError(f"{where}: expected {expected}, got {_describe(raw)}")


def _env_value(text: str, hint: Any, variable: str) -> object:
    if hint is int:
        if not re.fullmatch(r"[0-9]+", text.strip()):
            raise ConfigError(f"{variable}: expected an integer, got {text!r}")
        return int(text)
    return text


def _read_config_file(path: Path, origin: str, explicit: bool) -> dict[str, Any] | None:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} (from {origin}) does not exist") from None
        return None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def _file_overrides(document: Mapping[str, Any], path: Path) -> dict[str, dict[str, object]]:
    sections = _section_types()
    overrides: dict[str, dict[str, object]] = {}
    for section_name, table in document.items():
        if section_name == QUEUES:
            continue  # a table of tables: `_queue_specs`
        if section_name not in sections:
            if isinstance(table, dict):
                raise ConfigError(
                    f"{path}: unknown section [{section_name}]{did_you_mean(section_name, [*sections, QUEUES])} "
                    f"(sections: {', '.join(f'[{name}]' for name in sections)}, [{QUEUES}.<name>])"
                )
            homes = [name for name, kind in sections.items() if section_name in _key_types(kind)]
            places = " or ".join(f"[{home}] {section_name}" for home in homes)
            hint = f"; did you mean {places}?" if homes else ""
            raise ConfigError(
                f"{path}: unknown top-level key {section_name!r}; every key belongs in a section{hint}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section_name}] must be a table, got {_describe(table)}")
        key_types = _key_types(sections[section_name])
        values: dict[str, object] = {}
        for key, raw in table.items():
            if key not in key_types:
                raise ConfigError(
                    f"{path}: unknown key {key!r} in [{section_name}]{did_you_mean(key, key_types)} "
                    f"(keys: {', '.join(key_types)})",
                    key=f"{section_name}.{key}",
                )
            values[key] = _file_value(raw, key_types[key], f"{path}: [{section_name}] {key}", path.parent)
        overrides[section_name] = values
    devices = overrides.get("devices", {})
    if devices.get("simulate") is not None and "backend" not in devices:
        devices["backend"] = "simulated"
    return overrides


def _queue_specs(document: Mapping[str, Any], path: Path) -> tuple[QueueSpec, ...]:
    """The `[queues.<name>]` tables of `document`, each checked key by key.

    Raises ConfigError naming `[queues.<name>] key` for an unknown key (with the
    nearest valid one), a value of the wrong type, or one QueueSpec refuses.
    How the queues fit together (parents, services) is `_validate_queues`'s.
    """
    queues = document.get(QUEUES)
    if queues is None:
        return ()
    if not isinstance(queues, dict):
        raise ConfigError(f"{path}: [{QUEUES}] must hold [{QUEUES}.<name>] tables, got {_describe(queues)}", key=QUEUES)
    specs = []
    for name, table in queues.items():
        where = f"{path}: [{QUEUES}.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(
                f"{where} must be a table of the queue's keys ({', '.join(QUEUE_KEYS)}), got {_describe(table)}",
                key=f"{QUEUES}.{name}",
            )
        specs.append(_queue_spec(name, table, where))
    return tuple(specs)


def _queue_spec(name: str, table: Mapping[str, Any], where: str) -> QueueSpec:
    dotted = f"{QUEUES}.{name}"
    for key in table:
        if key not in QUEUE_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}{did_you_mean(key, QUEUE_KEYS)} (keys: {', '.join(QUEUE_KEYS)})",
                key=dotted,
            )
    here = Path(".")  # no queue key is a path

    def value(key: str, hint: Any) -> Any:
        return _file_value(table[key], hint, f"{where} {key}", here)

    values: dict[str, Any] = {}
    for key, hint in (
        ("parent", str),
        ("weight", float),
        ("max_gpus", int),
        ("max_priority", int),
        ("borrow", bool),
        ("lend", bool),
        ("preemption_grace_s", float),
        ("services", tuple[str, ...]),
        ("allow_shares", bool),
        ("cross_queue_shares", bool),
    ):
        if key in table:
            values[key] = value(key, hint)
    if values.get("parent") == "":
        del values["parent"]  # TOML has no null: "" is a top-level queue, as for other unset keys
    for service in values.get("services", ()):
        if not SERVICE_NAME_RE.match(service):
            raise ConfigError(
                f"{where} services: {service!r} can never be a service_name (1-128 letters, digits, "
                "'.', '_', ':' or '-', starting with a letter or digit)",
                key=dotted,
            )
    if "guaranteed_gpus" in table:
        raw = table["guaranteed_gpus"]
        if isinstance(raw, dict):
            by_model = {model: _file_value(n, int, f"{where} guaranteed_gpus.{model}", here) for model, n in raw.items()}
            values["guaranteed_by_model"] = tuple(sorted(by_model.items()))
        elif isinstance(raw, int) and not isinstance(raw, bool):
            values["guaranteed_gpus"] = raw
        else:
            raise ConfigError(
                f"{where} guaranteed_gpus: expected an integer or a table of GPU model = integer "
                f'(e.g. {{ H100 = 8 }}), got {_describe(raw)}',
                key=dotted,
            )
    if "idle_reclaim" in table:
        values["idle_reclaim"] = _idle_reclaim(table["idle_reclaim"], f"{where} idle_reclaim", dotted)
    try:
        return QueueSpec(name, **values)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}", key=dotted) from None


def _idle_reclaim(raw: object, where: str, dotted: str) -> IdlePolicy:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a table {{ utilization_pct = N, minutes = T }}, got {_describe(raw)}", key=dotted
        )
    for key in raw:
        if key not in IDLE_RECLAIM_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}{did_you_mean(key, IDLE_RECLAIM_KEYS)} "
                f"(keys: {', '.join(IDLE_RECLAIM_KEYS)})",
                key=dotted,
            )
    missing = [key for key in IDLE_RECLAIM_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"{where}: needs {' and '.join(missing)} as well (both, or no idle_reclaim at all)", key=dotted)
    utilization = _file_value(raw["utilization_pct"], float, f"{where}.utilization_pct", Path("."))
    minutes = _file_value(raw["minutes"], float, f"{where}.minutes", Path("."))
    assert isinstance(utilization, float) and isinstance(minutes, float)
    try:
        return IdlePolicy(utilization, minutes)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}", key=dotted) from None


def load_config(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    default_config_path: Path | None = None,
) -> AgentConfig:
    """Return the validated configuration from flags > environment > file > defaults.

    `args` is what `build_arg_parser()` parsed (an attribute that is missing or
    None counts as not given). The file is --config, else $CONFIG_PATH, else
    `default_config_path` (DEFAULT_CONFIG_PATH when None) if it exists. An empty
    environment variable counts as unset. Raises ConfigError for a named file
    that is missing, bad TOML, unknown sections or keys, wrong types, and
    anything `AgentConfig.validate()` rejects.
    """
    overrides: dict[str, dict[str, object]] = {name: {} for name in _section_types()}
    sources: dict[str, str] = {}  # dotted key -> where its value came from, for error messages

    def put(dotted: str, value: object, source: str) -> None:
        section, key = dotted.split(".")
        overrides[section][key] = value
        sources[dotted] = source

    flag_config = getattr(args, "config", None)
    env_config = environ.get("CONFIG_PATH", "")
    if flag_config is not None:
        config_path, origin, explicit = Path(flag_config), "--config", True
    elif env_config:
        config_path, origin, explicit = Path(env_config), "CONFIG_PATH", True
    else:
        config_path = default_config_path if default_config_path is not None else DEFAULT_CONFIG_PATH
        origin, explicit = "the default location", False
    config_path = config_path.absolute()
    document = _read_config_file(config_path, origin, explicit)
    queues: tuple[QueueSpec, ...] = ()
    if document is not None:
        for section, values in _file_overrides(document, config_path).items():
            for key, value in values.items():
                put(f"{section}.{key}", value, str(config_path))
        queues = _queue_specs(document, config_path)
        if queues:
            sources[QUEUES] = str(config_path)

    for variable, dotted in ENV_KEYS.items():
        text = environ.get(variable, "")
        if text:
            section, key = dotted.split(".")
            put(dotted, _env_value(text, _key_types(_section_types()[section])[key], variable), variable)

    for dest, dotted in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            if isinstance(value, Path):
                value = value.absolute()
            elif isinstance(value, list):
                value = tuple(value)
            put(dotted, value, "--" + dest.replace("_", "-"))
    if getattr(args, "simulate", None) is not None:
        put("devices.backend", "simulated", "--simulate")

    defaults = AgentConfig(
        agent=AgentSection(node_name=default_node_name(), data_dir=default_data_dir(environ))
    )
    config = replace(
        defaults,
        **{name: replace(getattr(defaults, name), **values) for name, values in overrides.items()},
        queues=queues,
    )
    try:
        config.validate()
    except ConfigError as error:
        source = sources.get(error.key) if error.key else None
        if source is None:
            raise
        raise ConfigError(f"{error} (set by {source})", key=error.key) from None
    return config
