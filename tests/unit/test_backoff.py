"""Retry pacing and the circuit breaker, driven by hand with explicit times."""

from __future__ import annotations

import random

import pytest

from coordinator.backoff import CircuitBreaker, retry_delay


# --- retry_delay: full jitter, window min(cap, base * 2**(attempt - 1)) ---


@pytest.mark.parametrize(
    ("attempt", "window"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (50, 10.0), (10_000, 10.0)],
)
def test_retry_delay_draws_uniformly_from_the_capped_exponential_window(attempt: int, window: float) -> None:
    # The same seed drawing from the expected window gives exactly the same number.
    got = retry_delay(attempt, random.Random(42), base_s=0.5, cap_s=10.0)
    assert got == random.Random(42).uniform(0.0, window)


def test_retry_delay_stays_inside_the_window_over_many_draws() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        window = min(300.0, 2.0 ** (attempt - 1))
        draws = [retry_delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= window for d in draws)
        # Full jitter: draws use the whole window, not just its top.
        assert min(draws) < window * 0.1 and max(draws) > window * 0.9


def test_retry_delay_is_reproducible_from_the_seed() -> None:
    a, b = random.Random(2024), random.Random(2024)
    assert [retry_delay(n, a) for n in range(1, 20)] == [retry_delay(n, b) for n in range(1, 20)]


def test_retry_delay_with_zero_base_never_waits() -> None:
    assert retry_delay(7, random.Random(0), base_s=0.0) == 0.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_retry_delay_rejects_attempts_before_the_first_retry(attempt: int) -> None:
    with pytest.raises(ValueError):
        retry_delay(attempt, random.Random(0))


# --- CircuitBreaker ---


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b = CircuitBreaker(failure_threshold=3, reset_after_s=10.0)
    for t in (1.0, 2.0):
        assert b.allow(t)
        b.record_failure(t)
        assert b.state == "closed"
    assert b.allow(3.0)
    b.record_failure(3.0)
    assert b.state == "open"
    assert not b.allow(3.0)
    assert not b.allow(12.9)  # still cooling down: opened at 3.0, reset after 10 s


def test_a_success_resets_the_consecutive_count() -> None:
    b = CircuitBreaker(failure_threshold=2, reset_after_s=10.0)
    b.record_failure(1.0)
    b.record_success(2.0)
    b.record_failure(3.0)
    assert b.state == "closed"
    assert b.consecutive_failures == 1
    b.record_failure(4.0)
    assert b.state == "open"


def test_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_after_s=10.0)
    b.record_failure(0.0)
    assert b.state == "open"
    assert b.allow(10.0)  # cool-down over: the trial
    assert b.state == "half_open"
    assert not b.allow(10.5)  # only one trial at a time
    b.record_success(11.0)
    assert b.state == "closed"
    assert b.consecutive_failures == 0
    assert b.allow(11.0) and b.allow(11.0)


def test_a_failed_trial_reopens_and_restarts_the_cool_down() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_after_s=10.0)
    b.record_failure(0.0)
    assert b.allow(10.0)
    b.record_failure(12.0)
    assert b.state == "open"
    assert not b.allow(21.9)  # timer restarted at 12.0, not at 0.0
    assert b.allow(22.0)
    assert b.state == "half_open"


def test_a_trial_that_never_reports_is_presumed_failed_after_the_reset_time() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_after_s=10.0)
    b.record_failure(0.0)
    assert b.allow(10.0)  # trial let through; its caller is cancelled and never reports
    assert not b.allow(19.9)
    assert b.allow(20.0)
    assert b.state == "half_open"


def test_late_failures_while_open_do_not_extend_the_cool_down() -> None:
    b = CircuitBreaker(failure_threshold=1, reset_after_s=10.0)
    b.record_failure(0.0)
    b.record_failure(9.0)  # a call let through before it opened, failing late
    assert b.state == "open"
    assert b.allow(10.0)


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, -1.0)])
def test_breaker_rejects_nonsense_settings(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=threshold, reset_after_s=reset)
