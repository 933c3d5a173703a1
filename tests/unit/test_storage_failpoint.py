"""The disk-stall failpoint (agent/storage.py): off unless its directory is named, on and off by a file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent import storage
from agent.raft_storage import RaftStorage
from coordinator.raft_messages import HardState


def test_no_directory_or_no_file_means_no_stall(tmp_path: Path) -> None:
    assert storage.fsync_failpoint_seconds(None) == 0.0
    assert storage.fsync_failpoint_seconds(str(tmp_path)) == 0.0


@pytest.mark.parametrize("content, seconds", [("0.25\n", 0.25), ("", 0.0), ("soon", 0.0), ("-1", 0.0), ("inf", 0.0)])
def test_the_file_holds_the_stall_in_seconds(tmp_path: Path, content: str, seconds: float) -> None:
    (tmp_path / storage.FSYNC_SLEEP_FILE).write_text(content)
    assert storage.fsync_failpoint_seconds(str(tmp_path)) == seconds


def test_a_raft_persist_stalls_while_the_file_is_there_and_not_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    monkeypatch.setattr(storage, "_FAILPOINT_DIR", str(failpoints))
    raft = RaftStorage(tmp_path / "state.db")
    (failpoints / storage.FSYNC_SLEEP_FILE).write_text("0.3")
    started = time.monotonic()
    raft.persist(HardState(1, None, 0), None, None, ())
    assert time.monotonic() - started >= 0.3
    (failpoints / storage.FSYNC_SLEEP_FILE).unlink()
    started = time.monotonic()
    raft.persist(HardState(2, None, 0), None, None, ())
    assert time.monotonic() - started < 0.3
    assert raft.load().hard_state.term == 2
    raft.close()
