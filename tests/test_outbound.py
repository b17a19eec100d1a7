"""The outbound queue's bookkeeping, with values only: no sockets, no Trio."""

from __future__ import annotations

from smap_notify.frames import PING_FRAME
from smap_notify.outbound import WRITE_CHUNK, Outbound, wholly_sent


def test_the_queue_is_bounded_by_messages_and_bytes_but_a_large_frame_goes_alone() -> None:
    queue = Outbound(max_messages=2, max_bytes=1000)
    assert queue.push(b"a" * 600)
    assert not queue.push(b"b" * 600)  # 1,200 > 1,000
    assert queue.push(b"c" * 400)  # exactly 1,000
    assert not queue.push(b"d")  # two messages already
    alone = Outbound(max_messages=2, max_bytes=1000)
    assert alone.push(b"e" * 5000)


def test_control_frames_do_not_count_against_the_message_bound() -> None:
    queue = Outbound(max_messages=1, max_bytes=1000)
    queue.push_control(PING_FRAME)
    assert queue.push(b"m")
    assert (queue.messages, queue.size) == (1, len(PING_FRAME) + 1)


def test_a_small_queue_is_written_whole_in_one_joined_write() -> None:
    queue = Outbound(max_messages=10, max_bytes=1 << 20)
    for frame in (b"one", b"two", b"three"):
        queue.push(frame)
    assert queue.next_write() == (3, b"onetwothree")
    queue.advance(11)
    assert (queue.frames, queue.messages, queue.size, queue.offset) == ([], 0, 0, 0)


def test_a_large_queue_is_written_in_chunks_of_whole_frames() -> None:
    queue = Outbound(max_messages=100, max_bytes=1 << 30)
    frames = [bytes([65 + n]) * 30_000 for n in range(5)]
    for frame in frames:
        queue.push(frame)
    n, data = queue.next_write()
    assert n == 2 and data == frames[0] + frames[1]  # a third would pass WRITE_CHUNK
    assert len(data) <= WRITE_CHUNK


def test_a_frame_larger_than_a_chunk_goes_alone_uncopied() -> None:
    queue = Outbound(max_messages=100, max_bytes=1 << 30)
    big = b"x" * (WRITE_CHUNK * 2)
    queue.push(big)
    queue.push(b"small")
    n, data = queue.next_write()
    assert n == 1 and data is big


def test_a_partial_write_keeps_the_shared_frame_and_an_offset_into_it() -> None:
    queue = Outbound(max_messages=10, max_bytes=1 << 20)
    first, second = b"a" * 100, b"b" * 50
    queue.push(first)
    queue.push(second)
    queue.advance(130)
    assert queue.frames == [second] and queue.frames[0] is second
    assert (queue.offset, queue.messages, queue.size) == (30, 1, 20)
    n, data = queue.next_write()
    assert n == 1 and bytes(data) == b"b" * 20
    queue.advance(20)
    assert (queue.frames, queue.offset, queue.size) == ([], 0, 0)


def test_a_ping_written_is_no_message_written() -> None:
    queue = Outbound(max_messages=10, max_bytes=1 << 20)
    queue.push_control(PING_FRAME)
    queue.push(b"m" * 10)
    queue.push(b"n" * 10)
    queue.advance(len(PING_FRAME) + 10)
    assert (queue.messages, queue.size) == (1, 10)


def test_wholly_sent_counts_only_frames_written_to_their_end() -> None:
    frames = [b"aa", b"bbb", b"c"]
    assert wholly_sent(frames, 0) == (0, 0)
    assert wholly_sent(frames, 4) == (1, 2)
    assert wholly_sent(frames, 5) == (2, 5)
    assert wholly_sent(frames, 6) == (3, 6)


def test_missed_frames_are_counted_from_the_first_until_taken() -> None:
    queue = Outbound(max_messages=1, max_bytes=100)
    queue.miss("t1")
    queue.miss("t2")
    assert (queue.missed, queue.missed_since) == (2, "t1")
    queue.clear()  # a write does not forget what was missed
    assert queue.take_missed() == (2, "t1")
    assert queue.missed == 0
    queue.miss("t3")
    assert queue.take_missed() == (1, "t3")
