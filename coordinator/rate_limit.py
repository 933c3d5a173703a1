"""Token buckets, one per client key: the arithmetic of the API's rate limit, with time passed in.

Theory of operation
-------------------
Each key (an API key's name, or a client address while auth is off) owns a
bucket of at most `burst` tokens that refills continuously at `rate_per_s`.
A request takes one token; when fewer than one is left it is refused, and
the caller is told how long until one will be there (the Retry-After).

A bucket is stored as (tokens, at): its level at time `at`. The level at any
later `now` is min(burst, tokens + (now - at) * rate_per_s), so nothing ticks
and an idle key costs nothing. A bucket that has refilled to `burst` behaves
exactly like one never seen, so such buckets are what `take` forgets first
when more than `max_keys` are held; only if every bucket is still refilling
does it forget the least recently used one (which can only make that key's
next request more likely to pass, never less). Memory is therefore bounded
whatever addresses or keys clients present.

Time is whatever clock the caller uses (seconds); it must not run backwards
for a given instance, and a `now` earlier than a bucket's `at` is treated as
equal to it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The bucket shape: `rate_per_s` tokens per second, at most `burst` held."""

    rate_per_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be finite and > 0, got {self.rate_per_s}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")


class TokenBuckets:
    """One token bucket per key, bounded to `max_keys` buckets."""

    def __init__(self, limit: RateLimit, *, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.limit = limit
        self.max_keys = max_keys
        # key -> (tokens, at); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def level(self, key: str, now: float) -> float:
        """Return the tokens `key` holds at `now` (`burst` for a key never seen)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(self.limit.burst)
        tokens, at = bucket
        return min(float(self.limit.burst), tokens + max(0.0, now - at) * self.limit.rate_per_s)

    def take(self, key: str, now: float) -> float:
        """Take one token for `key` at `now`.

        Returns 0.0 when the request may go ahead (a token was taken), else the
        seconds until `key` will hold a whole token again (nothing is taken).
        """
        tokens = self.level(key, now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            self._bound(now)
            return 0.0
        # Remember the level as of now, so later calls keep refilling from here.
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        return (1.0 - tokens) / self.limit.rate_per_s

    def _bound(self, now: float) -> None:
        if len(self._buckets) <= self.max_keys:
            return
        for key in [k for k in self._buckets if self.level(k, now) >= self.limit.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
