"""Retry pacing and a circuit breaker for calls to services we do not control.

Both are pure: the caller passes `now` (float seconds) and a `random.Random`,
so the same inputs give the same delays and state changes, and tests need no
clock. The trio shells (webhook delivery, the DeepAgents advisor) own the time.

Theory of operation (CircuitBreaker)
------------------------------------
A breaker stops us from paying a timeout on every call while a dependency is
down. It moves between three states:

    state       allow(now)                          record_success   record_failure
    closed      yes                                 reset count      count += 1; at threshold -> open
    open        after reset_after_s -> half_open,   -> closed        stay open
                one trial allowed; before: no
    half_open   only if the trial is lost*          -> closed        -> open (timer restarts)

* A half-open breaker lets exactly one trial call through. If that call never
  reports back (its caller was cancelled), the breaker would stay half-open
  and refuse forever; so a trial that has not reported within reset_after_s is
  presumed failed and a new trial is allowed.

`state` reports the stored state; an open breaker whose timer has run out
still reads "open" until the next `allow(now)` moves it to half_open.
"""

from __future__ import annotations

import random

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# 2**62 overflows nothing and exceeds any sensible cap; it keeps the float
# arithmetic below finite for attempt numbers in the thousands.
_MAX_EXPONENT = 62


def retry_delay(attempt: int, rng: random.Random, *, base_s: float = 1.0, cap_s: float = 300.0) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry).

    Exponential backoff with "full jitter": a uniform draw from
    [0, min(cap_s, base_s * 2**(attempt - 1))]. Full jitter spreads retries
    from many clients over the whole window, which the AWS Architecture Blog
    ("Exponential Backoff And Jitter", Marc Brooker, 2015,
    https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/)
    shows finishes the work with the fewest calls of the variants it compares.

    Raises ValueError for attempt < 1 or a negative base_s / cap_s.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if base_s < 0 or cap_s < 0:
        raise ValueError(f"base_s and cap_s must be >= 0, got {base_s}, {cap_s}")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


class CircuitBreaker:
    """Closed / open / half-open breaker over consecutive failures (see the module doc)."""

    def __init__(self, failure_threshold: int = 5, reset_after_s: float = 30.0) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if reset_after_s < 0:
            raise ValueError(f"reset_after_s must be >= 0, got {reset_after_s}")
        # Consecutive failures that open a closed breaker.
        self.failure_threshold = failure_threshold
        # How long an open breaker refuses calls before it lets one trial through.
        self.reset_after_s = reset_after_s
        self._state = CLOSED
        self._failures = 0
        # When the breaker last opened (open) or let its trial through (half_open).
        self._since = 0.0

    @property
    def state(self) -> str:
        """"closed", "open" or "half_open"."""
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures recorded since the last success."""
        return self._failures

    def allow(self, now: float) -> bool:
        """True when a call may go ahead now. May move open -> half_open."""
        if self._state == CLOSED:
            return True
        if now - self._since < self.reset_after_s:
            # Open and still cooling down, or half-open with its trial in flight.
            return False
        # Open long enough, or a half-open trial that never reported: one trial.
        self._state = HALF_OPEN
        self._since = now
        return True

    def record_success(self, now: float) -> None:
        """A call succeeded: the dependency works, so close the breaker."""
        self._state = CLOSED
        self._failures = 0
        self._since = now

    def record_failure(self, now: float) -> None:
        """A call failed: count it, and open the breaker at the threshold or on a failed trial."""
        self._failures += 1
        if self._state == HALF_OPEN or (self._state == CLOSED and self._failures >= self.failure_threshold):
            self._state = OPEN
            self._since = now
        # Already open: a late failure of a call let through before it opened
        # must not extend the cool-down.
