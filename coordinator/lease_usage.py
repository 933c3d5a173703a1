"""The lease table's accounting: GPU-seconds per queue and service, ended and live.

`UsageLedger` (usage_ledger.py) keeps the hourly figures of leases that ended
and of utilization the leader recorded. `LeaseUsage` is the table's side of
it: it credits a lease's allocated GPU-seconds, gpus × (end − allocated_at),
when the lease ends (whatever ends it), applies RecordUsage rows, prunes hours
older than the usage retention by the table's clock, and answers queries by
adding the running share of the live leases the table passes in.

Every rule reads only its arguments and the ledger, never a wall clock, so a
replica that replayed the log and one restored from a snapshot agree.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from coordinator.commands import MAX_USAGE_ROWS, RecordUsage
from coordinator.errors import InvalidRequest
from coordinator.finished_records import hour_of
from coordinator.model import Allocation
from coordinator.usage_ledger import HOUR_S, UsageKey, UsageLedger

# How long hourly usage is kept until a RecordUsage names the leader's
# `[accounting] retention_days`: 90 days, a quarter of chargeback.
DEFAULT_USAGE_RETENTION_S = 90 * 86_400.0
USAGE_BY = ("queue", "service")


class LeaseUsage:
    """Allocated and utilized GPU-seconds by hour and (queue, service), with their retention."""

    def __init__(self, ledger: UsageLedger | None = None, retention_s: float = DEFAULT_USAGE_RETENTION_S) -> None:
        self._ledger = ledger if ledger is not None else UsageLedger()
        self._retention_s = retention_s
        # Live leases per (queue, service): their lifetime totals are never pruned.
        self._live_keys: Counter[UsageKey] = Counter()

    @property
    def retention_s(self) -> float:
        """How long hourly usage is kept (the latest RecordUsage's retention)."""
        return self._retention_s

    def leases_started(self, allocs: Iterable[Allocation]) -> None:
        self._live_keys.update(usage_key(alloc) for alloc in allocs)

    def lease_ended(self, alloc: Allocation, at: float, clock: float) -> None:
        """Credit a lease that ended at `at` (the table's clock `clock` before this command)."""
        key = usage_key(alloc)
        floor = self._floor(clock, at)
        self._ledger.add_allocated(key, len(alloc.gpus), alloc.allocated_at, at, floor_hour=floor)
        self._live_keys[key] -= 1
        if not self._live_keys[key]:
            del self._live_keys[key]

    def record(self, cmd: RecordUsage, clock: float) -> None:
        """Apply a RecordUsage whole, or raise InvalidRequest and change nothing."""
        if not (math.isfinite(cmd.retention_s) and cmd.retention_s >= HOUR_S):
            raise InvalidRequest(f"usage retention must be at least an hour, got {cmd.retention_s}", code="invalid_command")
        if len(cmd.rows) > MAX_USAGE_ROWS:
            raise InvalidRequest(f"{len(cmd.rows)} usage rows, at most {MAX_USAGE_ROWS}", code="invalid_command")
        for queue, service, seconds in cmd.rows:
            if not (queue and service and math.isfinite(seconds) and seconds >= 0):
                raise InvalidRequest(f"bad usage row {queue!r}, {service!r}, {seconds!r}", code="invalid_command")
        self._retention_s = cmd.retention_s
        floor = self._floor(clock, cmd.at)
        for queue, service, seconds in cmd.rows:
            self._ledger.add_utilized((queue, service), cmd.at, seconds, floor_hour=floor)

    def prune(self, clock: float) -> None:
        self._ledger.prune(self._floor(clock, clock), self._live_keys)

    def _floor(self, clock: float, at: float) -> int:
        """The oldest hour usage is kept for once the clock reaches `at`."""
        return hour_of(max(clock, at) - self._retention_s)

    def usage(
        self, since: float, until: float, by: str, now: float, live: Sequence[Allocation]
    ) -> list[tuple[str, float, float]]:
        """GPU-seconds (name, allocated, utilized) per queue or service, in the whole hours covering [since, until).

        The range is widened to whole hours (`usage_window`); the `live` leases
        (oldest first) add their share held up to `now`. Sorted by name. Reads
        only the hours in the range and the live leases. Raises ValueError for
        `by` not in USAGE_BY.
        """
        if by not in USAGE_BY:
            raise ValueError(f"by must be one of {', '.join(USAGE_BY)}, got {by!r}")
        part = 0 if by == "queue" else 1
        first, last = usage_window(since, until)
        sums: dict[str, list[float]] = {}
        for _, rows in self._ledger.hours(first, last):
            for key in sorted(rows):  # as for live leases below: one order on every replica
                allocated, utilized = rows[key]
                row = sums.setdefault(key[part], [0.0, 0.0])
                row[0] += allocated
                row[1] += utilized
        start, stop = first * HOUR_S, min(last * HOUR_S, now)
        # Oldest first, not dict order: float sums in one order give equal answers on
        # every replica, restored or replayed (whose dicts were filled in other orders).
        for alloc in live:
            held = stop - max(start, alloc.allocated_at)
            if held > 0:
                sums.setdefault(usage_key(alloc)[part], [0.0, 0.0])[0] += len(alloc.gpus) * held
        return [(name, sums[name][0], sums[name][1]) for name in sorted(sums)]

    def totals(self, now: float, live: Sequence[Allocation]) -> dict[UsageKey, tuple[float, float]]:
        """Lifetime (allocated, utilized) GPU-seconds per (queue, service), the `live` leases counted up to `now`.

        Monotonic in `now` and across applies while `now` is the table's clock:
        a lease's running share becomes, when it ends at `at`, exactly the
        amount credited. A key disappears only after a retention period without use.
        """
        totals = {key: (t[0], t[1]) for key, t in self._ledger.totals().items()}
        for alloc in live:  # oldest first, as in `usage`
            held = now - alloc.allocated_at
            if held > 0:
                key = usage_key(alloc)
                allocated, utilized = totals.get(key, (0.0, 0.0))
                totals[key] = (allocated + len(alloc.gpus) * held, utilized)
        return totals

    def to_wire(self) -> dict[str, Any]:
        """The snapshot keys "usage" (usage_ledger.py's form) and "usage_retention_s"."""
        return {"usage": self._ledger.to_wire(), "usage_retention_s": self._retention_s}

    @classmethod
    def from_wire(cls, snap: Mapping[str, Any]) -> LeaseUsage:
        """From a table snapshot's keys; snapshots of versions 1 and 2 kept no usage: empty, default retention."""
        return cls(
            UsageLedger.from_wire(snap.get("usage", {})),
            float(snap.get("usage_retention_s", DEFAULT_USAGE_RETENTION_S)),
        )


def usage_window(since: float, until: float) -> tuple[int, int]:
    """The hours [first, last) that a usage query for [since, until) reads: the whole hours covering it."""
    first = hour_of(since)
    last = hour_of(until)
    if until > last * HOUR_S:
        last += 1
    return first, max(first, last)


def usage_key(alloc: Allocation) -> UsageKey:
    return (alloc.request.queue_name, alloc.request.service_name)
