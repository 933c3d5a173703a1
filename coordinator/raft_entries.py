"""The Raft log in memory: a snapshot, the entries after it, and what is not yet on disk.

Theory of operation
-------------------
    snapshot.index  <  first_index … applied ≤ committed ≤ last_index
    └ compacted ┘      └──────────── entries ────────────────────┘

`term(i)` is known for i = snapshot.index and for every entry; earlier indexes
are compacted (None). The log tracks the lowest index whose on-disk copy is
stale (`dirty_from`): appending or truncating lowers it, and `mark_stable`
(after the shell persisted a Ready) clears it. A Ready then says "delete
persisted entries ≥ dirty_from, append these" — the truncation point.

The membership configuration is the latest CONF_CHANGE entry in the log,
committed or not (thesis §4.1: "a server always uses the latest configuration
in its log"), or the snapshot's voters when there is none; truncating a
conflicting suffix therefore reverts it.
"""

from __future__ import annotations

from typing import Sequence

from coordinator.raft_messages import Entry, EntryType, NodeId, Snapshot, decode_voters


class LogInvariantError(AssertionError):
    """The log was asked to do something Raft's safety argument rules out (a bug)."""


class EntryLog:
    def __init__(self, snapshot: Snapshot | None, entries: Sequence[Entry], committed: int, applied: int | None = None) -> None:
        self.snapshot = snapshot or Snapshot(0, 0, ())
        self._entries: list[Entry] = []
        self._conf_indexes: list[int] = []
        # The decoded latest configuration, keyed by its entry's (index, term): the core asks
        # for the voters several times per message, and an entry's bytes never change.
        self._voters_cache: tuple[tuple[int, int], tuple[NodeId, ...]] | None = None
        expected = self.snapshot.index + 1
        for e in entries:
            if e.index < expected:
                continue  # covered by the snapshot (compaction raced a crash)
            if e.index != expected:
                raise LogInvariantError(f"log gap: entry {e.index} follows {expected - 1}")
            self._push(e)
            expected += 1
        self.committed = max(committed, self.snapshot.index)
        if self.committed > self.last_index:
            raise LogInvariantError(f"commit {self.committed} beyond the last entry {self.last_index}")
        self.applied = self.snapshot.index if applied is None else applied
        if not self.snapshot.index <= self.applied <= self.committed:
            raise LogInvariantError(f"applied {self.applied} outside [{self.snapshot.index}, {self.committed}]")
        self.dirty_from: int | None = None

    # --- reading ------------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self.snapshot.index + 1

    @property
    def last_index(self) -> int:
        return self.snapshot.index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot.term

    @property
    def stable_index(self) -> int:
        """The last index whose entry is on disk as it is in memory."""
        return self.last_index if self.dirty_from is None else min(self.last_index, self.dirty_from - 1)

    def term(self, index: int) -> int | None:
        """The term of entry `index`, or None when it is compacted or beyond the end."""
        if index == self.snapshot.index:
            return self.snapshot.term
        if self.snapshot.index < index <= self.last_index:
            return self._entries[index - self.first_index].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry:
        return self._entries[index - self.first_index]

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries lo..hi inclusive (all present), at least one, at most max_bytes of data."""
        out = self._entries[lo - self.first_index : hi - self.first_index + 1]
        if max_bytes is None or not out:
            return out
        size = 0
        for n, e in enumerate(out):
            size += len(e.data)
            if size > max_bytes and n > 0:
                return out[:n]
        return out

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log is at least as up to date as ours."""
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest i ≤ index whose term ≤ `term`, with that term (etcd findConflictByTerm).

        Where the term is unknown (compacted), i is a possible match: (i, 0).
        """
        index = min(index, self.last_index)
        while index > 0:
            ours = self.term(index)
            if ours is None:
                return index, 0
            if ours <= term:
                return index, ours
            index -= 1
        return 0, 0

    def voters(self) -> tuple[NodeId, ...]:
        """The latest configuration in the log (thesis §4.1), committed or not."""
        if self._conf_indexes:
            entry = self.entry(self._conf_indexes[-1])
            key = (entry.index, entry.term)
            if self._voters_cache is None or self._voters_cache[0] != key:
                self._voters_cache = (key, decode_voters(entry.data))
            return self._voters_cache[1]
        return self.snapshot.voters

    def voters_at(self, index: int) -> tuple[NodeId, ...]:
        """The configuration in force at `index` (for a snapshot taken there)."""
        for i in reversed(self._conf_indexes):
            if i <= index:
                return decode_voters(self.entry(i).data)
        return self.snapshot.voters

    @property
    def last_conf_index(self) -> int:
        return self._conf_indexes[-1] if self._conf_indexes else self.snapshot.index

    def unapplied(self) -> list[Entry]:
        """Committed entries not yet handed to the state machine, in order."""
        return self.entries(self.applied + 1, self.committed)

    def unstable(self) -> tuple[int | None, list[Entry]]:
        """(truncation point, entries to append) not yet on disk."""
        if self.dirty_from is None:
            return None, []
        return self.dirty_from, self.entries(self.dirty_from, self.last_index)

    # --- changing -----------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Leader append: `entries` continue the log exactly."""
        for e in entries:
            if e.index != self.last_index + 1:
                raise LogInvariantError(f"append of {e.index} after {self.last_index}")
            self._push(e)
            self._dirty(e.index)

    def maybe_append(self, prev_index: int, prev_term: int, leader_commit: int, entries: Sequence[Entry]) -> int | None:
        """Follower side of AppendEntries (Fig. 2, receiver rules 2–5).

        Returns the index of the last new entry, or None when the consistency check
        fails (no entry at prev_index with prev_term).
        """
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        for e in entries:
            ours = self.term(e.index)
            if ours == e.term:
                continue
            if ours is None and e.index <= self.snapshot.index:
                continue  # already compacted into our snapshot: committed, so it matches
            # Rule 3: an existing entry conflicts with a new one: delete it and all that follow.
            if e.index <= self.committed:
                raise LogInvariantError(f"conflict at committed index {e.index} (commit {self.committed})")
            self._truncate_from(e.index)
            self.append([x for x in entries if x.index >= e.index])
            break
        # Rule 5: commit = min(leaderCommit, index of last new entry).
        self.commit_to(min(leader_commit, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index <= self.committed:
            return
        if index > self.last_index:
            raise LogInvariantError(f"commit {index} beyond the last entry {self.last_index}")
        self.committed = index

    def applied_to(self, index: int) -> None:
        if not self.applied <= index <= self.committed:
            raise LogInvariantError(f"applied {index} outside [{self.applied}, {self.committed}]")
        self.applied = index

    def restore(self, snapshot: Snapshot) -> None:
        """Install a leader's snapshot (§7): the whole log is replaced by it, and it counts as applied."""
        self.snapshot = snapshot
        self._entries = []
        self._conf_indexes = []
        self.committed = self.applied = snapshot.index
        self._dirty(snapshot.index + 1)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Replace entries ≤ index (all applied) by a snapshot carrying `data`."""
        if not self.snapshot.index < index <= self.applied:
            raise LogInvariantError(f"compaction to {index} outside ({self.snapshot.index}, applied {self.applied}]")
        term = self.term(index)
        assert term is not None
        snapshot = Snapshot(index, term, self.voters_at(index), data)
        self._entries = self._entries[index - self.snapshot.index :]
        self._conf_indexes = [i for i in self._conf_indexes if i > index]
        self.snapshot = snapshot
        return snapshot

    def mark_stable(self) -> None:
        self.dirty_from = None

    def _push(self, e: Entry) -> None:
        self._entries.append(e)
        if e.type is EntryType.CONF_CHANGE:
            self._conf_indexes.append(e.index)

    def _truncate_from(self, index: int) -> None:
        del self._entries[index - self.first_index :]
        while self._conf_indexes and self._conf_indexes[-1] >= index:
            self._conf_indexes.pop()
        self._dirty(index)

    def _dirty(self, index: int) -> None:
        self.dirty_from = index if self.dirty_from is None else min(self.dirty_from, index)
