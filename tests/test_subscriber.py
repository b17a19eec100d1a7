"""subscriber.py: the thread's deadlines and its linger (``Coalescer``), as values."""

from __future__ import annotations

from typing import Final

import pytest

from smap_notify.resp import MAX_BATCH
from smap_notify.subscriber import (
    DEAD_AFTER,
    FAST_RATE,
    LONG_LINGER,
    MAX_LINGER,
    POLL_SECONDS,
    PROBE_AFTER,
    RATE_WINDOW,
    STEADY_RATE,
    Coalescer,
)

# The contract: a dead or wedged subscription is noticed within DETECT_TARGET seconds.
# bench/faults.py measures it against a real Redis.
DETECT_TARGET: Final = 5.0


def test_a_silent_subscription_is_probed_and_declared_dead_within_the_target() -> None:
    """The subscriber looks at a silent subscription every POLL_SECONDS: it sends a PING
    after PROBE_AFTER of silence, which a live Redis answers, and declares the
    subscription dead after DEAD_AFTER, so at the latest DEAD_AFTER + POLL_SECONDS after
    Redis's last reply."""
    assert POLL_SECONDS < PROBE_AFTER < DEAD_AFTER
    assert PROBE_AFTER + POLL_SECONDS < DEAD_AFTER, "a probe has time to be answered"
    assert DEAD_AFTER + POLL_SECONDS < DETECT_TARGET


def fed(rate: float, seconds: float = 0.05, per_batch: int = 1, start: float = 100.0) -> Coalescer:
    """A coalescer that has seen hand-overs of ``per_batch`` messages at ``rate`` msg/s."""
    coalescer = Coalescer()
    gap = per_batch / rate
    for i in range(int(seconds / gap)):
        coalescer.handed_over(start + i * gap, per_batch)
    return coalescer


def test_a_new_subscriber_does_not_linger() -> None:
    assert Coalescer().linger(100.0, 1) == 0.0


def test_a_slow_stream_is_handed_over_at_once() -> None:
    coalescer = fed(STEADY_RATE / 2)
    assert coalescer.rate == pytest.approx(STEADY_RATE / 2, rel=0.1)
    assert coalescer.linger(100.05, 1) == 0.0


def test_a_steady_stream_lingers_about_one_gap_between_messages() -> None:
    coalescer = fed(2000.0)
    assert coalescer.rate == pytest.approx(2000.0, rel=0.1)
    assert coalescer.linger(100.05, 1) == pytest.approx(1 / 2000.0, rel=0.1)


@pytest.mark.parametrize("rate", [FAST_RATE * 1.1, 5_000.0, 9_000.0])
def test_a_fast_stream_lingers_long(rate: float) -> None:
    assert fed(rate, per_batch=8).linger(100.05, 8) == pytest.approx(LONG_LINGER)


def test_a_faster_stream_lingers_longer_up_to_the_longest() -> None:
    lingers = [fed(rate, per_batch=8).linger(100.05, 8) for rate in (12_000, 20_000, 29_000)]
    assert lingers == sorted(lingers) and lingers[0] > LONG_LINGER
    assert lingers[-1] == pytest.approx(29_000 * 1e-7, rel=0.1)
    assert fed(200_000.0, per_batch=64).linger(100.05, 8) == MAX_LINGER


@pytest.mark.parametrize("rate", [100.0, STEADY_RATE, 2500.0, FAST_RATE, 50_000.0, 1e6])
def test_the_linger_never_exceeds_the_longest(rate: float) -> None:
    assert 0.0 <= fed(rate, per_batch=max(1, int(rate / 10_000))).linger(100.05, 1) <= MAX_LINGER


def test_a_full_batch_is_handed_over_at_once() -> None:
    assert fed(27_000.0, per_batch=8).linger(100.05, MAX_BATCH) == 0.0


def test_a_stream_that_paused_starts_without_a_linger() -> None:
    coalescer = fed(27_000.0, per_batch=8)
    # The first message after a pause is not held back by the rate from before it.
    assert coalescer.linger(100.05 + 2 * RATE_WINDOW, 1) == 0.0
    # After a pause of a second the stream's rate is measured afresh.
    coalescer.handed_over(101.05, 1)
    assert coalescer.rate < STEADY_RATE
    assert coalescer.linger(101.051, 1) == 0.0
