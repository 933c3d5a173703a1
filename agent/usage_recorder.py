"""The leader's usage recorder: leased GPUs' utilization, from telemetry into the replicated ledger.

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
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from coordinator.inventory import Inventory
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

    def poll(self, now: float) -> None:
        """Observe every GPU the table holds, at `now`."""
        table = self._service.table
        inventory = self._inventory()
        for ref, allocation_id in table.held_gpus().items():
            alloc = table.allocation(allocation_id)
            if alloc is None:
                continue
            view = inventory.get(ref)
            utilization = None if view is None else view.utilization_pct
            self.meter.observe(ref, now, utilization, allocation_id, (alloc.request.queue_name, alloc.request.service_name))

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
            if now >= next_record:
                next_record = now + self._record_interval_s
                await self.record()
            await trio.sleep(min(self._poll_s, max(0.0, next_record - self._clock())))
