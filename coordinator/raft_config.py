"""Raft configuration: every knob with its default and where the number comes from.

Theory of operation
-------------------
Time inside the core is logical: the shell calls `RaftCore.tick()` every
`tick_interval_s` seconds. Every timeout below is a count of ticks, as in
etcd-io/raft, so the core never reads a clock and a seed reproduces a run.

The defaults are etcd's: a 100 ms heartbeat and a 1,000 ms election timeout
(etcd's `--heartbeat-interval=100`, `--election-timeout=1000`), i.e. ticks of
100 ms, heartbeat 1 tick, election 10 ticks. Raft needs
broadcastTime ≪ electionTimeout ≪ MTBF (paper §5.6): a LAN round trip plus an
fsync is a few ms, so 1 s leaves a wide margin, and each follower draws its
actual timeout uniformly from [election_ticks, 2·election_ticks) so split votes
are rare (§5.2).

Profiles are built from one another: `lan()` is the production default,
`local()` is the same protocol with 10 ms ticks for loopback tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


class InvalidRaftConfig(ValueError):
    """A configuration that would make the protocol misbehave, or an unknown key."""


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Raft parameters. `*_ticks` are counts of `tick()` calls."""

    # The shell's tick period. 100 ms is etcd's heartbeat interval.
    tick_interval_s: float = 0.1
    # A leader sends heartbeats every heartbeat_ticks (etcd HeartbeatTick = 1).
    heartbeat_ticks: int = 1
    # A follower that hears no leader for a random time in
    # [election_ticks, 2·election_ticks) campaigns (etcd ElectionTick = 10, paper §5.2).
    # It is also the check-quorum period and the leader-transfer timeout.
    election_ticks: int = 10
    # Pre-vote (thesis §9.6): ask "would you vote for me?" at term+1 before
    # bumping the term, so a node that was partitioned away cannot force a
    # healthy leader to step down when it returns (etcd's --pre-vote, on by default since v3.5).
    pre_vote: bool = True
    # Check-quorum (thesis §6.2): a leader that has not heard from a majority
    # within election_ticks steps down, and followers that heard from a leader
    # within election_ticks ignore vote requests (the "leader lease").
    check_quorum: bool = True
    # Upper bound on the entry bytes in one append (etcd server MaxSizePerMsg = 1 MiB);
    # at least one entry is always sent.
    max_bytes_per_message: int = 1024 * 1024
    # Appends in flight to one follower while it keeps up (etcd MaxInflightMsgs; its
    # server uses 512). Bounds the memory a slow follower can pin on the leader.
    max_inflight_messages: int = 256
    # The shell captures a state-machine snapshot every snapshot_every applied entries
    # (etcd's default SnapshotCount is 10,000) and compacts the
    # log to the snapshot captured one round earlier, so at least snapshot_every entries
    # stay in the log and a follower that lags a little catches up without a snapshot
    # (the role of etcd's SnapshotCatchUpEntries).
    snapshot_every: int = 10_000

    def validate(self) -> None:
        """Raise InvalidRaftConfig when the numbers cannot work together."""
        if not self.tick_interval_s > 0:
            raise InvalidRaftConfig("tick_interval_s must be > 0")
        if self.heartbeat_ticks < 1:
            raise InvalidRaftConfig("heartbeat_ticks must be ≥ 1")
        if self.election_ticks <= self.heartbeat_ticks:
            raise InvalidRaftConfig("election_ticks must exceed heartbeat_ticks (etcd: 10× is typical)")
        if self.max_bytes_per_message < 1:
            raise InvalidRaftConfig("max_bytes_per_message must be ≥ 1")
        if self.max_inflight_messages < 1:
            raise InvalidRaftConfig("max_inflight_messages must be ≥ 1")
        if self.snapshot_every < 1:
            raise InvalidRaftConfig("snapshot_every must be ≥ 1")

    def replace(self, **changes: Any) -> RaftConfig:
        """A copy with `changes`; raises InvalidRaftConfig for unknown keys or bad values."""
        return from_mapping(changes, base=self)


def from_mapping(values: Mapping[str, Any], *, base: RaftConfig | None = None) -> RaftConfig:
    """Build a config from a mapping (e.g. a TOML table); unknown keys are errors."""
    base = base or lan()
    known = {f.name for f in dataclasses.fields(RaftConfig)}
    unknown = set(values) - known
    if unknown:
        raise InvalidRaftConfig(f"unknown raft config keys: {sorted(unknown)}")
    config = dataclasses.replace(base, **dict(values))
    config.validate()
    return config


def lan() -> RaftConfig:
    """The production default: etcd's 100 ms heartbeat / 1,000 ms election timeout."""
    return RaftConfig()


def local() -> RaftConfig:
    """Loopback tests: the same tick counts on 10 ms ticks (100 ms elections), small snapshots."""
    return dataclasses.replace(lan(), tick_interval_s=0.01, snapshot_every=100)
