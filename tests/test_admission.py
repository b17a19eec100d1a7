"""admission.py: which request heads may be read at once, as decisions called with values."""

from __future__ import annotations

import resource

from smap_notify.admission import (
    FD_HEADROOM,
    HEAD_CROWDED_AFTER,
    MAX_PENDING_HEADS,
    MIN_PENDING_HEADS,
    head_cap,
    heads_to_close,
)


def test_the_heads_read_at_once_are_what_the_open_files_limit_leaves_within_bounds() -> None:
    assert head_cap(resource.RLIM_INFINITY, 10_000) == MAX_PENDING_HEADS
    assert head_cap(1_000_000, 0) == MAX_PENDING_HEADS
    assert head_cap(1024, 500) == 1024 - FD_HEADROOM - 500
    assert head_cap(1024, 5000) == MIN_PENDING_HEADS  # never fewer, whatever is open


def test_a_new_head_has_room_while_there_are_fewer_than_the_cap() -> None:
    assert heads_to_close([0.0] * 15, now=100.0, cap=16) == (0, True)


def test_the_oldest_heads_past_the_crowding_age_are_closed_to_make_room() -> None:
    old = 100.0 - HEAD_CROWDED_AFTER - 1
    since = [old, old, old, 99.9]
    assert heads_to_close(since, now=100.0, cap=2) == (3, True)


def test_heads_all_younger_than_the_crowding_age_leave_no_room() -> None:
    old = 100.0 - HEAD_CROWDED_AFTER - 1
    assert heads_to_close([old, 99.5, 99.9], now=100.0, cap=2) == (1, False)
    assert heads_to_close([99.5] * 20, now=100.0, cap=16) == (0, False)
