"""Usage accounting's cost in the replicated state: snapshot bytes, encode and restore time, a /usage read.

Run it with `python -m tests.bench.bench_usage_snapshot` (see docs/benchmarks.md,
"Usage accounting"); it is not part of the test suite. Pure: a LeaseTable in
this process, no agent.

What it builds: `--days` days (default 90, the default retention) of `--services`
services (default 50) in `--queues` queues, through the table's own commands:
every hour one RecordUsage with a row per (queue, service), and per service one
lease a day, held all day on its own GPUs, released at the end of the day (so
every hour of every key has both figures, and every day's release spreads over
24 hours as in production). Then it measures, best of `--repeats`:

- the snapshot's msgpack size, whole and with the usage part alone, against the
  same table with its usage emptied (what version 2 would have written);
- `snapshot()` + `msgpack.packb` cold (the first snapshot of a table that
  replayed its log: every hour's text is made), after a restore (the texts came
  with the snapshot) and warm (one more RecordUsage since the last snapshot:
  one hour re-encoded);
- `LeaseTable.restore` of the msgpack'd snapshot (hours are left unparsed);
- `usage(..., "service")` over the last 30 days on the restored table (parses
  those hours on first read) and again (parsed).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import msgpack

from coordinator.commands import Allocate, RecordUsage, Release
from coordinator.lease_table import LeaseTable
from coordinator.lease_usage import DEFAULT_USAGE_RETENTION_S
from coordinator.model import AllocatedGpu, Allocation, AllocationRequest, Requirements
from coordinator.usage_ledger import UsageLedger

HOUR = 3600.0
DAY = 86_400.0
START = 1_800_000_000.0 - (1_800_000_000.0 % DAY)  # a midnight, so days and hours align


def build(days: int, services: int, queues: int) -> LeaseTable:
    table = LeaseTable()
    keys = [(f"queue-{s % queues}", f"service-{s:02d}") for s in range(services)]
    for day in range(days):
        base = START + day * DAY
        for s, (queue, service) in enumerate(keys):
            request = AllocationRequest(
                request_id=f"r-{day}-{s}", service_name=service, workload_type="generic", priority=5,
                requirements=Requirements(gpu_count=2, min_memory_mb=1024), ttl_s=0.0, submitted_at=base,
                queue_name=queue,
            )
            gpus = tuple(AllocatedGpu(f"node-{s}", i, f"GPU-{s}-{i}", "H100", 81559) for i in range(2))
            alloc = Allocation(f"a-{day}-{s}", request, f"node-{s}", gpus, base + 1.5, None)
            assert table.apply(Allocate(base + 1.5, alloc)).ok
        for hour in range(24):
            at = base + hour * HOUR + 1800.25
            rows = tuple((q, svc, 3600.0 * (0.25 + (i % 7) / 10)) for i, (q, svc) in enumerate(keys))
            assert table.apply(RecordUsage(at, rows, DEFAULT_USAGE_RETENTION_S)).ok
        ids = tuple(f"a-{day}-{s}" for s in range(services))
        assert table.apply(Release(base + DAY - 0.5, ids)).ok
    return table


def best(repeats: int, action: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    started = time.perf_counter()
    table = build(args.days, args.services, args.queues)
    built_s = time.perf_counter() - started
    cold_times: list[float] = []
    for _ in range(args.repeats):
        replayed = build(args.days, args.services, args.queues) if cold_times else table
        started = time.perf_counter()
        packed: bytes = msgpack.packb(replayed.snapshot(), use_bin_type=True)
        cold_times.append(time.perf_counter() - started)
    snap = table.snapshot()
    usage_only: bytes = msgpack.packb(snap["usage"], use_bin_type=True)
    without = dict(snap, usage=UsageLedger().to_wire())
    hours = len(snap["usage"]["hours"])

    restored_times: list[float] = []
    for _ in range(args.repeats):
        fresh = LeaseTable.restore(msgpack.unpackb(packed, raw=False))
        started = time.perf_counter()
        msgpack.packb(fresh.snapshot(), use_bin_type=True)
        restored_times.append(time.perf_counter() - started)
    clock = [table.clock]

    def warm() -> bytes:
        clock[0] += 60.0
        table.apply(RecordUsage(clock[0], (("queue-0", "service-00", 1.0),), DEFAULT_USAGE_RETENTION_S))
        data: bytes = msgpack.packb(table.snapshot(), use_bin_type=True)
        return data

    warm()  # the first after the build encodes every hour
    warm_s, _ = best(args.repeats, warm)
    restore_s, restored = best(args.repeats, lambda: LeaseTable.restore(msgpack.unpackb(packed, raw=False)))
    since = restored.clock - 30 * DAY
    started = time.perf_counter()
    rows = restored.usage(since, restored.clock, "service", now=restored.clock)
    first_read_s = time.perf_counter() - started
    read_s, _ = best(args.repeats, lambda: restored.usage(since, restored.clock, "service", now=restored.clock))
    assert len(rows) == args.services

    print(f"{args.days} days x {args.services} services x {args.queues} queue(s): {hours} hours kept, built in {built_s:.1f} s")
    print(f"  snapshot (msgpack)             {len(packed):>12,} B")
    print(f"    of which usage               {len(usage_only):>12,} B  ({len(usage_only) / max(hours, 1):,.0f} B an hour, "
          f"{len(usage_only) / max(hours * args.services, 1):,.0f} B a (queue, service) hour)")
    print(f"    the same table without usage {len(msgpack.packb(without, use_bin_type=True)):>12,} B")
    print(f"  snapshot+packb, cold           {min(cold_times) * 1000:>12.1f} ms  (after a replay: every hour encoded)")
    print(f"  snapshot+packb, restored       {min(restored_times) * 1000:>12.1f} ms  (the texts came with the snapshot)")
    print(f"  snapshot+packb, warm           {warm_s * 1000:>12.2f} ms  (one RecordUsage since the last)")
    print(f"  restore (unpackb + restore)    {restore_s * 1000:>12.1f} ms")
    print(f"  usage(30 days, by service)     {first_read_s * 1000:>12.1f} ms first read, {read_s * 1000:.1f} ms after")


if __name__ == "__main__":
    main()
