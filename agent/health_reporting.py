"""The leader's health reporters: GPU verdicts into the lease table, where they reach lease holders.

Two tasks of a ready leadership (agent/leadership.py):

- `report_local_health` writes this host's verdicts (from its own health
  policy, through the sampler) as `ReportGpuHealth` commands whenever one
  differs from the table's record: at the start of each leadership (the table
  may hold a verdict from before a restart that the fresh sampler no longer
  sees, or the reverse) and at every change.
- `record_remote_health` copies the verdicts the hosts it schedules gossip,
  as the pure `RemoteHealthPolicy` decides (coordinator/remote_health.py),
  each time gossip reports a change.

A verdict that cannot be written (storage failure, leadership moving) is logged
and skipped: health still shows in /gpu/status and the metrics and still guides
the scheduler, which reads it from the inventory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from coordinator.gpu_health import GpuHealth
from coordinator.model import GpuRef
from coordinator.remote_health import RemoteHealthPolicy

from agent.device_sampler import DeviceSampler
from agent.lease_service import LeaseService
from agent.membership import MembershipService
from agent.node_meta import gossiped_reasons

log = logging.getLogger(__name__)

# How often the leader compares the health members gossip with the table's record
# when gossip reports nothing (a quiet period that ends needs no gossip to end).
_REMOTE_HEALTH_POLL_S = 1.0


async def report_local_health(service: LeaseService, sampler: DeviceSampler) -> None:
    """Keep the table's record of this host's GPUs equal to the sampler's verdicts, at every change.

    Each pass compares every local GPU with the table, so it also reconciles a
    record from before a restart that the fresh sampler no longer sees (or the
    reverse). Verdict changes are minutes apart (the quiet period), so a pass per
    change records each of them.
    """
    changes = _Changes()
    stop_listening = sampler.on_health_change(lambda index, health: changes.note(""))
    node = sampler.node_name
    try:
        while True:
            for snap in sampler.snapshots():
                recorded = service.table.gpu_health(GpuRef(node, snap.reading.index))
                if recorded != (snap.health.state, snap.health.reasons):
                    await _report(service, node, snap.reading.index, snap.health)
            await changes.wait(math.inf)
    finally:
        stop_listening()


async def record_remote_health(
    service: LeaseService,
    membership: MembershipService,
    scheduled: Callable[[str], bool],
    quiet_s: float,
) -> None:
    """Record the verdicts of the GPUs of alive members this leader schedules (`scheduled(name)`), as they change."""
    policy = RemoteHealthPolicy(quiet_s)
    changes = _Changes()
    stop_listening = membership.on_change(changes.note)
    try:
        while True:
            now = trio.current_time()
            for member in membership.members():
                name = member.view.name
                if name == membership.name or member.view.status != "alive" or member.meta is None or not scheduled(name):
                    continue
                for gpu in member.meta.gpus:
                    ref = GpuRef(name, gpu.index)
                    state, why = service.table.gpu_health(ref)
                    verdict = policy.decide(ref, (gpu.health, gpu.reasons), (state, gossiped_reasons(state, why)), now)
                    if verdict is not None:
                        await _report(service, name, gpu.index, GpuHealth(*verdict))
            await changes.wait(_REMOTE_HEALTH_POLL_S)
    finally:
        stop_listening()


class _Changes:
    """Gossip's change notifications, as something a task can wait on (bounded)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def note(self, name: str) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        with trio.move_on_after(timeout_s):
            await self._event.wait()
        self._event = trio.Event()


async def _report(service: LeaseService, node: str, index: int, health: GpuHealth) -> None:
    try:
        await service.report_health(node, index, health.state, health.reasons)
    except Exception:
        log.exception("could not record health of GPU %s/%d", node, index)
