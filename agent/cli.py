"""`gpu-agent`: parse flags, load the configuration, run the agent.

Exit status: 0 after a clean shutdown, 2 for a configuration error, 1 when the
agent cannot start (no usable GPU backend, state file unreadable).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys

import trio

from agent import gc_policy
from agent.api_keys import ApiKeyError
from agent.cluster_keyring import KeyringError
from agent.app import run_agent
from agent.config_checks import ConfigError
from agent.config_loading import build_arg_parser, load_config
from agent.devices.base import DeviceError
from agent.storage import StorageError


def package_version() -> str:
    try:
        return importlib.metadata.version("gpu-orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        config = load_config(args, os.environ)
    except ConfigError as exc:
        print(f"gpu-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.agent.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The whole process is this agent: keep full collections short (agent/gc_policy.py).
    gc_policy.install()
    try:
        trio.run(
            lambda: run_agent(
                config,
                version=package_version(),
                environ=os.environ,
                reload_config=lambda: load_config(args, os.environ),
            )
        )
    except BaseException as exc:  # noqa: BLE001 - sorted below, re-raised if not ours
        # trio wraps errors raised inside a nursery in an ExceptionGroup: unwrap a
        # lone start-up error (a port in use, a bad key file) to say it plainly.
        leaf = _lone_leaf(exc)
        if isinstance(leaf, (ApiKeyError, KeyringError, ConfigError)):
            print(f"gpu-agent: configuration error: {leaf}", file=sys.stderr)
            return 2
        if isinstance(leaf, (DeviceError, StorageError, OSError, ValueError)):
            print(f"gpu-agent: cannot start: {leaf}", file=sys.stderr)
            return 1
        raise
    return 0


def _lone_leaf(exc: BaseException) -> BaseException:
    """The single exception inside nested exception groups, or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
