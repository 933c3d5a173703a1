"""The lease table: a deterministic state machine over the command log.

Theory of operation
-------------------
The table holds live allocations (which GPU is held by which lease), the wait
queue, and a record of every request id it has seen (so a retried request with
the same id is answered, not run twice). `apply(command)` is the only mutator.
It either changes the state and returns the lifecycle events that the change
causes, or rejects the command with a CoordinatorError and changes nothing.

Rules that keep every replica identical:
- Time comes only from `command.at`. The table's own clock is the largest `at`
  it has accepted (a refused command leaves it alone); it is used for nothing
  but forgetting old request records.
- An expiry (Release with reason "expired") ends only leases whose `expires_at`
  has passed at its `at`: a renewal applied after the expiry was proposed wins.
- MarkHostLost ends every lease live on its node *when it is applied*: whether
  the host is gone is the leader's judgement (gossip is not replicated), so the
  table takes the command as that decision and only checks it against its state.
- A rejection depends only on the state and the command, never on outside facts.
- Iteration orders that leak into results (snapshots, listings) are sorted.
- Finished request records are kept for `retention_s` after they end and then
  pruned, by a rule that depends only on the set of records, so a table
  restored from a snapshot prunes exactly as one that replayed the whole log.
- Live leases and their indexes (GPU holders, shares, nodes, expiries, gangs)
  are coordinator/live_leases.py's; the snapshot format is lease_snapshot.py's.

- Usage (coordinator/lease_usage.py over usage_ledger.py): a lease's allocated
  GPU-seconds, gpus × (end − allocated_at), are credited when it ends, whatever
  ends it (`_remove_allocation`); utilized GPU-seconds arrive in RecordUsage commands.
  Hours older than the usage retention (the latest RecordUsage's, 90 days
  until one says otherwise) are pruned by the table's clock, like records.

- Queues (coordinator/queues.py): the policy is state like any other, set by
  SetQueuePolicy. A Preempt starts victims' grace periods and records the
  claim of the request they are taken for (preemption_book.py); a Release
  with reason "preempted" or "idle" ends only leases whose grace deadline has passed at its `at`
  (like an expiry), so a lease preempted once ends once, never early, whoever
  leads when the deadline comes.

- Gangs (coordinator/gang_placement.py): one Allocate carries a lease per node, all
  with the same gang id; it is applied whole or refused whole. Every later
  command that names any member (or the gang id) acts on all of them: release,
  expiry, renewal, preemption, and host loss of any one member's node. So no
  replica ever holds part of a gang, and its owner hears one event per change.

- Shares of a GPU (coordinator/share_placement.py): a share lease names one
  GPU and a memory budget. An Allocate of a share (its own op, "allocate_share")
  joins a GPU already shared by its sharing group, or opens a free one; it is
  refused when the group differs or the budgets would pass the GPU's memory
  total. One share of a shared GPU stands as its holder, so to everything else
  the GPU is simply held; it is freed when its last share ends.

Invariant: no GPU is held by two live allocations, shares of one group aside
(checked on every Allocate), and no GPU's shares promise more than its memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from coordinator.commands import (
    Allocate,
    Cancel,
    Command,
    Enqueue,
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
from coordinator.errors import Conflict, CoordinatorError, InvalidRequest, NotFound
from coordinator.finished_records import FinishedRecords
from coordinator.model import (
    ALLOCATED,
    CANCELLED,
    EXPIRED,
    HEALTHY,
    LOST,
    QUEUED,
    UNHEALTHY,
    RELEASED,
    TERMINAL_STATUSES,
    Allocation,
    AllocationRequest,
    GpuRef,
    LeaseEvent,
    QueuedRequest,
    RequestRecord,
    Wire,
)
from coordinator.lease_snapshot import (
    READABLE_VERSIONS,
    SnapshotCapture,
    collector_paused,
    record_row,
    snapshot_version,
    text_or_item,
)
from coordinator.lease_usage import LeaseUsage
from coordinator.live_leases import LiveLeases
from coordinator.mig import SLOTS_PER_GPU, gpu_of_slice, slice_index
from coordinator.preemption_book import Claim, PreemptionBook
from coordinator.queue_ledger import QueueLedger
from coordinator.queues import UNCONFIGURED, QueuePolicy
from coordinator.share_placement import ShareIndex
from coordinator.usage_ledger import UsageKey
from coordinator.wait_queue import RankKey, WaitQueue

# How long a finished request id is remembered. A client retrying a request
# within a day gets the original answer; after that the id may be reused.
DEFAULT_RETENTION_S = 86_400.0
# Why a preemption started (Preempt.reason), and the release reasons that end one.
PREEMPTION_REASONS = frozenset({"reclaim", "priority", "idle"})
PREEMPTION_END_REASONS = frozenset({"preempted", "idle"})


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What applying one command did: events for the outside world, or why it was refused."""

    events: tuple[LeaseEvent, ...] = ()
    error: CoordinatorError | None = None
    # Ids the command acted on (released allocations, cancelled requests).
    affected: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


class LeaseTable:
    """Allocations, queue and request records, changed only by `apply`."""

    def __init__(self, *, retention_s: float = DEFAULT_RETENTION_S) -> None:
        self.retention_s = retention_s
        # Live leases and their GPU, node, expiry and gang indexes (live_leases.py).
        self._leases = LiveLeases()
        # Waiting shares in serving order: the scheduler packs them onto shared GPUs before its pass.
        self._queued_shares = WaitQueue()
        self._queue = WaitQueue()
        # Records of queued and allocated requests; finished ones live in _finished.
        self._records: dict[str, RequestRecord] = {}
        # When each GPU was last released: telemetry sampled before then belongs
        # to the previous tenant, so the scheduler does not read it as unleased use.
        self._released_at: dict[GpuRef, float] = {}
        # GPUs an operator drained, with the reason given.
        self._drained: dict[GpuRef, str] = {}
        # GPUs whose last reported health is not healthy: (state, reasons).
        self._gpu_health: dict[GpuRef, tuple[str, tuple[str, ...]]] = {}
        # Finished records, kept only to answer retries (finished_records.py).
        self._finished = FinishedRecords()
        # Each live allocation's and waiting request's JSON text, made at most once
        # per object (a renewal makes a new one), so a snapshot copies references.
        self._allocation_texts: dict[str, tuple[Allocation, str]] = {}
        self._queue_texts: dict[str, tuple[QueuedRequest, str]] = {}
        self._clock = 0.0
        # The leader's delivery progress (OutboxDelivered): rows of entries at or below it are done.
        self._outbox_delivered_through = 0
        # GPU-seconds by hour and (queue, service); live leases' share is added on read.
        self._usage = LeaseUsage()
        # The queues and sharing rules (SetQueuePolicy), and per-queue indexes.
        self._policy: QueuePolicy = UNCONFIGURED
        self._queues = QueueLedger()
        # Leases in their preemption grace period, and the claims of the requests they are taken for.
        self._preemptions = PreemptionBook()

    # ------------------------------------------------------------------ queries

    def gang(self, gang_id: str) -> tuple[Allocation, ...] | None:
        """A live gang's member leases, rank order, or None when `gang_id` names none."""
        return self._leases.gang(gang_id)

    def lease_unit(self, allocation_id: str) -> tuple[Allocation, ...]:
        """What ends or renews together with `allocation_id` (which may name a gang): its gang, itself, or ()."""
        return self._leases.unit(allocation_id)

    def gang_count(self) -> int:
        return self._leases.gang_count()

    def gang_ports_in_use(self, address: str) -> set[int]:
        """Rendezvous ports live gangs hold at `address` (reads only the live gangs)."""
        return self._leases.gang_ports_in_use(address)

    @property
    def clock(self) -> float:
        """The latest command time applied (0.0 for an empty table)."""
        return self._clock

    def allocations(self) -> list[Allocation]:
        """Live allocations, oldest first."""
        return self._leases.oldest_first()

    def allocation(self, allocation_id: str) -> Allocation | None:
        return self._leases.get(allocation_id)

    def allocations_of_service(self, service_name: str) -> list[Allocation]:
        return [a for a in self.allocations() if a.request.service_name == service_name]

    def holder(self, gpu: GpuRef) -> str | None:
        """The allocation id holding `gpu`, or None when it is free."""
        return self._leases.holder(gpu)

    def held_gpus(self) -> Mapping[GpuRef, str]:
        return self._leases.held_gpus()

    def queued_share_count(self) -> int:
        return len(self._queued_shares)

    def queued_shares(self) -> Iterable[QueuedRequest]:
        """The waiting shares in serving order (their own index: no walk of the queue, no sort)."""
        return self._queued_shares

    @property
    def shares(self) -> ShareIndex:
        """The GPUs holding shares, their budgets and tenants (read only: `apply` keeps it)."""
        return self._leases.shares

    def released_at(self, gpu: GpuRef) -> float:
        """When `gpu` was last released (0.0 if never)."""
        return self._released_at.get(gpu, 0.0)

    def drained(self) -> Mapping[GpuRef, str]:
        """Drained GPUs and the operator's reason."""
        return self._drained

    def gpu_health(self, gpu: GpuRef) -> tuple[str, tuple[str, ...]]:
        """The last health reported for `gpu` (healthy when none was)."""
        return self._gpu_health.get(gpu, (HEALTHY, ()))

    def unhealthy_allocations(self) -> list[Allocation]:
        """Live allocations holding at least one GPU last reported unhealthy."""
        return [
            a
            for a in self.allocations()
            if any(self._gpu_health.get(_health_ref(g.ref), (HEALTHY,))[0] == UNHEALTHY for g in a.gpus)
        ]

    @property
    def outbox_delivered_through(self) -> int:
        """Log index at or below which every outbox row was delivered or given up (0: none yet)."""
        return self._outbox_delivered_through

    def queue(self) -> list[QueuedRequest]:
        """Waiting requests in strict priority order (the order the scheduler serves)."""
        return list(self._queue)

    def queue_position(self, request_id: str) -> int | None:
        """1 for the next request served, 2 for the one after...; None when `request_id` does not wait."""
        return self._queue.position(request_id)

    def queue_groups(self, before: RankKey | None = None) -> list[Iterable[QueuedRequest]]:
        """The waiting requests grouped by equal requirements, each group in rank order.

        With `before` (a rank key), only the requests ranked ahead of it. The
        groups are live views: read them before the next `apply`.
        """
        return self._queue.groups(before)

    def queue_due(self, now: float) -> list[QueuedRequest]:
        """Waiting requests whose deadline is at or before `now`, in rank order."""
        return self._queue.due(now)

    def expiries_due(self, now: float) -> list[Allocation]:
        """Live allocations whose `expires_at` is at or before `now`, oldest first."""
        return self._leases.expiries_due(now)

    def next_deadline(self) -> float | None:
        """The earliest lease expiry, queue deadline or preemption deadline, or None when nothing is timed."""
        expiry = self._leases.next_expiry()
        preempt = self._preemptions.next_deadline()
        times = [t for t in (expiry, self._queue.next_deadline(), preempt) if t is not None]
        return min(times, default=None)

    def allocations_on(self, node: str) -> list[Allocation]:
        """Live allocations on `node`, oldest first."""
        return self._leases.on_node(node)

    @property
    def holder_version(self) -> int:
        """Bumped whenever a GPU is taken or freed; 0 for a table where none ever was."""
        return self._leases.holder_version

    def holders_changed_since(self, version: int) -> list[str]:
        """Nodes whose held GPUs changed after `holder_version` was `version`, latest first."""
        return self._leases.holders_changed_since(version)

    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def queue_policy(self) -> QueuePolicy:
        """The queues and sharing rules in force (UNCONFIGURED until a SetQueuePolicy)."""
        return self._policy

    @property
    def queue_ledger(self) -> QueueLedger:
        """Per-queue GPUs, leases and waiters (read-only for callers)."""
        return self._queues

    def rank_key(self, request: AllocationRequest) -> RankKey:
        """`request`'s place in the serving order, with the policy's aging."""
        return request.rank_key(self._policy.age_weight_per_hour)

    def preempting(self, allocation_id: str) -> float | None:
        """The grace deadline of a lease being preempted, or None when it is not."""
        return self._preemptions.deadline(allocation_id)

    def preempting_reason(self, allocation_id: str) -> str | None:
        return self._preemptions.reason(allocation_id)

    def preemptions_due(self, now: float) -> list[tuple[str, str]]:
        """(allocation id, reason) of leases whose grace deadline is at or before `now`, by deadline."""
        return self._preemptions.due(now)

    def preempting_count(self) -> int:
        return len(self._preemptions)

    def preempting_ids(self) -> list[str]:
        """Leases in their preemption grace period, by id."""
        return self._preemptions.ids()

    def claims(self) -> Mapping[str, Claim]:
        """Waiting requests that victims are being preempted for: request id -> (node, victim ids)."""
        return self._preemptions.claims()

    def claim(self, request_id: str) -> Claim | None:
        return self._preemptions.claim(request_id)

    def queued(self, request_id: str) -> QueuedRequest | None:
        return self._queue.get(request_id)

    def record(self, request_id: str) -> RequestRecord | None:
        """Where `request_id` stands, or None when the table does not know it (any more)."""
        record = self._records.get(request_id)
        if record is not None:
            return record
        row = self._finished.get(request_id)
        return None if row is None else RequestRecord(*row)

    def _known(self, request_id: str) -> bool:
        return request_id in self._records or request_id in self._finished

    def record_of_allocation(self, allocation_id: str) -> RequestRecord | None:
        """The record of the request granted `allocation_id`, live or ended (while kept), or None."""
        alloc = self._leases.get(allocation_id)
        if alloc is None:
            members = self._leases.gang(allocation_id)
            alloc = members[0] if members else None
        if alloc is not None:
            return self._records.get(alloc.request.request_id)
        row = self._finished.by_allocation(allocation_id)
        return None if row is None else RequestRecord(*row)

    @property
    def usage_retention_s(self) -> float:
        """How long hourly usage is kept (the latest RecordUsage's retention)."""
        return self._usage.retention_s

    def usage(self, since: float, until: float, by: str, now: float) -> list[tuple[str, float, float]]:
        """GPU-seconds (name, allocated, utilized) per queue or service, in the whole hours covering [since, until).

        See `LeaseUsage.usage` (lease_usage.py): live leases add their share up to
        `now`. Raises ValueError for `by` not in USAGE_BY.
        """
        return self._usage.usage(since, until, by, now, self.allocations())

    def usage_totals(self, now: float) -> dict[UsageKey, tuple[float, float]]:
        """Lifetime (allocated, utilized) GPU-seconds per (queue, service), live leases counted up to `now`."""
        return self._usage.totals(now, self.allocations())

    # ------------------------------------------------------------------ apply

    def apply(self, command: Command) -> ApplyResult:
        """Apply one command in log order; a refused command changes nothing.

        Not even the clock: a refusal leaves `snapshot()` exactly as it was.
        """
        try:
            if isinstance(command, Allocate):
                result = self._allocate(command)
            elif isinstance(command, Enqueue):
                result = self._enqueue(command)
            elif isinstance(command, Release):
                result = self._release(command)
            elif isinstance(command, Renew):
                result = self._renew(command)
            elif isinstance(command, Cancel):
                result = self._cancel(command)
            elif isinstance(command, SetDrain):
                result = self._set_drain(command)
            elif isinstance(command, MarkHostLost):
                result = self._mark_host_lost(command)
            elif isinstance(command, OutboxDelivered):
                result = self._outbox_delivered(command)
            elif isinstance(command, RecordUsage):
                result = self._record_usage(command)
            elif isinstance(command, SetQueuePolicy):
                result = self._set_queue_policy(command)
            elif isinstance(command, Preempt):
                result = self._preempt(command)
            else:
                result = self._report_health(command)
        except CoordinatorError as exc:
            return ApplyResult(error=exc)
        self._clock = max(self._clock, command.at)
        self._prune()
        return result

    def _allocate(self, cmd: Allocate) -> ApplyResult:
        alloc = cmd.allocation
        members = cmd.members
        request_id = alloc.request.request_id
        # Every check runs before any change: a gang is granted whole or not at all.
        for member in members:
            if member.allocation_id in self._leases or self._leases.is_gang(member.allocation_id):
                raise Conflict(f"allocation {member.allocation_id} exists", code="duplicate_allocation")
            refs = [gpu.ref for gpu in member.gpus]
            if not refs or len(set(refs)) != len(refs) or any(ref.node != member.node for ref in refs):
                # Never proposed by the scheduler; refused here so that no log entry can
                # make the holder map disagree with the allocations (a repeated GPU
                # would be freed twice on release).
                raise InvalidRequest(
                    f"allocation {member.allocation_id} must name distinct GPUs of node {member.node}",
                    code="invalid_allocation",
                )
        if cmd.gang_rest or alloc.gang is not None:
            _check_gang(members)
            if alloc.gang is not None and self._leases.is_gang(alloc.gang.gang_id):
                raise Conflict(f"gang {alloc.gang.gang_id} exists", code="duplicate_allocation")
        queued = self._queue.get(request_id)
        if queued is None and self._known(request_id):
            raise Conflict(f"request {request_id} was already handled", code="duplicate_request")
        if alloc.share_group is not None:
            cost = self._check_share(cmd)
        else:
            for member in members:
                for gpu in member.gpus:
                    holder = self._leases.holder(gpu.ref)
                    if holder is not None:
                        raise Conflict(
                            f"GPU {gpu.node}/{gpu.index} is held by {holder}", code="gpu_busy"
                        )
            cost = cmd.gpu_total
        self._check_caps(alloc, cost)
        if queued is not None:
            self._dequeue(queued)
        for member in members:
            self._add_allocation(member)
        lease_id = alloc.allocation_id
        if alloc.gang is not None:
            lease_id = alloc.gang.gang_id
            self._leases.add_gang(lease_id, tuple(m.allocation_id for m in members))
        self._records[request_id] = RequestRecord(
            request_id=request_id,
            service_name=alloc.request.service_name,
            status=ALLOCATED,
            submitted_at=alloc.request.submitted_at,
            updated_at=cmd.at,
            allocation_id=lease_id,
        )
        event = LeaseEvent(
            "allocated", cmd.at, alloc.request, allocation=alloc, was_queued=queued is not None, gang=_gang_of(members)
        )
        return ApplyResult(events=(event,), affected=tuple(m.allocation_id for m in members))

    def _check_share(self, cmd: Allocate) -> int:
        """Refuse a share that does not fit its GPU now; return the GPUs it adds to its queue's count (0 or 1)."""
        alloc = cmd.allocation
        if cmd.gang_rest or alloc.gang is not None or len(alloc.gpus) != 1 or not alloc.request.requirements.is_share:
            raise InvalidRequest(
                f"share {alloc.allocation_id} must be one lease on one GPU with a memory budget", code="invalid_allocation"
            )
        ref = alloc.gpus[0].ref
        holder = self._leases.holder(ref)
        if holder is not None and ref not in self._leases.shares.gpus:
            raise Conflict(f"GPU {ref.node}/{ref.index} is held by {holder}", code="gpu_busy")
        self._leases.shares.check(alloc)
        return self._queues.share_cost(alloc.request.queue_name, ref)

    def _enqueue(self, cmd: Enqueue) -> ApplyResult:
        request_id = cmd.request.request_id
        if self._known(request_id):
            raise Conflict(f"request {request_id} was already handled", code="duplicate_request")
        self._add_queued(QueuedRequest(cmd.request, cmd.deadline))
        self._records[request_id] = RequestRecord(
            request_id=request_id,
            service_name=cmd.request.service_name,
            status=QUEUED,
            submitted_at=cmd.request.submitted_at,
            updated_at=cmd.at,
        )
        return ApplyResult(events=(LeaseEvent("queued", cmd.at, cmd.request),), affected=(request_id,))

    def _release(self, cmd: Release) -> ApplyResult:
        expired = cmd.reason == "expired"
        preempted = cmd.reason in PREEMPTION_END_REASONS
        events: list[LeaseEvent] = []
        affected: list[str] = []
        for unit in self._units(cmd.allocation_ids):
            # A gang's members share expiry and preemption deadline: the first decides for all.
            alloc = unit[0]
            allocation_id = alloc.allocation_id
            if expired and (alloc.expires_at is None or alloc.expires_at > cmd.at):
                # Renewed after the expiry was proposed: the renewal was acknowledged,
                # so the lease lives on. Skipped like an id that is already gone.
                continue
            if preempted:
                deadline = self.preempting(allocation_id)
                if deadline is None or deadline > cmd.at:
                    # Not being preempted, or its grace period runs on: a preemption
                    # ends a lease at its deadline, never before (an early end is the
                    # holder's own release).
                    continue
            for member in unit:
                self._remove_allocation(member, cmd.at)
            reason = "lease_ttl" if expired else cmd.reason
            self._finish(alloc.request.request_id, EXPIRED if expired else RELEASED, cmd.at, reason)
            events.append(
                LeaseEvent(
                    "expired" if expired else "preempted" if preempted else "released",
                    cmd.at,
                    alloc.request,
                    allocation=alloc,
                    reason=reason,
                    gang=_gang_of(unit),
                )
            )
            affected.extend(m.allocation_id for m in unit)
        if not affected:
            what = "expired allocation" if expired else "preempted allocation" if preempted else "live allocation"
            raise NotFound(f"no {what} among {', '.join(cmd.allocation_ids) or 'none'}")
        return ApplyResult(events=tuple(events), affected=tuple(affected))

    def _mark_host_lost(self, cmd: MarkHostLost) -> ApplyResult:
        # Oldest first (allocations() order), so events and `affected` come out in
        # the same order on every replica.
        lost = [
            a
            for a in self.allocations_on(cmd.node)
            if cmd.allocated_before is None or a.allocated_at <= cmd.allocated_before
        ]
        if not lost:
            # Nothing live there: already marked by an earlier entry, or released
            # meanwhile. Refused like a release of ids that are gone, so a repeat
            # changes nothing, not even the clock, and emits nothing.
            raise NotFound(f"no live allocation on node {cmd.node}")
        events: list[LeaseEvent] = []
        affected: list[str] = []
        # A gang with a member on the lost host is lost whole, on every node.
        for unit in self._units(a.allocation_id for a in lost):
            alloc = unit[0]
            for member in unit:
                # As on release: telemetry from before `at` describes the old tenant.
                self._remove_allocation(member, cmd.at)
            self._finish(alloc.request.request_id, LOST, cmd.at, "host_lost")
            events.append(
                LeaseEvent("lost", cmd.at, alloc.request, allocation=alloc, reason="host_lost", gang=_gang_of(unit))
            )
            affected.extend(m.allocation_id for m in unit)
        return ApplyResult(events=tuple(events), affected=tuple(affected))

    def _outbox_delivered(self, cmd: OutboxDelivered) -> ApplyResult:
        if cmd.through <= self._outbox_delivered_through:
            # A stale report (a previous leader's, applied late): progress never goes back.
            raise Conflict(
                f"outbox already delivered through {self._outbox_delivered_through}", code="stale_outbox_progress"
            )
        self._outbox_delivered_through = cmd.through
        return ApplyResult()

    def _record_usage(self, cmd: RecordUsage) -> ApplyResult:
        self._usage.record(cmd, self._clock)
        return ApplyResult()

    def _set_queue_policy(self, cmd: SetQueuePolicy) -> ApplyResult:
        if cmd.policy == self._policy:
            # A repeat (a new leader proposing what is already in force): refused,
            # so it changes nothing, not even the clock.
            raise Conflict("that queue policy is already in force", code="policy_unchanged")
        aging_changed = cmd.policy.age_weight_per_hour != self._policy.age_weight_per_hour
        self._policy = cmd.policy
        if aging_changed:
            # The serving order depends on the aging weight: re-rank every waiter.
            queued = list(self._queue)
            self._queue = WaitQueue(queued, age_weight_per_hour=cmd.policy.age_weight_per_hour)
            self._queued_shares = WaitQueue(self._queued_shares, age_weight_per_hour=cmd.policy.age_weight_per_hour)
            self._queues = QueueLedger(cmd.policy.age_weight_per_hour)
            self._queues.load(self._leases.values(), queued, self._preemptions)
        return ApplyResult()

    def _preempt(self, cmd: Preempt) -> ApplyResult:
        # A victim in a gang takes its whole gang, with the same deadline.
        cmd = self._whole_gang_victims(cmd)
        # Checked whole first: a refusal changes nothing.
        if cmd.reason not in PREEMPTION_REASONS:
            raise InvalidRequest(f"unknown preemption reason {cmd.reason!r}", code="invalid_command")
        if not cmd.victims:
            raise InvalidRequest("a preemption needs at least one victim", code="invalid_command")
        ids = [i for i, _ in cmd.victims]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("a preemption names a victim twice", code="invalid_command")
        for allocation_id, deadline in cmd.victims:
            alloc = self._leases.get(allocation_id)
            if alloc is None:
                raise NotFound(f"no live allocation {allocation_id} to preempt")
            if allocation_id in self._preemptions:
                raise Conflict(f"allocation {allocation_id} is already being preempted", code="already_preempting")
            if not alloc.request.preemptible:
                raise Conflict(f"allocation {allocation_id} is not preemptible", code="not_preemptible")
            if alloc.share_group is not None:
                # Its end frees no GPU while other shares stay (docs/shapes.md): never a victim.
                raise Conflict(f"allocation {allocation_id} is a share of a GPU", code="not_preemptible")
            if not (math.isfinite(deadline) and deadline >= cmd.at):
                raise InvalidRequest(f"preemption deadline {deadline} is before {cmd.at}", code="invalid_command")
        if cmd.request_id is not None:
            claimant = self._queue.get(cmd.request_id)
            if claimant is None:
                raise NotFound(f"request {cmd.request_id} no longer waits")
            old = self._preemptions.claim(cmd.request_id)
            if old is not None and any(v in self._leases for v in old[1]):
                raise Conflict(f"request {cmd.request_id} already has victims", code="already_claimed")
            if cmd.node is None:
                raise InvalidRequest("a preemption for a request names its node", code="invalid_command")
            self._check_guarantees_kept(cmd, claimant.request.queue_name)
        events: list[LeaseEvent] = []
        for allocation_id, deadline in cmd.victims:
            alloc = self._leases[allocation_id]
            self._preemptions.start(allocation_id, deadline, cmd.reason)
            self._queues.mark_preempting(alloc)
            if alloc.gang is not None and alloc.gang.rank > 0:
                continue  # the gang's owner hears once, with its first member
            events.append(
                LeaseEvent(
                    "preempting",
                    cmd.at,
                    alloc.request,
                    allocation=alloc,
                    reason=cmd.reason,
                    deadline=deadline,
                    gang=_gang_of(self.lease_unit(allocation_id)),
                )
            )
        if cmd.request_id is not None and cmd.node is not None:
            self._preemptions.set_claim(cmd.request_id, cmd.node, tuple(ids))
        return ApplyResult(events=tuple(events), affected=tuple(ids))

    def _units(self, allocation_ids: Iterable[str]) -> list[tuple[Allocation, ...]]:
        """The live leases `allocation_ids` name, each widened to its whole gang, once each, in first-named order.

        Ids of leases already gone are skipped (an earlier entry ended them).
        """
        units: dict[str, tuple[Allocation, ...]] = {}
        for allocation_id in _unique(allocation_ids):
            unit = self.lease_unit(allocation_id)
            if unit and unit[0].allocation_id not in units:
                units[unit[0].allocation_id] = unit
        return list(units.values())

    def _whole_gang_victims(self, cmd: Preempt) -> Preempt:
        """`cmd` with each victim in a gang widened to all its members (same deadline)."""
        if not self._leases.gang_count():
            return cmd
        victims: list[tuple[str, float]] = []
        named = {i for i, _ in cmd.victims}
        for allocation_id, deadline in cmd.victims:
            victims.append((allocation_id, deadline))
            for member in self.lease_unit(allocation_id):
                if member.allocation_id not in named:
                    named.add(member.allocation_id)
                    victims.append((member.allocation_id, deadline))
        return dataclasses.replace(cmd, victims=tuple(victims))

    def _check_caps(self, alloc: Allocation, gpus: int) -> None:
        """Refuse an allocation that would take its queue (or the queue's parent) past `max_gpus`.

        The scheduler never proposes one; checked here too so that no race between
        decisions (a deposed leader's entry, a decision on a table one entry old)
        can ever pass a cap.
        """
        if not self._policy.configured:
            return
        name = alloc.request.queue_name
        spec = self._policy.spec(name)
        if spec.max_gpus is not None and self._queues.gpus[name] + gpus > spec.max_gpus:
            raise Conflict(f"queue {name} would pass its max_gpus {spec.max_gpus}", code="queue_quota")
        if spec.parent is not None:
            parent = self._policy.spec(spec.parent)
            held = sum(self._queues.gpus[c] for c in self._policy.children(parent.name))
            if parent.max_gpus is not None and held + gpus > parent.max_gpus:
                raise Conflict(f"queue {parent.name} would pass its max_gpus {parent.max_gpus}", code="queue_quota")

    def _check_guarantees_kept(self, cmd: Preempt, claimant_queue: str) -> None:
        """Refuse a preemption that would take another queue below its guarantee.

        Checked here, on the state it applies to, not only where it was decided:
        leases may have ended between the two, and work within a guarantee is
        never taken for another queue's request. (Lower-priority work of the
        claimant's own queue may be, by the priority gap.)
        """
        taken: Counter[str] = Counter()
        for allocation_id, _ in cmd.victims:
            victim = self._leases[allocation_id]
            if victim.request.queue_name != claimant_queue:
                taken[victim.request.queue_name] += len(victim.gpus)
        for queue, gpus in taken.items():
            guarantee = self._policy.spec(queue).guarantee
            # Leases already in their grace period are gone from the queue as far as
            # its guarantee goes: two preemptions may not each take what only one could.
            if self._queues.kept(queue) - gpus < guarantee:
                raise Conflict(
                    f"preempting {gpus} GPU(s) of queue {queue} would take it below its guarantee of {guarantee}",
                    code="guarantee_kept",
                )

    def _renew(self, cmd: Renew) -> ApplyResult:
        unit = self.lease_unit(cmd.allocation_id)
        if not unit:
            raise NotFound(f"no live allocation {cmd.allocation_id}")
        alloc = unit[0]
        if alloc.expires_at is not None and alloc.expires_at <= cmd.at:
            raise Conflict(f"allocation {cmd.allocation_id} has expired", code="lease_expired")
        renewed = []
        # A gang's members are renewed together: they keep one expiry.
        for member in unit:
            fresh = dataclasses.replace(member, expires_at=cmd.expires_at)
            self._leases.renew(fresh)
            renewed.append(fresh)
        event = LeaseEvent("renewed", cmd.at, alloc.request, allocation=renewed[0], gang=_gang_of(tuple(renewed)))
        return ApplyResult(events=(event,), affected=tuple(m.allocation_id for m in renewed))

    def _cancel(self, cmd: Cancel) -> ApplyResult:
        timed_out = cmd.reason == "queue_timeout"
        events: list[LeaseEvent] = []
        affected: list[str] = []
        for request_id in _unique(cmd.request_ids):
            queued = self._queue.get(request_id)
            if queued is None:
                continue
            self._dequeue(queued)
            self._finish(request_id, EXPIRED if timed_out else CANCELLED, cmd.at, cmd.reason)
            events.append(
                LeaseEvent(
                    "expired" if timed_out else "cancelled",
                    cmd.at,
                    queued.request,
                    reason=cmd.reason,
                    was_queued=True,
                )
            )
            affected.append(request_id)
        if not affected:
            raise NotFound(f"no queued request among {', '.join(cmd.request_ids) or 'none'}")
        return ApplyResult(events=tuple(events), affected=tuple(affected))

    def _set_drain(self, cmd: SetDrain) -> ApplyResult:
        ref = GpuRef(cmd.node, cmd.index)
        if cmd.drained:
            self._drained[ref] = cmd.reason
        else:
            self._drained.pop(ref, None)
        return ApplyResult()

    def _report_health(self, cmd: ReportGpuHealth) -> ApplyResult:
        ref = GpuRef(cmd.node, cmd.index)
        before = self._gpu_health.get(ref, (HEALTHY, ()))[0]
        if cmd.state == HEALTHY:
            self._gpu_health.pop(ref, None)
        else:
            self._gpu_health[ref] = (cmd.state, cmd.reasons)
        if cmd.state != UNHEALTHY or before == UNHEALTHY:
            return ApplyResult()
        # Health is recorded per GPU; the leases on it are the GPU's own, its shares, or its MIG slices'.
        holders = [self._leases.holder(ref), *self._leases.shares.tenants(ref)]
        if gpu_of_slice(cmd.index) is None:
            holders += [self._leases.holder(GpuRef(cmd.node, slice_index(cmd.index, i))) for i in range(SLOTS_PER_GPU)]
        affected = [h for h in dict.fromkeys(holders) if h is not None]
        if not affected:
            return ApplyResult()
        # The lease is kept (the job may survive, and only its owner knows), but
        # its owner and the metrics hear that a GPU under it turned unhealthy.
        reason = f"GPU {cmd.node}/{cmd.index}: {'; '.join(cmd.reasons) or 'unhealthy'}"
        events = tuple(
            LeaseEvent("gpu_unhealthy", cmd.at, self._leases[h].request, allocation=self._leases[h], reason=reason)
            for h in affected
        )
        return ApplyResult(events=events, affected=tuple(affected))

    # -- index upkeep: every change to allocations and the queue goes through these

    def _load(self, allocs: list[Allocation], queued: list[QueuedRequest]) -> None:
        """Fill an empty table's allocations, queue and their indexes at once (a restore).

        Sorted containers built from whole lists cost one sort each, where adding
        items one by one costs a bisect and an insert per item and index.
        """
        self._leases.load(allocs)
        self._usage.leases_started(allocs)
        self._queue = WaitQueue(queued, age_weight_per_hour=self._policy.age_weight_per_hour)
        self._queued_shares = WaitQueue(
            (q for q in queued if q.request.requirements.is_share), age_weight_per_hour=self._policy.age_weight_per_hour
        )
        self._queues = QueueLedger(self._policy.age_weight_per_hour)
        self._queues.load(allocs, queued, self._preemptions)

    def _add_allocation(self, alloc: Allocation) -> None:
        self._leases.add(alloc)
        self._usage.leases_started((alloc,))
        self._queues.add_lease(alloc)

    def _remove_allocation(self, alloc: Allocation, at: float) -> None:
        """End a lease at `at`, whatever the reason: its GPUs are freed and its GPU-seconds credited."""
        for ref in self._leases.remove(alloc):
            self._released_at[ref] = at
        self._usage.lease_ended(alloc, at, self._clock)
        self._allocation_texts.pop(alloc.allocation_id, None)
        self._queues.remove_lease(alloc, preempting=self._preemptions.end(alloc.allocation_id))

    def _add_queued(self, queued: QueuedRequest) -> None:
        self._queue.add(queued)
        self._queues.add_waiting(queued)
        if queued.request.requirements.is_share:
            self._queued_shares.add(queued)

    def _dequeue(self, queued: QueuedRequest) -> None:
        self._queue.remove(queued)
        self._queues.remove_waiting(queued)
        if queued.request.requirements.is_share:
            self._queued_shares.remove(queued)
        self._queue_texts.pop(queued.request.request_id, None)
        # Allocated, cancelled or timed out: its victims' grace periods run on
        # (they were promised a deadline), but the GPUs are no longer held for it.
        self._preemptions.drop_claim(queued.request.request_id)

    def _finish(self, request_id: str, status: str, at: float, reason: str) -> None:
        record = self._records.pop(request_id)
        self._finished.add(
            [request_id, record.service_name, status, record.submitted_at, at, record.allocation_id, reason]
        )

    def _prune(self) -> None:
        self._finished.prune(self._clock - self.retention_s)
        self._usage.prune(self._clock)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> Wire:
        """The whole state as a canonical plain dict (equal tables give equal dicts).

        See `restore` for why the garbage collector is paused meanwhile.

        The versions and their wire form are lease_snapshot.py's.
        """
        with collector_paused():
            capture = self.snapshot_capture()
            wire = capture.to_wire()
            self.keep_texts(capture, wire)
            return wire

    def snapshot_capture(self) -> SnapshotCapture:
        """The state for `snapshot()`, consistent now, with the JSON texts not made yet left to make.

        Cheap where `snapshot()` is not: after a burst, thousands of leases and
        waiters have no text yet, and making them is most of a snapshot's cost.
        `SnapshotCapture.to_wire()` makes them and reads nothing of the table, so
        a shell can run it in a worker thread while the table goes on changing
        (the items are immutable), then hand the texts back with `keep_texts`.
        """
        return SnapshotCapture(self._snapshot())

    def keep_texts(self, capture: SnapshotCapture, wire: Wire) -> None:
        """Cache the texts `capture.to_wire()` made (as `wire`), for items that are still live and unchanged."""
        for item, text in zip(capture.wire["allocations"], wire["allocations"]):
            if isinstance(item, Allocation) and self._leases.get(item.allocation_id) is item:
                self._allocation_texts[item.allocation_id] = (item, text)
        for item, text in zip(capture.wire["queue"], wire["queue"]):
            if isinstance(item, QueuedRequest) and self._queue.get(item.request.request_id) is item:
                self._queue_texts[item.request.request_id] = (item, text)

    def _snapshot(self) -> Wire:
        return {
            "version": snapshot_version(
                shares=bool(self._leases.shares.gpus or self._queued_shares),
                gangs_or_mig=bool(self._leases.gang_count()) or self._uses_mig(),
            ),
            "clock": self._clock,
            "retention_s": self.retention_s,
            "allocations": [text_or_item(self._allocation_texts, a.allocation_id, a) for a in self.allocations()],
            "queue": [text_or_item(self._queue_texts, q.request.request_id, q) for q in self._queue],
            "records": [record_row(self._records[k]) for k in sorted(self._records)],
            "finished": self._finished.to_wire(),
            "released_at": [
                [ref.node, ref.index, at] for ref, at in sorted(self._released_at.items())
            ],
            "drained": [[ref.node, ref.index, why] for ref, why in sorted(self._drained.items())],
            "gpu_health": [
                [ref.node, ref.index, state, list(reasons)]
                for ref, (state, reasons) in sorted(self._gpu_health.items())
            ],
            "outbox_delivered_through": self._outbox_delivered_through,
            **self._usage.to_wire(),
            "queue_policy": self._policy.to_wire(),
            **self._preemptions.to_wire(),
        }

    def _uses_mig(self) -> bool:
        """Whether a lease or a waiter asks for a MIG slice (a snapshot walks them all anyway)."""
        return any(a.request.requirements.mig_profile is not None for a in self._leases.values()) or any(
            q.request.requirements.mig_profile is not None for q in self._queue
        )

    @classmethod
    def restore(cls, snap: Mapping[str, Any]) -> LeaseTable:
        """Rebuild a table from `snapshot()` output of this version, or of versions 4 (no gangs), 3 (no queues), 2 or 1 (no usage).

        The cyclic garbage collector is paused meanwhile: a restore makes a few
        hundred thousand objects, none of them garbage, and the collections they
        would trigger walk the whole heap again and again (three times the work
        of the restore itself at 8,000 leases and 10,000 waiters).

        Raises ValueError for a snapshot of an unknown version.
        """
        with collector_paused():
            return cls._restore(snap)

    @classmethod
    def _restore(cls, snap: Mapping[str, Any]) -> LeaseTable:
        version = snap.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported lease-table snapshot version {version!r}")
        table = cls(retention_s=float(snap["retention_s"]))
        table._clock = float(snap["clock"])
        # Versions before 4 had no queues: the unconfigured policy, nothing preempting.
        table._policy = QueuePolicy.from_wire(snap.get("queue_policy", {}))
        table._preemptions = PreemptionBook.from_wire(snap)
        if version == 1:
            # Wire dicts; every record a dict, finished or not, by id.
            table._load(
                [Allocation.from_wire(w) for w in snap["allocations"]],
                [QueuedRequest.from_wire(w) for w in snap["queue"]],
            )
            rows = [record_row(RequestRecord.from_wire(w)) for w in snap["records"]]
            live = [row for row in rows if row[2] not in TERMINAL_STATUSES]
            table._finished = FinishedRecords.of(row for row in rows if row[2] in TERMINAL_STATUSES)
        else:
            # One parse per list: thousands of small json.loads calls cost more.
            alloc_texts, queue_texts = snap["allocations"], snap["queue"]
            allocs = [Allocation.from_wire(w) for w in json.loads("[" + ",".join(alloc_texts) + "]")]
            queued = [QueuedRequest.from_wire(w) for w in json.loads("[" + ",".join(queue_texts) + "]")]
            table._load(allocs, queued)
            table._allocation_texts = {a.allocation_id: (a, t) for a, t in zip(allocs, alloc_texts)}
            table._queue_texts = {q.request.request_id: (q, t) for q, t in zip(queued, queue_texts)}
            live = snap["records"]
            table._finished = FinishedRecords.from_wire(snap["finished"])
        for row in live:
            table._records[row[0]] = RequestRecord(*row)
        for node, index, at in snap["released_at"]:
            table._released_at[GpuRef(str(node), int(index))] = float(at)
        for node, index, why in snap.get("drained", ()):
            table._drained[GpuRef(str(node), int(index))] = str(why)
        for node, index, state, reasons in snap.get("gpu_health", ()):
            table._gpu_health[GpuRef(str(node), int(index))] = (str(state), tuple(str(r) for r in reasons))
        table._outbox_delivered_through = int(snap.get("outbox_delivered_through", 0))
        table._usage = LeaseUsage.from_wire(snap)
        return table


def _gang_of(members: tuple[Allocation, ...]) -> tuple[Allocation, ...]:
    """`members` when they are a gang's, else () (the LeaseEvent.gang of a single lease)."""
    return members if members and members[0].gang is not None else ()


def _check_gang(members: tuple[Allocation, ...]) -> None:
    """Refuse an Allocate whose leases are not one whole gang of one request on distinct nodes."""
    first = members[0].gang
    ok = (
        first is not None
        and len(members) == first.size >= 2
        and len({m.node for m in members}) == len(members)
        and all(
            m.gang is not None
            and m.gang.gang_id == first.gang_id
            and m.gang.rank == rank
            and m.gang.size == first.size
            and m.request == members[0].request
            and m.expires_at == members[0].expires_at
            for rank, m in enumerate(members)
        )
    )
    if not ok:
        raise InvalidRequest(
            f"allocation {members[0].allocation_id}: a gang needs one lease per distinct node, ranked 0.., "
            "all of one request, gang id and expiry",
            code="invalid_allocation",
        )


def _health_ref(ref: GpuRef) -> GpuRef:
    """Where `ref`'s health is recorded: a MIG slice's is its GPU's."""
    gpu = gpu_of_slice(ref.index)
    return ref if gpu is None else GpuRef(ref.node, gpu)


def _unique(ids: Iterable[str]) -> list[str]:
    """Ids in first-seen order without repeats (a command may name one twice)."""
    return list(dict.fromkeys(ids))
