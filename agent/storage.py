"""The state file's outbox, and what every table in the file shares: WAL, fsync, one transaction at a time.

Resource handling
-----------------
One SQLite file (`state.db` in the data dir) in WAL mode with
`synchronous=FULL`: a committed transaction has been fsync'd, so whatever a
write returned from survives a power cut. The Raft tables (agent/raft_storage.py)
live in the same file with a connection of their own; this module holds the
outbox's. `AsyncStateStore` runs its calls one at a time in a worker thread so
the trio loop never blocks on disk.

Layout
------
- `outbox(...)`: webhook and workflow events waiting for delivery. Rows are keyed
  by the log index that caused them, inserted with INSERT OR IGNORE, so
  replaying log entries after a crash re-creates missing rows and never
  duplicates present ones. Every server derives the rows, only the leader
  delivers them; the leader's progress is replicated (`OutboxDelivered`), and
  each server then drops the rows at or below it (`drop_outbox_through`). A
  delivered row is also dropped once a snapshot covers its log index
  (`prune_outbox`, when the Raft log compacts): no replay re-creates it.

Files written before the lone agent ran on Raft also hold `log` and `snapshot`
tables; agent/state_migration.py turns them into Raft state and drops them.

Error handling
--------------
Any sqlite3 error is raised as StorageError; the caller decides.

Failpoint: a disk that stalls
-----------------------------
For fault tests only (tests/nemesis): when the environment names a directory in
`GPU_ORCH_FAILPOINT_DIR` and that directory holds a file `fsync_sleep_s` with a
number in it, every transaction (this module's and agent/raft_storage.py's, both
go through `run_transaction`) sleeps that many seconds before its COMMIT, in the
worker thread, as an fsync on a dying disk would. Writing or removing the file
turns the stall on or off while the agent runs. Without the variable (always, in
production) nothing is read: the check is one comparison with None.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import trio

from agent.outbox import OutboxItem

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    log_index INTEGER NOT NULL,
    kind TEXT NOT NULL,
    url TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    gave_up INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up = 0;
"""


class StorageError(Exception):
    """The state file could not be read or written."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A new outbox entry, before its first delivery attempt."""

    id: str
    log_index: int
    kind: str
    url: str
    payload: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class OutboxCounts:
    pending: int
    gave_up: int


def open_state_db(path: Path, schema: str) -> sqlite3.Connection:
    """Open the state file in WAL mode with fsync on commit and create `schema`'s tables.

    Shared by the lease log's tables here and the Raft tables (agent/raft_storage.py),
    which live in the same file. Raises StorageError.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
        return db
    except (sqlite3.Error, OSError) as exc:
        raise StorageError(f"cannot open state file {path}: {exc}") from exc


FAILPOINT_DIR_ENV = "GPU_ORCH_FAILPOINT_DIR"
FSYNC_SLEEP_FILE = "fsync_sleep_s"
# Read once: the failpoint is set up by whoever starts the process, never in production.
_FAILPOINT_DIR = os.environ.get(FAILPOINT_DIR_ENV) or None


def fsync_failpoint_seconds(directory: str | None) -> float:
    """The stall the failpoint asks for: the number in `directory`/fsync_sleep_s, else 0.0.

    0.0 when `directory` is None, the file is missing or unreadable, or its content is
    not a finite number > 0 (a half-written file never stalls for ever).
    """
    if directory is None:
        return 0.0
    try:
        with open(os.path.join(directory, FSYNC_SLEEP_FILE)) as f:
            seconds = float(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0
    return seconds if 0.0 < seconds < float("inf") else 0.0


def run_transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run `work` in one IMMEDIATE transaction: committed (fsync'd) or rolled back whole."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        stall = fsync_failpoint_seconds(_FAILPOINT_DIR)
        if stall:
            time.sleep(stall)  # the failpoint's stuck disk (module docstring); held like a slow fsync
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


class StateStore:
    """Blocking access to the state file. Not thread-safe: use from one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_state_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return run_transaction(self._db, work)
        except sqlite3.Error as exc:
            raise StorageError(f"state file {self.path}: {exc}") from exc

    def prune_outbox(self, upto_log_index: int) -> int:
        """Delete delivered and given-up rows caused by entries at or below `upto_log_index`; returns how many.

        Call it once a snapshot at that index is durable: those entries are never
        replayed again, so nothing can re-create the rows.
        """

        def prune(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "DELETE FROM outbox WHERE log_index <= ? AND (delivered_at IS NOT NULL OR gave_up = 1)",
                (upto_log_index,),
            )
            return int(cursor.rowcount)

        return self._tx(prune)

    def drop_outbox_through(self, log_index: int) -> int:
        """Delete every row caused by entries at or below `log_index`, delivered or not; returns how many.

        For `OutboxDelivered` (coordinator/commands.py): the leader delivered (or gave
        up on) all of them, so no server keeps them, and none re-creates them.
        """
        return self._tx(lambda db: int(db.execute("DELETE FROM outbox WHERE log_index <= ?", (log_index,)).rowcount))

    def delivered_through(self, applied_index: int) -> int:
        """The highest log index at or below which no row waits for delivery (`applied_index` when none waits)."""
        row = self._tx(
            lambda db: db.execute("SELECT MIN(log_index) FROM outbox WHERE delivered_at IS NULL AND gave_up = 0").fetchone()
        )
        return applied_index if row is None or row[0] is None else min(applied_index, int(row[0]) - 1)

    # ------------------------------------------------------------------ outbox

    def add_outbox(self, rows: Sequence[OutboxRow]) -> None:
        self._tx(
            lambda db: db.executemany(
                "INSERT OR IGNORE INTO outbox (id, log_index, kind, url, payload, created_at, "
                "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.id, r.log_index, r.kind, r.url, r.payload, r.created_at, r.created_at) for r in rows],
            )
        )

    def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        rows = self._tx(
            lambda db: db.execute(
                "SELECT id, kind, url, payload, attempts, next_attempt_at, created_at FROM outbox "
                "WHERE delivered_at IS NULL AND gave_up = 0 AND next_attempt_at <= ? "
                "ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [
            OutboxItem(
                id=str(r[0]),
                kind=str(r[1]),
                url=str(r[2]),
                payload=bytes(r[3]),
                attempts=int(r[4]),
                next_attempt_at=float(r[5]),
                created_at=float(r[6]),
            )
            for r in rows
        ]

    def next_outbox_due(self) -> float | None:
        row = self._tx(
            lambda db: db.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE delivered_at IS NULL AND gave_up = 0"
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    def mark_delivered(self, item_id: str, at: float) -> None:
        self._tx(lambda db: db.execute("UPDATE outbox SET delivered_at = ? WHERE id = ?", (at, item_id)))

    def mark_failed(self, item_id: str, attempts: int, next_attempt_at: float | None, error: str) -> None:
        self._tx(
            lambda db: db.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = COALESCE(?, next_attempt_at), "
                "gave_up = ?, last_error = ? WHERE id = ?",
                (attempts, next_attempt_at, int(next_attempt_at is None), error[:1000], item_id),
            )
        )

    def outbox_counts(self) -> OutboxCounts:
        row = self._tx(
            lambda db: db.execute(
                "SELECT SUM(delivered_at IS NULL AND gave_up = 0), SUM(gave_up) FROM outbox"
            ).fetchone()
        )
        return OutboxCounts(pending=int(row[0] or 0), gave_up=int(row[1] or 0))


class AsyncStateStore:
    """The same operations for trio code: each runs in a worker thread, one at a time."""

    def __init__(self, store: StateStore) -> None:
        self.sync = store
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def prune_outbox(self, upto_log_index: int) -> int:
        return await self._run(self.sync.prune_outbox, upto_log_index)

    async def drop_outbox_through(self, log_index: int) -> int:
        return await self._run(self.sync.drop_outbox_through, log_index)

    async def delivered_through(self, applied_index: int) -> int:
        return await self._run(self.sync.delivered_through, applied_index)

    async def add_outbox(self, rows: Sequence[OutboxRow]) -> None:
        await self._run(self.sync.add_outbox, rows)

    async def due_outbox(self, now: float, limit: int) -> list[OutboxItem]:
        return await self._run(self.sync.due_outbox, now, limit)

    async def next_outbox_due(self) -> float | None:
        return await self._run(self.sync.next_outbox_due)

    async def mark_delivered(self, item_id: str, at: float) -> None:
        await self._run(self.sync.mark_delivered, item_id, at)

    async def mark_failed(
        self, item_id: str, attempts: int, next_attempt_at: float | None, error: str
    ) -> None:
        await self._run(self.sync.mark_failed, item_id, attempts, next_attempt_at, error)

    async def outbox_counts(self) -> OutboxCounts:
        return await self._run(self.sync.outbox_counts)
