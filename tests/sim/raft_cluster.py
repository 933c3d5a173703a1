"""A deterministic whole-cluster Raft simulation with a safety checker.

A discrete-event loop (a heap of (time, seq, action); time is in ticks and no
wall clock is read) drives several `RaftCore`s exactly as the agent's shell
will: tick every 1.0, step each delivered message, and drain Ready - persist to
the node's simulated disk, then send, then apply, then advance (a leader's
messages leave before its persist when the Ready allows it, and a Ready that
need not be persisted - a commit index alone - is not written, as in the agent).

The world is hostile and seeded (one `random.Random` decides everything):
- the network loses, duplicates and reorders (random delays) messages, every one
  of which is encoded to msgpack and decoded again, and can be partitioned
  (symmetric splits, one-way cuts, the leader isolated);
- nodes crash (losing everything not persisted through a Ready - the in-flight
  Ready of a slow disk included) and restart from their disk;
- a slow disk makes a node's persist step take time, during which the node
  takes no input (messages and ticks queue, as behind a shell's fsync);
- nodes compact their logs, so restarted and lagging followers need snapshots.

The replicated state machine is pluggable (`StateMachine`; the lease layer in
tests/sim/lease_cluster.py runs a real LeaseTable): by default a key-value map
that records every applied entry (its history is also its snapshot). The checker runs after every event and raises
`SafetyViolation` when any of these break:
- election safety: at most one leader per term (§5.2);
- leader append-only: a leader never overwrites or deletes its entries (§5.3);
- committed entries never change: every (index → term, type, data) that any
  server reports committed or applies agrees with every other (state-machine
  safety, §5.4.3; log matching up to commit);
- leader completeness: a new leader's log holds every committed entry (§5.4);
- applied state machines are prefixes of each other (same entries, same order);
- on disk, commit never exceeds the last persisted entry;
- read index: a confirmed read's index covers everything committed before it started;
and at the end `settle()` heals the world and checks that every acknowledged
proposal (committed and applied on the leader that took it) is in every
surviving voter's state machine, and that the logs match pairwise (§5.3).
"""

from __future__ import annotations

import abc
import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import msgpack

from coordinator.raft import NotLeader, ProposalRejected, RaftCore, RaftState, Ready, Role, initial_state
from coordinator.raft_config import RaftConfig
from coordinator.raft_messages import Entry, EntryType, HardState, Message, Snapshot, decode_message, decode_voters, encode_message


class SafetyViolation(AssertionError):
    """A Raft safety property failed in the simulation."""


Record = tuple[int, int, bytes]  # (term, entry type, data) of a committed index


@dataclass
class Disk:
    """What survives a crash: exactly what was persisted through Ready (and compaction)."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def state(self) -> RaftState:
        return RaftState(self.hard_state, self.snapshot, tuple(self.entries))

    @property
    def last_index(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot else 0

    def persist(self, rd: Ready) -> None:
        """Apply rd's durable part. One that need not be persisted (a commit index alone)
        is not written, as the agent's RaftLog does."""
        if not rd.must_sync:
            return
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = [e for e in self.entries if e.index > rd.snapshot.index]
        if rd.truncate_from is not None:
            self.entries = [e for e in self.entries if e.index < rd.truncate_from]
        self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state
        first = self.snapshot.index + 1 if self.snapshot else 1
        if self.entries and self.entries[0].index != first:
            raise SafetyViolation(f"disk log starts at {self.entries[0].index}, expected {first}")
        if self.hard_state.commit > self.last_index:
            raise SafetyViolation(f"persisted commit {self.hard_state.commit} beyond the persisted log {self.last_index}")


class StateMachine(abc.ABC):
    """What the cluster needs of a server's replicated state machine.

    `history` holds the entries the machine knows one by one, (index, term, type,
    data): every applied one, and those its snapshot carries individually (the
    checker records them as committed).
    """

    history: list[tuple[int, int, int, bytes]]

    @property
    @abc.abstractmethod
    def applied(self) -> int:
        ...

    @abc.abstractmethod
    def apply(self, e: Entry) -> None:
        """Apply the next committed entry (raise SafetyViolation when it is not the next)."""
        ...

    @abc.abstractmethod
    def snapshot_at(self, index: int) -> tuple[int, bytes] | None:
        """A snapshot (its index and data) at or below `index` to compact to, or None."""
        ...

    @abc.abstractmethod
    def holds(self, index: int, term: int, data: bytes) -> bool:
        """Whether entry (index, term, data) is reflected in this machine."""
        ...

    @abc.abstractmethod
    def state(self) -> object:
        """The machine's state, comparable with ==."""
        ...


MachineFactory = Callable[["SimNode", Snapshot | None], StateMachine]


class Machine(StateMachine):
    """The default state machine: a key-value map plus the full history that built it."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.history = []
        self.kv: dict[bytes, bytes] = {}
        if snapshot is not None and snapshot.data:
            for index, term, etype, data in msgpack.unpackb(snapshot.data):
                self._apply(index, term, etype, data)

    @classmethod
    def factory(cls, node: SimNode, snapshot: Snapshot | None) -> StateMachine:
        return cls(snapshot)

    @property
    def applied(self) -> int:
        return self.history[-1][0] if self.history else 0

    def apply(self, e: Entry) -> None:
        if e.index != self.applied + 1:
            raise SafetyViolation(f"applied entry {e.index} after {self.applied}")
        self._apply(e.index, e.term, int(e.type), e.data)

    def snapshot_at(self, index: int) -> tuple[int, bytes] | None:
        return index, self.snapshot_data(index)

    def holds(self, index: int, term: int, data: bytes) -> bool:
        return (index, term, int(EntryType.NORMAL), data) in self.history

    def state(self) -> object:
        return self.kv

    def _apply(self, index: int, term: int, etype: int, data: bytes) -> None:
        self.history.append((index, term, etype, data))
        if etype == EntryType.NORMAL and b"=" in data:
            key, value = data.split(b"=", 1)
            self.kv[key] = value

    def snapshot_data(self, index: int) -> bytes:
        return msgpack.packb([list(h) for h in self.history[:index]])  # type: ignore[no-any-return]


UP, DOWN, GONE = "up", "down", "gone"  # GONE: removed from the cluster and shut down


@dataclass
class SimNode:
    id: str
    disk: Disk
    rng: random.Random
    core: RaftCore | None = None
    machine: StateMachine = field(default_factory=Machine)
    state: str = DOWN
    life: int = 0  # bumped on every crash: events of an earlier life are void
    busy: bool = False
    backlog: deque[Callable[[], None]] = field(default_factory=deque)
    slow_disk: float = 0.0  # persist takes uniform(0, slow_disk) ticks


@dataclass
class Proposal:
    node: str
    life: int
    index: int
    term: int
    data: bytes


class RaftCluster:
    """A seeded world of Raft servers; see the module docstring."""

    def __init__(
        self,
        seed: int,
        n: int,
        config: RaftConfig,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[float, float] = (0.05, 0.5),
        snapshot_every: int = 20,
        snapshot_catchup: int = 5,
        machine: MachineFactory = Machine.factory,
    ) -> None:
        self.seed = seed
        self.machine = machine
        self.rng = random.Random(seed)
        self.config = config
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.snapshot_every = snapshot_every
        self.snapshot_catchup = snapshot_catchup
        self.now = 0.0
        self._seq = 0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self.nodes: dict[str, SimNode] = {}
        self.blocked: set[tuple[str, str]] = set()
        # The checker's memory.
        self.committed: dict[int, Record] = {}
        self.leaders: dict[int, str] = {}
        self._leader_tail: dict[str, tuple[int, int, int]] = {}  # node → (term, last index, its term)
        self.proposals: dict[tuple[str, int, int], Proposal] = {}
        self.acked: list[Proposal] = []
        self.reads: dict[bytes, int] = {}  # read context → commit floor when it started
        self.reads_confirmed = 0
        self.trace: deque[str] = deque(maxlen=60)
        # Run after every event, once the Raft checks passed (layers above Raft hook in here).
        self.after_event: list[Callable[[], None]] = []
        self.stats = {"delivered": 0, "dropped": 0, "snapshots_installed": 0, "crashes": 0, "elections": 0}
        voters = [f"n{i}" for i in range(n)]
        for v in voters:
            self._add(v, initial_state(voters))

    # --- world construction -------------------------------------------------------------------

    def _add(self, node_id: str, state: RaftState) -> SimNode:
        node = SimNode(node_id, Disk(state.hard_state, state.snapshot, list(state.entries)), random.Random(self.rng.random()))
        self.nodes[node_id] = node
        self._start(node)
        return node

    def add_blank_node(self, node_id: str) -> SimNode:
        """A new server with an empty disk (to be added as a voter)."""
        return self._add(node_id, RaftState())

    def _start(self, node: SimNode) -> None:
        node.core = RaftCore(self.config, node.id, node.rng, node.disk.state())
        node.machine = self.machine(node, node.disk.snapshot)
        # The state machine is rebuilt from the snapshot; the core re-delivers the rest.
        if node.machine.applied != node.core.log.applied:
            raise SafetyViolation(f"{node.id}: snapshot machine at {node.machine.applied}, core at {node.core.log.applied}")
        node.state = UP
        node.busy = False
        node.backlog.clear()
        self._schedule_tick(node, node.life, self.rng.uniform(0.0, 1.0))

    def crash(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.state != UP:
            return
        node.state = DOWN
        node.life += 1
        node.core = None
        node.busy = False
        node.backlog.clear()
        self.stats["crashes"] += 1
        self._log(f"crash {node_id}")

    def restart(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.state != DOWN:
            return
        self._start(node)
        self._log(f"restart {node_id} term={node.disk.hard_state.term} last={node.disk.last_index}")

    def retire(self, node_id: str) -> None:
        """Shut a removed server down for good."""
        self.crash(node_id)
        self.nodes[node_id].state = GONE

    def partition(self, *groups: set[str]) -> None:
        """Only nodes in the same group can talk (both directions)."""
        self.blocked = {(a, b) for a in self.nodes for b in self.nodes if a != b and not any(a in g and b in g for g in groups)}
        self._log(f"partition {[sorted(g) for g in groups]}")

    def cut(self, a: str, b: str) -> None:
        """One-way: a's messages to b are lost."""
        self.blocked.add((a, b))
        self._log(f"cut {a}->{b}")

    def heal(self) -> None:
        self.blocked = set()
        self._log("heal")

    # --- queries ------------------------------------------------------------------------------

    def up(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.state == UP]

    def leaders_now(self) -> list[SimNode]:
        return [n for n in self.up() if n.core is not None and n.core.role is Role.LEADER]

    def leader(self) -> SimNode | None:
        """The leader of the highest term among live nodes, if any."""
        leaders = self.leaders_now()
        return max(leaders, key=lambda n: n.core.term if n.core else 0) if leaders else None

    def committed_voters(self) -> tuple[str, ...]:
        """The latest configuration that is known committed."""
        confs = [i for i, (_, t, _) in self.committed.items() if t == EntryType.CONF_CHANGE]
        return decode_voters(self.committed[max(confs)][2])

    # --- client actions -----------------------------------------------------------------------

    def propose(self, data: bytes) -> bool:
        """Hand `data` to the current leader (queued behind its disk, like a shell's channel);
        False when no node leads."""

        def submit(core: RaftCore, node: SimNode) -> None:
            index, term = core.propose(data)
            self.proposals[(node.id, node.life, index)] = Proposal(node.id, node.life, index, term, data)

        return self.change(submit)

    def read(self, context: bytes) -> bool:
        """Start a ReadIndex read at the leader; its confirmed index is checked against
        everything committed when the leader took the request."""

        def submit(core: RaftCore, node: SimNode) -> None:
            self.reads[context] = max(self.committed, default=0)
            core.read_index(context)

        return self.change(submit)

    def submit(self, node_id: str, action: Callable[[RaftCore, SimNode], object]) -> None:
        """Run `action` on `node_id`'s core when it next takes input (behind its disk, like
        a shell's channel); nothing when the node is down or crashes first."""
        node = self.nodes[node_id]
        life = node.life

        def run() -> None:
            if node.core is not None and node.life == life:
                action(node.core, node)

        self._input(node, run)

    def change(self, action: Callable[[RaftCore, SimNode], object]) -> bool:
        """Run a leader-only request on the leader when it next takes input; refusals
        (NotLeader, ProposalRejected) are the client's to retry. False when no node leads."""
        node = self.leader()
        if node is None:
            return False

        def run() -> None:
            if node.core is None:
                return
            try:
                action(node.core, node)
            except (NotLeader, ProposalRejected):
                pass

        self._input(node, run)
        return True

    # --- the event loop -----------------------------------------------------------------------

    def at(self, time: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, action))

    def run_until(self, time: float) -> None:
        while self._events and self._events[0][0] <= time:
            t, _, action = heapq.heappop(self._events)
            self.now = t
            action()
            self.check()
            for hook in self.after_event:
                hook()
        self.now = time

    def _schedule_tick(self, node: SimNode, life: int, delay: float) -> None:
        def fire() -> None:
            if node.life != life or node.state != UP:
                return
            self._input(node, lambda: node.core.tick() if node.core else None)
            self._schedule_tick(node, life, 1.0)

        self.at(self.now + delay, fire)

    def _input(self, node: SimNode, action: Callable[[], None]) -> None:
        if node.state != UP:
            return
        if node.busy:
            node.backlog.append(action)
            return
        action()
        self._pump(node)

    def _pump(self, node: SimNode) -> None:
        """Step all queued input, then drain Ready, until the node is idle or busy.

        Taking every queued input before the next Ready is the shell's group commit:
        one fsync covers everything that arrived during the previous one.
        """
        while node.state == UP and not node.busy:
            assert node.core is not None
            while node.backlog and node.state == UP:
                node.backlog.popleft()()
            if not node.core.has_ready():
                return
            rd = node.core.ready()
            if rd.send_before_persist:
                # A leader's appends leave while its own (possibly slow) fsync runs.
                for m in rd.messages:
                    self._send(m)
            if node.slow_disk > 0:
                node.busy = True
                life = node.life
                self.at(self.now + self.rng.uniform(0.0, node.slow_disk), lambda: self._finish(node, life, rd))
                return
            self._handle_ready(node, rd)

    def _finish(self, node: SimNode, life: int, rd: Ready) -> None:
        if node.life != life:
            return  # crashed while "fsyncing": none of it happened
        node.busy = False
        self._handle_ready(node, rd)
        self._pump(node)

    def _handle_ready(self, node: SimNode, rd: Ready) -> None:
        core = node.core
        assert core is not None
        node.disk.persist(rd)  # 1. persist
        if not rd.send_before_persist:
            for m in rd.messages:  # 2. send, now that the promises in them are durable
                self._send(m)
        if rd.snapshot is not None:  # 3. apply
            node.machine = self.machine(node, rd.snapshot)
            self.stats["snapshots_installed"] += 1
            self._check_history(node)
        for e in rd.committed_entries:
            self._record(e.index, (e.term, int(e.type), e.data), f"{node.id} applied")
            node.machine.apply(e)
            p = self.proposals.pop((node.id, node.life, e.index), None)
            if p is not None and p.term == e.term and p.data == e.data:
                self.acked.append(p)
        for rs in rd.read_states:
            floor = self.reads.pop(rs.context, None)
            if floor is not None:
                if rs.index < floor:
                    raise SafetyViolation(f"read index {rs.index} misses commit {floor} that preceded the read")
                self.reads_confirmed += 1
        core.advance(rd)  # 4. advance
        applied = core.log.applied
        if applied - core.log.snapshot.index >= self.snapshot_every:
            point = node.machine.snapshot_at(applied - self.snapshot_catchup)
            if point is not None and point[0] > core.log.snapshot.index:
                index, data = point
                node.disk.snapshot = core.compact(index, data)
                node.disk.entries = [e for e in node.disk.entries if e.index > index]

    def _send(self, m: Message) -> None:
        if (m.sender, m.to) in self.blocked or self.rng.random() < self.loss:
            self.stats["dropped"] += 1
            return
        wire = encode_message(m)
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            self.at(self.now + self.rng.uniform(*self.delay), lambda: self._deliver(wire))

    def _deliver(self, wire: bytes) -> None:
        m = decode_message(wire)
        node = self.nodes.get(m.to)
        if node is None or node.state != UP or (m.sender, m.to) in self.blocked:
            return
        self.stats["delivered"] += 1
        self._input(node, lambda: node.core.step(m) if node.core else None)

    # --- the checker --------------------------------------------------------------------------

    def _record(self, index: int, record: Record, who: str) -> None:
        known = self.committed.setdefault(index, record)
        if known != record:
            raise SafetyViolation(f"{who}: committed index {index} is {record[:2]}, but {known[:2]} was committed before")

    def _check_history(self, node: SimNode) -> None:
        for index, term, etype, data in node.machine.history:
            self._record(index, (term, etype, data), f"{node.id} restored")

    def check(self) -> None:
        """The per-event safety checks (see the module docstring)."""
        for node in self.up():
            core = node.core
            assert core is not None
            log = core.log
            # Whatever a server holds as committed is the cluster's committed entry.
            c = log.committed
            if c > log.snapshot.index:
                e = log.entry(c)
                self._record(c, (e.term, int(e.type), e.data), f"{node.id} commit")
            if core.role is not Role.LEADER:
                continue
            holder = self.leaders.setdefault(core.term, node.id)
            if holder != node.id:
                raise SafetyViolation(f"two leaders in term {core.term}: {holder} and {node.id}")
            tail = self._leader_tail.get(node.id)
            if tail is None or tail[0] != core.term:
                self.stats["elections"] += 1
                self._log(f"{node.id} leads term {core.term}")
                for index, (term, _, _) in self.committed.items():
                    if index > log.snapshot.index and log.term(index) != term:
                        raise SafetyViolation(f"new leader {node.id} (term {core.term}) lacks committed entry {index}")
            elif tail[1] > log.snapshot.index and log.term(tail[1]) != tail[2]:
                raise SafetyViolation(f"leader {node.id} overwrote its entry {tail[1]} in term {core.term}")
            self._leader_tail[node.id] = (core.term, log.last_index, log.last_term)

    def check_logs_match(self) -> None:
        """Log matching (§5.3): same index and term ⇒ identical logs up to there."""
        logs = []
        for node in self.up():
            assert node.core is not None
            log = node.core.log
            logs.append((node.id, {i: log.entry(i) for i in range(log.first_index, log.last_index + 1)}))
        for a, la in logs:
            for b, lb in logs:
                common = sorted(set(la) & set(lb))
                agreed = [i for i in common if la[i].term == lb[i].term]
                if agreed:
                    top = agreed[-1]
                    for i in common:
                        if i <= top and la[i] != lb[i]:
                            raise SafetyViolation(f"logs of {a} and {b} agree at {top} but differ at {i}")

    def settle(self, ticks: float = 80.0, marker: bytes | None = None) -> None:
        """Heal everything, restart the crashed voters, and check that the cluster recovers
        with every acknowledged proposal applied everywhere. `marker` is the entry
        proposed to prove progress (default: a key-value write naming the seed)."""
        self.heal()
        self.loss = self.duplicate = 0.0
        for node in self.nodes.values():
            if node.state == DOWN:
                self.restart(node.id)
        self.run_until(self.now + ticks)
        if marker is None:
            marker = b"settle=%d" % self.seed
        deadline = self.now + 200.0
        while self.now < deadline:
            if not self._acked(marker):
                self.propose(marker)
            self.run_until(self.now + 5.0)
            if self._acked(marker) and self._converged():
                break
        else:
            raise SafetyViolation(f"no progress after healing: leader={self.leader() and self.leader().id}; acked marker={self._acked(marker)}")  # type: ignore[union-attr]
        self.check_logs_match()
        voters = self.committed_voters()
        for v in voters:
            node = self.nodes[v]
            lost = [p.data for p in self.acked if not node.machine.holds(p.index, p.term, p.data)]
            if lost:
                raise SafetyViolation(f"{v} lost acknowledged proposals {lost[:3]}")

    def _acked(self, data: bytes) -> bool:
        return any(p.data == data for p in self.acked)

    def _converged(self) -> bool:
        leader = self.leader()
        if leader is None or leader.core is None:
            return False
        target = leader.core.log.committed
        return all(
            self.nodes[v].state == UP and self.nodes[v].machine.applied == target for v in self.committed_voters()
        )

    def _log(self, text: str) -> None:
        self.trace.append(f"t={self.now:.2f} {text}")


def random_fault(cluster: RaftCluster, rng: random.Random) -> None:
    """One step of a random fault schedule: isolate the leader, split the cluster, cut one
    direction of a link, heal, crash a server (it restarts 1-30 ticks later), crash the
    leader, or ask the leader to hand over."""
    names = [v for v, node in cluster.nodes.items() if node.state != GONE]
    leader = cluster.leader()
    kind = rng.choice(["isolate_leader", "split", "cut", "heal", "heal", "crash", "crash_leader", "transfer"])
    if kind == "isolate_leader" and leader is not None:
        cluster.partition({leader.id}, set(names) - {leader.id})
    elif kind == "split":
        shuffled = rng.sample(names, len(names))
        k = rng.randrange(1, len(names))
        cluster.partition(set(shuffled[:k]), set(shuffled[k:]))
    elif kind == "cut":
        a, b = rng.sample(names, 2)
        cluster.cut(a, b)
    elif kind == "heal":
        cluster.heal()
    elif kind in ("crash", "crash_leader"):
        victim = leader.id if kind == "crash_leader" and leader is not None else rng.choice(names)
        cluster.crash(victim)
        cluster.at(cluster.now + rng.uniform(1.0, 30.0), lambda: cluster.restart(victim))
    elif kind == "transfer":
        cluster.change(lambda core, _: core.transfer_leadership())
