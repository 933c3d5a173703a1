"""The lease layer inside the seeded whole-cluster Raft simulation (tests/sim/raft_cluster.py).

Theory of operation
-------------------
`LeaseCluster` wraps a `RaftCluster` whose servers each run a real `LeaseTable`
as their state machine (`LeaseMachine`): committed NORMAL entries are decoded
with `decode_command` and applied in log order; snapshots are
`msgpack(table.snapshot())`, restored with `LeaseTable.restore`.

On top of each server runs a `Shell`: agent/lease_service.py's logic on the
pure Admission core (coordinator/admission.py), one per life of the server. While its core leads *and* is `leader_ready` (an entry of its own term
is applied, so its table holds every committed write) the shell owns a fresh
`Admission` for that term; it drops it when that stops. Only then does it decide:

    allocate: begin → (WAIT: park until the id's owner finishes | Repeat: answer
              again | PROCEED) → decide → propose → the entry applies here with
              the same term: settle, answer, finish
    release / renew: read the table as lease_service does, propose Release /
              Renew / Cancel, answer from the applied result
    every tick: Admission.tick → propose the commands as consecutive entries
              (one batch in flight at a time, as run_scheduler awaits it)

A proposal ends when its index applies on its server: same term = applied
(the ApplyResult answers), another term = `proposal_lost`. A snapshot that
covers the index is `outcome_unknown`; so is no answer within PROPOSE_TIMEOUT
(the client hears it, but the shell keeps the GPUs and the request id held
until the entry's fate is known, so a retry waits instead of deciding again).
A proposal refused by the core, or queued behind a slow disk and reaching the
core in another term (what was decided for one term is never proposed in
another), is `not_leader`. A crash voids everything of that life:
its clients time out. A request reaching a leader that is not ready yet waits
for readiness (READY_WAIT, then `no_leader`; `not_leader` when it stops leading).

Clients send allocate (own request id, varied GPU counts, sometimes
queue=false), release (by allocation id or request id) and renew to a random
server; a follower forwards to the leader it knows over the simulated network
(partitions and loss apply; a forwarded call is not forwarded again: `no_leader`).
On a 503 or a timeout the client retries through another server with the same
request id, at most MAX_ATTEMPTS times.

Each ready leader also proposes a RecordUsage every USAGE_EVERY ticks (half the
GPU-seconds its live leases held since, per queue and service), as the agent's
usage recorder does.

Commands carry `at` = the simulation's clock in seconds (SECONDS_PER_TICK per
tick); TTLs and queue timeouts are a few seconds, so leases expire and queued
requests time out during a run.

Checked after every event (`LeaseViolation`, a SafetyViolation):
- no GPU is held by two live leases in any server's table;
- one request id → at most one allocation ever, over every server's applies;
- every acknowledged allocation (a server answered 200 with it) is in the table of
  every server whose applied index covers the acknowledgement, until it was
  released, expired or marked lost; a 202 leaves a record the same way; an
  acknowledged renewal is not expired before its new expiry;
- tables captured at the same index are identical on every server, and so is
  the usage they answer (per-service GPU-seconds and lifetime totals, read as
  /usage and the metrics read them);
- on every server after every entry: the allocated GPU-seconds in its ledger,
  plus its live leases' running share, equal the sum over the leases that ended
  of gpus × (end − allocated_at), plus the same share (the table accounts every
  end, whatever its reason); its utilized GPU-seconds equal the sum of the
  RecordUsage rows it applied;
- every answer a server gives a client (checked as given, so one lost on its way
  back counts) is one docs/api.md lists for that call (never
  `gpu_busy`, `duplicate_request`, ...: those mean a leader decided from a table
  missing committed entries), and repeats of a request id name one allocation.
- gangs (Call.nodes > 1): on every server after every event, a gang is whole
  or absent: every live member's gang is in the table's gang index with all
  its members live, on distinct nodes, ranked 0.., with one expiry and one
  preemption state; a gang's request record names the gang while it lives.
  A gang's acknowledgement is its gang id (what its owner releases and renews).
- with MIG hosts (`mig_hosts`: GPUs split into slices, coordinator/mig.py): no
  device (GPU or MIG instance, by UUID) in two live leases, no GPU leased whole
  while a slice of it is leased, every slice lease holds one slice of the
  profile (and memory) it asked for, and no whole-GPU lease holds a slice;
- with shares of a GPU (Call.share_mb): no GPU memory oversubscribed by shares
  (the budgets of the live shares of a GPU sum to at most its memory total),
  the shares of a GPU all of one sharing group and no whole-GPU lease beside
  them, its holder one of them; and every queue's GPU count, recounted from the
  leases (a shared GPU once per queue with a share on it), is the table's, so
  the cap check below holds shares to `max_gpus` too;
- with a queue policy (each ready leader proposes it first, as the agent does):
  no Allocate takes a queue or its parent past `max_gpus`; no Preempt takes
  another queue's work below that queue's guarantee, or names a lease that is
  not preemptible; a lease preempted once has one deadline on every server and
  ends as preempted only at or after it.
`settle()` heals the world (RaftCluster.settle: no acknowledged entry lost, logs
match), lets the clients finish, checks every acknowledgement against the final
leader's table, that all voters' tables are equal, and that a new allocate is served.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Union

import msgpack

from coordinator.admission import WAIT, Admission, AllocateOutcome, Repeat
from coordinator.commands import (
    Preempt,
    SetQueuePolicy,
    Allocate,
    Cancel,
    Command,
    MarkHostLost,
    RecordUsage,
    Release,
    Renew,
    SetDrain,
    decode_command,
    encode_command,
)
from coordinator.errors import Conflict, CoordinatorError
from coordinator.inventory import Inventory
from coordinator.mig import slice_index
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.lease_usage import DEFAULT_USAGE_RETENTION_S
from coordinator.model import (
    ALLOCATED,
    EXPIRED,
    LOST,
    MIG_ANY,
    QUEUED,
    RELEASED,
    Allocation,
    AllocationRequest,
    GpuRef,
    GpuView,
    Requirements,
)
from coordinator.raft import NotLeader, RaftCore, Role
from coordinator.raft_config import RaftConfig
from coordinator.raft_messages import Entry, EntryType, Snapshot
from coordinator.queues import QueuePolicy
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.sim.raft_cluster import GONE, UP, Proposal, RaftCluster, SafetyViolation, SimNode, StateMachine

# Lease time per Raft tick: the production tick (RaftConfig.lan) is 100 ms.
SECONDS_PER_TICK = 0.1
# No answer for a proposal within this many ticks: the client hears outcome_unknown.
PROPOSE_TIMEOUT = 15.0
# A client gives up on one attempt after this many ticks and tries another server.
CLIENT_TIMEOUT = 20.0
# Attempts per client call (the first included).
MAX_ATTEMPTS = 8
# A leader that is not ready answers no_leader after holding a request this long.
READY_WAIT = 8.0
# Tables are captured every CAPTURE_EVERY applied entries (snapshots compact to a capture).
CAPTURE_EVERY = 5
# Ticks between a ready leader's RecordUsage proposals.
USAGE_EVERY = 10.0
# The lease kinds that end a lease (LeaseEvent.kind).
_ENDS = frozenset({"released", "expired", "lost", "preempted"})

RAFT_503 = frozenset({(503, "no_leader"), (503, "not_leader"), (503, "proposal_lost"), (503, "outcome_unknown")})
# docs/api.md: the answers each call may give (status, code); None for a success.
DOCUMENTED: dict[str, frozenset[tuple[int, str | None]]] = {
    "allocate": RAFT_503
    | {
        (200, None),
        (202, None),
        (400, "unsatisfiable"),
        (409, "no_capacity"),
        (409, "request_id_used"),
        (409, "request_id_conflict"),
        (409, "queue_quota"),
        (503, "queue_full"),
    },
    "release": RAFT_503 | {(200, None), (404, "not_found")},
    "renew": RAFT_503 | {(200, None), (404, "not_found")},
}


class LeaseViolation(SafetyViolation):
    """A lease-layer property failed in the simulation."""


def lease_id(alloc: Allocation) -> str:
    """What a client holds and names for a granted lease: a gang's id, or the allocation's own."""
    return alloc.gang.gang_id if alloc.gang is not None else alloc.allocation_id


# A proposal's end: the applied result, or the 503 code the client hears.
Outcome = Union[ApplyResult, str]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a server answered one attempt of a call."""

    status: int
    code: str | None = None
    allocation: Allocation | None = None
    affected: tuple[str, ...] = ()
    # The answering server's applied index: what the answer is based on.
    index: int = 0
    server: str = ""


@dataclass
class Call:
    """One client operation; every attempt of it carries the same ids."""

    op: str  # allocate | release | renew
    service: str
    request_id: str = ""
    allocation_id: str = ""
    gpus: int = 1
    queue: bool = True
    ttl_s: float = 5.0
    priority: int = 5
    preemptible: bool = True
    # A gang: `gpus` on each of `nodes` nodes (1: an ordinary request).
    nodes: int = 1
    min_memory_mb: int = 1024
    mig_profile: str | None = None  # one MIG slice of this profile, or MIG_ANY
    share_mb: int | None = None  # a share of one GPU with this memory budget
    attempts: int = 0
    finished: bool = False
    answers: list[Answer] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.op} {self.request_id or self.allocation_id}"


Reply = Callable[[Answer], None]


def once(reply: Reply) -> Reply:
    """A server answers each attempt at most once (a timeout's 503 or the result, not both)."""
    done = [False]

    def answer(a: Answer) -> None:
        if not done[0]:
            done[0] = True
            reply(a)

    return answer


class LeaseMachine(StateMachine):
    """A server's LeaseTable, fed by committed NORMAL entries in log order."""

    def __init__(
        self,
        node_id: str,
        snapshot: Snapshot | None,
        on_apply: Callable[[LeaseMachine, Entry, Command | None, ApplyResult | None], None],
        on_capture: Callable[[int, bytes], None],
        on_usage: Callable[[LeaseMachine], None],
    ) -> None:
        self.node_id = node_id
        self._on_usage = on_usage
        self.history = []
        self._on_apply = on_apply
        self._on_capture = on_capture
        if snapshot is not None and snapshot.data:
            self.table = LeaseTable.restore(msgpack.unpackb(snapshot.data, raw=False))
            self._applied = snapshot.index
        else:
            self.table = LeaseTable()
            self._applied = snapshot.index if snapshot is not None else 0
        # The checker's own account of usage, from the entries this machine applied (a
        # restored one starts from what its snapshot holds: the entries before are gone).
        totals = self.table.usage_totals(float("-inf"))
        self.ended_gpu_seconds = sum(allocated for allocated, _ in totals.values())
        self.recorded_gpu_seconds = sum(utilized for _, utilized in totals.values())
        self._first = self._applied + 1  # entries from here on are known one by one
        self._captures: deque[tuple[int, bytes]] = deque(maxlen=6)

    @property
    def applied(self) -> int:
        return self._applied

    def apply(self, e: Entry) -> None:
        if e.index != self._applied + 1:
            raise LeaseViolation(f"{self.node_id}: applied entry {e.index} after {self._applied}")
        self._applied = e.index
        self.history.append((e.index, e.term, int(e.type), e.data))
        command: Command | None = None
        result: ApplyResult | None = None
        if e.type == EntryType.NORMAL:
            command = decode_command(e.data)
            result = self.table.apply(command)
            for event in result.events:
                if event.kind in _ENDS and event.allocation is not None:
                    held = event.at - event.allocation.allocated_at
                    # One event ends a whole gang: every member's GPUs.
                    gpus = sum(len(m.gpus) for m in event.gang or (event.allocation,))
                    self.ended_gpu_seconds += gpus * max(0.0, held)
            if isinstance(command, RecordUsage) and result.ok:
                self.recorded_gpu_seconds += sum(row[2] for row in command.rows)
            self._on_usage(self)
        if e.index % CAPTURE_EVERY == 0:
            data: bytes = msgpack.packb(self.table.snapshot(), use_bin_type=True)
            self._captures.append((e.index, data))
            self._on_capture(e.index, data)
        self._on_apply(self, e, command, result)

    def snapshot_at(self, index: int) -> tuple[int, bytes] | None:
        points = [c for c in self._captures if c[0] <= index]
        return points[-1] if points else None

    def holds(self, index: int, term: int, data: bytes) -> bool:
        if index > self._applied:
            return False
        if index < self._first:
            return True  # inside the snapshot it was restored from
        return self.history[index - self._first] == (index, term, int(EntryType.NORMAL), data)

    def state(self) -> object:
        return self.table.snapshot()


@dataclass
class InFlight:
    """A proposal of a shell, until its index applies on its server (or its life ends)."""

    node: str
    life: int
    index: int
    term: int
    command: Command
    admission: Admission | None
    done: Callable[[Outcome], None]
    resolved: bool = False


@dataclass
class Shell:
    """One server's lease service, for one life of that server."""

    node_id: str
    life: int
    admission: Admission | None = None
    term: int = 0
    # Requests that reached this leader before it was ready: (give-up time, call, reply).
    waiting_ready: list[tuple[float, Call, Reply]] = field(default_factory=list)
    # Requests whose request id another request of this admission is handling (WAIT).
    waiters: dict[str, list[tuple[Call, Reply]]] = field(default_factory=dict)
    tick_in_flight: bool = False


# Layouts of the MIG hosts' GPUs, GPU i taking layout i mod 3: (profile, memory MiB) per slice.
MIG_LAYOUTS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("3g.40gb", 40192), ("2g.20gb", 19968), ("1g.10gb", 9728), ("1g.10gb", 9728)),
    (("7g.80gb", 80896),),
    (("1g.10gb", 9728),) * 7,
)


def mig_slices(node: str, gpu: int, layout: tuple[tuple[str, int], ...]) -> list[GpuView]:
    """The views an A100 80GB in MIG mode gives the inventory: one per slice."""
    return [
        GpuView(
            node,
            slice_index(gpu, i),
            f"MIG-{node}-{gpu}-{i}",
            f"NVIDIA A100-SXM4-80GB MIG {profile}",
            memory_mb,
            mig_profile=profile,
            parent_uuid=f"GPU-{node}-{gpu}",
        )
        for i, (profile, memory_mb) in enumerate(layout)
    ]


class LeaseCluster:
    """Lease tables and lease services on a seeded Raft world; see the module docstring."""

    def __init__(
        self,
        seed: int,
        n: int,
        config: RaftConfig,
        *,
        hosts: int = 3,
        gpus_per_host: int = 4,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[float, float] = (0.05, 0.5),
        scheduler: SchedulerConfig = SchedulerConfig(queue_timeout_s=3.0, max_queue=40),
        ready_gate: bool = True,
        queue_policy: QueuePolicy | None = None,
        mig_hosts: int = 0,
    ) -> None:
        self.raft = RaftCluster(seed, n, config, loss=loss, duplicate=duplicate, delay=delay, machine=self._machine)
        self.seed = seed
        self.rng = self.raft.rng
        self.scheduler_config = scheduler
        # False only to prove the checker: leaders decide before leader_ready.
        self.ready_gate = ready_gate
        # With a policy, each ready leader proposes it (as the agent does from its config).
        self.queue_policy = queue_policy
        # Preemption deadlines as applied: allocation id -> deadline (equal on every server).
        self.preempt_deadlines: dict[str, float] = {}
        # The last `mig_hosts` hosts have their GPUs in MIG mode: only the slices are views.
        # One host at least keeps whole GPUs, for settle()'s probe.
        mig_hosts = min(mig_hosts, hosts - 1)
        self.views = [
            view
            for h in range(hosts)
            for i in range(gpus_per_host)
            for view in (
                mig_slices(f"gpu-{h}", i, MIG_LAYOUTS[i % len(MIG_LAYOUTS)])
                if h >= hosts - mig_hosts
                else [GpuView(f"gpu-{h}", i, f"GPU-{h}-{i}", "NVIDIA H100 80GB HBM3", 81559)]
            )
        ]
        self.shells: dict[str, Shell] = {}
        self.inflight: dict[tuple[str, int, int], InFlight] = {}
        self.calls: list[Call] = []
        self.stats: Counter[str] = Counter()
        # The checker's memory.
        self.allocated: dict[str, str] = {}  # request id → the one allocation id any server applied
        self.acks: dict[str, tuple[str, int]] = {}  # request id → (acked allocation id, index it rests on)
        self.queued_acks: dict[str, int] = {}  # request id → index of its first 202
        self.renewals: dict[str, tuple[str, float, int]] = {}  # allocation id → (request id, acked expiry, index)
        self.captures: dict[int, bytes] = {}
        self.usage_captures: dict[int, object] = {}
        self._checked: dict[str, tuple[int, int, int]] = {}
        self._seq = 0
        # What a client does once a call ends (the workload sets it).
        self.on_finished: Callable[[Call, Answer], None] = lambda call, answer: None
        self.raft.after_event.append(self._after_event)
        self.raft.at(0.5, self._scheduler_tick)
        self.raft.at(USAGE_EVERY, self._usage_tick)

    # --- time and state ----------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.raft.now

    def clock(self) -> float:
        """The lease clock in seconds: what commands carry as `at`."""
        return self.raft.now * SECONDS_PER_TICK

    def table(self, node_id: str) -> LeaseTable:
        machine = self.raft.nodes[node_id].machine
        assert isinstance(machine, LeaseMachine)
        return machine.table

    def applied(self, node_id: str) -> int:
        return self.raft.nodes[node_id].machine.applied

    def inventory(self, table: LeaseTable) -> Inventory:
        """The GPUs as the scheduler sees them: the fixed views, with the table's drains."""
        drained = table.drained()
        return Inventory.of(replace(v, drained=True) if v.ref in drained else v for v in self.views)

    def run_until(self, time: float) -> None:
        self.raft.run_until(time)

    def later(self, delay: float, action: Callable[[], None]) -> None:
        self.raft.at(self.raft.now + delay, action)

    def violation(self, text: str) -> LeaseViolation:
        self.raft._log(f"VIOLATION {text}")
        return LeaseViolation(text)

    # --- the state machine's hooks ------------------------------------------------------------

    def _machine(self, node: SimNode, snapshot: Snapshot | None) -> StateMachine:
        if snapshot is not None:
            # A snapshot replaced this server's log: whether its proposals up to there
            # were applied cannot be known here any more.
            for key, p in list(self.inflight.items()):
                if p.node == node.id and p.index <= snapshot.index:
                    del self.inflight[key]
                    self.later(0.0, partial(self._resolve, p, "outcome_unknown"))
        return LeaseMachine(node.id, snapshot, self._applied, self._captured, self._check_usage)

    def _captured(self, index: int, data: bytes) -> None:
        if self.captures.setdefault(index, data) != data:
            raise self.violation(f"two servers' tables differ at index {index}")

    def _check_usage(self, machine: LeaseMachine) -> None:
        """The usage invariants of the module docstring, on one server after one entry."""
        table = machine.table
        clock = table.clock
        totals = table.usage_totals(clock)
        running = sum(len(a.gpus) * (clock - a.allocated_at) for a in table.allocations() if clock > a.allocated_at)
        allocated = sum(a for a, _ in totals.values())
        utilized = sum(u for _, u in totals.values())
        if not math.isclose(allocated, machine.ended_gpu_seconds + running, rel_tol=1e-9, abs_tol=1e-6):
            raise self.violation(
                f"{machine.node_id} (applied {machine.applied}): {allocated} GPU-seconds allocated, "
                f"but the ended leases held {machine.ended_gpu_seconds} and the live ones {running}"
            )
        if not math.isclose(utilized, machine.recorded_gpu_seconds, rel_tol=1e-9, abs_tol=1e-6):
            raise self.violation(
                f"{machine.node_id} (applied {machine.applied}): {utilized} GPU-seconds utilized, "
                f"{machine.recorded_gpu_seconds} recorded"
            )
        if machine.applied % CAPTURE_EVERY == 0:
            seen = (table.usage(0.0, clock + 3600.0, "service", now=clock), sorted(totals.items()))
            if self.usage_captures.setdefault(machine.applied, seen) != seen:
                raise self.violation(f"two servers' usage differs at index {machine.applied}")

    def _applied(self, machine: LeaseMachine, e: Entry, command: Command | None, result: ApplyResult | None) -> None:
        if result is not None and result.ok and self.queue_policy is not None:
            self._check_queue_rules(machine, command, result)
        if isinstance(command, Allocate) and result is not None and result.ok:
            alloc = command.allocation
            rid = alloc.request.request_id
            known = self.allocated.setdefault(rid, lease_id(alloc))
            if known != lease_id(alloc):
                raise self.violation(f"request {rid} got two allocations: {known} and {lease_id(alloc)}")
        node = self.raft.nodes[machine.node_id]
        p = self.inflight.pop((node.id, node.life, e.index), None)
        if p is None:
            return
        if e.term == p.term:
            if command != p.command:
                raise self.violation(f"{node.id}: entry {e.index} of term {e.term} is not the one proposed")
            assert result is not None
            outcome: Outcome = result
        else:
            outcome = "proposal_lost"
        # Answered after this Ready (the shell never calls the core between ready and advance).
        self.later(0.0, lambda: self._resolve(p, outcome))

    def _check_queue_rules(self, machine: LeaseMachine, command: Command | None, result: ApplyResult) -> None:
        """The queue invariants, on one server after one applied entry (module docstring)."""
        table = machine.table
        policy = table.queue_policy
        ledger = table.queue_ledger
        if isinstance(command, Allocate):
            # No allocation ever takes a queue past its cap (leases granted before a
            # policy lowered it may stay above until they end).
            name = command.allocation.request.queue_name
            for queue in (name, policy.parent_of(name)):
                if queue is None or policy.spec(queue).max_gpus is None:
                    continue
                held = sum(ledger.gpus[m] for m in (policy.children(queue) or (queue,)))
                if held > (policy.spec(queue).max_gpus or 0):
                    raise self.violation(
                        f"{machine.node_id}: an allocation takes queue {queue} to {held} > max_gpus "
                        f"{policy.spec(queue).max_gpus}"
                    )
        if isinstance(command, Preempt):
            claimant = None if command.request_id is None else table.queued(command.request_id)
            own = None if claimant is None else claimant.request.queue_name
            taken: Counter[str] = Counter()
            # A gang member named takes its whole gang (the table widens the victims).
            victims = {m.allocation_id: d for i, d in command.victims for m in table.lease_unit(i)}
            for allocation_id, deadline in victims.items():
                alloc = table.allocation(allocation_id)
                assert alloc is not None
                if not alloc.request.preemptible:
                    raise self.violation(f"{machine.node_id}: non-preemptible {allocation_id} preempted")
                if alloc.request.queue_name != own:
                    taken[alloc.request.queue_name] += len(alloc.gpus)
                known = self.preempt_deadlines.setdefault(allocation_id, deadline)
                if known != deadline:
                    raise self.violation(f"{allocation_id} preempted twice: deadlines {known} and {deadline}")
            if command.reason != "idle":
                # Work within its queue's guarantee is never taken for another queue, counting
                # every lease of the queue now in its grace period as gone (this command's and
                # earlier ones'): two preemptions may not each take what only one could.
                for queue in taken:
                    kept = sum(
                        len(a.gpus)
                        for i in ledger.leases.get(queue, ())
                        if (a := table.allocation(i)) is not None and table.preempting(i) is None
                    )
                    # A GPU the queue has shares on counts once (shares are never victims).
                    kept += len(
                        {a.gpus[0].ref for a in table.allocations() if a.share_group is not None and a.request.queue_name == queue}
                    )
                    if kept < policy.spec(queue).guarantee:
                        raise self.violation(
                            f"{machine.node_id}: a preemption leaves queue {queue} {kept} GPU(s) not in their "
                            f"grace period, below its guarantee {policy.spec(queue).guarantee}"
                        )
        for event in result.events:
            if event.kind == "preempted" and event.allocation is not None:
                ended_by = self.preempt_deadlines.get(event.allocation.allocation_id)
                if ended_by is None or event.at < ended_by:
                    raise self.violation(
                        f"{machine.node_id}: {event.allocation.allocation_id} ended as preempted at {event.at}, "
                        f"before its deadline {ended_by}"
                    )

    def _resolve(self, p: InFlight, outcome: Outcome) -> None:
        if p.resolved or self.raft.nodes[p.node].life != p.life:
            return  # answered already, or the server died first: its clients time out
        p.resolved = True
        if p.admission is not None:
            p.admission.settle(p.command)
        p.done(outcome)

    # --- shells -------------------------------------------------------------------------------

    def _after_event(self) -> None:
        self._sync_shells()
        self._check()

    def _sync_shells(self) -> None:
        for node in self.raft.nodes.values():
            shell = self.shells.get(node.id)
            if node.state != UP:
                if shell is not None:
                    self._drop_shell(shell)
                continue
            if shell is None or shell.life != node.life:
                if shell is not None:
                    self._drop_shell(shell)
                shell = self.shells[node.id] = Shell(node.id, node.life)
            core = node.core
            assert core is not None
            ready = core.role is Role.LEADER and (core.leader_ready or not self.ready_gate)
            if ready and (shell.admission is None or shell.term != core.term):
                self._end_leadership(shell)
                rng = random.Random(self.rng.random())
                shell.admission = Admission(Scheduler(self.scheduler_config, rng))
                shell.term = core.term
                self.stats["admissions"] += 1
                parked, shell.waiting_ready = shell.waiting_ready, []
                for _, call, reply in parked:
                    self.later(0.0, partial(self._serve, shell, call, reply))
            elif not ready and shell.admission is not None:
                self._end_leadership(shell)
            if shell.waiting_ready:
                keep = []
                for give_up, call, reply in shell.waiting_ready:
                    if core.role is not Role.LEADER:
                        reply(Answer(503, "not_leader", server=node.id))
                    elif give_up <= self.now:
                        reply(Answer(503, "no_leader", server=node.id))
                    else:
                        keep.append((give_up, call, reply))
                shell.waiting_ready = keep

    def _drop_shell(self, shell: Shell) -> None:
        """The server crashed: whatever this life held is gone, and nobody answers its clients."""
        del self.shells[shell.node_id]
        for key in [k for k in self.inflight if k[0] == shell.node_id and k[1] == shell.life]:
            del self.inflight[key]

    def _end_leadership(self, shell: Shell) -> None:
        """Drop the admission: requests waiting on it are answered not_leader; proposals in
        flight still end when their index applies (or times out)."""
        if shell.admission is None:
            return
        shell.admission = None
        shell.tick_in_flight = False
        waiters, shell.waiters = shell.waiters, {}
        for parked in waiters.values():
            for _, reply in parked:
                reply(Answer(503, "not_leader", server=shell.node_id))

    def _serving(self, shell: Shell) -> Admission | None:
        """The shell's admission while its server still leads that term; else None."""
        node = self.raft.nodes[shell.node_id]
        if (
            shell.admission is None
            or node.state != UP
            or node.life != shell.life
            or node.core is None
            or node.core.role is not Role.LEADER
            or node.core.term != shell.term
        ):
            return None
        return shell.admission

    def _propose(
        self,
        shell: Shell,
        commands: list[Command],
        dones: list[Callable[[Outcome], None]],
        admission: Admission | None,
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        """Propose `commands` as consecutive entries on the shell's server, behind its disk.

        Each `done` gets its command's outcome. A proposal that reaches the core after
        leadership of the deciding term ended gets not_leader (nothing is appended).
        """
        term = shell.term

        def run(core: RaftCore, node: SimNode) -> None:
            proposed = 0
            try:
                if core.role is not Role.LEADER or core.term != term:
                    raise NotLeader(core.lead, f"decided in term {term}, now term {core.term}")
                for command, done in zip(commands, dones):
                    data = encode_command(command)
                    index, t = core.propose(data)
                    p = InFlight(node.id, node.life, index, t, command, admission, done)
                    self.inflight[(node.id, node.life, index)] = p
                    self.raft.proposals[(node.id, node.life, index)] = Proposal(node.id, node.life, index, t, data)
                    if on_timeout is not None:
                        self.later(PROPOSE_TIMEOUT, partial(self._timeout, p, on_timeout))
                    proposed += 1
            except NotLeader:
                for command, done in list(zip(commands, dones))[proposed:]:
                    p = InFlight(node.id, node.life, 0, 0, command, admission, done)
                    self.later(0.0, partial(self._resolve, p, "not_leader"))

        self.raft.submit(shell.node_id, run)

    @staticmethod
    def _timeout(p: InFlight, on_timeout: Callable[[], None]) -> None:
        if not p.resolved:
            on_timeout()

    # --- the lease service --------------------------------------------------------------------

    def _serve(self, shell: Shell, call: Call, reply: Reply) -> None:
        admission = self._serving(shell)
        if admission is None:
            reply(Answer(503, "not_leader", server=shell.node_id))
        elif call.op == "allocate":
            self._allocate(shell, admission, call, reply)
        elif call.op == "release":
            self._release(shell, call, reply)
        else:
            self._renew(shell, call, reply)

    def _answer(
        self,
        shell: Shell,
        status: int,
        code: str | None = None,
        *,
        allocation: Allocation | None = None,
        affected: tuple[str, ...] = (),
    ) -> Answer:
        return Answer(status, code, allocation, affected, index=self.applied(shell.node_id), server=shell.node_id)

    def _error(self, shell: Shell, exc: CoordinatorError) -> Answer:
        return self._answer(shell, exc.http_status, exc.code)

    def _outcome(self, shell: Shell, outcome: AllocateOutcome) -> Answer:
        if outcome.allocation is not None:
            return self._answer(shell, 200, allocation=outcome.allocation)
        return self._answer(shell, 202)

    def _allocate(self, shell: Shell, admission: Admission, call: Call, reply: Reply) -> None:
        table = self.table(shell.node_id)
        rid = call.request_id
        try:
            step = admission.begin(rid, call.service, table)
        except CoordinatorError as exc:
            reply(self._error(shell, exc))
            return
        if step is WAIT:
            self.stats["waited_for_id"] += 1
            shell.waiters.setdefault(rid, []).append((call, reply))
            return
        if isinstance(step, Repeat):
            reply(self._outcome(shell, step.outcome))
            return
        now = self.clock()
        request = AllocationRequest(
            request_id=rid,
            service_name=call.service,
            workload_type="generic",
            priority=call.priority,
            requirements=Requirements(
                gpu_count=call.gpus,
                min_memory_mb=call.min_memory_mb,
                nodes=call.nodes,
                mig_profile=call.mig_profile,
                share_mb=call.share_mb,
            ),
            ttl_s=call.ttl_s,
            submitted_at=now,
            queue=call.queue,
            queue_name=self.queue_policy.queue_of_service(call.service) if self.queue_policy else "default",
            preemptible=call.preemptible,
        )
        try:
            command = admission.decide(request, table, self.inventory(table), now)
        except CoordinatorError as exc:
            admission.finish(rid)
            self._wake(shell, admission, rid)
            reply(self._error(shell, exc))
            return

        def done(outcome: Outcome) -> None:
            if isinstance(outcome, str):
                reply(self._answer(shell, 503, outcome))
            else:
                try:
                    answer = admission.answer(command, outcome, self.table(shell.node_id))
                except CoordinatorError as exc:
                    reply(self._error(shell, exc))
                else:
                    reply(self._outcome(shell, answer))
            admission.finish(rid)
            self._wake(shell, admission, rid)

        # On a timeout the client hears outcome_unknown, but the id and the GPUs stay held
        # until the entry's fate is known: a retry waits for it instead of deciding again.
        self._propose(
            shell, [command], [done], admission, on_timeout=lambda: reply(self._answer(shell, 503, "outcome_unknown"))
        )

    def _wake(self, shell: Shell, admission: Admission, rid: str) -> None:
        if shell.admission is not admission:
            return  # dropped: its waiters were answered not_leader
        for call, reply in shell.waiters.pop(rid, []):
            self.later(0.0, partial(self._serve, shell, call, reply))

    def _release(self, shell: Shell, call: Call, reply: Reply) -> None:
        table = self.table(shell.node_id)
        if call.allocation_id:
            self._release_allocation(shell, call.allocation_id, reply)
            return
        rid = call.request_id
        record = table.record(rid)
        if record is not None and record.status == QUEUED:

            def cancelled(outcome: Outcome) -> None:
                if isinstance(outcome, str):
                    reply(self._answer(shell, 503, outcome))
                elif outcome.ok:
                    reply(self._answer(shell, 200, affected=outcome.affected))
                else:
                    # Placed between the read and the Cancel: release that (lease_service.release_request).
                    self._release_request_allocation(shell, rid, reply)

            self._propose(
                shell,
                [Cancel(self.clock(), (rid,))],
                [cancelled],
                None,
                on_timeout=lambda: reply(self._answer(shell, 503, "outcome_unknown")),
            )
            return
        self._release_request_allocation(shell, rid, reply)

    def _release_request_allocation(self, shell: Shell, rid: str, reply: Reply) -> None:
        if self._serving(shell) is None:
            reply(self._answer(shell, 503, "not_leader"))
            return
        record = self.table(shell.node_id).record(rid)
        if record is not None and record.status == ALLOCATED and record.allocation_id:
            self._release_allocation(shell, record.allocation_id, reply)
        else:
            reply(self._answer(shell, 404, "not_found"))

    def _release_allocation(self, shell: Shell, aid: str, reply: Reply) -> None:
        if not self.table(shell.node_id).lease_unit(aid):
            reply(self._answer(shell, 404, "not_found"))
            return

        def released(outcome: Outcome) -> None:
            if isinstance(outcome, str):
                reply(self._answer(shell, 503, outcome))
            elif outcome.error is not None:
                reply(self._error(shell, outcome.error))
            else:
                reply(self._answer(shell, 200, affected=outcome.affected))

        self._propose(
            shell,
            [Release(self.clock(), (aid,))],
            [released],
            None,
            on_timeout=lambda: reply(self._answer(shell, 503, "outcome_unknown")),
        )

    def _renew(self, shell: Shell, call: Call, reply: Reply) -> None:
        now = self.clock()
        aid = call.allocation_id

        def renewed(outcome: Outcome) -> None:
            if isinstance(outcome, str):
                reply(self._answer(shell, 503, outcome))
            elif outcome.error is not None:
                # lease_service.renew: an expired lease (Conflict lease_expired) is 404 too.
                code = "not_found" if isinstance(outcome.error, Conflict) else outcome.error.code
                reply(self._answer(shell, 404 if code == "not_found" else outcome.error.http_status, code))
            else:
                unit = self.table(shell.node_id).lease_unit(aid)
                if not unit:
                    reply(self._answer(shell, 404, "not_found"))
                else:
                    reply(self._answer(shell, 200, allocation=unit[0]))

        self._propose(
            shell,
            [Renew(now, aid, now + call.ttl_s)],
            [renewed],
            None,
            on_timeout=lambda: reply(self._answer(shell, 503, "outcome_unknown")),
        )

    def _scheduler_tick(self) -> None:
        """Every tick, each ready leader proposes what its scheduler finds due."""
        for shell in list(self.shells.values()):
            admission = self._serving(shell)
            if admission is None or shell.tick_in_flight:
                continue
            table = self.table(shell.node_id)
            commands: list[Command] = []
            if self.queue_policy is not None and table.queue_policy != self.queue_policy:
                commands.append(SetQueuePolicy(self.clock(), self.queue_policy))
            commands += admission.tick(table, self.inventory(table), self.clock())
            if not commands:
                continue
            shell.tick_in_flight = True
            left = [len(commands)]

            def done(
                outcome: Outcome, shell: Shell = shell, admission: Admission = admission, left: list[int] = left
            ) -> None:
                left[0] -= 1
                if left[0] == 0 and shell.admission is admission:
                    shell.tick_in_flight = False

            self.stats["tick_batches"] += 1
            self._propose(shell, commands, [done] * len(commands), admission)
        self.later(1.0, self._scheduler_tick)

    def _usage_tick(self) -> None:
        """Every USAGE_EVERY ticks, each ready leader records utilized GPU-seconds (half of what
        its live leases held since the last record), as agent/usage_recorder.py does."""
        for shell in list(self.shells.values()):
            if self._serving(shell) is None:
                continue
            now = self.clock()
            sums: dict[tuple[str, str], float] = {}
            for alloc in self.table(shell.node_id).allocations():
                key = (alloc.request.queue_name, alloc.request.service_name)
                held = now - max(alloc.allocated_at, now - USAGE_EVERY * SECONDS_PER_TICK)
                sums[key] = sums.get(key, 0.0) + 0.5 * len(alloc.gpus) * max(0.0, held)
            rows = tuple((q, s, sums[(q, s)]) for q, s in sorted(sums))
            if rows:
                self.stats["usage_records"] += 1
                command = RecordUsage(now, rows, DEFAULT_USAGE_RETENTION_S)
                self._propose(shell, [command], [lambda outcome: None], None)
        self.later(USAGE_EVERY, self._usage_tick)

    def operator(self, kind: str) -> None:
        """An operator's (or the host-loss watcher's) change through the ready leader, if any:
        drain or undrain a random GPU, or mark a host's leases lost."""
        for shell in self.shells.values():
            if self._serving(shell) is None:
                continue
            now = self.clock()
            command: Command
            if kind == "drain":
                view = self.rng.choice(self.views)
                drained = view.ref not in self.table(shell.node_id).drained()
                command = SetDrain(now, view.node, view.index, drained, "sim")
            else:
                host = self.rng.choice(self.views).node
                command = MarkHostLost(now, host, allocated_before=now)
            self.stats[kind] += 1
            self._propose(shell, [command], [lambda outcome: None], None)
            return

    # --- clients ------------------------------------------------------------------------------

    def new_request_id(self) -> str:
        self._seq += 1
        return f"r{self._seq}"

    def call(self, call: Call, first: str | None = None, *, at_once: bool = False) -> Call:
        """Start a client call: its first attempt goes to `first` (default: a random server),
        arriving there within this event when `at_once`."""
        self._attempt(self._track(call), first=first, at_once=at_once)
        return call

    def call_later(self, delay: float, call: Call) -> None:
        self.later(delay, lambda: self._attempt(self._track(call)))

    def _track(self, call: Call) -> Call:
        self.calls.append(call)
        return call

    def _attempt(self, call: Call, *, first: str | None = None, avoid: str | None = None, at_once: bool = False) -> None:
        call.attempts += 1
        if call.attempts > MAX_ATTEMPTS:
            call.finished = True
            self.stats["calls_abandoned"] += 1
            return
        names = [v for v, node in self.raft.nodes.items() if node.state != GONE]
        target = first or self.rng.choice([v for v in names if v != avoid] or names)
        attempt = call.attempts

        def reply(answer: Answer) -> None:
            self.later(self.rng.uniform(*self.raft.delay), lambda: self._receive(call, attempt, target, answer))

        if at_once:
            self._arrive(target, call, once(reply), forwarded=False)
        else:
            self.later(self.rng.uniform(*self.raft.delay), lambda: self._arrive(target, call, once(reply), forwarded=False))
        self.later(CLIENT_TIMEOUT, lambda: self._timed_out(call, attempt, target))

    def _arrive(self, node_id: str, call: Call, reply: Reply, *, forwarded: bool) -> None:
        node = self.raft.nodes[node_id]
        if node.state != UP or node.core is None:
            return  # nobody listens: the client times out
        reply = self._audited(call, reply)
        core = node.core
        shell = self.shells.get(node_id)
        if core.role is Role.LEADER and shell is not None:
            if self._serving(shell) is not None:
                self._serve(shell, call, reply)
            else:
                self.stats["waited_for_ready"] += 1
                shell.waiting_ready.append((self.now + READY_WAIT, call, reply))
            return
        lead = core.lead
        if forwarded or lead is None or lead == node_id:
            reply(Answer(503, "no_leader", index=node.machine.applied, server=node_id))
            return
        life = node.life

        def back(answer: Answer) -> None:  # the leader's answer, relayed by this server
            def relay() -> None:
                if node.state == UP and node.life == life:
                    reply(answer)

            self._hop(lead, node_id, relay)

        self.stats["forwarded"] += 1
        self._hop(node_id, lead, lambda: self._arrive(lead, call, once(back), forwarded=True))

    def _hop(self, a: str, b: str, action: Callable[[], None]) -> None:
        """One server-to-server message of the HTTP layer: partitions and loss apply."""
        if (a, b) in self.raft.blocked or self.rng.random() < self.raft.loss:
            return

        def deliver() -> None:
            if (a, b) not in self.raft.blocked:
                action()

        self.later(self.rng.uniform(*self.raft.delay), deliver)

    def _timed_out(self, call: Call, attempt: int, target: str) -> None:
        if not call.finished and call.attempts == attempt:
            self.stats["client_timeouts"] += 1
            self._attempt(call, avoid=target)

    def _receive(self, call: Call, attempt: int, server: str, answer: Answer) -> None:
        self._check_answer(call, answer)
        call.answers.append(answer)
        self.stats[f"{call.op}_{answer.status}_{answer.code or 'ok'}"] += 1
        if call.finished or call.attempts != attempt:
            return  # a late answer: checked and counted, but the client moved on
        if answer.status == 503 and answer.code != "queue_full":
            self.later(self.rng.uniform(1.0, 4.0), lambda: self._attempt(call, avoid=server))
            return
        call.finished = True
        self.on_finished(call, answer)

    # --- the checker --------------------------------------------------------------------------

    def _audited(self, call: Call, reply: Reply) -> Reply:
        """Check each answer as a server gives it, so one lost on its way back counts too."""

        def audited(answer: Answer) -> None:
            self._check_answer(call, answer)
            reply(answer)

        return audited

    def _check_answer(self, call: Call, answer: Answer) -> None:
        if (answer.status, answer.code) not in DOCUMENTED[call.op]:
            raise self.violation(
                f"{call} answered {answer.status} {answer.code} by {answer.server}: not an answer docs/api.md lists"
            )
        if call.op == "allocate" and answer.status == 200:
            alloc = answer.allocation
            assert alloc is not None
            rid = call.request_id
            # Only the id (and its service) must match: a repeat answers the first request
            # with this id, whatever the retry's body says (docs/api.md, Idempotency).
            if alloc.request.request_id != rid or alloc.request.service_name != call.service:
                raise self.violation(f"{call} of {call.service} answered with {alloc.allocation_id} of another request")
            aid = lease_id(alloc)
            if self.allocated.get(rid) != aid:
                raise self.violation(f"{call} answered {aid}, but {self.allocated.get(rid)} was applied")
            acked = self.acks.setdefault(rid, (aid, answer.index))
            if acked[0] != aid:
                raise self.violation(f"{call} acknowledged two allocations: {acked[0]} and {aid}")
        elif call.op == "allocate" and answer.status == 202:
            self.queued_acks.setdefault(call.request_id, answer.index)
        elif call.op == "renew" and answer.status == 200:
            alloc = answer.allocation
            assert alloc is not None and lease_id(alloc) == call.allocation_id
            expiry = alloc.expires_at if alloc.expires_at is not None else float("inf")
            # The latest expiry acknowledged: the workload renews a lease with one TTL, so
            # retries (later `at`) only move it later.
            before = self.renewals.get(call.allocation_id)
            if before is None or before[1] < expiry:
                self.renewals[call.allocation_id] = (alloc.request.request_id, expiry, answer.index)

    def _check(self) -> None:
        """Per-event table checks on every live server, re-run when its table or the acks changed."""
        marks = len(self.acks) + len(self.queued_acks) + len(self.renewals)
        for node in self.raft.up():
            machine = node.machine
            assert isinstance(machine, LeaseMachine)
            key = (id(machine), machine.applied, marks)
            if self._checked.get(node.id) == key:
                continue
            self._checked[node.id] = key
            self.check_table(node.id)

    def check_table(self, node_id: str) -> None:
        """No GPU under two leases; every acknowledgement the table's applied index covers holds."""
        table = self.table(node_id)
        applied = self.applied(node_id)
        held: dict[GpuRef, str] = {}
        for alloc in table.allocations():
            if alloc.share_group is not None:
                held.setdefault(alloc.gpus[0].ref, "shares")  # checked in _check_shares
                continue
            for gpu in alloc.gpus:
                other = held.setdefault(gpu.ref, alloc.allocation_id)
                if other != alloc.allocation_id:
                    raise self.violation(f"{node_id}: GPU {gpu.ref} held by {other} and {alloc.allocation_id}")
                if table.holder(gpu.ref) != alloc.allocation_id:
                    raise self.violation(f"{node_id}: GPU {gpu.ref} of {alloc.allocation_id} has holder {table.holder(gpu.ref)}")
        if len(held) != len(table.held_gpus()):
            raise self.violation(f"{node_id}: the holder map names GPUs no live lease holds")
        self._check_gangs_whole(node_id, table)
        self._check_devices(node_id, table)
        self._check_shares(node_id, table)
        for rid, (aid, index) in self.acks.items():
            if index > applied or table.lease_unit(aid):
                continue
            record = table.record(rid)
            if record is None or record.allocation_id != aid or record.status not in (RELEASED, EXPIRED, LOST):
                raise self.violation(
                    f"{node_id} (applied {applied}): acknowledged allocation {aid} of {rid} (at {index}) is gone: {record}"
                )
        for rid, index in self.queued_acks.items():
            if index <= applied and table.record(rid) is None:
                raise self.violation(f"{node_id} (applied {applied}): queued request {rid} (at {index}) has no record")
        for aid, (rid, expiry, index) in self.renewals.items():
            record = table.record(rid)
            if (
                index <= applied
                and record is not None
                and record.status == EXPIRED
                and record.allocation_id == aid
                and record.updated_at < expiry
            ):
                raise self.violation(f"{node_id}: {aid} expired at {record.updated_at}, renewed until {expiry}")

    def _check_gangs_whole(self, node_id: str, table: LeaseTable) -> None:
        """A gang is whole or absent in `table` (module docstring)."""
        gangs: dict[str, list[Allocation]] = {}
        for alloc in table.allocations():
            if alloc.gang is not None:
                gangs.setdefault(alloc.gang.gang_id, []).append(alloc)
        if len(gangs) != table.gang_count():
            raise self.violation(f"{node_id}: {table.gang_count()} gangs indexed, {len(gangs)} with live members")
        for gang_id, members in gangs.items():
            indexed = table.gang(gang_id)
            first = members[0]
            assert first.gang is not None
            ranks = sorted(m.gang.rank for m in members if m.gang is not None)
            if (
                indexed is None
                or sorted(m.allocation_id for m in indexed) != sorted(m.allocation_id for m in members)
                or ranks != list(range(first.gang.size))
                or len({m.node for m in members}) != len(members)
                or len({m.expires_at for m in members}) != 1
                or len({table.preempting(m.allocation_id) for m in members}) != 1
            ):
                raise self.violation(f"{node_id}: gang {gang_id} is not whole: {[m.allocation_id for m in members]}")
            record = table.record(first.request.request_id)
            if record is None or record.status != ALLOCATED or record.allocation_id != gang_id:
                raise self.violation(f"{node_id}: live gang {gang_id} has record {record}")

    def _check_shares(self, node_id: str, table: LeaseTable) -> None:
        """The share invariants of the module docstring, recounted from the leases, not the table's indexes."""
        views = {v.ref: v for v in self.views}
        shares: dict[GpuRef, list[Allocation]] = {}
        whole: set[GpuRef] = set()
        per_queue: dict[str, set[GpuRef]] = {}
        for alloc in table.allocations():
            if alloc.share_group is not None:
                shares.setdefault(alloc.gpus[0].ref, []).append(alloc)
            else:
                whole.update(g.ref for g in alloc.gpus)
            # Each (queue, GPU) once: a shared GPU counts once per queue with a share there.
            per_queue.setdefault(alloc.request.queue_name, set()).update(g.ref for g in alloc.gpus)
        for ref, tenants in shares.items():
            budget = sum(t.request.requirements.share_mb or 0 for t in tenants)
            total = views[ref].memory_total_mb
            if budget > total:
                raise self.violation(f"{node_id}: GPU {ref} oversubscribed by shares: {budget} MB > {total} MB")
            if ref in whole:
                raise self.violation(f"{node_id}: GPU {ref} leased whole and in shares")
            if len({t.share_group for t in tenants}) != 1:
                raise self.violation(f"{node_id}: GPU {ref} shared by groups {sorted({str(t.share_group) for t in tenants})}")
            if table.holder(ref) not in {t.allocation_id for t in tenants}:
                raise self.violation(f"{node_id}: shared GPU {ref} has holder {table.holder(ref)}")
        counted = {q: n for q, n in table.queue_ledger.gpus.items() if n}
        recounted = {q: len(refs) for q, refs in per_queue.items() if refs}
        if counted != recounted:
            # The cap check after each Allocate (_check_queue_rules) reads these counts:
            # equal to the recount, a share can never slip a queue past max_gpus.
            raise self.violation(f"{node_id}: queues count {counted} GPUs, their leases hold {recounted}")

    def _check_devices(self, node_id: str, table: LeaseTable) -> None:
        """The MIG invariants of the module docstring, on one server's table."""
        by_uuid: dict[str, str] = {}
        whole: dict[str, str] = {}  # GPU UUID -> the lease holding it whole
        sliced: dict[str, str] = {}  # GPU UUID -> a lease holding a slice of it
        views = {v.ref: v for v in self.views}
        for alloc in table.allocations():
            wanted = alloc.request.requirements
            if alloc.share_group is not None:
                # Shares of a device are many leases by design: _check_shares judges them.
                by_uuid.setdefault(alloc.gpus[0].uuid, "shares")
                continue
            for gpu in alloc.gpus:
                other = by_uuid.setdefault(gpu.uuid, alloc.allocation_id)
                if other != alloc.allocation_id:
                    raise self.violation(f"{node_id}: device {gpu.uuid} in leases {other} and {alloc.allocation_id}")
                view = views.get(gpu.ref)
                if view is None or view.uuid != gpu.uuid or view.mig_profile != gpu.mig_profile:
                    raise self.violation(f"{node_id}: {alloc.allocation_id} holds {gpu}, which is no unit of the cluster")
                if gpu.mig_profile is None:
                    if wanted.mig_profile is not None:
                        raise self.violation(f"{node_id}: slice request {alloc.allocation_id} holds whole GPU {gpu.uuid}")
                    whole[gpu.uuid] = alloc.allocation_id
                    continue
                # Judged apart from Requirements.matches_unit, so a bug there cannot hide here.
                if wanted.mig_profile not in (MIG_ANY, gpu.mig_profile) or gpu.memory_total_mb < wanted.min_memory_mb:
                    raise self.violation(
                        f"{node_id}: {alloc.allocation_id} asked {wanted.mig_profile!r} and holds a {gpu.mig_profile} slice"
                    )
                if len(alloc.gpus) != 1:
                    raise self.violation(f"{node_id}: {alloc.allocation_id} holds {len(alloc.gpus)} slices")
                sliced[gpu.parent_uuid or ""] = alloc.allocation_id
        for parent, holder in sliced.items():
            if parent in whole:
                raise self.violation(f"{node_id}: GPU {parent} leased whole by {whole[parent]} and in slices by {holder}")

    def settle(self) -> None:
        """Heal the world, let the clients finish, and check the end state (module docstring)."""
        marker = encode_command(SetDrain(self.clock(), self.views[0].node, 0, False, f"settle {self.seed}"))
        self.raft.settle(marker=marker)
        self.run_until(self.now + CLIENT_TIMEOUT * MAX_ATTEMPTS / 2)
        leader = self.raft.leader()
        if leader is None or leader.core is None or not leader.core.leader_ready:
            raise self.violation("no ready leader after healing")
        # Let the final leader's entries reach every voter, then compare the tables.
        for _ in range(40):
            target = leader.core.log.committed
            if all(self.applied(v) == target for v in self.raft.committed_voters()):
                break
            self.run_until(self.now + 1.0)
        else:
            raise self.violation(f"the voters' tables do not converge on the leader {leader.id}'s")
        self.check_table(leader.id)
        for v in self.raft.committed_voters():
            if self.raft.nodes[v].machine.state() != leader.machine.state():
                raise self.violation(f"{v}'s table differs from the leader {leader.id}'s after healing")
        probe = self.call(Call("allocate", "probe", request_id=f"probe-{self.seed}", ttl_s=60.0))
        self.run_until(self.now + CLIENT_TIMEOUT * 2)
        if not probe.answers or probe.answers[-1].status not in (200, 202):
            raise self.violation(f"a healed cluster did not serve an allocate: {probe.answers}")

