"""GPU-seconds used per queue and service, by the hour: the lease table's accounting.

Theory of operation
-------------------
Two figures are kept per (queue, service):

- **allocated**: GPUs held × seconds held. Credited when a lease ends, spread
  over the hours it was held (a lease held from 10:30 to 12:15 adds to the 10:00,
  11:00 and 12:00 hours), so a query for any range of hours is exact. Live
  leases are not in the ledger: the table adds their running share on read.
- **utilized**: the same weighted by the GPUs' utilization, measured by the
  leader from telemetry and recorded by `RecordUsage` commands, credited to the
  hour the command was stamped in.

Each hour is a bucket {(queue, service): [allocated, utilized]}; a query reads
only the buckets of the hours it asks for. Beside the buckets, lifetime totals
per key (the monotonic figures Prometheus counters need), each with the last
hour anything was credited to it.

Retention is a rule on the ledger's own contents and the caller's clock
(`prune(cutoff_hour, keep)`): buckets of hours before the cutoff go, and a
total goes once its last credited hour is before the cutoff and no live lease
holds its key. Crediting never writes to an hour before the cutoff. So a ledger
restored from a snapshot prunes exactly as one that replayed the whole log.

Snapshot form: {"hours": [[hour, text], ...], "totals": [[queue, service,
allocated, utilized, last_hour], ...]}, each hour's text the canonical JSON of
its rows [queue, service, allocated, utilized] sorted by key. A text is made
when a snapshot first needs it and kept until its hour changes, so a snapshot
re-encodes the hours credited since the last one (usually one), not 90 days;
a restored hour is parsed only when it is read or credited. Floats go through
JSON's shortest round-trip repr, so a restored ledger holds the very same values.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any, Container, Iterable, Mapping

from coordinator.finished_records import canonical_json, hour_of

HOUR_S = 3600.0
# (queue, service)
UsageKey = tuple[str, str]
# Indexes of the two figures in a row [allocated, utilized].
_ALLOCATED = 0
_UTILIZED = 1


@dataclass(slots=True)
class _Hour:
    """One hour's figures: rows parsed on demand, text made on demand."""

    rows: dict[UsageKey, list[float]] | None
    text: str | None

    def parsed(self) -> dict[UsageKey, list[float]]:
        if self.rows is None:
            assert self.text is not None
            self.rows = {(str(q), str(s)): [float(a), float(u)] for q, s, a, u in json.loads(self.text)}
        return self.rows

    def encoded(self) -> str:
        if self.text is None:
            rows = self.parsed()
            self.text = canonical_json([[q, s, *rows[(q, s)]] for q, s in sorted(rows)])
        return self.text


class UsageLedger:
    """Hourly allocated and utilized GPU-seconds per (queue, service), and lifetime totals."""

    def __init__(self) -> None:
        self._hours: dict[int, _Hour] = {}
        self._order: list[int] = []  # the hours present, ascending
        # key -> [allocated, utilized, last hour credited]
        self._totals: dict[UsageKey, list[float]] = {}

    # ------------------------------------------------------------------ crediting

    def add_allocated(self, key: UsageKey, gpus: int, start: float, end: float, *, floor_hour: int) -> float:
        """Credit `gpus` held from `start` to `end`, hour by hour from `floor_hour` on.

        Returns the GPU-seconds added to the lifetime total (gpus × (end − start),
        0 when `end` is not after `start`): the whole lease, even the part in
        hours already past retention.
        """
        if not end > start or gpus <= 0:
            return 0.0
        amount = gpus * (end - start)
        last = hour_of(end) if end > hour_of(end) * HOUR_S else hour_of(end) - 1
        for hour in range(max(hour_of(start), floor_hour), last + 1):
            overlap = min(end, (hour + 1) * HOUR_S) - max(start, hour * HOUR_S)
            if overlap > 0:
                bucket = self._bucket(hour)
                bucket[key] = _plus(bucket.get(key), _ALLOCATED, gpus * overlap)
        self._credit_total(key, _ALLOCATED, amount, last)
        return amount

    def add_utilized(self, key: UsageKey, at: float, gpu_seconds: float, *, floor_hour: int) -> None:
        """Credit `gpu_seconds` of utilized GPU time to the hour of `at` (to the total only when before `floor_hour`)."""
        if gpu_seconds <= 0:
            return
        hour = hour_of(at)
        if hour >= floor_hour:
            bucket = self._bucket(hour)
            bucket[key] = _plus(bucket.get(key), _UTILIZED, gpu_seconds)
        self._credit_total(key, _UTILIZED, gpu_seconds, hour)

    def _bucket(self, hour: int) -> dict[UsageKey, list[float]]:
        entry = self._hours.get(hour)
        if entry is None:
            entry = self._hours[hour] = _Hour({}, None)
            bisect.insort(self._order, hour)
        rows = entry.parsed()
        entry.text = None  # the caller is about to change it
        return rows

    def _credit_total(self, key: UsageKey, kind: int, amount: float, hour: int) -> None:
        total = self._totals.get(key)
        if total is None:
            total = self._totals[key] = [0.0, 0.0, float(hour)]
        total[kind] += amount
        total[2] = max(total[2], float(hour))

    # ------------------------------------------------------------------ retention

    def prune(self, cutoff_hour: int, keep: Container[UsageKey]) -> None:
        """Forget the hours before `cutoff_hour`, and the totals of keys idle since then and not in `keep`."""
        if not self._order or self._order[0] >= cutoff_hour:
            return
        gone = bisect.bisect_left(self._order, cutoff_hour)
        for hour in self._order[:gone]:
            del self._hours[hour]
        del self._order[:gone]
        for key in [k for k, t in self._totals.items() if t[2] < cutoff_hour and k not in keep]:
            del self._totals[key]

    # ------------------------------------------------------------------ reading

    def hours(self, first: int, last: int) -> Iterable[tuple[int, Mapping[UsageKey, list[float]]]]:
        """(hour, {key: [allocated, utilized]}) for each hour present in [first, last), ascending."""
        lo = bisect.bisect_left(self._order, first)
        hi = bisect.bisect_left(self._order, last)
        for hour in self._order[lo:hi]:
            yield hour, self._hours[hour].parsed()

    def totals(self) -> Mapping[UsageKey, list[float]]:
        """Lifetime [allocated, utilized, last hour credited] per key (live leases' running share not included)."""
        return self._totals

    # ------------------------------------------------------------------ snapshots

    def to_wire(self) -> dict[str, Any]:
        """The snapshot form (module docstring): a value of its own (texts are immutable)."""
        return {
            "hours": [[hour, self._hours[hour].encoded()] for hour in self._order],
            "totals": [[q, s, *self._totals[(q, s)]] for q, s in sorted(self._totals)],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UsageLedger:
        """A ledger from `to_wire()` output; hours stay unparsed until read or credited."""
        ledger = cls()
        for hour, text in wire.get("hours", ()):
            ledger._hours[int(hour)] = _Hour(None, str(text))
            ledger._order.append(int(hour))
        ledger._order.sort()
        for q, s, allocated, utilized, last in wire.get("totals", ()):
            ledger._totals[(str(q), str(s))] = [float(allocated), float(utilized), float(last)]
        return ledger




def _plus(row: list[float] | None, kind: int, amount: float) -> list[float]:
    row = [0.0, 0.0] if row is None else row
    row[kind] += amount
    return row
