"""The lease table's wait queue, indexed for the questions the scheduler asks.

Waiting requests by id, in rank order (`AllocationRequest.rank_key`: the order
they are served in), grouped by equal requirements (each group in rank order,
so the scheduler can drop a group whose requirements can no longer change a
plan), and by deadline. Each change costs O(log n); no question needs a sort.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

from sortedcontainers import SortedKeyList, SortedList

from coordinator.model import QueuedRequest, Requirements

RankKey = tuple[float, float, str]


class WaitQueue:
    """Waiting requests, changed by `add` and `remove` only."""

    def __init__(self, queued: Iterable[QueuedRequest] = (), age_weight_per_hour: float = 0.0) -> None:
        """A queue holding `queued`, ranked with aging `age_weight_per_hour`; one sort per index."""
        items = list(queued)
        self.age_weight_per_hour = age_weight_per_hour
        w = age_weight_per_hour

        def _rank(queued: QueuedRequest) -> RankKey:
            return queued.request.rank_key(w)

        self._rank = _rank
        self._by_id = {q.request.request_id: q for q in items}
        self._ranked: SortedKeyList[QueuedRequest, RankKey] = SortedKeyList(items, key=_rank)
        groups: dict[Requirements, list[QueuedRequest]] = {}
        for q in self._ranked:
            groups.setdefault(q.request.requirements, []).append(q)
        self._groups: dict[Requirements, SortedKeyList[QueuedRequest, RankKey]] = {
            shape: SortedKeyList(group, key=_rank) for shape, group in groups.items()
        }
        self._deadlines: SortedList[tuple[float, str]] = SortedList(
            (q.deadline, q.request.request_id) for q in items if q.deadline is not None
        )

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[QueuedRequest]:
        """The waiting requests in rank order."""
        return iter(self._ranked)

    def get(self, request_id: str) -> QueuedRequest | None:
        return self._by_id.get(request_id)

    def add(self, queued: QueuedRequest) -> None:
        """Queue `queued` (its request id must not be queued already)."""
        self._by_id[queued.request.request_id] = queued
        self._ranked.add(queued)
        shape = queued.request.requirements
        group = self._groups.get(shape)
        if group is None:
            group = self._groups[shape] = SortedKeyList(key=self._rank)
        group.add(queued)
        if queued.deadline is not None:
            self._deadlines.add((queued.deadline, queued.request.request_id))

    def remove(self, queued: QueuedRequest) -> None:
        """Take `queued` out of the queue (it must be queued)."""
        del self._by_id[queued.request.request_id]
        self._ranked.remove(queued)
        shape = queued.request.requirements
        group = self._groups[shape]
        group.remove(queued)
        if not group:
            del self._groups[shape]
        if queued.deadline is not None:
            self._deadlines.remove((queued.deadline, queued.request.request_id))

    def position(self, request_id: str) -> int | None:
        """1 for the next request served, 2 for the one after...; None when `request_id` does not wait."""
        queued = self._by_id.get(request_id)
        if queued is None:
            return None
        return int(self._ranked.bisect_key_left(self._rank(queued))) + 1

    def groups(self, before: RankKey | None = None) -> list[Iterable[QueuedRequest]]:
        """The requests grouped by equal requirements, each group in rank order.

        With `before` (a rank key), only the requests ranked ahead of it. The
        groups are live views: read them before the next change.
        """
        if before is None:
            return list(self._groups.values())
        return [g.irange_key(max_key=before, inclusive=(True, False)) for g in self._groups.values()]

    def due(self, now: float) -> list[QueuedRequest]:
        """Requests whose deadline is at or before `now`, in rank order."""
        due = [self._by_id[i] for _, i in itertools.takewhile(lambda e: e[0] <= now, self._deadlines)]
        return sorted(due, key=self._rank)

    def next_deadline(self) -> float | None:
        """The earliest deadline, or None when no request has one."""
        return self._deadlines[0][0] if self._deadlines else None

