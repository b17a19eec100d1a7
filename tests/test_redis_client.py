"""redis_client.py: the reconnect backoff, against the contract's figures as values."""

from __future__ import annotations

import random
from typing import Final

import pytest

from smap_notify.redis_client import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    FLAP_CAP,
    backoff_delay,
    reconnect_delay,
)

# The contract: delivery resumes within RECOVER_TARGET seconds of Redis answering again.
# bench/faults.py measures it against a real Redis.
RECOVER_TARGET: Final = 2.0


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


def test_the_wait_before_a_new_attempt_leaves_time_to_recover_within_the_target() -> None:
    """Without flapping, the longest wait between two attempts is BACKOFF_CAP: an attempt
    comes that soon after Redis is back, and has the rest of the target to subscribe."""
    rng = random.Random(3)
    assert max(reconnect_delay(attempt, 0, rng) for attempt in range(200)) <= BACKOFF_CAP
    assert BACKOFF_CAP < RECOVER_TARGET
