"""The leader's usage recorder: leased GPUs' utilization, into the replicated ledger and idle reclaim.

Theory of operation
-------------------
Allocated GPU-seconds need no telemetry: the lease table credits them when a
lease ends (coordinator/lease_table.py). Utilized GPU-seconds do, and telemetry
is not replicated, so the ready leader measures them: every POLL_S it looks at
each GPU the table holds (its own through the sampler, the others through their
gossiped figures, both via the inventory) and feeds the utilization meter
(coordinator/usage_meter.py); every `[accounting] record_interval_s` it
proposes the sums as RecordUsage commands, coalesced per (queue, service).

A poll costs O(GPUs held), not a walk of the cluster or of history. A GPU
missing from the inventory (its host is not alive in gossip) counts as unknown:
no utilized time is claimed for it.

What is lost: a record the log refuses or cannot commit is dropped, not retried
(it may have applied: retrying could count it twice), and a new leader starts
measuring afresh; either loses at most one interval of utilized time, never
allocated time. The figure errs low, never high.

Idle reclaim: the same looks feed the idle detector (coordinator/idle_reclaim.py)
with the policies of the queues that set `idle_reclaim` in the table's queue
policy. A lease that has been under its queue's floor on every GPU for the
queue's period, and is live, preemptible and not already being preempted, is
preempted with reason "idle": a Preempt whose deadline is now plus its queue's
`preemption_grace_s` (the holder hears `lease_preempting`; the scheduler ends
the lease at the deadline). A new leader measures idleness afresh, so a
failover restarts the period: reclaim errs late, never early. A Preempt the
table refuses (the lease ended meanwhile) is dropped; one still due is tried
again at the next look.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from coordinator.idle_reclaim import IdlePolicy, IdleReclaimDetector
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.queues import QueuePolicy
from coordinator.usage_meter import UtilizationMeter

from agent.lease_service import LeaseService

log = logging.getLogger(__name__)

# Seconds between looks at the leased GPUs. Local figures change every sample,
# remote ones when their gossip changes (5 % steps); a 5 s step function of
# them is within a fraction of a percent of the true integral over a minute.
POLL_S = 5.0


class UsageRecorder:
    """One leadership's measurement of utilized GPU-seconds (module docstring)."""

    def __init__(
        self,
        service: LeaseService,
        inventory: Callable[[], Inventory],
        *,
        record_interval_s: float,
        retention_s: float,
        clock: Callable[[], float],
        poll_s: float = POLL_S,
    ) -> None:
        self._service = service
        self._inventory = inventory
        self._record_interval_s = record_interval_s
        self._retention_s = retention_s
        self._clock = clock
        self._poll_s = poll_s
        # Three missed polls and the gap is not counted (a stalled loop, a slow disk).
        self.meter = UtilizationMeter(max_gap_s=3 * poll_s)
        self.idle = IdleReclaimDetector({})
        self._idle_policy_of: QueuePolicy | None = None

    def poll(self, now: float) -> None:
        """Observe every GPU the table holds, at `now`: for the meter and the idle detector."""
        table = self._service.table
        if table.queue_policy is not self._idle_policy_of:
            self._idle_policy_of = table.queue_policy
            self.idle.set_policies(idle_policies(table.queue_policy))
        inventory = self._inventory()
        for ref, allocation_id in table.held_gpus().items():
            alloc = table.allocation(allocation_id)
            if alloc is None:
                continue
            view = inventory.get(ref)
            utilization = None if view is None else view.utilization_pct
            # A shared GPU's utilization is credited to its stand-in holder (the least
            # share id): NVML measures the GPU, not each tenant (docs/shapes.md).
            self.meter.observe(ref, now, utilization, allocation_id, (alloc.request.queue_name, alloc.request.service_name))
            if alloc.share_group is None:
                # Shares are never preempted, for idleness or anything else (their end frees no GPU).
                self.idle.observe(ref, now, utilization, alloc)
        self.idle.sweep(_LiveIn(table))

    async def reclaim_idle(self, now: float) -> None:
        """Preempt (reason "idle") every lease the detector finds due and that may still be (module docstring)."""
        table = self._service.table
        due = self.idle.due(now)
        idle = set(due)
        for allocation_id in due:
            alloc = table.allocation(allocation_id)
            if alloc is None or not alloc.request.preemptible or table.preempting(allocation_id) is not None:
                continue
            if alloc.gang is not None and not all(m.allocation_id in idle for m in table.lease_unit(allocation_id)):
                continue  # a gang is reclaimed whole: only once every node of it idles
            deadline = now + table.queue_policy.spec(alloc.request.queue_name).preemption_grace_s
            try:
                result = await self._service.preempt(((allocation_id, deadline),), "idle")
            except Exception as error:  # noqa: BLE001 - still due: tried again at the next look
                log.info("idle reclaim of %s not proposed (%s); retrying", allocation_id, error)
                return
            if result.ok:
                log.info(
                    "idle reclaim: %s (queue %s, idle since %s) ends at %s unless released",
                    allocation_id,
                    alloc.request.queue_name,
                    self.idle.idle_since(allocation_id),
                    deadline,
                )
            else:
                log.info("idle reclaim of %s refused: %s", allocation_id, result.error)

    async def record(self) -> None:
        """Propose what the meter summed since the last record (nothing when nothing was and retention is unchanged)."""
        rows = self.meter.take()
        try:
            await self._service.record_usage(rows, self._retention_s)
        except Exception as error:  # noqa: BLE001 - measurement: dropped, never retried (may have applied)
            log.info("usage record of %d row(s) not applied (%s); dropped", len(rows), error)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll and record for as long as this leadership lasts."""
        task_status.started()
        next_record = self._clock() + self._record_interval_s
        while True:
            now = self._clock()
            self.poll(now)
            await self.reclaim_idle(now)
            if now >= next_record:
                next_record = now + self._record_interval_s
                await self.record()
            await trio.sleep(min(self._poll_s, max(0.0, next_record - self._clock())))


def idle_policies(policy: QueuePolicy) -> dict[str, IdlePolicy]:
    """Queue name -> its `idle_reclaim`, for the queues of `policy` that set one."""
    return {spec.name: spec.idle_reclaim for spec in policy.queues if spec.idle_reclaim is not None}


class _LiveIn:
    """The table's live allocation ids, as a container (what the detector's sweep asks)."""

    def __init__(self, table: LeaseTable) -> None:
        self._table = table

    def __contains__(self, allocation_id: object) -> bool:
        return isinstance(allocation_id, str) and self._table.allocation(allocation_id) is not None
