"""Shared fixtures: real agent processes on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.agent_process import AgentProcess


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents (kwargs as AgentProcess's); all are killed at the end of the test."""
    started: list[AgentProcess] = []

    def start(**kwargs: object) -> AgentProcess:
        kwargs.setdefault("data_dir", tmp_path / f"agent-{len(started)}")
        agent = AgentProcess(**kwargs)  # type: ignore[arg-type]
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        agent.kill()
