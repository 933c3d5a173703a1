"""The piggyback queue: bounded retransmission of membership news (memberlist TransmitLimitedQueue).

Theory of operation
-------------------
Every alive/suspect/dead message this member originates or accepts is queued
once, already encoded, under the name of the member it is about. A newer
message about the same member replaces the older one (it supersedes it: an
older incarnation or a weaker verdict is no longer worth sending).

Whenever a datagram leaves with room to spare, `take(room, limit)` fills it:
least-transmitted first, newest first among equals (fresh news spreads
fastest), skipping parts that do not fit and trying smaller ones. Each part
taken counts one transmission; after `limit` transmissions -
retransmit_mult · ⌈log10(N+1)⌉, computed by the caller with the current N - it
is dropped. The count of members who hear a message thus grows like gossip
infection while each member's work per message stays O(log N) (SWIM §4.1).

Past `max_depth` entries, the most-transmitted (then oldest) are dropped: they
have already spread furthest.
"""

from __future__ import annotations


class BroadcastQueue:
    """Encoded broadcasts keyed by the member they describe."""

    __slots__ = ("_entries", "_next_id", "_max_depth")

    def __init__(self, max_depth: int) -> None:
        # name -> [transmits, id, payload]; lists, mutated in place, to avoid churn.
        self._entries: dict[str, list[object]] = {}
        self._next_id = 0
        self._max_depth = max_depth

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def push(self, name: str, payload: bytes) -> None:
        """Queue `payload` about member `name`, superseding what was queued about it."""
        self._next_id += 1
        self._entries[name] = [0, self._next_id, payload]
        if len(self._entries) > self._max_depth:
            ordered = sorted(self._entries.items(), key=lambda kv: (-_int(kv[1][0]), _int(kv[1][1])))
            for victim, _ in ordered[: len(self._entries) - self._max_depth]:
                del self._entries[victim]

    def take(self, room: int, limit: int) -> list[bytes]:
        """Parts that together fit in `room` bytes, each counted as one more transmission."""
        if not self._entries or room <= 0:
            return []
        ordered = sorted(self._entries.items(), key=lambda kv: (_int(kv[1][0]), -_int(kv[1][1])))
        out: list[bytes] = []
        for name, entry in ordered:
            payload = entry[2]
            assert isinstance(payload, bytes)
            if len(payload) > room:
                continue
            out.append(payload)
            room -= len(payload)
            transmits = _int(entry[0]) + 1
            if transmits >= limit:
                del self._entries[name]
            else:
                entry[0] = transmits
            if room < 8:  # nothing useful fits in fewer bytes than the smallest message
                break
        return out

    def transmits(self, name: str) -> int | None:
        """How often the queued message about `name` was sent (None: nothing queued)."""
        entry = self._entries.get(name)
        return None if entry is None else _int(entry[0])


def _int(v: object) -> int:
    assert isinstance(v, int)
    return v
