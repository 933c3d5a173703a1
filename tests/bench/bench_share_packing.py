"""Share-packing benchmark: does placing shares of a GPU stay cheap as the shared GPUs and the waiting shares grow?

Run it with `python -m tests.bench.bench_share_packing` (docs/benchmarks.md,
"Scale: the scheduler core"); it is not part of the test suite. Figures are
reported, never asserted.

What runs, on the pure core (coordinator/scheduler.py, share_placement.py):
N hosts x 8 H100s, every GPU shared (a 60 GB share of queue `b` on each,
21 GB left), queues `a` (max_gpus = 1) and `b`, both allowing cross-queue
shares. Queue `a` holds one GPU already (a share that fills it), so every
other shared GPU would cost it a GPU of quota it may not have: the case that
made a share read every GPU of its group. With W waiting 20 GB shares of `a`
(`--waiting`, the same at every N, so the growth column is the cluster's
alone), each operation is timed by thread CPU time:

- tick with W shares waiting and none placeable (every tick pays it);
- admit a 20 GB share of `b` that packs (best fit over the group);
- admit a 20 GB share of `a` that cannot pack (it queues).
"""

from __future__ import annotations

import argparse
import platform
import random
from typing import Any

from coordinator.commands import Allocate, Enqueue, SetQueuePolicy
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocationRequest, GpuView, Requirements
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.bench.bench_scale import GPUS_PER_HOST, H100, H100_MB, print_growth_table, timed

OPERATIONS = ("tick, W shares waiting, none placeable", "admit share that packs", "admit share that queues")


def share(request_id: str, mb: int, queue: str, at: float) -> AllocationRequest:
    return AllocationRequest(
        request_id=request_id,
        service_name=f"svc-{queue}",
        workload_type="inference",
        priority=5,
        requirements=Requirements(1, mb, share_mb=mb),
        ttl_s=0.0,
        submitted_at=at,
        queue_name=queue,
    )


def build(hosts: int, waiting: int) -> tuple[LeaseTable, Inventory, Scheduler]:
    views = [GpuView(f"host-{h:04d}", i, f"GPU-{h}-{i}", H100, H100_MB) for h in range(hosts) for i in range(GPUS_PER_HOST)]
    table, inventory = LeaseTable(), Inventory.of(views)
    scheduler = Scheduler(SchedulerConfig(0.0, 10**9), random.Random(1))
    policy = QueuePolicy.of((QueueSpec("a", max_gpus=1, cross_queue_shares=True), QueueSpec("b", cross_queue_shares=True)))

    def apply(command: Any) -> None:
        result = table.apply(command)
        assert result.ok, result.error

    apply(SetQueuePolicy(0.0, policy))
    apply(scheduler.admit(share("a-full", H100_MB, "a", 0.0), table, inventory, 0.0))
    for k in range(len(views) - 1):
        apply(scheduler.admit(share(f"b-{k}", 60_000, "b", 0.0), table, inventory, 0.0))
    for k in range(waiting):
        command = scheduler.admit(share(f"a-wait-{k}", 20_000, "a", 1.0), table, inventory, 1.0)
        assert isinstance(command, Enqueue), command
        apply(command)
    return table, inventory, scheduler


def measure(hosts: int, waiting: int, repeats: int) -> dict[str, list[float]]:
    table, inventory, scheduler = build(hosts, waiting)
    out: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    for k in range(repeats):
        now = 2.0 + k
        assert timed(lambda: scheduler.tick(table, inventory, now), out[OPERATIONS[0]]) == []
        packs = timed(lambda: scheduler.admit(share(f"b-new-{k}", 20_000, "b", now), table, inventory, now), out[OPERATIONS[1]])
        assert isinstance(packs, Allocate), packs
        queues = timed(lambda: scheduler.admit(share(f"a-new-{k}", 20_000, "a", now), table, inventory, now), out[OPERATIONS[2]])
        assert isinstance(queues, Enqueue), queues
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--waiting", type=int, default=500, help="waiting shares that cannot be placed (W)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, timed by thread CPU time")
    results = {hosts: measure(hosts, args.waiting, args.repeats) for hosts in args.hosts}
    columns = {n: f"N={n} ({n * GPUS_PER_HOST} shared GPUs, W={args.waiting})" for n in results}
    print_growth_table("operation", columns, results, list(OPERATIONS))

if __name__ == "__main__":
    main()
