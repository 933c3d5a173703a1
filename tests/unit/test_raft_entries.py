"""EntryLog: the follower's AppendEntries rules, the fast back-off search, compaction and config."""

from __future__ import annotations

import pytest

from coordinator.raft_entries import EntryLog, LogInvariantError
from coordinator.raft_messages import Entry, EntryType, Snapshot, encode_voters


def log_of(terms: list[int], committed: int = 0) -> EntryLog:
    return EntryLog(None, [Entry(i, t) for i, t in enumerate(terms, start=1)], committed)


def test_maybe_append_truncates_a_conflicting_suffix_and_marks_it_dirty() -> None:
    """Fig. 2 receiver rule 3: an existing entry that conflicts with a new one is deleted with
    everything after it; the truncation point is what the next Ready reports."""
    log = log_of([1, 1, 2, 2])
    log.mark_stable()
    assert log.maybe_append(2, 1, 3, [Entry(3, 3), Entry(4, 3), Entry(5, 3)]) == 5
    assert [log.term(i) for i in range(1, 6)] == [1, 1, 3, 3, 3]
    assert log.unstable() == (3, [Entry(3, 3), Entry(4, 3), Entry(5, 3)])
    assert log.committed == 3  # rule 5: min(leaderCommit, index of last new entry)


def test_maybe_append_ignores_entries_it_already_has() -> None:
    """Rule 4: appending entries already in the log (a duplicate or reordered append) changes
    nothing and never truncates later entries."""
    log = log_of([1, 1, 1])
    log.mark_stable()
    assert log.maybe_append(0, 0, 0, [Entry(1, 1)]) == 1
    assert log.last_index == 3 and log.unstable() == (None, [])


def test_conflict_below_commit_is_a_bug() -> None:
    """State-machine safety: a committed entry is never overwritten."""
    log = log_of([1, 1], committed=2)
    with pytest.raises(LogInvariantError):
        log.maybe_append(1, 1, 2, [Entry(2, 5)])


def test_find_conflict_by_term() -> None:
    """etcd findConflictByTerm: the largest index ≤ i whose term ≤ t."""
    log = log_of([1, 3, 3, 3, 5, 5, 5, 5, 5])
    assert log.find_conflict_by_term(6, 2) == (1, 1)
    assert log.find_conflict_by_term(9, 4) == (4, 3)
    assert log.find_conflict_by_term(20, 5) == (9, 5)
    assert log.find_conflict_by_term(3, 0) == (0, 0)


def test_compaction_keeps_terms_at_the_boundary_and_the_config() -> None:
    """§7: the snapshot records the last included index and term, and the configuration then."""
    conf = Entry(1, 1, EntryType.CONF_CHANGE, encode_voters(["a", "b", "c"]))
    log = EntryLog(None, [conf, Entry(2, 1), Entry(3, 2)], committed=3, applied=3)
    snap = log.compact(2, b"s")
    assert snap == Snapshot(2, 1, ("a", "b", "c"), b"s")
    assert log.term(2) == 1 and log.term(1) is None and log.first_index == 3
    assert log.voters() == ("a", "b", "c")
    for bad in (2, 4):  # already compacted; not applied yet
        with pytest.raises(LogInvariantError):
            log.compact(bad, b"")


def test_restore_replaces_the_log() -> None:
    """§7 receiver: a snapshot that is not a prefix of our log discards the entire log."""
    log = log_of([1, 1, 2], committed=1)
    log.mark_stable()
    log.restore(Snapshot(10, 4, ("a",), b"x"))
    assert (log.last_index, log.last_term, log.committed, log.applied) == (10, 4, 10, 10)
    assert log.unstable() == (11, [])


def test_restart_rejects_a_log_with_a_gap() -> None:
    """What the shell loads must be a contiguous log after the snapshot."""
    with pytest.raises(LogInvariantError):
        EntryLog(None, [Entry(1, 1), Entry(3, 1)], 0)
