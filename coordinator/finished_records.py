"""Finished request records, kept for idempotency, stored by the hour they ended.

Theory of operation
-------------------
A finished record is read back only when a client retries its request id, yet a
day of them outnumbers the live state tenfold. So they are kept as compact rows
[request_id, service_name, status, submitted_at, updated_at, allocation_id,
reason], grouped by the hour of `updated_at` (when they ended), each hour in
(updated_at, request_id) order, which is also the order pruning removes them in.

An hour's snapshot form is [hour, ids, text]: its ids in row order and the
canonical JSON text of its rows. The text is made when a snapshot first needs
it and kept until the hour changes; as records end in the current hour and are
pruned from the oldest, a snapshot re-encodes about two hours, not a day.
Restoring takes the ids and the text as they come and parses an hour's text only
when one of its records is read, or pruning cuts into it, or a record ends in it.
Everything depends only on the set of records, so equal sets give equal
snapshots however they were reached.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

# [request_id, service_name, status, submitted_at, updated_at, allocation_id, reason]
FinishedRow = list[Any]
_HOUR_S = 3600.0


@dataclass(slots=True)
class _Hour:
    """The records that ended in one hour: rows parsed on demand, text made on demand."""

    ids: list[str]
    rows: list[FinishedRow] | None
    text: str | None

    def parsed(self) -> list[FinishedRow]:
        if self.rows is None:
            assert self.text is not None
            self.rows = json.loads(self.text)
        return self.rows

    def encoded(self) -> str:
        if self.text is None:
            self.text = canonical_json(self.parsed())
        return self.text


class FinishedRecords:
    """Finished records by request id, pruned oldest first."""

    def __init__(self) -> None:
        self._hour_of: dict[str, int] = {}
        self._hours: dict[int, _Hour] = {}
        self._order: list[int] = []  # the hours present, ascending
        # allocation id -> request id, for a release retried after its lease ended. Built
        # on first use after a restore (the hours stay unparsed until then); entries of
        # pruned records are dropped when it is rebuilt, once it is twice the records.
        self._by_allocation: dict[str, str] | None = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._hour_of

    def get(self, request_id: str) -> FinishedRow | None:
        """The row of `request_id`, or None when no finished record has that id."""
        hour = self._hour_of.get(request_id)
        if hour is None:
            return None
        bucket = self._hours[hour]
        return bucket.parsed()[bucket.ids.index(request_id)]

    def add(self, row: FinishedRow) -> None:
        """Keep one more finished record (its id must not be kept already)."""
        hour = hour_of(row[4])
        bucket = self._hours.get(hour)
        if bucket is None:
            bucket = self._hours[hour] = _Hour([], [], None)
            bisect.insort(self._order, hour)
        rows = bucket.parsed()
        at = bisect.bisect_right(rows, (row[4], row[0]), key=lambda r: (r[4], r[0]))
        rows.insert(at, row)
        bucket.ids.insert(at, row[0])
        bucket.text = None
        self._hour_of[row[0]] = hour
        if self._by_allocation is not None and row[5]:
            self._by_allocation[row[5]] = row[0]

    def by_allocation(self, allocation_id: str) -> FinishedRow | None:
        """The row of the finished request that was granted `allocation_id`, or None."""
        if self._by_allocation is None or len(self._by_allocation) > 2 * len(self._hour_of) + 64:
            self._by_allocation = {
                row[5]: row[0] for hour in self._order for row in self._hours[hour].parsed() if row[5]
            }
        request_id = self._by_allocation.get(allocation_id)
        row = None if request_id is None else self.get(request_id)
        return row if row is not None and row[5] == allocation_id else None

    def prune(self, cutoff: float) -> None:
        """Forget every record that ended before `cutoff`."""
        while self._order and self._order[0] * _HOUR_S < cutoff:
            hour = self._order[0]
            bucket = self._hours[hour]
            if (hour + 1) * _HOUR_S <= cutoff:
                gone = len(bucket.ids)  # the whole hour, without parsing it
            else:
                gone = bisect.bisect_left(bucket.parsed(), cutoff, key=lambda r: r[4])
            for request_id in bucket.ids[:gone]:
                del self._hour_of[request_id]
            if gone < len(bucket.ids):
                del bucket.parsed()[:gone]
                del bucket.ids[:gone]
                if gone:
                    bucket.text = None
                return
            del self._hours[hour]
            self._order.pop(0)

    def to_wire(self) -> list[list[Any]]:
        """[hour, ids, text] per hour, oldest first: a value of its own (ids are copied, texts immutable)."""
        return [[hour, list(self._hours[hour].ids), self._hours[hour].encoded()] for hour in self._order]

    @classmethod
    def from_wire(cls, hours: Iterable[list[Any]]) -> FinishedRecords:
        """Records from `to_wire()` output, left unparsed until needed."""
        records = cls()
        records._by_allocation = None
        for hour, ids, text in hours:
            records._hours[int(hour)] = _Hour(list(ids), None, str(text))
            records._order.append(int(hour))
            records._hour_of.update(dict.fromkeys(ids, int(hour)))
        records._order.sort()
        return records

    @classmethod
    def of(cls, rows: Iterable[FinishedRow]) -> FinishedRecords:
        """Records holding `rows` (any order)."""
        records = cls()
        for row in sorted(rows, key=lambda r: (r[4], r[0])):
            records.add(row)
        return records


def canonical_json(value: Any) -> str:
    """Canonical JSON: equal values give equal texts."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def hour_of(at: float) -> int:
    """The hour `at` falls in: hour·3600 ≤ at < (hour+1)·3600, exactly as prune compares.

    The float division can land one hour off at a boundary; the two loops put it right.
    Shared with the usage ledger's hourly buckets.
    """
    hour = math.floor(at / _HOUR_S)
    while at < hour * _HOUR_S:
        hour -= 1
    while at >= (hour + 1) * _HOUR_S:
        hour += 1
    return hour
