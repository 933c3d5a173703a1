"""What a leader knows about each follower's log (etcd tracker.Progress).

Theory of operation
-------------------
Each follower is in one of three replication states:

    PROBE      we do not know where its log ends: send one append, then wait for
               its answer (or the next heartbeat response) before sending another.
    REPLICATE  it is keeping up: send appends optimistically (next advances as
               we send), at most max_inflight_messages unacknowledged at once.
    SNAPSHOT   its next entry was compacted: a snapshot is on its way; send
               nothing until it acknowledges, or retry after election_ticks.

A rejection moves it to PROBE with `next` lowered by the fast back-off hint; an
acceptance raises `match` (never lowers it) and moves PROBE to REPLICATE.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class ReplicationState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@dataclass(slots=True)
class Progress:
    match: int
    next: int
    state: ReplicationState = ReplicationState.PROBE
    # PROBE: an append is out and unanswered.
    probe_sent: bool = False
    # REPLICATE: the last index of every unacknowledged append, oldest first.
    inflight: deque[int] = field(default_factory=deque)
    # SNAPSHOT: the index of the snapshot sent, and the leader tick it was sent at.
    pending_snapshot: int = 0
    snapshot_sent_tick: int = 0
    # Heard from since the last check-quorum round (thesis §6.2).
    recent_active: bool = False

    def become_probe(self) -> None:
        # After a snapshot the follower has at least the snapshot's entries.
        if self.state is ReplicationState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ReplicationState.PROBE
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0

    def become_replicate(self) -> None:
        self.state = ReplicationState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_snapshot(self, index: int, tick: int) -> None:
        self.state = ReplicationState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_sent_tick = tick
        self.inflight.clear()

    def paused(self, max_inflight: int) -> bool:
        """Whether an append must wait (flow control)."""
        if self.state is ReplicationState.PROBE:
            return self.probe_sent
        if self.state is ReplicationState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True

    def sent(self, last: int) -> None:
        """An append ending at `last` (or an empty probe, last = next − 1) went out."""
        if self.state is ReplicationState.REPLICATE:
            if last >= self.next:
                self.next = last + 1
                self.inflight.append(last)
        else:
            self.probe_sent = True

    def maybe_update(self, index: int) -> bool:
        """The follower matches us up to `index`; returns whether match moved."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        while self.inflight and self.inflight[0] <= index:
            self.inflight.popleft()
        return updated

    def maybe_decrease(self, rejected: int, hint: int) -> bool:
        """The append after `rejected` failed; back `next` off to hint + 1. False when stale."""
        if self.state is ReplicationState.REPLICATE:
            if rejected <= self.match:
                return False  # an old append, answered after a newer one succeeded
            self.become_probe()
            self.next = max(min(rejected, hint + 1), self.match + 1)
            return True
        if self.next - 1 != rejected:
            return False  # not the probe we are waiting for
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.probe_sent = False
        return True
