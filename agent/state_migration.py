"""Upgrade in place: a state file written by the lone agent before it ran on Raft opens as Raft state.

Until 0.1.0 a lone agent kept its lease table in `log` and `snapshot` tables of
`state.db` (its single-server log). It is now a Raft cluster of one voter on the
same Raft tables as every server, so on start-up, before the Raft state is
loaded, `adopt_lone_agent_log` turns those tables into Raft state:

- the old snapshot is restored and the old log entries after it are applied,
  as the old agent did on every start, giving the lease table it last served;
- that table becomes a Raft snapshot at the old log's last index L (term 1,
  voters: this node alone), with hard state term 1 and commit L. New entries
  therefore continue at L + 1, and outbox rows, which are keyed by log index,
  never collide with the undelivered rows of the old log (they stay in the
  outbox and are delivered as before);
- the old tables are dropped in the same transaction, so a crash leaves either
  the old file or the migrated one, and a second run finds nothing to do.

A file that has Raft state already (a server's, or one migrated before) is left
alone; stray old tables beside Raft state are dropped.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

import msgpack

from coordinator.commands import decode_command
from coordinator.lease_table import LeaseTable
from coordinator.raft_messages import HardState, NodeId, Snapshot

from agent.raft_storage import RaftStorage, write_state

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Adopted:
    """What the migration found: the old log's last index, its entries replayed, the live state."""

    last_index: int
    replayed: int
    allocations: int
    queued: int


def adopt_lone_agent_log(storage: RaftStorage, node_id: NodeId) -> Adopted | None:
    """Turn a pre-Raft lone agent's log into this node's Raft state (see the module docstring).

    Returns what was adopted, or None when there was nothing to adopt. Raises
    StorageError (the file is left as it was).
    """

    def migrate(db: sqlite3.Connection) -> Adopted | None:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        legacy = {"log", "snapshot"} & tables
        if not legacy:
            return None
        has_raft = db.execute("SELECT 1 FROM raft_hard_state").fetchone() is not None or (
            db.execute("SELECT 1 FROM raft_snapshot").fetchone() is not None
        )
        adopted = None if has_raft else _adopt(db, legacy, node_id)
        for name in sorted(legacy):
            db.execute(f"DROP TABLE {name}")
        return adopted

    adopted = storage.transaction(migrate)
    if adopted is not None:
        log.info(
            "state file %s: adopted the lone agent's log (index %d, %d allocations, %d queued) as Raft state",
            storage.path,
            adopted.last_index,
            adopted.allocations,
            adopted.queued,
        )
    return adopted


def _adopt(db: sqlite3.Connection, legacy: set[str], node_id: NodeId) -> Adopted | None:
    table = LeaseTable()
    last = 0
    if "snapshot" in legacy:
        row = db.execute("SELECT idx, data FROM snapshot WHERE id = 1").fetchone()
        if row is not None:
            last = int(row[0])
            table = LeaseTable.restore(msgpack.unpackb(bytes(row[1]), raw=False))
    replayed = 0
    if "log" in legacy:
        for index, data in db.execute("SELECT idx, data FROM log WHERE idx > ? ORDER BY idx", (last,)):
            if int(index) != last + 1:
                raise ValueError(f"the old log has a gap: entry {index} follows {last}")
            table.apply(decode_command(bytes(data)))
            last = int(index)
            replayed += 1
    if last == 0:
        return None  # an old file that never held a write: start as a new cluster of one
    snapshot = Snapshot(last, 1, (node_id,), msgpack.packb(table.snapshot(), use_bin_type=True))
    write_state(db, HardState(term=1, vote=None, commit=last), snapshot, None, ())
    return Adopted(last, replayed, len(table.allocations()), table.queue_length())
