"""Lifeguard's two local mechanisms: health awareness and confirmation-shortened suspicion.

Theory of operation
-------------------
`Awareness` is the Local Health Multiplier of Lifeguard §IV-A (memberlist
awareness.go): a saturating counter in [0, max − 1]. Evidence that *this*
member is slow or cut off raises it; each successful probe lowers it:

    probe acked ............................................ −1
    probe failed, relays expected to nack: + (expected − nacks received)
    probe failed, no nacks expected ........................ +1
    had to refute a suspicion or death about ourselves ..... +1

Timeouts are multiplied by `score + 1`, so a member that cannot get its own
packets through probes more slowly and waits longer before accusing others.

`Suspicion` is one suspicion timer (Lifeguard §IV-B, memberlist suspicion.go).
It starts at `hi` (or at `lo` when no confirmations are wanted, k = 0) and,
each time a *different* member independently suspects the same incarnation,
is recomputed as SwimConfig.suspicion_timeout(c, k, lo, hi) from its start. The
accuser that started it never counts as a confirmation of itself.
"""

from __future__ import annotations

from coordinator.swim_config import SwimConfig


class Awareness:
    __slots__ = ("score", "_max")

    def __init__(self, max_multiplier: int) -> None:
        self.score = 0
        self._max = max_multiplier

    def apply(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self._max - 1)

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)


class Suspicion:
    __slots__ = ("start", "deadline", "k", "lo", "hi", "confirmed_by", "incarnation")

    def __init__(self, accuser: str, incarnation: int, k: int, lo: float, hi: float, start: float) -> None:
        self.start = start
        self.k = k
        self.lo = lo
        self.hi = hi
        self.incarnation = incarnation
        self.confirmed_by: set[str] = {accuser}
        self.deadline = start + (lo if k < 1 else hi)

    @property
    def confirmations(self) -> int:
        return len(self.confirmed_by) - 1

    def confirm(self, accuser: str) -> bool:
        """Count an independent accusation; True if it was new (and so worth re-gossiping)."""
        if self.confirmations >= self.k or accuser in self.confirmed_by:
            return False
        self.confirmed_by.add(accuser)
        timeout = SwimConfig.suspicion_timeout(self.confirmations, self.k, self.lo, self.hi)
        self.deadline = self.start + timeout
        return True
