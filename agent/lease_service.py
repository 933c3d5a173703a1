"""The lease service: the leader's API operations on the lease table, and its scheduler loop.

One `LeaseService` serves one leadership (agent/leadership.py builds it when
this server starts to lead and drops it when it stops). Every operation reads
the applied table, asks the pure admission core (coordinator/admission.py) or
builds a command, proposes it, and answers from the applied result, so a write
is acknowledged only once it is durable on a majority.

The shell's own state is only what must be awaited: an event per request id
in flight, so a concurrent retry waits for the first call's answer. Which ids
are in flight, which GPUs pending proposals hold and every decision are the
admission core's.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import trio

from coordinator.admission import PROCEED, UNSURE, Admission, AllocateOutcome, Repeat, queue_position
from coordinator.commands import (
    MAX_USAGE_ROWS,
    Allocate,
    Cancel,
    Command,
    MarkHostLost,
    OutboxDelivered,
    Preempt,
    RecordUsage,
    Release,
    Renew,
    ReportGpuHealth,
    SetDrain,
    SetQueuePolicy,
)
from coordinator.errors import Conflict, CoordinatorError, NotFound
from coordinator.mig import gpu_of_slice
from coordinator.inventory import Inventory
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import ALLOCATED, QUEUED, RELEASED, Allocation, GpuRef
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.raft import NotLeader, RaftError
from coordinator.request_parsing import AllocateBody, build_request, queue_for, resolve_ttl

from agent.raft_log import ProposalLost
from agent.workload_analysis import WorkloadAnalysis

log = logging.getLogger(__name__)

# How many allocates may decide and wait for their entry at once (see LeaseService._deciding).
# Enough to fill a group commit (entries proposed while an fsync runs share the next one).
ADMISSION_CONCURRENCY = 32
# How often a retry of a request whose earlier proposal's outcome is unknown looks at the table again.
UNSURE_RECHECK_S = 0.02

__all__ = ["AllocateOutcome", "CommandLog", "LeaseReader", "LeaseService", "ReleaseOutcome", "TableReader"]


class CommandLog(Protocol):
    """What the service needs of the replicated log (agent/raft_log.RaftLog)."""

    @property
    def table(self) -> LeaseTable: ...

    async def read_barrier(self) -> None: ...
    async def propose(self, command: Command, *, term: int | None = None) -> ApplyResult: ...
    async def propose_many(self, commands: Sequence[Command], *, term: int | None = None) -> list[ApplyResult]: ...


class LeaseReader(Protocol):
    """What a read handler needs: the table and queue positions (a LeaseService, or a TableReader)."""

    @property
    def table(self) -> LeaseTable: ...

    def queue_position(self, request_id: str) -> int | None: ...


@dataclass(frozen=True, slots=True)
class TableReader:
    """Reads of a replica's table without a leader (`?stale=true` on a follower)."""

    table: LeaseTable

    def queue_position(self, request_id: str) -> int | None:
        return queue_position(self.table, request_id)


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    released: tuple[str, ...]
    cancelled: tuple[str, ...]
    # True when the allocation had already been released by its caller (a retry).
    repeated: bool = False


class LeaseService:
    """Allocate, release, renew, cancel, drain and health records; expiry and queue service in `run_scheduler`."""

    def __init__(
        self,
        log_: CommandLog,
        admission: Admission,
        inventory: Callable[[], Inventory],
        analysis: WorkloadAnalysis,
        *,
        term: int | None = None,
        default_ttl_s: float,
        max_ttl_s: float,
        tick_interval_s: float = 0.5,
        clock: Callable[[], float],
        on_decision: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.log = log_
        # The leadership term this service decides for: its proposals are refused in any other.
        self.term = term
        self.admission = admission
        self.inventory = inventory
        self.analysis = analysis
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.tick_interval_s = tick_interval_s
        self._clock = clock
        self._on_decision = on_decision
        # request id -> set when the call that owns it finishes (see Admission.begin).
        self._finished: dict[str, trio.Event] = {}
        self._wake = trio.Event()
        # Allocates past their idempotency check, deciding or waiting for their entry. A
        # burst of hundreds in flight would otherwise all become runnable together each
        # time a Ready applies their entries, and trio runs a whole batch of runnable tasks
        # before it looks at its timers again: the Raft ticker (heartbeats) waited behind
        # 200 of them. Past the limit, callers wait their turn (FIFO), not the loop.
        self._deciding = trio.CapacityLimiter(ADMISSION_CONCURRENCY)

    @property
    def table(self) -> LeaseTable:
        return self.log.table

    # ------------------------------------------------------------------ allocate

    async def allocate(self, body: AllocateBody, *, key_queue: str | None = None) -> AllocateOutcome:
        """Place the request now, or queue it, in its queue (`queue_for`: `key_queue`, the API key's, first).

        Raises InvalidRequest/Unsatisfiable (400), Forbidden (403: above the queue's
        priority ceiling, or a key naming no usable queue), Conflict (409: no capacity
        with queue=false, or a request_id already used), QueueFull (503), RaftError.
        """
        # A body the server would refuse is refused whether or not its request_id was seen
        # before: a retry with a bad TTL gets 400, not the earlier answer.
        resolve_ttl(body.ttl_seconds, default_ttl_s=self.default_ttl_s, max_ttl_s=self.max_ttl_s)
        queue = queue_for(body, self.table.queue_policy, key_queue)
        request_id = body.request_id or uuid.uuid4().hex
        while True:
            step = self.admission.begin(request_id, body.service_name, self.table)
            if isinstance(step, Repeat):
                return step.outcome
            if step is PROCEED:
                break
            if step is UNSURE:
                # An earlier call's entry for this id may still apply: let the table catch
                # up rather than propose a second one (the request bound ends the wait).
                await self.log.read_barrier()
                await trio.sleep(UNSURE_RECHECK_S)
                continue
            await self._finished[request_id].wait()
        finished = self._finished[request_id] = trio.Event()
        try:
            async with self._deciding:
                return await self._decide(body, request_id, queue)
        finally:
            self.admission.finish(request_id)
            del self._finished[request_id]
            finished.set()

    async def _decide(self, body: AllocateBody, request_id: str, queue: QueueSpec) -> AllocateOutcome:
        """Analyse, decide and propose one new request (its id is this call's: Admission.begin said PROCEED)."""
        analysis = await self.analysis.analyze(body)
        now = self._clock()
        request = build_request(
            body,
            analysis.estimate,
            decided_by=analysis.decided_by,
            request_id=request_id,
            now=now,
            default_ttl_s=self.default_ttl_s,
            max_ttl_s=self.max_ttl_s,
            queue=queue,
        )
        try:
            command = self.admission.decide(request, self.table, self.inventory(), now)
        except CoordinatorError as exc:
            self._on_decision(f"rejected_{exc.code}")
            raise
        try:
            result = await self.log.propose(command, term=self.term)
        except (NotLeader, ProposalLost):
            self.admission.settle(command)  # surely not applied: its GPUs are free again
            raise
        except BaseException:
            # Outcome unknown (cut short by the request bound, or the log could not tell):
            # the entry may still apply, so its GPUs stay held until the table says.
            self.admission.unsure(command)
            raise
        self.admission.settle(command)
        outcome = self.admission.answer(command, result, self.table)
        self._on_decision("allocated" if isinstance(command, Allocate) else "queued")
        if not isinstance(command, Allocate):
            self.wake()
        return outcome

    def queue_position(self, request_id: str) -> int | None:
        return queue_position(self.table, request_id)

    # ------------------------------------------------------------------ release, renew, cancel

    async def release_allocation(self, allocation_id: str) -> ReleaseOutcome:
        """Release one allocation. Raises NotFound when it is not live.

        One its caller already released (a retry after outcome_unknown) answers
        as the first release did, marked `repeated`.
        """
        if not self.table.lease_unit(allocation_id):
            record = self.table.record_of_allocation(allocation_id)
            if record is not None and record.status == RELEASED and record.reason == "released":
                return ReleaseOutcome((allocation_id,), (), repeated=True)
            raise NotFound(f"no live allocation {allocation_id}")
        result = await self._propose_ok(Release(self._clock(), (allocation_id,)))
        self.wake()
        return ReleaseOutcome(result.affected, ())

    async def release_service(self, service_name: str) -> ReleaseOutcome:
        """Release every allocation of a service and cancel its queued requests."""
        now = self._clock()
        released: tuple[str, ...] = ()
        cancelled: tuple[str, ...] = ()
        ids = tuple(a.allocation_id for a in self.table.allocations_of_service(service_name))
        if ids:
            released = (await self._propose_ok(Release(now, ids))).affected
        queued = tuple(
            q.request.request_id for q in self.table.queue() if q.request.service_name == service_name
        )
        if queued:
            # The scheduler may place some between the two entries: not an error (a Cancel
            # with none left queued is NotFound), and what it placed is released below.
            result = await self.log.propose(Cancel(now, queued), term=self.term)
            cancelled = result.affected if result.ok else ()
            late = tuple(a.allocation_id for a in self.table.allocations_of_service(service_name))
            if late:
                released += (await self._propose_ok(Release(self._clock(), late))).affected
        self.wake()
        return ReleaseOutcome(released, cancelled)

    async def release_request(self, request_id: str) -> ReleaseOutcome:
        """Cancel a queued request, or release what it was granted. Raises NotFound."""
        record = self.table.record(request_id)
        if record is not None and record.status == QUEUED:
            result = await self.log.propose(Cancel(self._clock(), (request_id,)), term=self.term)
            if result.ok:
                self.wake()
                return ReleaseOutcome((), result.affected)
            # The scheduler placed it between our read and the Cancel: release that.
            record = self.table.record(request_id)
        if record is not None and record.status == ALLOCATED and record.allocation_id:
            return await self.release_allocation(record.allocation_id)
        raise NotFound(f"no queued request or live allocation for request_id {request_id}")

    async def renew(self, allocation_id: str, ttl_s: float | None) -> Allocation:
        """Extend a lease to now + ttl (default TTL when None, never when 0).

        Raises NotFound for an unknown or expired lease, InvalidRequest for a TTL over the cap.
        """
        ttl = resolve_ttl(ttl_s, default_ttl_s=self.default_ttl_s, max_ttl_s=self.max_ttl_s)
        now = self._clock()
        try:
            await self._propose_ok(Renew(now, allocation_id, now + ttl if ttl > 0 else None))
        except Conflict as exc:
            # Past its expiry the lease is gone in all but the scheduler's bookkeeping.
            raise NotFound(f"allocation {allocation_id} has expired") from exc
        renewed = self.table.lease_unit(allocation_id)
        if not renewed:
            raise NotFound(f"no live allocation {allocation_id}")
        return renewed[0]

    async def set_drain(self, node: str, index: int, drained: bool, reason: str = "") -> None:
        """Drain (no new allocations) or undrain a GPU; durable like any lease change.

        Raises NotFound for a GPU the scheduler does not know. A GPU in MIG mode
        is known by its slices: draining it drains them (agent/inventory_feed.overlay).
        """
        inventory = self.inventory()
        if inventory.get(GpuRef(node, index)) is None and not any(
            gpu_of_slice(v.index) == index for v in inventory.node_views(node)
        ):
            raise NotFound(f"no GPU {node}/{index}")
        await self._propose_ok(SetDrain(self._clock(), node, index, drained, reason))
        self.wake()

    async def report_health(self, node: str, index: int, state: str, reasons: tuple[str, ...]) -> None:
        """Record a GPU's health change; a leased GPU turning unhealthy notifies its owner."""
        await self._propose_ok(ReportGpuHealth(self._clock(), node, index, state, reasons))
        self.wake()

    async def mark_host_lost(self, node: str, allocated_before: float | None = None) -> ApplyResult:
        """End every live lease on `node` made at or before `allocated_before` as lost (the host is gone).

        Returns the applied result: its `affected` ids, or a NotFound error when
        nothing was live there any more. Raises RaftError when leadership moved.
        """
        result = await self.log.propose(MarkHostLost(self._clock(), node, allocated_before), term=self.term)
        if result.ok:
            self.wake()  # GPUs were freed; the queue may be served once the host returns
        return result

    async def record_outbox_progress(self, through: int) -> None:
        """Replicate that every outbox row of entries at or below `through` is done (OutboxDelivered)."""
        if through > self.table.outbox_delivered_through:
            await self._propose_ok(OutboxDelivered(self._clock(), through))

    async def record_usage(self, rows: Sequence[tuple[str, str, float]], retention_s: float) -> None:
        """Replicate utilized GPU-seconds per (queue, service) (RecordUsage), MAX_USAGE_ROWS a command.

        Nothing is proposed for no rows unless the retention changed. Raises the
        table's refusal or RaftError.
        """
        if not rows and retention_s == self.table.usage_retention_s:
            return
        now = self._clock()
        chunks = [tuple(rows[i : i + MAX_USAGE_ROWS]) for i in range(0, len(rows), MAX_USAGE_ROWS)] or [()]
        for result in await self.log.propose_many([RecordUsage(now, c, retention_s) for c in chunks], term=self.term):
            if result.error is not None:
                raise result.error

    async def set_queue_policy(self, policy: QueuePolicy) -> None:
        """Make `policy` the cluster's queues and sharing rules (SetQueuePolicy).

        Raises the table's refusal (Conflict `policy_unchanged` when it is in force already) or RaftError.
        """
        await self._propose_ok(SetQueuePolicy(self._clock(), policy))
        self.wake()  # the queue is served by the new rules from the next tick

    async def preempt(self, victims: Sequence[tuple[str, float]], reason: str) -> ApplyResult:
        """Start the grace periods of `victims` ((allocation id, deadline) pairs) for `reason` (Preempt).

        For preemptions no waiting request claims (idle reclaim): the scheduler's
        own preemptions are part of its tick. Returns the applied result; a refusal
        (a victim already gone or already preempting) is in its `error`. Raises RaftError.
        """
        result = await self.log.propose(Preempt(self._clock(), tuple(victims), reason), term=self.term)
        if result.ok:
            self.wake()  # the scheduler ends them at their deadlines
        return result

    async def _propose_ok(self, command: Command) -> ApplyResult:
        result = await self.log.propose(command, term=self.term)
        if result.error is not None:
            raise result.error
        return result

    # ------------------------------------------------------------------ scheduler loop

    def wake(self) -> None:
        """Run the scheduler soon: capacity was freed or the queue changed."""
        self._wake.set()

    async def run_scheduler(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire leases, time out the queue and place waiting requests, for as long as this leadership lasts."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            commands = self.admission.tick(self.table, self.inventory(), self._clock())
            if commands:
                await self._propose_tick(commands)
            deadline = self.admission.next_deadline(self.table)
            wait = self.tick_interval_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - self._clock()))
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _propose_tick(self, commands: list[Command]) -> None:
        try:
            results = await self.log.propose_many(commands, term=self.term)
        except (NotLeader, ProposalLost) as error:
            for command in commands:
                self.admission.settle(command)
            # Leadership moved or the entries were overwritten: the next leader's scheduler
            # redoes what is still due.
            log.info("scheduler proposals not applied (%s); retrying next tick", error)
            await trio.sleep(self.tick_interval_s)
            return
        except RaftError as error:
            for command in commands:
                self.admission.unsure(command)
            log.info("scheduler proposals' outcome unknown (%s); retrying next tick", error)
            await trio.sleep(self.tick_interval_s)
            return
        except Exception:
            for command in commands:
                self.admission.unsure(command)
            log.exception("scheduler proposals failed; retrying next tick")
            await trio.sleep(self.tick_interval_s)
            return
        except BaseException:
            for command in commands:
                self.admission.unsure(command)
            raise
        for command in commands:
            self.admission.settle(command)
        for command, result in zip(commands, results):
            if result.ok:
                self._on_decision(_tick_outcome(command))
            else:
                log.info("scheduler command refused: %s", result.error)


def _tick_outcome(command: Command) -> str:
    """The scheduling-outcome label of a command the scheduler's tick proposed."""
    if isinstance(command, Allocate):
        return "allocated_from_queue"
    if isinstance(command, Release):
        # The tick ends leases at their expiry, or at their preemption deadline.
        return "lease_preempted" if command.reason in ("preempted", "idle") else "lease_expired"
    if isinstance(command, Preempt):
        return "preemption_started"
    if isinstance(command, Cancel):
        return "queue_timeout"
    return type(command).__name__
