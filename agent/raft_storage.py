"""Raft's stable storage in the agent's SQLite state file: hard state, log, snapshot.

Theory of operation
-------------------
`RaftCore` hands its shell a `Ready`; everything in it that must survive a
crash is written here in **one** transaction, committed with fsync
(WAL, `synchronous=FULL`), before any message of that Ready is sent:

    BEGIN IMMEDIATE
      snapshot     → replace raft_snapshot, delete raft_entries ≤ its index
      truncate_from→ delete raft_entries ≥ truncate_from
      entries      → insert them
      hard_state   → replace raft_hard_state (term, vote, commit)
    COMMIT                                              -- fsync: now a promise

Either all of a Ready is on disk or none of it is, so a crash between two
persists loses only what was never acknowledged: nothing of the unfinished
Ready was sent (persist before send), and the core re-creates it after the
restart from what the peers still hold. The persisted commit index never
exceeds the persisted log, because both move in the same transaction.

A compaction (`RaftCore.compact`, called by the shell after applying) is
written by `save_snapshot` in its own transaction: the snapshot, then the
entries it covers are deleted. A crash before it only leaves more log to replay.

`load()` reads the three tables back as the `RaftState` a restarted core is
built from (entries at or below the snapshot are skipped by the core).

Layout (next to agent/storage.py's tables in the same file)
------------------------------------------------------------
- `raft_hard_state(id=1, term, vote, commit)`, vote NULL when none;
- `raft_entries(idx PRIMARY KEY, term, type, data)`: contiguous after the snapshot;
- `raft_snapshot(id=1, idx, term, conf, data)`: conf = `encode_voters(voters)`,
  data = the state machine's bytes (a msgpack'd LeaseTable snapshot).

Resource handling
-----------------
One connection per file, opened `check_same_thread=False`; `AsyncRaftStorage`
runs every call in a worker thread, one at a time (a CapacityLimiter of 1), so
the trio loop never blocks on the disk. `last_persist_seconds` is the duration
of the last completed transaction and `stalled_seconds()` the age of the one
in flight: a "disk not making progress" health signal reads those.

Error handling
--------------
Any sqlite3 or OS error is raised as `agent.storage.StorageError` after a
rollback. A shell that gets one must stop (the core believes nothing of that
Ready is durable, and it must not be advanced past it).

Failpoint
---------
Every transaction here goes through `agent.storage.run_transaction`, so the
disk-stall failpoint described there (`GPU_ORCH_FAILPOINT_DIR`/fsync_sleep_s, off
unless that variable is set) holds a Ready's persist as a stuck fsync would, and
`stalled_seconds()` grows meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import trio

from coordinator.raft import RaftState, Ready
from coordinator.raft_messages import (
    Entry,
    EntryType,
    HardState,
    MalformedMessage,
    Snapshot,
    decode_voters,
    encode_voters,
)

from agent.storage import StorageError, open_state_db, run_transaction

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS raft_hard_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL,
    vote TEXT,
    commit_index INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS raft_entries (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    type INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS raft_snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL,
    term INTEGER NOT NULL,
    conf BLOB NOT NULL,
    data BLOB NOT NULL
);
"""


class RaftStorage:
    """Blocking access to the Raft tables. Not thread-safe: one thread at a time."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the state file and the Raft tables; raises StorageError."""
        self.path = path
        # Duration of the last committed persist (seconds), for metrics and health.
        self.last_persist_seconds = 0.0
        self.persists = 0
        # time.monotonic() when the persist in flight began; None when idle. Written
        # by the worker thread, read by the trio thread (a float swap is atomic).
        self._started: float | None = None
        self._lock = threading.Lock()
        self._db = open_state_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def stalled_seconds(self, now: float | None = None) -> float:
        """How long the persist in flight has run (0.0 when none): a stuck disk grows this."""
        started = self._started
        if started is None:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - started)

    # --- reading ------------------------------------------------------------------------

    def load(self) -> RaftState:
        """The persisted hard state, snapshot and entries after it (empty RaftState when new)."""

        def read(db: sqlite3.Connection) -> RaftState:
            row = db.execute("SELECT term, vote, commit_index FROM raft_hard_state WHERE id = 1").fetchone()
            hard = HardState() if row is None else HardState(int(row[0]), None if row[1] is None else str(row[1]), int(row[2]))
            row = db.execute("SELECT idx, term, conf, data FROM raft_snapshot WHERE id = 1").fetchone()
            snapshot = None
            if row is not None:
                snapshot = Snapshot(int(row[0]), int(row[1]), decode_voters(bytes(row[2])), bytes(row[3]))
            after = 0 if snapshot is None else snapshot.index
            entries = tuple(
                Entry(int(i), int(t), EntryType(int(k)), bytes(d))
                for i, t, k, d in db.execute(
                    "SELECT idx, term, type, data FROM raft_entries WHERE idx > ? ORDER BY idx", (after,)
                )
            )
            return RaftState(hard, snapshot, entries)

        return self._tx(read, timed=False)

    # --- writing ------------------------------------------------------------------------

    def persist_ready(self, rd: Ready) -> None:
        """Make the durable part of `rd` stable in one fsync'd transaction; raises StorageError."""
        self.persist(rd.hard_state, rd.snapshot, rd.truncate_from, rd.entries)

    def persist(
        self,
        hard_state: HardState | None,
        snapshot: Snapshot | None,
        truncate_from: int | None,
        entries: Sequence[Entry],
    ) -> None:
        """Write what a Ready asks for, all or nothing (see the module docstring)."""
        if hard_state is None and snapshot is None and truncate_from is None and not entries:
            return  # nothing durable in this Ready: no transaction, no fsync
        self._tx(lambda db: write_state(db, hard_state, snapshot, truncate_from, entries), timed=True)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a compaction's snapshot and delete the entries it covers; raises StorageError."""
        self._tx(lambda db: write_state(db, None, snapshot, None, ()), timed=True)

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one fsync'd transaction on the state file (start-up work such as
        agent/state_migration.py's); raises StorageError after a rollback."""
        return self._tx(work, timed=False)

    def _tx(self, work: Callable[[sqlite3.Connection], T], *, timed: bool) -> T:
        with self._lock:  # the async wrapper serializes already; this guards direct use
            started = time.monotonic()
            if timed:
                self._started = started
            try:
                result = run_transaction(self._db, work)
            except (sqlite3.Error, OSError, ValueError, MalformedMessage) as exc:
                raise StorageError(f"raft state in {self.path}: {exc}") from exc
            finally:
                self._started = None
            if timed:
                self.last_persist_seconds = time.monotonic() - started
                self.persists += 1
            return result


def write_state(
    db: sqlite3.Connection,
    hard_state: HardState | None,
    snapshot: Snapshot | None,
    truncate_from: int | None,
    entries: Sequence[Entry],
) -> None:
    """Write a Ready's durable parts inside the caller's transaction."""
    # The order matters: the snapshot first (it makes older entries redundant),
    # then the truncation of a conflicting suffix, then the new entries.
    if snapshot is not None:
        db.execute(
            "INSERT OR REPLACE INTO raft_snapshot (id, idx, term, conf, data) VALUES (1, ?, ?, ?, ?)",
            (snapshot.index, snapshot.term, encode_voters(snapshot.voters), snapshot.data),
        )
        db.execute("DELETE FROM raft_entries WHERE idx <= ?", (snapshot.index,))
    if truncate_from is not None:
        db.execute("DELETE FROM raft_entries WHERE idx >= ?", (truncate_from,))
    if entries:
        db.executemany(
            "INSERT OR REPLACE INTO raft_entries (idx, term, type, data) VALUES (?, ?, ?, ?)",
            [(e.index, e.term, int(e.type), e.data) for e in entries],
        )
    if hard_state is not None:
        db.execute(
            "INSERT OR REPLACE INTO raft_hard_state (id, term, vote, commit_index) VALUES (1, ?, ?, ?)",
            (hard_state.term, hard_state.vote, hard_state.commit),
        )


class AsyncRaftStorage:
    """The same operations for trio code: each runs in a worker thread, one at a time."""

    def __init__(self, storage: RaftStorage) -> None:
        self.sync = storage
        self._limiter = trio.CapacityLimiter(1)

    @property
    def last_persist_seconds(self) -> float:
        return self.sync.last_persist_seconds

    def stalled_seconds(self) -> float:
        """Age of the persist in flight (0.0 when idle); see RaftStorage.stalled_seconds."""
        return self.sync.stalled_seconds()

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def load(self) -> RaftState:
        return await self._run(self.sync.load)

    async def persist_ready(self, rd: Ready) -> None:
        await self._run(self.sync.persist_ready, rd)

    async def persist(
        self,
        hard_state: HardState | None,
        snapshot: Snapshot | None,
        truncate_from: int | None,
        entries: Sequence[Entry],
    ) -> None:
        await self._run(self.sync.persist, hard_state, snapshot, truncate_from, entries)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await self._run(self.sync.save_snapshot, snapshot)
