"""Raft's stable storage in SQLite: what a Ready persists is exactly what load() gives back.

Each scenario persists Readys built by hand (or by a real RaftCore), reopens the
file as a restarted agent would, and compares the RaftState. The crash test kills
a process in the middle of a transaction (os._exit before COMMIT) and checks that
everything persisted before it — every acknowledged write — is still there.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from coordinator.raft import RaftCore, RaftState, Ready, Role, initial_state
from coordinator.raft_config import local
from coordinator.raft_messages import Entry, EntryType, HardState, Snapshot
from agent.raft_storage import AsyncRaftStorage, RaftStorage
from agent.storage import OutboxRow, StateStore, StorageError


def ready(
    hard_state: HardState | None = None,
    *,
    snapshot: Snapshot | None = None,
    truncate_from: int | None = None,
    entries: tuple[Entry, ...] = (),
) -> Ready:
    return Ready(hard_state, snapshot, truncate_from, entries, (), (), ())


def entries(first: int, last: int, term: int) -> tuple[Entry, ...]:
    return tuple(Entry(i, term, EntryType.NORMAL, f"cmd-{i}-{term}".encode()) for i in range(first, last + 1))


def reopen(path: Path) -> RaftState:
    store = RaftStorage(path)
    try:
        return store.load()
    finally:
        store.close()


def test_a_new_file_loads_as_the_empty_state(tmp_path: Path) -> None:
    assert reopen(tmp_path / "state.db") == RaftState()


def test_hard_state_entries_and_conf_changes_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = RaftStorage(path)
    boot = initial_state(["a", "b", "c"])
    store.persist(boot.hard_state, None, None, boot.entries)
    store.persist_ready(ready(HardState(2, "b", 3), entries=(Entry(2, 2, EntryType.NOOP), *entries(3, 5, 2))))
    store.close()
    assert reopen(path) == RaftState(
        HardState(2, "b", 3), None, (*boot.entries, Entry(2, 2, EntryType.NOOP), *entries(3, 5, 2))
    )


def test_truncation_replaces_a_conflicting_suffix(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = RaftStorage(path)
    store.persist_ready(ready(HardState(2, None, 2), entries=entries(1, 6, 2)))
    # A new leader of term 3 overwrites 4..6 with a shorter suffix: 5 and 6 must not survive.
    store.persist_ready(ready(HardState(3, "c", 2), truncate_from=4, entries=entries(4, 4, 3)))
    store.close()
    assert reopen(path) == RaftState(HardState(3, "c", 2), None, (*entries(1, 3, 2), *entries(4, 4, 3)))


def test_an_installed_snapshot_drops_every_entry_it_covers_and_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = RaftStorage(path)
    store.persist_ready(ready(HardState(1, None, 3), entries=entries(1, 8, 1)))
    # As RaftCore reports an InstallSnapshot: snapshot at 20, truncate from 21, no entries.
    snap = Snapshot(20, 4, ("a", "b", "c"), b"table-at-20")
    store.persist_ready(ready(HardState(4, None, 20), snapshot=snap, truncate_from=21))
    store.close()
    assert reopen(path) == RaftState(HardState(4, None, 20), snap, ())


def test_a_compaction_snapshot_keeps_the_entries_after_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = RaftStorage(path)
    store.persist_ready(ready(HardState(1, None, 10), entries=entries(1, 10, 1)))
    snap = Snapshot(6, 1, ("a",), b"table-at-6")
    store.save_snapshot(snap)
    store.close()
    state = reopen(path)
    assert state.snapshot == snap and state.entries == entries(7, 10, 1)
    # And a core restarts from it: the snapshot is applied, 7..10 are to be replayed.
    core = RaftCore(local(), "a", random.Random(1), state)
    assert (core.log.snapshot.index, core.log.applied, core.log.committed, core.log.last_index) == (6, 6, 10, 10)


def test_a_ready_with_nothing_durable_writes_nothing(tmp_path: Path) -> None:
    store = RaftStorage(tmp_path / "state.db")
    store.persist_ready(ready())
    assert store.persists == 0
    store.persist_ready(ready(HardState(1, None, 0)))
    assert store.persists == 1 and store.last_persist_seconds > 0.0 and store.stalled_seconds() == 0.0
    store.close()


def test_raft_tables_live_beside_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    outbox = StateStore(path)
    outbox.add_outbox([OutboxRow("1.0.graph", 1, "graph", "http://127.0.0.1:9/", b"{}", 1.0)])
    store = RaftStorage(path)
    store.persist_ready(ready(HardState(1, None, 1), entries=entries(1, 1, 1)))
    store.close()
    assert outbox.outbox_counts().pending == 1
    outbox.close()
    assert reopen(path).entries == entries(1, 1, 1)


def test_a_failed_write_rolls_back_and_raises_storage_error(tmp_path: Path) -> None:
    store = RaftStorage(tmp_path / "state.db")
    store.persist_ready(ready(HardState(1, None, 1), entries=entries(1, 2, 1)))
    with pytest.raises(StorageError):
        # An entry type SQLite cannot bind: the whole transaction, hard state included, is undone.
        store.persist(HardState(9, None, 1), None, None, (Entry(3, 1, EntryType.NORMAL, object()),))  # type: ignore[arg-type]
    assert store.load() == RaftState(HardState(1, None, 1), None, entries(1, 2, 1))
    store.close()


_CRASH_MID_TRANSACTION = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from coordinator.raft_messages import Entry, HardState
    import agent.raft_storage as rs

    store = rs.RaftStorage(Path(sys.argv[1]))
    real_write = rs.write_state

    def write_then_die(db, *args):
        real_write(db, *args)  # every row of the Ready is written, the COMMIT never runs
        os._exit(9)

    rs.write_state = write_then_die
    store.persist(HardState(5, "x", 4), None, 2, [Entry(2, 5, data=b"unacknowledged")])
    """
)


def test_a_crash_inside_a_persist_loses_nothing_persisted_before_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = RaftStorage(path)
    store.persist_ready(ready(HardState(2, "a", 1), entries=entries(1, 3, 2)))
    store.close()
    before = reopen(path)
    crashed = subprocess.run([sys.executable, "-c", _CRASH_MID_TRANSACTION, str(path)], timeout=60)
    assert crashed.returncode == 9
    # The interrupted Ready (a truncation, a new entry, a new term and vote) left no trace;
    # everything acknowledged before it is intact.
    assert reopen(path) == before == RaftState(HardState(2, "a", 1), None, entries(1, 3, 2))


def test_a_single_voter_core_persisted_through_the_async_store_restarts_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "state.db"

    async def main() -> None:
        store = AsyncRaftStorage(RaftStorage(path))
        core = RaftCore(local(), "a", random.Random(7), initial_state(["a"]))
        await store.persist(core.hard_state, None, None, initial_state(["a"]).entries)
        while core.role is not Role.LEADER:
            core.tick()
            while core.has_ready():
                rd = core.ready()
                await store.persist_ready(rd)
                core.advance(rd)
        for n in range(5):
            core.propose(f"w{n}".encode())
            while core.has_ready():
                rd = core.ready()
                await store.persist_ready(rd)
                core.advance(rd)
        assert store.last_persist_seconds > 0.0
        restarted = await store.load()
        assert restarted.hard_state == core.hard_state
        assert [e.data for e in restarted.entries if e.type is EntryType.NORMAL] == [f"w{n}".encode() for n in range(5)]
        store.sync.close()

    trio.run(main)
