"""Giving memory back: when a trim is asked for."""

from __future__ import annotations

from smap_notify.memory import Trimmer


def test_a_tracked_frame_asks_for_a_trim_once_nothing_holds_it() -> None:
    trimmer = Trimmer()
    frame = trimmer.track(b"x" * 100)
    pending = [frame]
    del frame
    assert not trimmer.wanted
    pending.clear()
    assert trimmer.wanted
    trimmer.trim_if_wanted()
    assert not trimmer.wanted
