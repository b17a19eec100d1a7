"""The server's frame bytes, without sockets."""

from __future__ import annotations

from smap_notify.frames import PING_FRAME, close_frame, is_close_frame, text_frame, text_frame_of


def test_a_close_frame_carries_its_code_and_no_reason() -> None:
    assert close_frame(1002) == b"\x88\x02\x03\xea"
    assert is_close_frame(close_frame(1007))


def test_only_a_close_opcode_makes_a_close_frame() -> None:
    assert not is_close_frame(b"")
    assert not is_close_frame(PING_FRAME)
    assert not is_close_frame(b"\x8a\x00")  # a pong
    assert not is_close_frame(text_frame(b"\x88"))


def test_a_frame_of_parts_is_the_frame_of_their_join() -> None:
    parts = [b"a" * 100, b"b" * 30, b"c"]
    assert text_frame_of(parts) == text_frame(b"".join(parts))
