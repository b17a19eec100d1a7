"""Failure pacing: the circuit breaker guarding Redis checks, the reconnect backoff, and
the subscriber's deadlines for a silent subscription."""

from __future__ import annotations

import random
from typing import Final

import pytest

from smap_notify.breaker import CircuitBreaker
from smap_notify.redis_client import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    FLAP_CAP,
    backoff_delay,
    reconnect_delay,
)
from smap_notify.subscriber import DEAD_AFTER, POLL_SECONDS, PROBE_AFTER

# The contract: a dead or wedged subscription is noticed within DETECT_TARGET seconds, and
# delivery resumes within RECOVER_TARGET of Redis answering again. bench/faults.py
# measures both against a real Redis.
DETECT_TARGET: Final = 5.0
RECOVER_TARGET: Final = 2.0


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


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 10, 16, 17, 100, 10**9])
def test_backoff_is_within_half_and_full_of_the_capped_delay(attempt: int) -> None:
    capped = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 16))
    rng = random.Random(attempt)
    for _ in range(200):
        delay = backoff_delay(attempt, rng)
        assert capped * 0.5 <= delay <= capped


def test_backoff_never_exceeds_the_cap() -> None:
    rng = random.Random(1)
    assert max(backoff_delay(a, rng) for a in range(1000)) <= BACKOFF_CAP


def test_backoff_grows_from_the_base() -> None:
    low = random.Random(0)
    low.random = lambda: 0.0  # type: ignore[method-assign]
    assert [backoff_delay(a, low) for a in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5])


def test_backoff_is_jittered() -> None:
    rng = random.Random(42)
    assert len({backoff_delay(10, rng) for _ in range(20)}) > 1


def test_backoff_without_rng_uses_the_module_random() -> None:
    delay = backoff_delay(3)
    assert 0.4 <= delay <= 0.8


def test_the_wait_after_flapping_subscriptions_grows_with_each_up_to_its_cap() -> None:
    """A peer that subscribes and then breaks the protocol was retried every 0.1 s: each
    cycle a warning pair and a resync to every client (an outside re-check: 29 in 5 s)."""
    rng = random.Random(7)
    assert reconnect_delay(0, 0, rng) <= BACKOFF_BASE  # an ordinary loss: as before
    waits = [reconnect_delay(0, flaps, rng) for flaps in range(1, 12)]
    assert waits == sorted(waits)
    assert waits[0] >= 2 * BACKOFF_BASE
    assert waits[-1] == FLAP_CAP


def test_a_silent_subscription_is_probed_and_declared_dead_within_the_target() -> None:
    """The subscriber looks at a silent subscription every POLL_SECONDS: it sends a PING
    after PROBE_AFTER of silence, which a live Redis answers, and declares the
    subscription dead after DEAD_AFTER, so at the latest DEAD_AFTER + POLL_SECONDS after
    Redis's last reply."""
    assert POLL_SECONDS < PROBE_AFTER < DEAD_AFTER
    assert PROBE_AFTER + POLL_SECONDS < DEAD_AFTER, "a probe has time to be answered"
    assert DEAD_AFTER + POLL_SECONDS < DETECT_TARGET


def test_the_wait_before_a_new_attempt_leaves_time_to_recover_within_the_target() -> None:
    """Without flapping, the longest wait between two attempts is BACKOFF_CAP: an attempt
    comes that soon after Redis is back, and has the rest of the target to subscribe."""
    rng = random.Random(3)
    assert max(reconnect_delay(attempt, 0, rng) for attempt in range(200)) <= BACKOFF_CAP
    assert BACKOFF_CAP < RECOVER_TARGET
