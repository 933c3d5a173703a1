"""Admission: the leader's decision on every lease request, as one pure object.

Theory of operation
-------------------
Every scheduling feature is an admission decision on the lease table, so the
decision and everything it depends on live here, in one object that takes
explicit inputs (the applied `LeaseTable`, the `Inventory` of GPUs, `now`) and
returns explicit outputs (commands to propose, answers to give). The agent only
feeds it and proposes what it decides; the whole-cluster simulation drives the
same object, so the decision is proven under partitions, loss and crashes.

What it keeps between calls is what the table cannot know yet, because a
proposal is in flight between "decided" and "applied":

- **Pending GPUs.** An `Allocate` decided but not yet applied holds its GPUs
  here (a count per GPU) until `settle` is called for it, so a second decision
  never picks the same GPU. `decide` and `tick` register their commands before
  they return, so no await can fall between deciding and registering.
- **Pending enqueues**, counted against `max_queue` the same way.
- **Unsure proposals.** A proposal whose outcome the caller could not learn
  (its wait was cut short, or the log said "outcome unknown") may still be
  applied, so its GPUs stay held (`unsure`) until the table shows its request
  id (applied, or refused and recorded by then): releasing them at once would
  let a second decision take a GPU that entry is about to take.
- **Request ids in flight.** `begin(request_id)` answers `PROCEED` once per id:
  a second call with the same id before `finish` gets `WAIT` (the caller waits
  for the first to finish and calls `begin` again), and an id the table already
  recorded gets `Repeat` with the earlier answer (idempotent retries), or a
  Conflict when that answer can no longer be given.

An `Admission` serves one leadership: the agent builds a fresh one when it
starts to lead (after an entry of its own term is applied, so the table holds
every committed write) and drops it when it stops. Nothing in it outlives a
term, so nothing a deposed leader decided can leak into the next one.

Placement itself (priority, best fit, reservations, expiries, timeouts) is the
`Scheduler`'s (coordinator/scheduler.py); this module owns the bookkeeping
around it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Union

from coordinator.commands import Allocate, Command, Enqueue
from coordinator.errors import Conflict
from coordinator.inventory import Inventory
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import ALLOCATED, QUEUED, Allocation, AllocationRequest, GpuRef, QueuedRequest
from coordinator.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class AllocateOutcome:
    """The answer to an allocate: placed (allocation) or waiting (queued, with its position)."""

    request_id: str
    allocation: Allocation | None = None
    queued: QueuedRequest | None = None
    position: int | None = None
    # True when this answer repeats an earlier request with the same request_id.
    repeated: bool = False
    # For a gang: every member lease, rank order (`allocation` is the first).
    gang: tuple[Allocation, ...] = ()


@dataclass(frozen=True, slots=True)
class Repeat:
    """`begin`: the id was handled before; give this answer again."""

    outcome: AllocateOutcome


class _Step:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


# `begin`: this caller handles the id (and must call `finish` for it).
PROCEED = _Step("PROCEED")
# `begin`: another caller is handling the id; wait for its `finish`, then begin again.
WAIT = _Step("WAIT")
# `begin`: an earlier call's proposal for the id ended without an answer and the table
# has not recorded it yet; it may still apply. Deciding again would propose a second
# command for one id (which the table refuses as a duplicate): wait for the table to
# apply more, then begin again.
UNSURE = _Step("UNSURE")

Begin = Union[_Step, Repeat]


class Admission:
    """Decides allocates and scheduler ticks for one leadership; tracks what is in flight."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._pending: dict[GpuRef, int] = {}
        self._pending_enqueues = 0
        # GPUs of pending Allocates per queue: a queue's cap counts them before they apply.
        self._pending_queues: Counter[str] = Counter()
        self._inflight: set[str] = set()
        # Commands whose proposal's outcome is unknown, held until the table records their request.
        self._unsure: list[Allocate | Enqueue] = []
        self._unsure_ids: set[str] = set()

    # ------------------------------------------------------------------ observers

    @property
    def pending_gpus(self) -> frozenset[GpuRef]:
        """GPUs that decided, unapplied Allocates are about to take."""
        return frozenset(self._pending)

    @property
    def pending_enqueues(self) -> int:
        return self._pending_enqueues

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._inflight

    # ------------------------------------------------------------------ allocate

    def begin(self, request_id: str, service_name: str, table: LeaseTable) -> Begin:
        """Claim `request_id` for a new decision, or say why not.

        Returns PROCEED (the caller owns the id until `finish`), WAIT (another
        caller owns it), UNSURE (an unanswered proposal for it may still apply),
        or Repeat (the answer already given). Raises Conflict
        `request_id_conflict` (another service's id) or `request_id_used` (the
        id's request ended; a new id is needed).
        """
        if request_id in self._inflight:
            return WAIT
        self._resolve_unsure(table)
        if request_id in self._unsure_ids:
            return UNSURE
        earlier = self.earlier_answer(request_id, service_name, table)
        if earlier is not None:
            return Repeat(earlier)
        self._inflight.add(request_id)
        return PROCEED

    def earlier_answer(self, request_id: str, service_name: str, table: LeaseTable) -> AllocateOutcome | None:
        """The answer the table holds for `request_id` (None: never seen). Raises Conflict as `begin`."""
        record = table.record(request_id)
        if record is None:
            return None
        if record.service_name != service_name:
            raise Conflict(f"request_id {request_id} belongs to another service", code="request_id_conflict")
        if record.status == ALLOCATED and record.allocation_id is not None:
            unit = table.lease_unit(record.allocation_id)
            if unit:
                gang = unit if unit[0].gang is not None else ()
                return AllocateOutcome(request_id, allocation=unit[0], repeated=True, gang=gang)
        if record.status == QUEUED:
            queued = table.queued(request_id)
            if queued is not None:
                return AllocateOutcome(
                    request_id, queued=queued, position=queue_position(table, request_id), repeated=True
                )
        raise Conflict(
            f"request_id {request_id} was already used and is {record.status}; "
            "send a new request_id to allocate again",
            code="request_id_used",
        )

    def decide(self, request: AllocationRequest, table: LeaseTable, inventory: Inventory, now: float) -> Command:
        """Allocate when it fits now, else Enqueue; the command is registered as pending.

        The caller proposes it and calls `settle(command)` once the proposal
        returned or failed. Raises Unsatisfiable (400), Conflict `no_capacity`
        (409, queue=false), QueueFull (503).
        """
        self._resolve_unsure(table)
        command = self.scheduler.admit(
            request,
            table,
            inventory,
            now,
            pending=self._pending,
            pending_enqueues=self._pending_enqueues,
            pending_queues=self._pending_queues,
        )
        self._hold(command)
        return command

    def answer(self, command: Command, result: ApplyResult, table: LeaseTable) -> AllocateOutcome:
        """The answer for an applied Allocate or Enqueue that `decide` returned.

        Raises the table's refusal when it refused the command.
        """
        if result.error is not None:
            raise result.error
        if isinstance(command, Allocate):
            gang = command.members if command.gang_rest else ()
            return AllocateOutcome(command.allocation.request.request_id, allocation=command.allocation, gang=gang)
        assert isinstance(command, Enqueue)
        request_id = command.request.request_id
        queued = table.queued(request_id)
        if queued is not None:
            return AllocateOutcome(request_id, queued=queued, position=queue_position(table, request_id))
        # Placed (or cancelled) by an entry applied right after the Enqueue: say what it is now.
        earlier = self.earlier_answer(request_id, command.request.service_name, table)
        return earlier if earlier is not None else AllocateOutcome(request_id)

    def finish(self, request_id: str) -> None:
        """The owner of `request_id` is done with it (answered or failed)."""
        self._inflight.discard(request_id)

    # ------------------------------------------------------------------ the scheduler's tick

    def tick(self, table: LeaseTable, inventory: Inventory, now: float) -> list[Command]:
        """Commands due at `now` (expiries, queue timeouts, placements); each is registered as pending."""
        self._resolve_unsure(table)
        commands = self.scheduler.tick(table, inventory, now, self._pending, self._pending_queues)
        for command in commands:
            self._hold(command)
        return commands

    def next_deadline(self, table: LeaseTable) -> float | None:
        """When the next lease expires or queued request times out (None: nothing timed)."""
        return self.scheduler.next_deadline(table)

    # ------------------------------------------------------------------ pending bookkeeping

    def settle(self, command: Command) -> None:
        """A command from `decide` or `tick` was applied, refused, or will never be known: release what it held."""
        if isinstance(command, Allocate):
            for gpu in (g for member in command.members for g in member.gpus):
                count = self._pending[gpu.ref] - 1
                if count:
                    self._pending[gpu.ref] = count
                else:
                    del self._pending[gpu.ref]
            queue = command.allocation.request.queue_name
            self._pending_queues[queue] -= command.gpu_total
            if self._pending_queues[queue] <= 0:
                del self._pending_queues[queue]
        elif isinstance(command, Enqueue):
            self._pending_enqueues -= 1

    def unsure(self, command: Command) -> None:
        """A command's proposal ended without an answer (cut short, outcome unknown): hold it until the table says.

        Other commands hold nothing and are settled at once.
        """
        if isinstance(command, (Allocate, Enqueue)):
            self._unsure.append(command)
            self._unsure_ids.add(_request_of(command).request_id)
        else:
            self.settle(command)

    def _resolve_unsure(self, table: LeaseTable) -> None:
        """Settle the unsure commands whose request the table now records (applied, or refused after another entry)."""
        if not self._unsure:
            return
        still: list[Allocate | Enqueue] = []
        for command in self._unsure:
            request = _request_of(command)
            if table.record(request.request_id) is None:
                still.append(command)
            else:
                self.settle(command)
                self._unsure_ids.discard(request.request_id)
        self._unsure = still

    def _hold(self, command: Command) -> None:
        if isinstance(command, Allocate):
            # Every member of a gang: its GPUs on all nodes are taken by the one entry.
            for gpu in (g for member in command.members for g in member.gpus):
                self._pending[gpu.ref] = self._pending.get(gpu.ref, 0) + 1
            self._pending_queues[command.allocation.request.queue_name] += command.gpu_total
        elif isinstance(command, Enqueue):
            self._pending_enqueues += 1


def _request_of(command: Allocate | Enqueue) -> AllocationRequest:
    return command.allocation.request if isinstance(command, Allocate) else command.request


def queue_position(table: LeaseTable, request_id: str) -> int | None:
    """`request_id`'s 1-based place in the wait queue, or None when it is not queued (a bisect, not a walk)."""
    return table.queue_position(request_id)
