"""Preemptions in progress: leases in their grace period, and what they are taken for.

A Preempt command (lease_table.py) starts each victim's grace period with a
deadline and a reason, and, when it is taken for a waiting request, records
that request's claim: the node it will be placed on and the victims. The
book keeps both, replicated like the rest of the table, so a failover
neither forgets a deadline nor preempts again for the same request. It
enforces nothing itself: the table checks a Preempt against the whole state
and then writes here.

A grace period ends with its lease (whatever ends it: `end`); a claim ends
when its request stops waiting (`drop_claim`), while its victims' grace
periods run on, because they were promised a deadline.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

from sortedcontainers import SortedList

# (node, victim allocation ids) of a waiting request's claim.
Claim = tuple[str, tuple[str, ...]]


class PreemptionBook:
    """Grace deadlines by lease (and in deadline order), and claims by waiting request."""

    def __init__(self) -> None:
        # Leases in their preemption grace period: id -> (deadline, reason), and by deadline.
        self._grace: dict[str, tuple[float, str]] = {}
        self._deadlines: SortedList[tuple[float, str]] = SortedList()
        # Waiting requests victims were taken for: request id -> (node, victim ids).
        self._claims: dict[str, Claim] = {}

    def __contains__(self, allocation_id: object) -> bool:
        return allocation_id in self._grace

    def __len__(self) -> int:
        return len(self._grace)

    def deadline(self, allocation_id: str) -> float | None:
        """The grace deadline of a lease being preempted, or None when it is not."""
        entry = self._grace.get(allocation_id)
        return None if entry is None else entry[0]

    def reason(self, allocation_id: str) -> str | None:
        entry = self._grace.get(allocation_id)
        return None if entry is None else entry[1]

    def ids(self) -> list[str]:
        """Leases in their grace period, by id."""
        return sorted(self._grace)

    def due(self, now: float) -> list[tuple[str, str]]:
        """(allocation id, reason) of leases whose grace deadline is at or before `now`, by deadline."""
        return [(i, self._grace[i][1]) for _, i in itertools.takewhile(lambda e: e[0] <= now, self._deadlines)]

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def claims(self) -> Mapping[str, Claim]:
        """Waiting requests that victims are being preempted for: request id -> (node, victim ids)."""
        return self._claims

    def claim(self, request_id: str) -> Claim | None:
        return self._claims.get(request_id)

    def start(self, allocation_id: str, deadline: float, reason: str) -> None:
        self._grace[allocation_id] = (deadline, reason)
        self._deadlines.add((deadline, allocation_id))

    def end(self, allocation_id: str) -> bool:
        """Forget the grace period of a lease that ended; whether it had one."""
        entry = self._grace.pop(allocation_id, None)
        if entry is None:
            return False
        self._deadlines.remove((entry[0], allocation_id))
        return True

    def set_claim(self, request_id: str, node: str, victims: tuple[str, ...]) -> None:
        self._claims[request_id] = (node, victims)

    def drop_claim(self, request_id: str) -> None:
        self._claims.pop(request_id, None)

    def to_wire(self) -> dict[str, Any]:
        """The snapshot keys "preempting" (rows [allocation_id, deadline, reason]) and "claims" ([request_id, node, victim ids])."""
        return {
            "preempting": [[i, d, r] for i, (d, r) in sorted(self._grace.items())],
            "claims": [[req, node, list(victims)] for req, (node, victims) in sorted(self._claims.items())],
        }

    @classmethod
    def from_wire(cls, snap: Mapping[str, Any]) -> PreemptionBook:
        """From a table snapshot's keys; versions before 4 had none: an empty book."""
        book = cls()
        for allocation_id, deadline, reason in snap.get("preempting", ()):
            book._grace[str(allocation_id)] = (float(deadline), str(reason))
        book._deadlines = SortedList((d, i) for i, (d, _) in book._grace.items())
        for request_id, node, victims in snap.get("claims", ()):
            book._claims[str(request_id)] = (str(node), tuple(str(v) for v in victims))
        return book
