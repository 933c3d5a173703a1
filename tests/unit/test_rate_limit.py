"""The token bucket core: burst, refill, Retry-After, independence of keys and bounded memory."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.rate_limit import RateLimit, TokenBuckets


def test_a_fresh_key_may_make_burst_requests_at_once_then_waits_for_the_refill() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=2.0, burst=3))
    assert [buckets.take("ci", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Empty: the next token arrives after 1 / rate seconds.
    assert buckets.take("ci", 100.0) == pytest.approx(0.5)
    assert buckets.take("ci", 100.25) == pytest.approx(0.25)
    assert buckets.take("ci", 100.5) == 0.0


def test_a_refused_request_takes_nothing() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1.0, burst=1))
    assert buckets.take("k", 0.0) == 0.0
    for _ in range(5):
        assert buckets.take("k", 0.5) == pytest.approx(0.5)
    assert buckets.take("k", 1.0) == 0.0


def test_the_refill_never_exceeds_the_burst() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=10.0, burst=2))
    buckets.take("k", 0.0)
    assert buckets.level("k", 3600.0) == 2.0
    assert [buckets.take("k", 3600.0) for _ in range(3)][2] > 0


def test_keys_do_not_share_a_bucket() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1.0, burst=1))
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0


def test_a_clock_that_steps_back_neither_refills_nor_fails() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1.0, burst=1))
    buckets.take("k", 10.0)
    assert buckets.take("k", 5.0) == pytest.approx(1.0)


def test_memory_is_bounded_and_full_buckets_go_first() -> None:
    buckets = TokenBuckets(RateLimit(rate_per_s=1.0, burst=5), max_keys=3)
    buckets.take("hot", 0.0)
    for i in range(10):
        buckets.take(f"addr-{i}", float(i))
    assert len(buckets) <= 3


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)])
def test_nonsense_shapes_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimit(rate_per_s=rate, burst=burst)


@given(
    rate=st.floats(min_value=0.1, max_value=100.0),
    burst=st.integers(min_value=1, max_value=50),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int, gaps: list[float]) -> None:
    """Over any run, the requests let through never exceed burst + rate x elapsed time."""
    buckets = TokenBuckets(RateLimit(rate_per_s=rate, burst=burst))
    now, passed = 0.0, 0
    for gap in gaps:
        now += gap
        if buckets.take("k", now) == 0.0:
            passed += 1
        assert passed <= burst + rate * now + 1e-6
