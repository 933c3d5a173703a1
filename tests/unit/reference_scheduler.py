# Test-only: coordinator/scheduler.py verbatim as of commit 580c749, before the
# indexes. tests/unit/test_scheduler_equivalence.py checks the indexed scheduler against it.
"""The priority scheduler: decides which commands the leader proposes.

Theory of operation
-------------------
The scheduler is a pure function of the lease table, the cluster's GPUs (with
their latest telemetry), `now`, and the GPUs that in-flight proposals are about
to take. It never mutates the table: it returns commands, and the table changes
only when those commands are applied in log order.

Policy, in the order it is applied:

1. **Strict priority.** Requests are served in rank order: priority 10 before 1,
   then the oldest, then by request id (a total order, so ties are stable).
2. **One node per allocation, best fit.** Among the nodes where the request fits,
   prefer placements on healthy GPUs over degraded ones (unhealthy and drained
   GPUs are never chosen); then the node that leaves the fewest free GPUs stranded; then the one whose
   chosen GPUs have the least total memory (keep big GPUs for big jobs); then the
   node name. Within a node, the smallest adequate GPUs, lowest index first.
   A GPU is eligible when it is not unhealthy, not drained, free, matches the model and
   node constraints, has `min_memory_mb` of total memory, and - when its telemetry
   was sampled more than RELEASE_GRACE_S after its last release - has that much free
   memory and runs under `max_utilization` (busy, unleased GPUs are somebody else's).
3. **No starvation (conservative backfill).** A request that cannot be placed
   reserves, on the node where it is closest to fitting (most eligible free GPUs,
   among nodes that have enough matching GPUs at all), every eligible free GPU
   there. Requests ranked below it may not take reserved GPUs; they may only
   backfill GPUs that no higher-ranked request reserved. So the count of free
   GPUs a waiting request can use never shrinks because of lower-ranked work:
   each release brings it closer until it fits. A new request is ranked against
   the queue the same way, so it cannot jump ahead of equal or higher waiters.
4. **Leases and the queue end by time.** A lease whose `expires_at` has passed is
   released with reason "expired"; a queued request past its deadline is
   withdrawn with reason "queue_timeout". Both are commands with `at = now`, so
   a new leader simply continues them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from coordinator.commands import Allocate, Cancel, Command, Enqueue, Release
from coordinator.errors import Conflict, QueueFull, Unsatisfiable
from coordinator.lease_table import LeaseTable
from coordinator.model import HEALTHY, AllocatedGpu, Allocation, AllocationRequest, GpuRef, GpuView


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Scheduling limits; the defaults are SPEC.md's `[scheduler]` defaults."""

    # How long a queued request waits before it is withdrawn (0 = forever).
    queue_timeout_s: float = 3600.0
    # Bound on waiting requests: past it new requests get 503 queue_full rather
    # than an ever-growing queue that no one will serve.
    max_queue: int = 1000


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one request goes: a node and the GPUs chosen there."""

    node: str
    gpus: tuple[GpuView, ...]


class Scheduler:
    """Proposes allocations, queueing, expiries and queue timeouts."""

    def __init__(self, config: SchedulerConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng

    # ------------------------------------------------------------------ decisions

    def admit(
        self,
        request: AllocationRequest,
        table: LeaseTable,
        gpus: Sequence[GpuView],
        now: float,
        pending: Iterable[GpuRef] = (),
        pending_enqueues: int = 0,
    ) -> Command:
        """Decide a new request: Allocate when it fits now, else Enqueue.

        `pending` are GPUs that proposals in flight are about to take, and
        `pending_enqueues` the Enqueues in flight (they count against max_queue).
        Raises Unsatisfiable when no node could ever hold it, Conflict when it
        does not fit now and the caller asked not to queue, QueueFull when the
        queue is at its bound.
        """
        self.check_satisfiable(request, gpus)
        ahead = [q.request for q in table.queue() if q.request.rank_key() < request.rank_key()]
        placements = self._plan([*ahead, request], table, gpus, set(pending), released=set())
        placement = placements.get(request.request_id)
        if placement is not None:
            return Allocate(now, self._allocation(request, placement, now))
        if not request.queue:
            raise Conflict("no GPUs free that fit the request now (queue=false)", code="no_capacity")
        if table.queue_length() + pending_enqueues >= self.config.max_queue:
            raise QueueFull(f"the wait queue is full ({self.config.max_queue} requests)")
        timeout = self.config.queue_timeout_s
        return Enqueue(now, request, now + timeout if timeout > 0 else None)

    def tick(
        self,
        table: LeaseTable,
        gpus: Sequence[GpuView],
        now: float,
        pending: Iterable[GpuRef] = (),
    ) -> list[Command]:
        """Commands due at `now`: expiries, queue timeouts, then queue placements."""
        commands: list[Command] = []
        expired = [
            a for a in table.allocations() if a.expires_at is not None and a.expires_at <= now
        ]
        if expired:
            commands.append(Release(now, tuple(a.allocation_id for a in expired), "expired"))
        timed_out = [
            q.request.request_id
            for q in table.queue()
            if q.deadline is not None and q.deadline <= now
        ]
        if timed_out:
            commands.append(Cancel(now, tuple(timed_out), "queue_timeout"))
        gone = set(timed_out)
        waiting = [q.request for q in table.queue() if q.request.request_id not in gone]
        if waiting:
            # GPUs of expired leases count as free: their Release is ahead in the log.
            released = {g.ref for a in expired for g in a.gpus}
            placements = self._plan(waiting, table, gpus, set(pending), released)
            for request in waiting:
                placement = placements.get(request.request_id)
                if placement is not None:
                    commands.append(Allocate(now, self._allocation(request, placement, now)))
        return commands

    @staticmethod
    def next_deadline(table: LeaseTable) -> float | None:
        """The earliest lease expiry or queue deadline, or None when nothing is timed."""
        times = [a.expires_at for a in table.allocations() if a.expires_at is not None]
        times += [q.deadline for q in table.queue() if q.deadline is not None]
        return min(times) if times else None

    @staticmethod
    def check_satisfiable(request: AllocationRequest, gpus: Sequence[GpuView]) -> None:
        """Raise Unsatisfiable unless some node has enough GPUs matching the request.

        Health and drain are ignored here: a sick GPU may recover, a missing model never appears.
        """
        req = request.requirements
        by_node: dict[str, int] = {}
        for gpu in gpus:
            if req.matches_statically(gpu):
                by_node[gpu.node] = by_node.get(gpu.node, 0) + 1
        if any(count >= req.gpu_count for count in by_node.values()):
            return
        wanted = f"{req.gpu_count} GPU(s) with at least {req.min_memory_mb} MB"
        if req.gpu_model:
            wanted += f" of model {req.gpu_model!r}"
        if req.node:
            wanted += f" on node {req.node!r}"
        largest = max(by_node.values(), default=0)
        hint = ""
        if largest and req.node is None:
            hint = f"; to run over several nodes, ask gpus_per_node (at most {largest}) to split it into a gang"
        raise Unsatisfiable(
            f"no node can ever hold {wanted}: the best node has {largest} matching GPU(s){hint}",
            code="unsatisfiable",
        )

    # ------------------------------------------------------------------ planning

    def _plan(
        self,
        ranked: Sequence[AllocationRequest],
        table: LeaseTable,
        gpus: Sequence[GpuView],
        pending: set[GpuRef],
        released: set[GpuRef],
    ) -> dict[str, Placement]:
        """Walk requests in rank order: place each, or let it reserve GPUs below it."""
        taken = {ref for ref in table.held_gpus() if ref not in released} | pending
        by_node: dict[str, list[GpuView]] = {}
        for gpu in gpus:
            by_node.setdefault(gpu.node, []).append(gpu)
        placements: dict[str, Placement] = {}
        for request in ranked:
            placement = self._best_fit(request, by_node, taken, table, released)
            if placement is not None:
                placements[request.request_id] = placement
                taken.update(g.ref for g in placement.gpus)
            else:
                taken.update(self._reservation(request, by_node, taken, table, released))
        return placements

    def _best_fit(
        self,
        request: AllocationRequest,
        by_node: dict[str, list[GpuView]],
        taken: set[GpuRef],
        table: LeaseTable,
        released: set[GpuRef],
    ) -> Placement | None:
        need = request.requirements.gpu_count
        best: tuple[tuple[int, int, int, str], Placement] | None = None
        for node in sorted(by_node):
            node_gpus = by_node[node]
            candidates = [
                g for g in node_gpus if g.ref not in taken and _eligible(g, request, table, released)
            ]
            if len(candidates) < need:
                continue
            candidates.sort(key=lambda g: (g.health != HEALTHY, g.memory_total_mb, g.index))
            chosen = tuple(sorted(candidates[:need], key=lambda g: g.index))
            degraded = sum(1 for g in chosen if g.health != HEALTHY)
            free_left = sum(1 for g in node_gpus if g.ref not in taken and g.schedulable) - need
            score = (degraded, free_left, sum(g.memory_total_mb for g in chosen), node)
            if best is None or score < best[0]:
                best = (score, Placement(node, chosen))
        return None if best is None else best[1]

    def _reservation(
        self,
        request: AllocationRequest,
        by_node: dict[str, list[GpuView]],
        taken: set[GpuRef],
        table: LeaseTable,
        released: set[GpuRef],
    ) -> set[GpuRef]:
        req = request.requirements
        best: tuple[int, str] | None = None
        best_refs: set[GpuRef] = set()
        for node in sorted(by_node):
            node_gpus = by_node[node]
            capable = [g for g in node_gpus if g.schedulable and req.matches_statically(g)]
            if len(capable) < req.gpu_count:
                continue
            free = {
                g.ref for g in capable if g.ref not in taken and _eligible(g, request, table, released)
            }
            key = (-len(free), node)
            if best is None or key < best:
                best, best_refs = key, free
        return best_refs

    def _allocation(self, request: AllocationRequest, placement: Placement, now: float) -> Allocation:
        ttl = request.ttl_s
        return Allocation(
            allocation_id=f"{request.service_name}-{self._rng.getrandbits(64):016x}",
            request=request,
            node=placement.node,
            gpus=tuple(
                AllocatedGpu(g.node, g.index, g.uuid, g.name, g.memory_total_mb)
                for g in placement.gpus
            ),
            allocated_at=now,
            expires_at=now + ttl if ttl > 0 else None,
        )


# Seconds after a release during which a GPU's telemetry still speaks of the previous
# tenant: the release is stamped when proposed, before the device layer hears of it,
# and a job's memory and activity take a moment to drain. Two default sample
# intervals cover both.
RELEASE_GRACE_S = 2.0


def _eligible(
    gpu: GpuView, request: AllocationRequest, table: LeaseTable, released: set[GpuRef]
) -> bool:
    """Whether `gpu`, known to be free, may serve `request` now."""
    req = request.requirements
    if not gpu.schedulable or not req.matches_statically(gpu):
        return False
    # Telemetry from before (or just after) the last release describes the previous tenant.
    last_release = table.released_at(gpu.ref)
    stale = gpu.ref in released or (last_release > 0 and gpu.sampled_at <= last_release + RELEASE_GRACE_S)
    if stale:
        return True
    if gpu.memory_free_mb is not None and gpu.memory_free_mb < req.min_memory_mb:
        return False
    if gpu.utilization_pct is not None and gpu.utilization_pct > req.max_utilization:
        return False
    return True
