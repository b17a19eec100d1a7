"""status.py: the STATUS= line and the status loop's wake-ups, as values."""

from __future__ import annotations

import itertools

import pytest

from smap_notify.status import STATUS_TICK, status_text, status_wake


def test_status_says_redis_connections_and_users() -> None:
    text = status_text(
        subscribed=True,
        redis_state="subscribed",
        draining=False,
        out_of_descriptors=False,
        connections=3,
        users=2,
    )
    assert text == "subscribed; 3 connections, 2 users"


def test_status_says_redis_state_draining_and_a_descriptor_shortage() -> None:
    text = status_text(
        subscribed=False,
        redis_state="retrying",
        draining=True,
        out_of_descriptors=True,
        connections=0,
        users=0,
    )
    assert text == (
        "draining; out of file descriptors, refusing new connections; redis retrying;"
        " 0 connections, 0 users"
    )


@pytest.mark.parametrize("interval", [0.2, 1.0, 1.25, 1.001, 1.9, 15.0])
def test_watchdog_pings_keep_to_half_of_watchdog_usec(interval: float) -> None:
    """The status loop ticked every second and pinged on the first tick past the ping's
    time: with WatchdogSec=2.5s, pings came 2 s apart, 80% of the limit (and past it
    with a little lateness at 2.0025 s)."""
    now = next_ping = 0.0
    pings, wakes = [], []
    while now < 60:
        if now >= next_ping:
            pings.append(now)
            next_ping = now + interval
        now = status_wake(now, next_ping)
        wakes.append(now)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) == pytest.approx(interval)
    assert max(b - a for a, b in itertools.pairwise(wakes)) <= STATUS_TICK + 1e-9


def test_a_held_back_watchdog_ping_is_looked_at_again_in_a_second() -> None:
    # next_ping in the past: the subscriber thread was not alive at the ping's time.
    assert status_wake(10.0, 9.5) == 10.0 + STATUS_TICK
    assert status_wake(10.0, None) == 10.0 + STATUS_TICK
