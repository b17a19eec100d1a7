"""Failure pacing: the circuit breaker guarding Redis checks, the reconnect backoff, and
the subscriber's deadlines for a silent subscription."""

from __future__ import annotations

import pytest

from smap_notify.breaker import CircuitBreaker


def opened(at: float = 100.0) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=3, reset_after=5.0)
    for _ in range(3):
        assert breaker.allow(at)
        breaker.record_failure(at)
    assert breaker.state == "open"
    return breaker


# -- the circuit breaker -------------------------------------------------------------------


def test_new_breaker_is_closed_and_allows_calls() -> None:
    breaker = CircuitBreaker()
    assert (breaker.failure_threshold, breaker.reset_after) == (3, 5.0)
    assert breaker.state == "closed"
    assert all(breaker.allow(t) for t in range(10))


def test_closed_breaker_stays_closed_below_the_threshold() -> None:
    breaker = CircuitBreaker()
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state == "closed"
    assert breaker.allow(2.0)


def test_three_consecutive_failures_open_the_breaker() -> None:
    breaker = opened(at=100.0)
    assert breaker.opened_at == 100.0
    assert not breaker.allow(100.0)


def test_a_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker()
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    breaker.record_success()
    breaker.record_failure(3.0)
    breaker.record_failure(4.0)
    assert breaker.state == "closed"
    breaker.record_failure(5.0)
    assert breaker.state == "open"


@pytest.mark.parametrize("elapsed", [0.0, 1.0, 4.0, 4.999])
def test_open_breaker_rejects_until_reset_after(elapsed: float) -> None:
    breaker = opened(at=100.0)
    assert not breaker.allow(100.0 + elapsed)
    assert breaker.state == "open"


def test_open_breaker_rejects_every_call_while_open() -> None:
    breaker = opened(at=100.0)
    assert not any(breaker.allow(100.0 + n * 0.1) for n in range(50))


@pytest.mark.parametrize("elapsed", [5.0, 5.001, 60.0])
def test_after_reset_after_exactly_one_trial_goes_through(elapsed: float) -> None:
    breaker = opened(at=100.0)
    assert breaker.allow(100.0 + elapsed)
    assert breaker.state == "half_open"
    assert not breaker.allow(100.0 + elapsed)
    assert not breaker.allow(100.0 + elapsed + 100)


def test_successful_trial_closes_the_breaker() -> None:
    breaker = opened(at=100.0)
    assert breaker.allow(105.0)
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.failures == 0
    assert all(breaker.allow(105.0) for _ in range(5))


def test_failed_trial_reopens_the_breaker_for_another_reset_after() -> None:
    breaker = opened(at=100.0)
    assert breaker.allow(105.0)
    breaker.record_failure(105.5)
    assert breaker.state == "open"
    assert breaker.opened_at == 105.5
    assert not breaker.allow(110.0)
    assert breaker.allow(110.5)
    assert breaker.state == "half_open"


def test_one_failure_in_half_open_is_enough_to_reopen() -> None:
    breaker = CircuitBreaker(failure_threshold=10, reset_after=1.0)
    for _ in range(10):
        breaker.record_failure(0.0)
    assert breaker.allow(1.0)
    breaker.record_failure(1.0)
    assert breaker.state == "open"


def test_threshold_and_reset_are_configurable() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_after=0.5)
    breaker.record_failure(10.0)
    assert not breaker.allow(10.4)
    assert breaker.allow(10.5)


# -- the subscriber's reconnect backoff ----------------------------------------------------
