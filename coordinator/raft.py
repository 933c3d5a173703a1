"""Raft consensus as a sans-io state machine (Ongaro & Ousterhout 2014; etcd-io/raft).

Theory of operation
-------------------
`RaftCore` is one server. It never reads a clock, touches a disk or a socket:
the shell feeds it `tick()` (every RaftConfig.tick_interval_s), `step(message)`
and the local requests (`propose`, `add_voter`, `remove_voter`,
`transfer_leadership`, `read_index`), then drains a `Ready`:

    while core.has_ready():
        rd = core.ready()
        if rd.send_before_persist: send rd.messages           # a leader's, see below
        persist rd.hard_state, rd.snapshot, then delete persisted entries ≥
            rd.truncate_from and append rd.entries           # fsync; skippable if not rd.must_sync
        if not rd.send_before_persist: send rd.messages      # only after the fsync
        restore the state machine from rd.snapshot (if any), then apply
            rd.committed_entries in order; answer rd.read_states once applied
        core.advance(rd)

Persist before send is what makes a vote or an acknowledgement a promise that
survives a crash (Fig. 2: "updated on stable storage before responding to RPCs").
A leader counts its own log towards a majority only as far as it is persisted,
which is why its appends may leave while it writes them (thesis §10.2.1): the
follower's fsync then overlaps the leader's instead of following it. A Ready
whose only durable change is the commit index need not be persisted (etcd's
MustSync): a commit index lost in a crash is learnt again.
Between `ready()` and `advance()` the shell calls nothing else on the core.

Roles swap the step function, as etcd's `stepLeader/stepCandidate/stepFollower`:

    follower ──election timeout──▶ pre-candidate ──pre-vote quorum──▶ candidate ──vote quorum──▶ leader
        ▲ any message of a higher term, an append/heartbeat/snapshot of the current term ◀──┘
        └── a leader that lost contact with a majority for election_ticks (check-quorum)

Rules implemented, with where they come from:
- Elections (§5.2): randomized timeouts in [E, 2E); one vote per term, persisted;
  grant only to a log at least as up to date (§5.4.1).
- Pre-vote (thesis §9.6) and check-quorum / leader lease (thesis §6.2): a
  server that heard from a leader within E ticks ignores vote requests, so a
  rejoining server cannot depose a working leader; a leader that has not heard
  from a majority in E ticks steps down.
- Log replication (§5.3) with the consistency check and fast back-off: a
  rejection carries (hint index, its term) and the leader skips every entry of
  a term the follower cannot have (etcd findConflictByTerm).
- Commitment (§5.4.2): a leader only counts replicas for entries of its own
  term; each new leader appends a NOOP so earlier entries commit promptly (§8).
- Snapshots (§7): the shell compacts applied entries (`compact`); a follower
  whose next entry is gone gets the snapshot (InstallSnapshot, sent whole).
- Membership (thesis §4.1): one voter added or removed at a time; a server uses
  the latest configuration in its log, committed or not; a leader proposes a
  change only after the previous one and an entry of its own term committed;
  a leader that removed itself steps down once that change commits.
- Leadership transfer (thesis §3.10): the leader stops taking proposals,
  brings the target up to date, and sends TimeoutNow; the target campaigns at
  once, and its vote requests override the leader lease (`force`).
- Linearizable reads (thesis §6.4, etcd ReadIndex): the leader records its
  commit index, confirms it still leads with a heartbeat round acknowledged by a
  majority, and returns (index, context); the read is served once applied ≥ index.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Callable

from coordinator.raft_config import RaftConfig
from coordinator.raft_entries import EntryLog
from coordinator.raft_messages import (
    Entry,
    EntryType,
    HardState,
    Message,
    MessageKind,
    NodeId,
    Snapshot,
    encode_voters,
)
from coordinator.raft_progress import Progress, ReplicationState

__all__ = [
    "NotLeader",
    "ProposalRejected",
    "RaftCore",
    "RaftError",
    "RaftState",
    "ReadState",
    "Ready",
    "Role",
    "initial_state",
]


class RaftError(Exception):
    """Base of the errors the Raft core raises to its shell."""


class NotLeader(RaftError):
    """Only the leader takes this request; `leader_hint` is who we think leads (or None)."""

    def __init__(self, leader_hint: NodeId | None, reason: str = "not the leader") -> None:
        super().__init__(f"{reason} (leader: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


class ProposalRejected(RaftError):
    """The leader refuses this request now (e.g. a membership change is still in flight)."""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class RaftState:
    """What a server has on disk: the shell loads it to restart a core."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()


def initial_state(voters: tuple[NodeId, ...] | list[NodeId]) -> RaftState:
    """The disk state every founding voter starts from (the same on all of them).

    Like etcd's bootstrap, the first configuration is entry 1 of term 1, committed:
    a server added later learns it from the leader's log or snapshot.
    """
    if not voters or len(set(voters)) != len(voters):
        raise ValueError("a cluster starts with ≥ 1 distinct voters")
    entry = Entry(1, 1, EntryType.CONF_CHANGE, encode_voters(voters))
    return RaftState(HardState(term=1, vote=None, commit=1), None, (entry,))


@dataclass(frozen=True, slots=True)
class ReadState:
    """A confirmed linearizable read: serve `context`'s read once applied ≥ index."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the shell must do, in order: persist, send, apply, then advance()."""

    # Persist when not None (term, vote, commit).
    hard_state: HardState | None
    # A leader's snapshot we installed: persist it, delete persisted entries ≤ its
    # index, and restore the state machine from it before applying entries.
    snapshot: Snapshot | None
    # Delete persisted entries with index ≥ truncate_from (None: keep all), then
    # append `entries`.
    truncate_from: int | None
    entries: tuple[Entry, ...]
    # Send only after the above is durable.
    messages: tuple[Message, ...]
    # Apply in order (all are committed and, after the persist step, durable here).
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    # Whether the persist step must happen before what follows (etcd's
    # MustSync): new entries, a snapshot, a truncation, or a new term or vote.
    # A commit index alone need not be persisted at all: losing it only makes
    # a restarted server learn it again (and the commit restored never exceeds
    # the persisted log either way).
    must_sync: bool = True
    # A leader's messages may leave before its own persist (thesis §10.2.1):
    # appends and heartbeats carry no promise of ours, and the leader counts its
    # own log towards a majority only once advance() says it is durable. Never
    # when the term or vote changed in this Ready: a vote must be durable first.
    send_before_persist: bool = False


@dataclass(slots=True)
class _ReadRequest:
    index: int
    context: bytes
    acks: set[NodeId] = field(default_factory=set)


_CAMPAIGN_PRE, _CAMPAIGN_ELECTION = "pre", "election"


class RaftCore:
    """One Raft server's state machine (see the module docstring)."""

    def __init__(
        self,
        config: RaftConfig,
        node_id: NodeId,
        rng: random.Random,
        state: RaftState = RaftState(),
        *,
        applied: int | None = None,
    ) -> None:
        """Restart from `state` (as persisted through Ready) or, empty, join as a blank server.

        `applied` is how far the shell's state machine already is (default: the snapshot).
        """
        config.validate()
        self._config = config
        self.id = node_id
        self._rng = rng
        hs = state.hard_state
        self.term = hs.term
        self.vote = hs.vote
        self.log = EntryLog(state.snapshot, state.entries, hs.commit, applied)
        self.role = Role.FOLLOWER
        self.lead: NodeId | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._early_beats = 0
        self._randomized_timeout = 0
        self._ticks = 0
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, Progress] = {}
        self.lead_transferee: NodeId | None = None
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_reads: list[bytes] = []
        self._reads: list[_ReadRequest] = []
        self._persisted_hard = hs
        self._installed_snapshot: Snapshot | None = None
        self._step: Callable[[Message], None] = self._step_follower
        self._reset(self.term)

    # --- observers ----------------------------------------------------------------------------

    @property
    def voters(self) -> tuple[NodeId, ...]:
        return self.log.voters()

    @property
    def hears_leader(self) -> bool:
        """Whether a leader is known and was heard from within the election timeout (or this server leads).

        A forwarder waiting on the leader's answer stops waiting once this is
        False: that leader is cut off, paused or gone, whatever the core still
        names as `lead` until its randomized timeout fires.
        """
        if self.role is Role.LEADER:
            return True
        return self.lead is not None and self._election_elapsed < self._config.election_ticks

    @property
    def promotable(self) -> bool:
        """Whether this server may campaign: it is a voter in its latest configuration."""
        return self.id in self.log.voters()

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def progress(self, node: NodeId) -> Progress | None:
        """The leader's view of `node`'s log (None on a non-leader)."""
        return self._progress.get(node)

    # --- local requests -----------------------------------------------------------------------

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append `data` as a NORMAL entry; returns its (index, term).

        The entry is committed when it comes back in Ready.committed_entries with
        that index *and* term (another term there means it was lost to a new leader).
        Raises NotLeader.
        """
        self._check_can_propose()
        return self._append_local(EntryType.NORMAL, bytes(data))

    def add_voter(self, node: NodeId) -> tuple[int, int]:
        """Propose adding one voter (thesis §4.1); returns the change's (index, term).

        Raises NotLeader, or ProposalRejected while a change is in flight or `node` votes already.
        """
        voters = self._check_can_change_config()
        if node in voters:
            raise ProposalRejected(f"{node} is already a voter")
        return self._append_local(EntryType.CONF_CHANGE, encode_voters((*voters, node)))

    def remove_voter(self, node: NodeId) -> tuple[int, int]:
        """Propose removing one voter; the leader may remove itself (it steps down on commit).

        Raises NotLeader, or ProposalRejected (change in flight, not a voter, the last voter).
        """
        voters = self._check_can_change_config()
        if node not in voters:
            raise ProposalRejected(f"{node} is not a voter")
        if len(voters) == 1:
            raise ProposalRejected("cannot remove the last voter")
        return self._append_local(EntryType.CONF_CHANGE, encode_voters([v for v in voters if v != node]))

    def transfer_leadership(self, to: NodeId | None = None) -> NodeId:
        """Hand leadership to `to` (default: the most up-to-date other voter); returns the target.

        Proposals are refused until the transfer ends: the target wins an election,
        or election_ticks pass (then we lead on). Raises NotLeader, ProposalRejected.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        others = [v for v in self.voters if v != self.id]
        if to is None:
            if not others:
                raise ProposalRejected("no other voter to transfer leadership to")
            to = max(others, key=lambda v: (self._progress[v].match, v))
        if to not in others:
            raise ProposalRejected(f"{to} is not another voter")
        self.lead_transferee = to
        self._election_elapsed = 0  # the transfer times out after election_ticks
        if self._progress[to].match == self.log.last_index:
            self._send_timeout_now(to)
        else:
            self._send_append(to)
        return to

    def read_index(self, context: bytes) -> None:
        """Start a linearizable read; Ready.read_states returns (index, context) once confirmed.

        `context` must be unique among outstanding reads. A read in flight when this
        server stops leading is dropped silently: the shell times it out. Raises NotLeader.
        """
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.voters == (self.id,):
            self._read_states.append(ReadState(self.log.committed, context))
        elif self.log.term(self.log.committed) != self.term:
            # Until an entry of this term commits we do not know the commit index (thesis §6.4).
            self._pending_reads.append(context)
        else:
            self._start_read(context)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The state machine as of applied entry `index` is `data`: drop the log up to it.

        Returns the Snapshot to persist; after that the shell may delete persisted
        entries ≤ index. Lagging followers are then sent this snapshot.
        """
        return self.log.compact(index, data)

    # --- inputs -------------------------------------------------------------------------------

    def campaign(self) -> None:
        """Start an election now instead of at the election timeout (etcd's Campaign).

        For a server that knows no one else can lead: a cluster of one voter
        elects itself at once, so a lone agent serves from its first second.
        Does nothing on a leader or on a server that may not campaign.
        """
        if self.role is not Role.LEADER and self.promotable:
            self._election_elapsed = 0
            self._campaign(_CAMPAIGN_PRE if self._config.pre_vote else _CAMPAIGN_ELECTION)

    @property
    def leader_ready(self) -> bool:
        """Leader, and an entry of its own term is applied: its state machine holds every committed write.

        Before that, a new leader's applied state may miss entries its predecessor
        committed (they commit through its NOOP), so it must not decide anything
        from it (thesis §6.4 asks the same of reads).
        """
        return self.role is Role.LEADER and self.log.term(self.log.applied) == self.term

    def tick(self) -> None:
        """One logical clock tick (RaftConfig.tick_interval_s of real time)."""
        self._ticks += 1
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def heartbeat_now(self) -> tuple[Message, ...]:
        """A leader's heartbeats, to send at once, outside the Ready cycle (empty on a non-leader).

        For a shell whose loop is busy (a long fsync, applying a large batch):
        the tick it queues meanwhile would reach `tick` only afterwards, and the
        followers' election timers would see the leader go quiet. Heartbeats may
        leave at any moment: the term they carry was made durable before this
        server asked anyone to vote for it, and the commit index they carry for
        a follower never exceeds what that follower holds. The broadcast of the
        next tick is skipped for each one sent here, so the followers do not hear
        every beat twice. Changes nothing else: may be called between `ready()`
        and `advance()`.
        """
        if self.role is not Role.LEADER:
            return ()
        self._early_beats += 1
        return self._heartbeats()

    def step(self, m: Message) -> None:
        """Process one message from a peer (already decoded and validated)."""
        if m.to != self.id or m.sender == self.id:
            return
        if m.term > self.term:
            if m.kind in (MessageKind.VOTE, MessageKind.PRE_VOTE) and not m.force and self._in_lease():
                # Thesis §6.2 / §9.6: we heard from a leader recently; do not help depose it.
                return
            if m.kind is MessageKind.PRE_VOTE or (m.kind is MessageKind.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change our term (a granted answer carries the future term)
            elif m.kind in (MessageKind.APP, MessageKind.HEARTBEAT, MessageKind.SNAP):
                self._become_follower(m.term, m.sender)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if (self._config.check_quorum or self._config.pre_vote) and m.kind in (MessageKind.APP, MessageKind.HEARTBEAT):
                # A stale leader (or one cut off while we moved on): tell it our term so it
                # steps down; with pre-vote it could otherwise never learn it (etcd raft.go).
                self._send(Message(MessageKind.APP_RESP, self.id, m.sender, self.term))
            elif m.kind is MessageKind.PRE_VOTE:
                self._send(Message(MessageKind.PRE_VOTE_RESP, self.id, m.sender, self.term, reject=True))
            return
        if m.kind in (MessageKind.VOTE, MessageKind.PRE_VOTE):
            self._handle_vote_request(m)
        else:
            self._step(m)

    # --- Ready --------------------------------------------------------------------------------

    def has_ready(self) -> bool:
        return bool(
            self._msgs
            or self._read_states
            or self.hard_state != self._persisted_hard
            or self.log.dirty_from is not None
            or self._installed_snapshot is not None
            or self.log.applied < self.log.committed
        )

    def ready(self) -> Ready:
        """What to persist, send and apply now; hand it back with advance() when done."""
        hs = self.hard_state
        truncate_from, entries = self.log.unstable()
        promised = (hs.term, hs.vote) != (self._persisted_hard.term, self._persisted_hard.vote)
        rd = Ready(
            hard_state=hs if hs != self._persisted_hard else None,
            snapshot=self._installed_snapshot,
            truncate_from=truncate_from,
            entries=tuple(entries),
            messages=tuple(self._msgs),
            committed_entries=tuple(self.log.unapplied()),
            read_states=tuple(self._read_states),
            must_sync=promised or bool(entries) or truncate_from is not None or self._installed_snapshot is not None,
            send_before_persist=self.role is Role.LEADER and not promised,
        )
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The shell persisted, sent and applied `rd`."""
        if rd.hard_state is not None:
            self._persisted_hard = rd.hard_state
        self._installed_snapshot = None
        self.log.mark_stable()
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
        if self.role is Role.LEADER and self._maybe_commit():
            # Our own log is now durable and may complete a majority.
            self._bcast_append()

    # --- roles --------------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.lead = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = self._config.election_ticks + self._rng.randrange(self._config.election_ticks)
        self._votes = {}
        self._progress = {}
        self.lead_transferee = None
        self._pending_reads = []
        self._reads = []

    def _become_follower(self, term: int, lead: NodeId | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead
        self._step = self._step_follower

    def _become_pre_candidate(self) -> None:
        # Term and vote stay: a pre-election changes nothing durable (thesis §9.6).
        self.role = Role.PRE_CANDIDATE
        self._votes = {}
        self.lead = None
        self._step = self._step_candidate

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self._step = self._step_candidate

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        self._step = self._step_leader
        self._sync_progress()
        # §8: a NOOP of our term lets everything before it commit (§5.4.2 forbids
        # counting replicas of older terms' entries directly).
        self.log.append([Entry(self.log.last_index + 1, self.term, EntryType.NOOP)])
        self._bcast_append()

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self.promotable and self._election_elapsed >= self._randomized_timeout:
            self._election_elapsed = 0
            self._campaign(_CAMPAIGN_PRE if self._config.pre_vote else _CAMPAIGN_ELECTION)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._config.election_ticks:
            self._election_elapsed = 0
            if self._config.check_quorum:
                if not self._quorum_active():
                    self._become_follower(self.term, None)
                    return
                for pr in self._progress.values():
                    pr.recent_active = False
            self.lead_transferee = None  # a transfer that did not finish in time is abandoned
        if self._heartbeat_elapsed >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            if self._early_beats:
                self._early_beats -= 1  # heartbeat_now sent this one already
            else:
                self._bcast_heartbeat()

    def _campaign(self, kind: str, force: bool = False) -> None:
        if kind == _CAMPAIGN_PRE:
            self._become_pre_candidate()
            term, request = self.term + 1, MessageKind.PRE_VOTE
        else:
            self._become_candidate()
            term, request = self.term, MessageKind.VOTE
        self._votes[self.id] = True
        if self._tally() is True:
            self._won(kind)
            return
        for voter in self.voters:
            if voter != self.id:
                self._send(Message(request, self.id, voter, term, index=self.log.last_index, log_term=self.log.last_term, force=force))

    def _won(self, kind: str) -> None:
        if kind == _CAMPAIGN_PRE:
            self._campaign(_CAMPAIGN_ELECTION)
        else:
            self._become_leader()

    def _tally(self) -> bool | None:
        """True: a majority granted; False: a majority refused; None: undecided."""
        voters = self.voters
        quorum = len(voters) // 2 + 1
        granted = sum(1 for v in voters if self._votes.get(v) is True)
        refused = sum(1 for v in voters if self._votes.get(v) is False)
        if granted >= quorum:
            return True
        if refused > len(voters) - quorum:
            return False
        return None

    def _in_lease(self) -> bool:
        return self._config.check_quorum and self.lead is not None and self._election_elapsed < self._config.election_ticks

    def _handle_vote_request(self, m: Message) -> None:
        resp = MessageKind.VOTE_RESP if m.kind is MessageKind.VOTE else MessageKind.PRE_VOTE_RESP
        can_vote = (
            self.vote == m.sender
            or (self.vote is None and self.lead is None)
            or (m.kind is MessageKind.PRE_VOTE and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # Answer with the request's term: a pre-vote asks about a term we are not in yet.
            self._send(Message(resp, self.id, m.sender, m.term))
            if m.kind is MessageKind.VOTE:
                self._election_elapsed = 0
                self.vote = m.sender
        else:
            self._send(Message(resp, self.id, m.sender, self.term, reject=True))

    # --- step functions -----------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        if m.kind in (MessageKind.APP, MessageKind.HEARTBEAT, MessageKind.SNAP):
            self._election_elapsed = 0
            self.lead = m.sender
            self._handle_from_leader(m)
        elif m.kind is MessageKind.TIMEOUT_NOW and self.promotable:
            self._campaign(_CAMPAIGN_ELECTION, force=True)

    def _step_candidate(self, m: Message) -> None:
        if m.kind in (MessageKind.APP, MessageKind.HEARTBEAT, MessageKind.SNAP):
            self._become_follower(self.term, m.sender)  # someone else won this term (§5.2)
            self._handle_from_leader(m)
            return
        expected = MessageKind.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MessageKind.VOTE_RESP
        if m.kind is not expected:
            return
        self._votes[m.sender] = not m.reject
        outcome = self._tally()
        if outcome is True:
            self._won(_CAMPAIGN_PRE if self.role is Role.PRE_CANDIDATE else _CAMPAIGN_ELECTION)
        elif outcome is False:
            self._become_follower(self.term, None)

    def _step_leader(self, m: Message) -> None:
        pr = self._progress.get(m.sender)
        if pr is None:
            return
        if m.kind is MessageKind.APP_RESP:
            pr.recent_active = True
            if m.reject:
                self._handle_rejection(m.sender, pr, m)
            else:
                self._handle_acceptance(m.sender, pr, m.index)
        elif m.kind is MessageKind.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state is ReplicationState.REPLICATE and len(pr.inflight) >= self._config.max_inflight_messages:
                pr.inflight.popleft()  # an append may be lost: let one more through (etcd)
            if pr.state is ReplicationState.SNAPSHOT and self._ticks - pr.snapshot_sent_tick >= self._config.election_ticks:
                pr.become_probe()  # the snapshot was probably lost: find out where it stands
            if pr.match < self.log.last_index:
                self._send_append(m.sender)
            if m.context:
                self._ack_read(m.sender, m.context)

    def _handle_rejection(self, sender: NodeId, pr: Progress, m: Message) -> None:
        hint = m.reject_hint
        if m.log_term > 0:
            # Fast back-off: skip every entry whose term the follower's hint rules out.
            hint, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
        if pr.maybe_decrease(m.index, hint):
            self._send_append(sender)

    def _handle_acceptance(self, sender: NodeId, pr: Progress, index: int) -> None:
        if pr.maybe_update(index):
            if pr.state is ReplicationState.PROBE:
                pr.become_replicate()
            elif pr.state is ReplicationState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                pr.become_replicate()
            if self._maybe_commit():
                self._bcast_append()  # tell everyone the new commit index
            # Then keep the pipe to this follower full.
            while self.role is Role.LEADER and sender in self._progress and self._send_append(sender, send_empty=False):
                pass
            if sender == self.lead_transferee and pr.match == self.log.last_index:
                self._send_timeout_now(sender)

    def _handle_from_leader(self, m: Message) -> None:
        if m.kind is MessageKind.APP:
            self._handle_append(m)
        elif m.kind is MessageKind.HEARTBEAT:
            # The leader sends commit ≤ what it knows we match, so it is in our log.
            self.log.commit_to(m.commit)
            self._send(Message(MessageKind.HEARTBEAT_RESP, self.id, m.sender, self.term, context=m.context))
        else:
            self._handle_snapshot(m)

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(Message(MessageKind.APP_RESP, self.id, m.sender, self.term, index=self.log.committed))
            return
        last = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last is not None:
            self._send(Message(MessageKind.APP_RESP, self.id, m.sender, self.term, index=last))
            return
        # Consistency check failed (§5.3). Hint: the largest index ≤ the probe whose
        # term ≤ the leader's prevLogTerm, and that term, so the leader can skip ahead.
        hint, hint_term = self.log.find_conflict_by_term(min(m.index, self.log.last_index), m.log_term)
        self._send(
            Message(MessageKind.APP_RESP, self.id, m.sender, self.term, index=m.index, reject=True, reject_hint=hint, log_term=hint_term)
        )

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        assert s is not None  # decode_message guarantees it for SNAP
        if s.index <= self.log.committed:
            pass  # stale: we have all of it already
        elif self.log.match_term(s.index, s.term):
            self.log.commit_to(s.index)  # our log already holds it: just fast-forward
        else:
            self.log.restore(s)
            self._installed_snapshot = s
        self._send(Message(MessageKind.APP_RESP, self.id, m.sender, self.term, index=self.log.committed))

    # --- leader machinery ---------------------------------------------------------------------

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee is not None:
            raise NotLeader(self.lead_transferee, "leadership is being transferred")
        if not self.promotable:
            raise NotLeader(None, "this leader removed itself from the cluster")

    def _check_can_change_config(self) -> tuple[NodeId, ...]:
        self._check_can_propose()
        if self.log.term(self.log.committed) != self.term:
            # Thesis §4.1 (the 2015 fix): no change until an entry of this term committed.
            raise ProposalRejected("this leader has not committed an entry of its term yet")
        if self.log.last_conf_index > self.log.committed:
            raise ProposalRejected("the previous membership change has not committed yet")
        return self.voters

    def _append_local(self, etype: EntryType, data: bytes) -> tuple[int, int]:
        index = self.log.last_index + 1
        self.log.append([Entry(index, self.term, etype, data)])
        if etype is EntryType.CONF_CHANGE:
            self._sync_progress()  # the new configuration is in force once appended
        self._bcast_append()
        return index, self.term

    def _sync_progress(self) -> None:
        voters = set(self.voters)
        for node in list(self._progress):
            if node not in voters:
                del self._progress[node]
        for node in sorted(voters - {self.id} - set(self._progress)):  # sorted: runs must not depend on hashing
            self._progress[node] = Progress(match=0, next=self.log.last_index + 1)

    def _match(self, node: NodeId) -> int:
        if node == self.id:
            return self.log.stable_index
        return self._progress[node].match

    def _maybe_commit(self) -> bool:
        voters = self.voters
        matches = sorted((self._match(v) for v in voters), reverse=True)
        index = matches[len(voters) // 2]
        # §5.4.2: only entries of the current term are committed by counting replicas.
        if index <= self.log.committed or self.log.term(index) != self.term:
            return False
        first_of_term = self.log.term(self.log.committed) != self.term
        self.log.commit_to(index)
        if first_of_term:
            for context in self._pending_reads:
                self._start_read(context)
            self._pending_reads = []
        if not self.promotable and self.log.last_conf_index <= self.log.committed:
            # Thesis §4.2.2: a leader that removed itself steps down once that is committed.
            self._become_follower(self.term, None)
        return True

    def _quorum_active(self) -> bool:
        voters = self.voters
        active = sum(1 for v in voters if v == self.id or self._progress[v].recent_active)
        return active >= len(voters) // 2 + 1

    def _bcast_append(self) -> None:
        for node in self._progress:
            self._send_append(node)

    def _send_append(self, to: NodeId, send_empty: bool = True) -> bool:
        """Send `to` what it lacks (or the snapshot); False when flow control holds it back."""
        pr = self._progress[to]
        if pr.paused(self._config.max_inflight_messages):
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            snapshot = self.log.snapshot
            self._send(Message(MessageKind.SNAP, self.id, to, self.term, snapshot=snapshot))
            pr.become_snapshot(snapshot.index, self._ticks)
            return True
        entries = self.log.entries(pr.next, self.log.last_index, self._config.max_bytes_per_message) if pr.next <= self.log.last_index else []
        if not entries and not send_empty:
            return False
        self._send(
            Message(MessageKind.APP, self.id, to, self.term, index=prev, log_term=prev_term, entries=tuple(entries), commit=self.log.committed)
        )
        pr.sent(entries[-1].index if entries else prev)
        return True

    def _bcast_heartbeat(self) -> None:
        self._msgs.extend(self._heartbeats())

    def _heartbeats(self) -> tuple[Message, ...]:
        context = self._reads[-1].context if self._reads else b""
        # Never tell a follower to commit past what it is known to hold.
        return tuple(
            Message(MessageKind.HEARTBEAT, self.id, node, self.term, commit=min(pr.match, self.log.committed), context=context)
            for node, pr in self._progress.items()
        )

    def _send_timeout_now(self, to: NodeId) -> None:
        self._send(Message(MessageKind.TIMEOUT_NOW, self.id, to, self.term))

    def _start_read(self, context: bytes) -> None:
        self._reads.append(_ReadRequest(self.log.committed, context, {self.id}))
        self._bcast_heartbeat()

    def _ack_read(self, sender: NodeId, context: bytes) -> None:
        for n, request in enumerate(self._reads):
            if request.context == context:
                request.acks.add(sender)
                voters = self.voters
                if sum(1 for v in voters if v in request.acks) >= len(voters) // 2 + 1:
                    # A majority still follows us as of this round: it and every earlier read are safe.
                    self._read_states.extend(ReadState(r.index, r.context) for r in self._reads[: n + 1])
                    del self._reads[: n + 1]
                return

    def _send(self, m: Message) -> None:
        self._msgs.append(m)
