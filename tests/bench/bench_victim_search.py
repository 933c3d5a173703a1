"""How victim search grows with the fleet: one scheduling pass that must preempt.

Run it with `python -m tests.bench.bench_victim_search` (see docs/benchmarks.md,
"Victim search"); not part of the test suite. The pure core only, timed by the
thread's CPU time around one `Scheduler.tick`, as bench_scale times its
operations.

Per size N (hosts of 8 GPUs): queue `owner` is guaranteed half the fleet and
holds none of it; queue `borrower` (no guarantee) holds the GPUs in one-GPU
leases. One request of `owner`, within its guarantee, waits; the tick runs
victim search for it (coordinator/preemption.py), and the waiter is cancelled
again so every sample sees the same state. Cases:

- reclaim 1 GPU: every GPU borrowed; the set is one lease (any node);
- reclaim 8 GPUs: every GPU borrowed; the set is a whole node's 8 leases;
- reclaim 8 GPUs, no set: on every node `owner` holds one GPU (within its
  guarantee, never a victim) and `borrower` seven; no node can give 8, so the
  search finds nothing - the case a whole-host request meets pass after pass.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

from coordinator.commands import Allocate, Cancel, Enqueue, Preempt, SetQueuePolicy
from coordinator.inventory import Inventory
from coordinator.lease_table import LeaseTable
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, GpuView, Requirements
from coordinator.queues import QueuePolicy, QueueSpec
from coordinator.scheduler import Scheduler, SchedulerConfig
from tests.bench.bench_scale import GPUS_PER_HOST, H100, H100_MB, print_growth_table

START = 1_000_000.0
CASES = ("reclaim 1 GPU", "reclaim 8 GPUs", "reclaim 8 GPUs, no set")


class Fleet:
    """A full fleet under the two queues, and a scheduler to run passes on it."""

    def __init__(self, hosts: int, owner_holds_one: bool, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = START
        self.issued = 0
        views = [
            GpuView(f"host-{h:04d}", i, f"GPU-{h}-{i}", H100, H100_MB, H100_MB - 500, 0.0)
            for h in range(hosts)
            for i in range(GPUS_PER_HOST)
        ]
        self.inventory = Inventory.of(views)
        self.table = LeaseTable()
        self.scheduler = Scheduler(SchedulerConfig(3600.0, 10**9), self.rng)
        policy = QueuePolicy.of(
            (QueueSpec("owner", guaranteed_gpus=hosts * GPUS_PER_HOST // 2), QueueSpec("borrower")),
            preemption_priority_gap=0,
        )
        self._apply(SetQueuePolicy(START - 1, policy))
        for view in views:
            queue = "owner" if owner_holds_one and view.index == 0 else "borrower"
            request = self.request(queue, 1)
            alloc = Allocation(
                f"lease-{self.issued:08d}",
                request,
                view.node,
                (AllocatedGpu(view.node, view.index, view.uuid, view.name, view.memory_total_mb),),
                START - self.rng.uniform(0, 3600),
                START + 86_400.0,
            )
            self._apply(Allocate(START, alloc))

    def request(self, queue: str, gpus: int) -> AllocationRequest:
        self.issued += 1
        return AllocationRequest(
            request_id=f"req-{self.issued:08d}",
            service_name=f"svc-{queue}",
            workload_type="generic",
            priority=5,
            requirements=Requirements(gpus, 4096),
            ttl_s=86_400.0,
            submitted_at=self.now,
            queue_name=queue,
        )

    def _apply(self, command: object) -> None:
        result = self.table.apply(command)  # type: ignore[arg-type]
        assert result.ok, result.error

    def pass_for(self, gpus: int, expect_set: bool) -> float:
        """µs of thread CPU time for one tick with one waiting `owner` request of `gpus`."""
        self.now += 1.0
        waiter = self.request("owner", gpus)
        self._apply(Enqueue(self.now, waiter, self.now + 3600))
        started = time.thread_time()
        commands = self.scheduler.tick(self.table, self.inventory, self.now)
        spent = (time.thread_time() - started) * 1e6
        preempts = [c for c in commands if isinstance(c, Preempt)]
        assert bool(preempts) == expect_set, commands
        if preempts:
            assert len(preempts[0].victims) == gpus, preempts
        self._apply(Cancel(self.now, (waiter.request_id,)))
        return spent


def measure(hosts: int, repeats: int, seed: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in CASES}
    borrowed = Fleet(hosts, owner_holds_one=False, seed=seed)
    mixed = Fleet(hosts, owner_holds_one=True, seed=seed)
    borrowed.pass_for(1, True)  # the scheduler builds its indexes once
    mixed.pass_for(8, False)
    for _ in range(repeats):
        out["reclaim 1 GPU"].append(borrowed.pass_for(1, True))
        out["reclaim 8 GPUs"].append(borrowed.pass_for(8, True))
        out["reclaim 8 GPUs, no set"].append(mixed.pass_for(8, False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 200, 400, 1000])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, timed by thread CPU time")
    results = {hosts: measure(hosts, args.repeats, args.seed) for hosts in args.hosts}
    print_growth_table("tick with victim search", {n: f"N={n}" for n in results}, results, list(CASES), decimals=0)

if __name__ == "__main__":
    main()
