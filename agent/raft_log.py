"""The replicated command log: a trio shell around `RaftCore`, the only log the agent has.

Every change to the lease table goes through `propose(command)` on the leader,
which returns once the command's entry is committed (on a majority's disks)
and applied to this server's `LeaseTable`. Followers apply the same entries in
the same order; `table` is each server's copy. A lone agent is the same log
with one voter: it elects itself as soon as `run` starts (`RaftCore.campaign`)
and commits an entry once its own fsync returns.

Leadership
----------
Role changes are events, not polls: after every loop turn the log compares
(term, role, leader, ready) with what it last published and calls each
`on_role` listener with a `RoleState` when it changed. `ready` is the core's
`leader_ready`: this server leads *and* has applied an entry of its own term,
so its table holds every write any earlier leader committed. Work that decides
from the table (admission, the scheduler, the outbox, host loss) starts on a
ready leadership and stops on any other state (agent/leadership.py).

Theory of operation
-------------------
One task (`run`) owns the core. Inputs never call the core directly: they go
into one ordered queue, and the loop steps them all, then handles one Ready:

    ticker ──tick──┐
    transport ─msg─┤
    propose ─batch─┼─▶ inputs (in arrival order) ──▶ loop: tick/step/propose all queued
    change_voters ─┘                                       │
                                 while core.has_ready():   ▼
        1. persist rd (hard state, snapshot, truncation, entries) — one fsync'd
           transaction in the storage worker thread (agent/raft_storage.py);
           skipped when only the commit index changed (not rd.must_sync)
        2. send rd.messages (the transport queues them; never blocks); a
           leader's go out before step 1 when rd.send_before_persist
        3. restore the table from rd.snapshot, apply rd.committed_entries in
           order, await on_applied(records), then wake the proposers
        4. core.advance(rd); every snapshot_every applied entries, capture the
           table and compact to the capture of the round before

Ticks versus fsync
------------------
The core must not be touched between `ready()` and `advance()`, so a Ready's
fsync necessarily delays whatever the core would do next, heartbeats included.
What must not happen is that the disk slows the *clock*. So the ticker is its
own task that only sleeps and appends a tick marker to the input queue: it
never awaits the disk, the core or the loop. While a Ready is being persisted
(in a worker thread, the trio loop free), ticks and messages keep arriving
and queue **in the order they happened**; after `advance()` the loop replays
them in that order. Logical time therefore never falls behind real time, and
a follower that received the leader's heartbeat during our fsync sees it
before the ticks that came after it (it does not campaign because the disk
was slow). The delay a heartbeat suffers is bounded by one Ready cycle — a few
milliseconds of fsync on a healthy disk, against a 1,000 ms election timeout.
A disk that stalls for longer than that *should* cost this server its
leadership: it cannot acknowledge anything anyway, and check-quorum on the
others moves on. `storage.stalled_seconds()` exposes the stall for health.
Ticks missed because the whole process was descheduled (not the disk) are
not made up: the ticker resynchronises, as Go's time.Ticker (and etcd) do.

A leader whose disk stalls
--------------------------
Every write waits for the leader's fsync (its loop handles one Ready at a
time), so a leader on a stalling disk makes the whole cluster as slow as its
disk, and the followers, still hearing heartbeats between the writes, see no
reason to elect another. After two consecutive writes of `SLOW_PERSIST_S` or
more, the leader hands leadership to its most up-to-date follower
(`transfer_leadership`: the target campaigns at once), at most once per
`HANDOVER_COOLDOWN_S`.

Heartbeats while the loop is busy
---------------------------------
Under load one Ready cycle can take a few hundred milliseconds (a group
commit's fsync behind others, applying hundreds of entries), and a leader's
heartbeats would wait for it: the followers' election timers see a leader
that goes quiet for a third of its election timeout. So while the loop
handles a Ready, the ticker sends the leader's heartbeats itself
(`RaftCore.heartbeat_now`, which may be called between `ready()` and
`advance()`: heartbeats carry nothing that must be durable first), and the
loop applies committed entries in slices of `APPLY_SLICE_S`, letting the
ticker (and everything else) run between them. During an fsync it does so
only for the first `BEAT_THROUGH_PERSIST_S` (one heartbeat period): a disk that
stalls for longer must still cost this server its leadership, as above.

Proposals
---------
`propose_many` checks leadership at once (`NotLeader(leader_hint)` on a
follower or during a transfer: the HTTP layer forwards), then queues its
commands; the loop proposes them consecutively, one entry per command, and
remembers each (index, term). The proposer is answered when that index is
applied: the same term means it is ours (the ApplyResult is returned);
another term there means a new leader overwrote it — `ProposalLost`, retry.
Only an *applied* entry is conclusive: an entry truncated from our log may
still be committed by a later leader that holds it, so truncation alone
decides nothing. When the outcome cannot be known — the wait exceeded
`propose_timeout_s` (e.g. this server was cut off after losing leadership),
a snapshot covering the index replaced our log, or the log stopped —
the proposer gets `ProposalUnknown`: retry with the same request id (the
lease table's commands are idempotent per request id). A batch is one entry
per command, so a leader change can apply a prefix of it and lose the rest.

Reads
-----
`read_barrier()` makes a read of `table` linearizable (thesis §6.4, ReadIndex):
the leader notes its commit index, confirms with a heartbeat round that a
majority still follows it, and the caller proceeds once that index is applied
here. A leader deposed by a partition cannot confirm, so it never serves a
stale read; the caller gets ReadUnconfirmed after the timeout (503, retry).
Reads still unconfirmed when this server stops leading fail with NotLeader
at once, and the HTTP layer forwards them to the new leader. A confirmed read
stays valid even if leadership moves before its index is applied. Reads that
arrive in the same loop turn share one round (one heartbeat broadcast), so a
burst of reads costs the followers one message each, not one per read.

Membership changes
------------------
`change_voters(add=...)` / `change_voters(remove=...)` go through the same
queue (never touching the core outside the loop): the loop calls the core's
`add_voter` / `remove_voter`, which append one CONF_CHANGE entry holding the
complete new voter set — in force on this server from that moment (thesis
§4.1). The caller is answered like a proposer: when that index is applied
with the same term it gets the new voters; another entry there is
`ProposalLost`; no answer within `propose_timeout_s`, a snapshot covering the
index or the log stopping is `ProposalUnknown` (a retry is safe to judge
against `voters`: adding a voter twice or removing one that is gone is
refused, not repeated). The core refuses (`ProposalRejected`) while an earlier
change is uncommitted, before this leader committed an entry of its term, and
for changes that make no sense (adding a voter, removing a non-voter or the
last one); that error reaches the caller unchanged. A leader that removes
itself applies the change like anyone else — the caller is answered — and the
core steps down as it commits.

Snapshots
---------
Every `config.snapshot_every` applied entries the loop captures
`msgpack(table.snapshot())` at the applied index and compacts the log to the
capture of the *previous* round (docs/raft.md): at least snapshot_every
entries stay in the log for followers that lag a little. An InstallSnapshot
(`rd.snapshot`) replaces the table and drops the capture; `on_restored` (when
given) lets derived state refresh, since the individual entries it skipped
are never applied here. If `on_applied` fails, no snapshot is taken until a
restart, so the replay of the log re-derives what the hook missed. Outbox rows
keyed by log index make that replay idempotent; once a compaction's snapshot
is durable, `on_compacted(index)` lets the outbox drop the delivered rows of
entries at or below it, which no replay can re-create.

Error handling
--------------
A `StorageError` while persisting a Ready ends `run()`: the core cannot be
advanced past a Ready that is not durable, and continuing would break persist
before send. The agent exits and systemd restarts it from the state file.
Pending proposers get `ProposalUnknown`. A failed compaction write is logged
and retried at the next round (the log on disk only keeps more entries).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, Sequence

import msgpack
import trio

from coordinator.commands import Command, decode_command, encode_command
from coordinator.lease_snapshot import SnapshotCapture
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import Wire
from coordinator.raft import NotLeader, ProposalRejected, RaftCore, RaftError, Ready, Role, initial_state
from coordinator.raft_config import RaftConfig, lan
from coordinator.raft_messages import Entry, EntryType, HardState, Message, NodeId, Snapshot, decode_voters

from agent.raft_storage import AsyncRaftStorage
from agent.storage import StorageError

log = logging.getLogger(__name__)

# Committed entries are applied in slices of this much CPU time, the loop yielding between
# them, so applying a large batch holds up heartbeats and HTTP by at most this (plus one entry).
APPLY_SLICE_S = 0.005
# How long into an fsync the ticker still sends the leader's heartbeats: one heartbeat
# period. A healthy disk's group commit stays below it even under load (the heartbeat
# bench's p50 persist is 3-7 ms); a disk that stalls longer is left to cost the leadership
# (at 250 ms, the nemesis's 1 s-per-transaction disk kept its leader, and its callers
# waiting, for seconds longer).
BEAT_THROUGH_PERSIST_S = 0.1
# A leader whose state-file writes take this long twice in a row hands leadership to the
# most up-to-date follower (at most once per HANDOVER_COOLDOWN_S, so a cluster whose disks
# are all slow does not bounce leadership on every write).
SLOW_PERSIST_S = 0.5
HANDOVER_COOLDOWN_S = 30.0

__all__ = [
    "Applied",
    "MessageSink",
    "NotLeader",
    "OnApplied",
    "ProposalLost",
    "ProposalRejected",
    "ProposalUnknown",
    "RaftLog",
    "ReadUnconfirmed",
    "RoleState",
]


@dataclass(frozen=True, slots=True)
class Applied:
    """One applied log entry, as `on_applied` receives it."""

    index: int
    command: Command
    result: ApplyResult
    # True for entries re-applied at start-up from the state file (they were answered before).
    replayed: bool


OnApplied = Callable[[Sequence[Applied]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RoleState:
    """What `on_role` listeners hear: this server's role as of the end of a loop turn."""

    term: int
    role: Role
    leader: NodeId | None
    # Leading with an entry of this term applied (RaftCore.leader_ready).
    ready: bool
    # A voter of its latest configuration (a blank or removed server is not: it hears no election).
    voter: bool = True
    # False once run() has ended: nothing of this log answers any more.
    running: bool = True


class ProposalLost(RaftError):
    """The proposal's index was committed with another leader's entry: it was not applied. Retry."""

    def __init__(self, index: int, term: int, committed_term: int) -> None:
        super().__init__(
            f"entry {index} of term {term} was replaced by a new leader's entry of term {committed_term}; retry"
        )
        self.index = index
        self.term = term


class ProposalUnknown(RaftError):
    """Whether the proposal was applied cannot be known here; retry it idempotently (same request id)."""


class ReadUnconfirmed(RaftError):
    """A linearizable read could not be confirmed in time (no quorum?); nothing was read. Retry."""


class MessageSink(Protocol):
    """Where the log hands outgoing Raft messages (agent/raft_transport.RaftTransport)."""

    def send(self, message: Message) -> None: ...


class _Tick:
    __slots__ = ()


_TICK = _Tick()


@dataclass(eq=False, slots=True, kw_only=True)
class _Waiter:
    """What a caller waits on: `done` once answered, with `error` when it failed."""

    done: trio.Event = field(default_factory=trio.Event)
    error: Exception | None = None

    def finish(self, error: Exception | None = None) -> None:
        """Answer the caller (first answer wins: a late one after a timeout changes nothing)."""
        if not self.done.is_set():
            self.error = error
            self.done.set()


@dataclass(eq=False, slots=True)
class _Batch(_Waiter):
    commands: Sequence[Command]
    results: list[ApplyResult | None]
    # The term whose leadership decided these commands (None: any term will do).
    term: int | None = None
    # (index, term) given to each command by the core once proposed.
    positions: list[tuple[int, int]] = field(default_factory=list)
    settled: int = 0


@dataclass(eq=False, slots=True)
class _Transfer:
    """A request to hand leadership over (to the most up-to-date voter when `to` is None)."""

    to: NodeId | None = None


@dataclass(eq=False, slots=True)
class _Read(_Waiter):
    """A linearizable read waiting for its ReadIndex round (see "Reads")."""

    # The commit index the leader confirmed for this read; None until confirmed.
    index: int | None = None


@dataclass(eq=False, slots=True)
class _ConfChange(_Waiter):
    """A request to add or remove one voter; `voters` is the new set once applied."""

    add: NodeId | None
    remove: NodeId | None
    # (index, term) of the CONF_CHANGE entry once the core appended it.
    position: tuple[int, int] | None = None
    voters: tuple[NodeId, ...] | None = None


_Input = Message | _Tick | _Batch | _Transfer | _Read | _ConfChange


class RaftLog:
    """Replicated, durable, ordered application of commands to a LeaseTable."""

    def __init__(
        self,
        storage: AsyncRaftStorage,
        transport: MessageSink,
        *,
        node_id: NodeId,
        on_applied: OnApplied,
        config: RaftConfig | None = None,
        rng: random.Random | None = None,
        bootstrap_voters: Sequence[NodeId] | None = None,
        on_restored: Callable[[], Awaitable[None]] | None = None,
        on_compacted: Callable[[int], Awaitable[object]] | None = None,
        retention_s: float | None = None,
        propose_timeout_s: float = 10.0,
        inbox_limit: int = 8192,
    ) -> None:
        """`bootstrap_voters`: the founding voters, used only when the state file holds no Raft state.

        A server added to a running cluster passes None: it starts blank and never
        campaigns until the leader's log makes it a voter.
        """
        self.node_id = node_id
        self.table = LeaseTable() if retention_s is None else LeaseTable(retention_s=retention_s)
        self._retention_s = retention_s
        self._storage = storage
        self._transport = transport
        self._on_applied = on_applied
        self._on_restored = on_restored
        self._on_compacted = on_compacted
        self._role_listeners: list[Callable[[RoleState], None]] = []
        self._published: RoleState | None = None
        self._config = config or lan()
        self._config.validate()
        self._rng = rng or random.Random()
        self._bootstrap = tuple(bootstrap_voters) if bootstrap_voters else None
        self._propose_timeout_s = propose_timeout_s
        self._inbox_limit = inbox_limit
        self._core: RaftCore | None = None
        self._inputs: deque[_Input] = deque()
        self._queued_messages = 0
        # While a Ready is handled: since when, and since when its fsync runs (None: none).
        self._busy_since: float | None = None
        self._persist_since: float | None = None
        # Consecutive persists slower than SLOW_PERSIST_S, and when leadership was last handed over for it.
        self._slow_persists = 0
        self._handed_over_at = -math.inf
        self._wakeup = trio.Event()
        # index → (batch, position in it, term the entry was proposed in)
        self._pending: dict[int, tuple[_Batch, int, int]] = {}
        # index → the membership change proposed there (at most one at a time in practice:
        # the core refuses a second while the first is uncommitted).
        self._pending_conf: dict[int, _ConfChange] = {}
        self._hooks_complete = True
        # The table captured one snapshot round ago: (index, bytes).
        self._capture: tuple[int, bytes] | None = None
        self._capture_index = 0
        # Metrics: the last persist's duration and entries written.
        self.last_append_seconds = 0.0
        self.last_batch_size = 0
        self.dropped_messages = 0
        # Called with each successful proposal's latency (seconds), for a histogram.
        self.on_proposal_seconds: Callable[[float], None] | None = None
        # Reads sent into the core (by context) and confirmed reads waiting for apply.
        # Reads queued in one loop turn share one ReadIndex round (one heartbeat
        # broadcast), keyed by that round's context.
        self._reads: dict[bytes, list[_Read]] = {}
        self._confirmed: list[_Read] = []
        self._read_seq = 0

    # --- observers ----------------------------------------------------------------------

    def _require_core(self) -> RaftCore:
        if self._core is None:
            raise RuntimeError("RaftLog.recover() first")
        return self._core

    def on_role(self, listener: Callable[[RoleState], None]) -> None:
        """Call `listener(state)` from the run loop whenever (term, role, leader, ready) changes.

        Listeners run synchronously in the loop: they must not block (start a task, set an event).
        """
        self._role_listeners.append(listener)

    @property
    def role_state(self) -> RoleState:
        core = self._require_core()
        return RoleState(core.term, core.role, core.lead, core.leader_ready, voter=core.promotable)

    @property
    def leader_ready(self) -> bool:
        """This server leads and has applied an entry of its term (see "Leadership")."""
        return self._require_core().leader_ready

    @property
    def role(self) -> Role:
        return self._require_core().role

    @property
    def is_leader(self) -> bool:
        return self._require_core().role is Role.LEADER

    @property
    def leader_id(self) -> NodeId | None:
        return self._require_core().lead

    @property
    def term(self) -> int:
        return self._require_core().term

    @property
    def hears_leader(self) -> bool:
        """A leader is known and was heard from within the election timeout, or this server leads."""
        return self._require_core().hears_leader

    @property
    def voters(self) -> tuple[NodeId, ...]:
        return self._require_core().voters

    @property
    def is_voter(self) -> bool:
        """Whether this server votes in its latest configuration (a blank or removed server does not)."""
        return self.node_id in self._require_core().voters

    @property
    def commit_index(self) -> int:
        return self._require_core().log.committed

    @property
    def applied_index(self) -> int:
        return self._require_core().log.applied

    @property
    def last_index(self) -> int:
        """The last entry in this server's log (committed or not); applied_index is what the table reflects."""
        return self._require_core().log.last_index

    @property
    def snapshot_index(self) -> int:
        return self._require_core().log.snapshot.index

    def disk_stalled_seconds(self) -> float:
        """How long the state-file write in flight has been running (0.0 when none)."""
        return self._storage.stalled_seconds()

    # --- start-up -----------------------------------------------------------------------

    async def recover(self) -> int:
        """Load the Raft state, restore the table from the snapshot, replay committed entries.

        Returns the number of entries replayed. Raises StorageError.
        """
        state = await self._storage.load()
        empty = state.hard_state == HardState() and state.snapshot is None and not state.entries
        if empty and self._bootstrap is not None:
            state = initial_state(self._bootstrap)
            await self._storage.persist(state.hard_state, None, None, state.entries)
            log.info("raft: bootstrapped a new cluster with voters %s", ", ".join(self._bootstrap))
        if state.snapshot is not None:
            self.table = self._restore_table(state.snapshot)
        core = self._core = RaftCore(self._config, self.node_id, self._rng, state)
        applied: list[Applied] = []
        while core.has_ready():
            rd = core.ready()
            # A freshly built core only has committed entries to hand back (nothing to
            # persist or send); persist anyway so the rule holds whatever the core does.
            await self._storage.persist_ready(rd)
            for m in rd.messages:
                self._transport.send(m)
            for e in rd.committed_entries:
                if e.type is EntryType.NORMAL:
                    command = decode_command(e.data)
                    applied.append(Applied(e.index, command, self.table.apply(command), replayed=True))
            core.advance(rd)
        if applied:
            await self._on_applied(applied)
        self._capture_index = core.log.applied
        return len(applied)

    # --- inputs -------------------------------------------------------------------------

    def receive(self, message: Message) -> None:
        """Queue a message from a peer (the transport's callback; never blocks)."""
        if self._queued_messages >= self._inbox_limit:
            self.dropped_messages += 1  # Raft retransmits; an overloaded loop must not grow without bound
            return
        self._queued_messages += 1
        self._inputs.append(message)
        self._wakeup.set()

    async def propose(self, command: Command, *, term: int | None = None) -> ApplyResult:
        """Replicate `command`, wait until committed and applied here, return its result.

        With `term`, the command is proposed only in that term: it was decided by
        that term's leadership, and a later one (this server lost leadership and won
        it again meanwhile) must not append a decision made from older state.
        Raises NotLeader (leader_hint: forward there), ProposalLost (not applied: retry),
        ProposalUnknown (may or may not be applied: retry idempotently).
        """
        return (await self.propose_many([command], term=term))[0]

    async def propose_many(self, commands: Sequence[Command], *, term: int | None = None) -> list[ApplyResult]:
        """Propose several commands, consecutive in the log in this order (see "Proposals" and `propose`)."""
        if not commands:
            return []
        core = self._require_core()
        if core.role is not Role.LEADER:
            raise NotLeader(core.lead)
        if core.lead_transferee is not None:
            raise NotLeader(core.lead_transferee, "leadership is being transferred")
        if term is not None and core.term != term:
            raise NotLeader(core.lead, f"decided in term {term}; this server now leads term {core.term}")
        batch = _Batch(commands, [None] * len(commands), term=term)
        started = trio.current_time()
        self._inputs.append(batch)
        self._wakeup.set()
        with trio.move_on_after(self._propose_timeout_s):
            await batch.done.wait()
        if not batch.done.is_set():
            raise ProposalUnknown(f"not applied within {self._propose_timeout_s} s; the outcome is unknown")
        if batch.error is not None:
            raise batch.error
        if self.on_proposal_seconds is not None:
            self.on_proposal_seconds(trio.current_time() - started)
        return [r for r in batch.results if r is not None]

    async def read_barrier(self, timeout_s: float = 5.0) -> None:
        """Return once this server's table reflects every write committed before the call (see "Reads").

        Raises NotLeader (forward the read), ReadUnconfirmed (no quorum confirmed
        this leader within `timeout_s`: answer 503, the caller retries).
        """
        core = self._require_core()
        if core.role is not Role.LEADER:
            raise NotLeader(core.lead)
        read = _Read()
        self._inputs.append(read)
        self._wakeup.set()
        with trio.move_on_after(timeout_s):
            await read.done.wait()
        if not read.done.is_set():
            error = ReadUnconfirmed(f"no majority confirmed this leader within {timeout_s} s")
            read.finish(error)  # the loop skips (or drops) a finished read wherever it is
            raise error
        if read.error is not None:
            raise read.error

    async def change_voters(self, add: NodeId | None = None, remove: NodeId | None = None) -> tuple[NodeId, ...]:
        """Add or remove one voter (exactly one of the two); return the voters once the change is applied here.

        Raises ValueError (neither or both given), NotLeader (leader_hint: forward
        there), ProposalRejected (the core refuses: a change in flight, no entry of
        this term committed yet, adding a voter, removing a non-voter or the last
        one), ProposalLost (not applied: retry), ProposalUnknown (see "Membership
        changes": look at `voters` before retrying).
        """
        if (add is None) == (remove is None):
            raise ValueError("change_voters: give exactly one of add and remove")
        core = self._require_core()
        if core.role is not Role.LEADER:
            raise NotLeader(core.lead)
        if core.lead_transferee is not None:
            raise NotLeader(core.lead_transferee, "leadership is being transferred")
        change = _ConfChange(add, remove)
        self._inputs.append(change)
        self._wakeup.set()
        with trio.move_on_after(self._propose_timeout_s):
            await change.done.wait()
        # On a timeout this marks it done: the loop then neither proposes it (if it
        # has not yet) nor settles it; whether an earlier proposal commits is unknown.
        change.finish(ProposalUnknown(f"membership change not applied within {self._propose_timeout_s} s; the outcome is unknown"))
        if change.error is not None:
            raise change.error
        assert change.voters is not None
        return change.voters

    def transfer_leadership(self, to: NodeId | None = None) -> None:
        """Ask the core to hand leadership to `to` (default: the most up-to-date other voter).

        Returns at once; the run task starts the transfer on its next turn, and
        does nothing if this server no longer leads by then. Watch `leader_id`.
        """
        self._inputs.append(_Transfer(to))
        self._wakeup.set()

    async def hand_over(self, timeout_s: float = 2.0) -> NodeId | None:
        """On the leader: transfer leadership and wait (bounded) until another server leads.

        Returns the new leader, or None (not leading, no other voter, or it took too long).
        """
        core = self._require_core()
        if core.role is not Role.LEADER or len(core.voters) < 2:
            return None
        self.transfer_leadership()
        with trio.move_on_after(timeout_s):
            while True:
                lead = core.lead
                if lead is not None and lead != self.node_id:
                    return lead
                await trio.sleep(0.01)
        return None

    # --- the run task -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick, step, persist, send, apply and advance forever (see the module docstring).

        Raises StorageError when the state file refuses a Ready.
        """
        core = self._require_core()
        if core.voters == (self.node_id,):
            core.campaign()  # the only voter: nobody else can lead, so do not wait an election timeout
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ticker)
                task_status.started()
                await self._loop(core)
        finally:
            self._fail_all()
            self._publish(RoleState(core.term, core.role, None, False, voter=core.promotable, running=False))

    async def _ticker(self) -> None:
        interval = self._config.tick_interval_s
        next_at = trio.current_time() + interval
        while True:
            await trio.sleep_until(next_at)
            self._inputs.append(_TICK)
            self._wakeup.set()
            if self._busy_since is not None:
                self._beat_while_busy()
            next_at += interval
            now = trio.current_time()
            if next_at < now:
                next_at = now + interval  # descheduled: skip missed ticks rather than burst them

    def _beat_while_busy(self) -> None:
        """Send the leader's heartbeats now: the loop is in a Ready and will tick only after it."""
        persist_since = self._persist_since
        if persist_since is not None and trio.current_time() - persist_since >= BEAT_THROUGH_PERSIST_S:
            return  # a stalled disk: let the followers notice (see "Ticks versus fsync")
        for m in self._require_core().heartbeat_now():
            self._transport.send(m)

    def _note_persist_time(self, core: RaftCore, seconds: float) -> None:
        """Hand leadership over after two consecutive slow writes (see "A leader whose disk stalls")."""
        self._slow_persists = self._slow_persists + 1 if seconds >= SLOW_PERSIST_S else 0
        if self._slow_persists < 2 or core.role is not Role.LEADER or core.lead_transferee is not None:
            return
        now = trio.current_time()
        if len(core.voters) < 2 or now - self._handed_over_at < HANDOVER_COOLDOWN_S:
            return
        self._handed_over_at = now
        self._slow_persists = 0
        log.warning(
            "raft: the state file's last two writes took %.2f s and more; handing leadership to a server whose disk keeps up",
            seconds,
        )
        self.transfer_leadership(None)

    async def _loop(self, core: RaftCore) -> None:
        while True:
            self._wakeup = trio.Event()
            self._drain_inputs(core)
            self._drop_unconfirmed_reads(core)
            if core.has_ready():
                self._busy_since = trio.current_time()
                try:
                    await self._handle_ready(core, core.ready())
                finally:
                    self._busy_since = None
                self._publish(self.role_state)
                continue
            self._publish(self.role_state)
            await self._wakeup.wait()

    def _publish(self, state: RoleState) -> None:
        if state == self._published:
            return
        self._published = state
        for listener in self._role_listeners:
            listener(state)

    def _drain_inputs(self, core: RaftCore) -> None:
        reads: list[_Read] = []
        while self._inputs:
            item = self._inputs.popleft()
            if isinstance(item, _Tick):
                core.tick()
            elif isinstance(item, Message):
                self._queued_messages -= 1
                core.step(item)
            elif isinstance(item, _Transfer):
                try:
                    target = core.transfer_leadership(item.to)
                except RaftError as error:
                    log.info("raft: not transferring leadership: %s", error)
                else:
                    log.info("raft: transferring leadership to %s", target)
            elif isinstance(item, _Read):
                if not item.done.is_set():  # else it timed out while queued
                    reads.append(item)
            elif isinstance(item, _ConfChange):
                self._propose_conf_change(core, item)
            else:
                self._propose_batch(core, item)
        if reads:
            self._start_reads(core, reads)

    def _start_reads(self, core: RaftCore, reads: list[_Read]) -> None:
        """One ReadIndex round for every read that arrived in this turn."""
        self._read_seq += 1
        context = self._read_seq.to_bytes(8, "big")
        try:
            core.read_index(context)
        except NotLeader as error:
            for read in reads:
                read.finish(error)
        else:
            self._reads[context] = reads

    def _propose_conf_change(self, core: RaftCore, change: _ConfChange) -> None:
        if change.done.is_set():
            return  # the caller timed out before the loop got to it: propose nothing
        try:
            if change.add is not None:
                index, term = core.add_voter(change.add)
            else:
                assert change.remove is not None
                index, term = core.remove_voter(change.remove)
        except (NotLeader, ProposalRejected) as error:
            change.finish(error)
            return
        change.position = (index, term)
        self._pending_conf[index] = change
        verb, node = ("adding", change.add) if change.add is not None else ("removing", change.remove)
        log.info("raft: %s voter %s (entry %d, term %d)", verb, node, index, term)

    def _propose_batch(self, core: RaftCore, batch: _Batch) -> None:
        if batch.done.is_set():
            return
        if batch.term is not None and core.term != batch.term:
            # Leadership was lost and won again while the batch waited in the queue:
            # nothing was appended, and the new term decides afresh.
            batch.finish(NotLeader(core.lead, f"decided in term {batch.term}; the log is in term {core.term}"))
            return
        try:
            for n, command in enumerate(batch.commands):
                index, term = core.propose(encode_command(command))
                batch.positions.append((index, term))
                self._pending[index] = (batch, n, term)
        except NotLeader as error:
            # Leadership moved between the caller's check and now; nothing was
            # appended (a batch is proposed in one go, so never a part of it).
            batch.finish(error)

    async def _handle_ready(self, core: RaftCore, rd: Ready) -> None:
        if rd.send_before_persist:
            # A leader's appends go out while it writes them (thesis §10.2.1): the
            # followers' fsyncs overlap ours, and the core counts our own log
            # towards a majority only once advance() says it is durable.
            self._send_all(rd)
        if rd.must_sync and (
            rd.hard_state is not None or rd.snapshot is not None or rd.truncate_from is not None or rd.entries
        ):
            # 1. durable (StorageError ends run()). Readys with nothing to persist —
            # heartbeats and their answers, most of them — skip the worker thread, and
            # so does a commit index alone (not rd.must_sync): the commit on disk is
            # then the one of the last durable write, and a restarted server learns
            # the rest again from the leader (Raft never needs it persisted). Not
            # waiting for it takes a thread round trip off every proposal's path.
            started = self._persist_since = trio.current_time()
            try:
                await self._storage.persist_ready(rd)
            finally:
                self._persist_since = None
            self.last_append_seconds = trio.current_time() - started
            self.last_batch_size = len(rd.entries)
            self._note_persist_time(core, self.last_append_seconds)
        if not rd.send_before_persist:
            self._send_all(rd)  # 2. only now may promises leave this server
        if rd.snapshot is not None:  # 3. apply
            await self._install(rd.snapshot)
        applied: list[Applied] = []
        settled: list[_Batch | _ConfChange] = []
        slice_ends = time.perf_counter() + APPLY_SLICE_S
        for e in rd.committed_entries:
            if time.perf_counter() > slice_ends:
                # Let the ticker (heartbeats) and the rest of the agent run; readers of the
                # table meanwhile see a prefix of this Ready applied, as between two Readys.
                await trio.sleep(0)
                slice_ends = time.perf_counter() + APPLY_SLICE_S
            result = None
            if e.type is EntryType.NORMAL:
                command = decode_command(e.data)
                result = self.table.apply(command)
                applied.append(Applied(e.index, command, result, replayed=False))
            batch = self._settle(e.index, e.term, result)
            if batch is not None:
                settled.append(batch)
            change = self._settle_conf(e)
            if change is not None:
                settled.append(change)
        if applied:
            try:
                await self._on_applied(applied)
            except Exception:
                log.exception("post-apply hook failed for entries %d..%d", applied[0].index, applied[-1].index)
                self._hooks_complete = False
        for waiter in settled:  # after the hook: an answered write has its outbox rows
            waiter.done.set()
        core.advance(rd)  # 4.
        self._release_reads(core, rd)
        await self._maybe_snapshot(core)

    def _release_reads(self, core: RaftCore, rd: Ready) -> None:
        """Answer confirmed reads whose index is applied; fail the rest once we stop leading."""
        for state in rd.read_states:
            for read in self._reads.pop(state.context, []):
                if not read.done.is_set():
                    read.index = state.index
                    self._confirmed.append(read)
        applied = core.log.applied
        waiting: list[_Read] = []
        for read in self._confirmed:
            if read.index is not None and read.index <= applied:
                read.finish()
            elif not read.done.is_set():  # not given up on by its caller
                waiting.append(read)
        self._confirmed = waiting
        self._drop_unconfirmed_reads(core)

    def _drop_unconfirmed_reads(self, core: RaftCore) -> None:
        """The core drops reads in flight when it stops leading: answer them now, so they are forwarded."""
        if self._reads and core.role is not Role.LEADER:
            for reads in self._reads.values():
                for read in reads:
                    read.finish(NotLeader(core.lead, "leadership was lost during the read"))
            self._reads.clear()

    def _send_all(self, rd: Ready) -> None:
        for m in rd.messages:
            self._transport.send(m)

    def _settle(self, index: int, term: int, result: ApplyResult | None) -> _Batch | None:
        """Record the outcome of a pending proposal at `index`; the batch when it is now complete."""
        pending = self._pending.pop(index, None)
        if pending is None:
            return None
        batch, position, proposed_term = pending
        if batch.done.is_set():
            return None  # already failed (or timed out and gone)
        if term != proposed_term or result is None:
            # Committed entries never change: ours is not, and never will be, at `index`.
            # The rest of the batch follows it in the log (log matching), so it is lost too.
            for later_index, _ in batch.positions[position + 1 :]:
                self._pending.pop(later_index, None)
            batch.error = ProposalLost(index, proposed_term, term)
            return batch
        batch.results[position] = result
        batch.settled += 1
        return batch if batch.settled == len(batch.commands) else None

    def _settle_conf(self, entry: Entry) -> _ConfChange | None:
        """Record the outcome of a membership change proposed at `entry.index`; the change if it was pending."""
        change = self._pending_conf.pop(entry.index, None)
        if change is None or change.done.is_set() or change.position is None:
            return None
        _, proposed_term = change.position
        if entry.term != proposed_term or entry.type is not EntryType.CONF_CHANGE:
            change.error = ProposalLost(entry.index, proposed_term, entry.term)
        else:
            change.voters = decode_voters(entry.data)
            log.info("raft: voters now %s (entry %d)", ", ".join(change.voters), entry.index)
        return change

    async def _install(self, snapshot: Snapshot) -> None:
        """Replace the table by a leader's snapshot (InstallSnapshot)."""
        self.table = self._restore_table(snapshot)
        self._capture = None
        self._capture_index = snapshot.index
        for index in [i for i in self._pending if i <= snapshot.index]:
            batch = self._pending.pop(index)[0]
            batch.finish(ProposalUnknown(f"entry {index} was covered by a snapshot from the leader; outcome unknown"))
        for index in [i for i in self._pending_conf if i <= snapshot.index]:
            self._pending_conf.pop(index).finish(
                ProposalUnknown(f"membership change {index} was covered by a snapshot from the leader; outcome unknown")
            )
        log.info("raft: installed the leader's snapshot at index %d (term %d)", snapshot.index, snapshot.term)
        if self._on_restored is not None:
            try:
                await self._on_restored()
            except Exception:
                log.exception("post-restore hook failed")

    def _restore_table(self, snapshot: Snapshot) -> LeaseTable:
        if not snapshot.data:
            return LeaseTable() if self._retention_s is None else LeaseTable(retention_s=self._retention_s)
        return LeaseTable.restore(msgpack.unpackb(snapshot.data, raw=False))

    async def _maybe_snapshot(self, core: RaftCore) -> None:
        applied = core.log.applied
        if not self._hooks_complete or applied - self._capture_index < self._config.snapshot_every:
            return
        # The capture is taken here, consistent with `applied` (references and texts made
        # before); making the missing texts and encoding (the bulk of the cost on a big
        # table, most of all after a burst) run in a worker thread, off the event loop,
        # so HTTP, gossip and heartbeats are not held up. Only this task waits for it.
        table = self.table
        capture = table.snapshot_capture()
        state, data = await trio.to_thread.run_sync(_encode_capture, capture)
        if self.table is table:
            table.keep_texts(capture, state)
        previous = self._capture
        self._capture, self._capture_index = (applied, data), applied
        if previous is None or previous[0] <= core.log.snapshot.index:
            return
        snapshot = core.compact(previous[0], previous[1])
        try:
            await self._storage.save_snapshot(snapshot)
        except StorageError as error:
            log.error("raft: storing the snapshot at %d failed (the log on disk is kept): %s", snapshot.index, error)
            return
        if self._on_compacted is not None:
            try:
                await self._on_compacted(snapshot.index)
            except Exception:
                log.exception("post-compaction hook failed at %d (retried at the next compaction)", snapshot.index)

    def _fail_all(self) -> None:
        """run() ended: nobody will answer the waiting proposers."""
        for batch, _, _ in self._pending.values():
            batch.finish(ProposalUnknown("the raft log stopped; the outcome is unknown"))
        self._pending.clear()
        for change in self._pending_conf.values():
            change.finish(ProposalUnknown("the raft log stopped; the outcome of the membership change is unknown"))
        self._pending_conf.clear()
        for item in self._inputs:
            if isinstance(item, (_Batch, _ConfChange)):
                item.finish(NotLeader(None, "the raft log stopped"))
            elif isinstance(item, _Read):
                item.finish(NotLeader(None, "the raft log stopped"))
        for read in [*(r for reads in self._reads.values() for r in reads), *self._confirmed]:
            read.finish(NotLeader(None, "the raft log stopped"))
        self._reads.clear()
        self._confirmed.clear()
        self._inputs.clear()
        self._queued_messages = 0


def _encode_capture(capture: SnapshotCapture) -> tuple[Wire, bytes]:
    """The snapshot dict of `capture` and its msgpack bytes (in a worker thread)."""
    state = capture.to_wire()
    return state, _pack(state)


def _pack(state: object) -> bytes:
    data: bytes = msgpack.packb(state, use_bin_type=True)
    return data
