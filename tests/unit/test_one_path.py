"""One node, one path: nothing above the replication layer asks which mode the agent runs in.

A lone agent is a Raft cluster of one voter, a server one of several, a client
a server-less role; the HTTP handlers and the lease service are the same code
for all three. They may ask what this node *is now* (the ready leader? does it
hold a replica?), never how it was configured. Like the layering test, this
reads the source: a branch on mode that creeps back in fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"
ABOVE_REPLICATION = ["http_api.py", "lease_service.py", "leadership.py", "health_reporting.py", "workload_analysis.py"]
# How a mode branch looked before (and would look again): the configured role or
# bootstrap size, the absence of a Raft log or cluster object, the log's type.
MODE_BRANCHES = [
    r"\bbootstrap_expect\b",
    r"\bcluster\.server\b",
    r"\braft_mode\b",
    r"\bis_server\b",
    r"\bholds_table\b",
    r"\b(cluster|raft)\s+is\s+(not\s+)?None\b",
    r"\bisinstance\([^)]*(LocalLog|RaftLog|ClientLog)",
    r"\b(LocalLog|ClientLog)\b",
]


@pytest.mark.parametrize("name", ABOVE_REPLICATION)
def test_no_branch_on_run_mode(name: str) -> None:
    source = (AGENT / name).read_text()
    found = [(pattern, m.group(0)) for pattern in MODE_BRANCHES for m in re.finditer(pattern, source)]
    assert not found, f"{name} branches on run mode: {found}"


def test_the_check_sees_a_mode_branch() -> None:
    """The patterns catch the branches this project used to have (so the test above can fail)."""
    old = [
        "if ctx.cluster is None:",
        "if read and cluster.is_server and stale:",
        "if isinstance(lease_log, (LocalLog, RaftLog)):",
        "raft = ctx.cluster.raft if ctx.cluster is not None else None\nif raft is None:",
        "if config.cluster.bootstrap_expect >= 3:",
    ]
    for line in old:
        assert any(re.search(pattern, line) for pattern in MODE_BRANCHES), line


def test_the_legacy_logs_are_gone() -> None:
    assert not (AGENT / "local_log.py").exists()
    assert not re.search(r"\bclass ClientLog\b", (AGENT / "cluster.py").read_text())
