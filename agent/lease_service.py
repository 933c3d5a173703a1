"""The lease service: API operations on the lease table, and the scheduler loop.

It is the only writer of the log. Every operation reads the applied table,
asks the pure Scheduler for a command, proposes it, and answers from the
applied result, so a write is acknowledged only once it is durable.

Concurrency (single trio thread): deciding a placement and registering its
GPUs as pending happen with no await in between, so two concurrent requests
never pick the same GPU. Requests that share a `request_id` while the first is
still in flight wait for it and then get its answer (idempotency holds even for
simultaneous retries).
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import trio

from coordinator.commands import (
    Allocate,
    Cancel,
    Command,
    Enqueue,
    MarkHostLost,
    Release,
    Renew,
    ReportGpuHealth,
    SetDrain,
)
from coordinator.errors import Conflict, CoordinatorError, NotFound
from coordinator.inventory import Inventory
from coordinator.lease_table import ApplyResult, LeaseTable
from coordinator.model import ALLOCATED, QUEUED, Allocation, AllocationRequest, GpuRef, GpuView, QueuedRequest
from coordinator.request_parsing import AllocateBody, build_request, resolve_ttl
from coordinator.scheduler import Scheduler
from coordinator.raft import RaftError
from coordinator.workload import WorkloadEstimate, analyze_workload

from agent.cluster import CommandLog

log = logging.getLogger(__name__)


class Advisor(Protocol):
    """What the service needs of the DeepAgents client (agent.advisor.DeepAgentsAdvisor)."""

    async def advise(
        self,
        service_name: str,
        workload_type: str,
        workload_data: dict[str, object],
        fallback: WorkloadEstimate,
        *,
        max_gpus_per_node: int,
    ) -> "AdviceLike": ...


class AdviceLike(Protocol):
    @property
    def estimate(self) -> WorkloadEstimate: ...
    @property
    def decided_by(self) -> str: ...
    @property
    def fallback_reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Analysis:
    """The figures a request will be scheduled with, and who decided them."""

    estimate: WorkloadEstimate
    decided_by: str
    fallback_reason: str | None


@dataclass(frozen=True, slots=True)
class AllocateOutcome:
    """The answer to an allocate: placed now (allocation) or waiting (queued)."""

    request_id: str
    allocation: Allocation | None = None
    queued: QueuedRequest | None = None
    position: int | None = None
    # True when this answer repeats an earlier request with the same request_id.
    repeated: bool = False


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    released: tuple[str, ...]
    cancelled: tuple[str, ...]


class LeaseService:
    """Allocate, release, renew and cancel; expiry and queue service in `run_scheduler`."""

    def __init__(
        self,
        log_: CommandLog,
        scheduler: Scheduler,
        inventory: Callable[[], Sequence[GpuView]],
        *,
        default_ttl_s: float,
        max_ttl_s: float,
        tick_interval_s: float = 0.5,
        advisor: Advisor | None = None,
        clock: Callable[[], float],
        rng: random.Random,
        on_decision: Callable[[str], None] = lambda outcome: None,
        on_advice: Callable[[str, str], None] = lambda decided_by, reason: None,
    ) -> None:
        self.log = log_
        self.scheduler = scheduler
        self.inventory = inventory
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.tick_interval_s = tick_interval_s
        self.advisor = advisor
        self._clock = clock
        self._rng = rng
        self._on_decision = on_decision
        self._on_advice = on_advice
        self._pending: dict[GpuRef, int] = {}
        # Enqueues proposed but not yet applied, so concurrent admits respect max_queue.
        self._pending_enqueues = 0
        self._inflight: dict[str, trio.Event] = {}
        self._wake = trio.Event()

    @property
    def table(self) -> LeaseTable:
        return self.log.table

    def gpus(self) -> list[GpuView]:
        """The GPUs the scheduler sees: live views, with operators' drains from the table."""
        drained = self.table.drained()
        views = self.inventory()
        if not drained:
            return list(views)
        return [replace(v, drained=True) if v.ref in drained else v for v in views]

    # ------------------------------------------------------------------ analysis

    async def analyze(self, body: AllocateBody) -> Analysis:
        """The built-in analyzer's figures, or the advisor's when it is set and answers well.

        Raises InvalidRequest for workload data the analyzer rejects.
        """
        gpus = self.gpus()
        estimate = analyze_workload(
            body.workload_type, body.workload_data, gpu_memory_mb=_target_gpu_memory(gpus, body.gpu_model)
        )
        if self.advisor is None or body.fully_specified:
            return Analysis(estimate, "analyzer", None)
        advice = await self.advisor.advise(
            body.service_name,
            body.workload_type,
            body.workload_data,
            estimate,
            max_gpus_per_node=max(_gpus_per_node(gpus).values(), default=1),
        )
        analysis = Analysis(advice.estimate, advice.decided_by, advice.fallback_reason)
        largest = max((g.memory_total_mb for g in gpus), default=None)
        if advice.decided_by == "advisor" and largest is not None and advice.estimate.min_memory_mb > largest:
            # Advice no GPU here could satisfy would turn the request into a 400: the
            # advisor may only refine the analyzer, never make a request unschedulable.
            analysis = Analysis(
                estimate, "analyzer", f"invalid_output: min_memory_mb above every GPU ({largest} MB)"
            )
        reason = (analysis.fallback_reason or "").split(":", 1)[0]
        self._on_advice(analysis.decided_by, reason)
        return analysis

    # ------------------------------------------------------------------ allocate

    async def allocate(self, body: AllocateBody) -> AllocateOutcome:
        """Place the request now, or queue it.

        Raises InvalidRequest/Unsatisfiable (400), Conflict (409: no capacity with
        queue=false, or a request_id already used), QueueFull (503), StorageError.
        """
        request_id = body.request_id or uuid.uuid4().hex
        earlier = await self._earlier_answer(request_id, body.service_name)
        if earlier is not None:
            return earlier
        done = self._inflight[request_id] = trio.Event()
        try:
            analysis = await self.analyze(body)
            request = build_request(
                body,
                analysis.estimate,
                decided_by=analysis.decided_by,
                request_id=request_id,
                now=self._clock(),
                default_ttl_s=self.default_ttl_s,
                max_ttl_s=self.max_ttl_s,
            )
            return await self._admit(request)
        finally:
            del self._inflight[request_id]
            done.set()

    async def _earlier_answer(self, request_id: str, service_name: str) -> AllocateOutcome | None:
        """The answer already given for `request_id`, waiting out one still in flight."""
        while (event := self._inflight.get(request_id)) is not None:
            await event.wait()
        record = self.table.record(request_id)
        if record is None:
            return None
        if record.service_name != service_name:
            raise Conflict(
                f"request_id {request_id} belongs to another service", code="request_id_conflict"
            )
        if record.status == ALLOCATED and record.allocation_id is not None:
            alloc = self.table.allocation(record.allocation_id)
            if alloc is not None:
                return AllocateOutcome(request_id, allocation=alloc, repeated=True)
        if record.status == QUEUED:
            queued = self.table.queued(request_id)
            if queued is not None:
                return AllocateOutcome(
                    request_id, queued=queued, position=self.queue_position(request_id), repeated=True
                )
        raise Conflict(
            f"request_id {request_id} was already used and is {record.status}; "
            "send a new request_id to allocate again",
            code="request_id_used",
        )

    async def _admit(self, request: AllocationRequest) -> AllocateOutcome:
        try:
            command = self.scheduler.admit(
                request,
                self.table,
                Inventory.of(self.gpus()),
                request.submitted_at,
                pending=self._pending,
                pending_enqueues=self._pending_enqueues,
            )
        except CoordinatorError as exc:
            self._on_decision(f"rejected_{exc.code}")
            raise
        result = await self._propose_holding(command)
        if not result.ok:
            assert result.error is not None
            raise result.error
        if isinstance(command, Allocate):
            self._on_decision("allocated")
            return AllocateOutcome(request.request_id, allocation=command.allocation)
        self._on_decision("queued")
        self.wake()
        queued = self.table.queued(request.request_id)
        if queued is None:
            # Placed by the scheduler between the Enqueue and this read.
            return await self._earlier_answer(request.request_id, request.service_name) or AllocateOutcome(
                request.request_id
            )
        return AllocateOutcome(
            request.request_id, queued=queued, position=self.queue_position(request.request_id)
        )

    async def _propose_holding(self, command: Command) -> ApplyResult:
        """Propose, counting an Allocate's GPUs as taken until it is applied."""
        refs = [g.ref for g in command.allocation.gpus] if isinstance(command, Allocate) else []
        enqueue = int(isinstance(command, Enqueue))
        for ref in refs:
            self._pending[ref] = self._pending.get(ref, 0) + 1
        self._pending_enqueues += enqueue
        try:
            return await self.log.propose(command)
        finally:
            self._pending_enqueues -= enqueue
            for ref in refs:
                self._pending[ref] -= 1
                if not self._pending[ref]:
                    del self._pending[ref]

    def queue_position(self, request_id: str) -> int | None:
        return self.table.queue_position(request_id)

    # ------------------------------------------------------------------ release, renew, cancel

    async def release_allocation(self, allocation_id: str) -> ReleaseOutcome:
        """Release one allocation. Raises NotFound when it is not live."""
        if self.table.allocation(allocation_id) is None:
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
            cancelled = (await self._propose_ok(Cancel(now, queued))).affected
        self.wake()
        return ReleaseOutcome(released, cancelled)

    async def release_request(self, request_id: str) -> ReleaseOutcome:
        """Cancel a queued request, or release what it was granted. Raises NotFound."""
        record = self.table.record(request_id)
        if record is not None and record.status == QUEUED:
            result = await self.log.propose(Cancel(self._clock(), (request_id,)))
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
        renewed = self.table.allocation(allocation_id)
        if renewed is None:
            raise NotFound(f"no live allocation {allocation_id}")
        return renewed

    async def set_drain(self, node: str, index: int, drained: bool, reason: str = "") -> None:
        """Drain (no new allocations) or undrain a GPU; durable like any lease change.

        Raises NotFound for a GPU the scheduler does not know.
        """
        if not any(v.node == node and v.index == index for v in self.inventory()):
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
        result = await self.log.propose(MarkHostLost(self._clock(), node, allocated_before))
        if result.ok:
            self.wake()  # GPUs were freed; the queue may be served once the host returns
        return result

    async def _propose_ok(self, command: Command) -> ApplyResult:
        result = await self.log.propose(command)
        if result.error is not None:
            raise result.error
        return result

    # ------------------------------------------------------------------ scheduler loop

    def wake(self) -> None:
        """Run the scheduler soon: capacity was freed or the queue changed."""
        self._wake.set()

    async def run_scheduler(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire leases, time out the queue and place waiting requests, forever."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            commands = self.scheduler.tick(self.table, Inventory.of(self.gpus()), self._clock(), self._pending)
            if commands:
                await self._propose_tick(commands)
            deadline = self.scheduler.next_deadline(self.table)
            wait = self.tick_interval_s
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - self._clock()))
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _propose_tick(self, commands: list[Command]) -> None:
        refs = [g.ref for c in commands if isinstance(c, Allocate) for g in c.allocation.gpus]
        for ref in refs:
            self._pending[ref] = self._pending.get(ref, 0) + 1
        try:
            results = await self.log.propose_many(commands)
        except RaftError as error:
            # Leadership moved (NotLeader) or the entries were overwritten (ProposalLost):
            # the next leader's scheduler redoes what is still due.
            log.info("scheduler proposals not applied (%s); retrying next tick", error)
            await trio.sleep(self.tick_interval_s)
            return
        except Exception:
            log.exception("scheduler proposals failed; retrying next tick")
            await trio.sleep(self.tick_interval_s)
            return
        finally:
            for ref in refs:
                self._pending[ref] -= 1
                if not self._pending[ref]:
                    del self._pending[ref]
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
        return "lease_expired"
    if isinstance(command, Cancel):
        return "queue_timeout"
    return type(command).__name__


def _gpus_per_node(gpus: Sequence[GpuView]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[gpu.node] = counts.get(gpu.node, 0) + 1
    return counts


def _target_gpu_memory(gpus: Sequence[GpuView], gpu_model: str | None) -> int | None:
    """The GPU memory an estimate should plan for: the requested model's, else the largest GPU's."""
    candidates = [
        g.memory_total_mb for g in gpus if gpu_model is None or gpu_model.lower() in g.name.lower()
    ]
    return max(candidates, default=None)
