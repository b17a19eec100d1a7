"""A connection's outbound queue: bounds, write chunks, partial writes and missed frames.

Pure bookkeeping, no sockets and no Trio: the connection asks it what to write next and
tells it how much the socket took.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .frames import PING_FRAME

# Frames joined for one write at most (a larger frame goes alone, uncopied): the copy a
# connection makes of what it sends is bounded by this, while the frames themselves stay
# shared by all connections of a user.
WRITE_CHUNK: Final = 64 * 1024


def wholly_sent(frames: Sequence[bytes | memoryview], sent: int) -> tuple[int, int]:
    """Of ``frames`` written back to back, how many lie wholly among the first ``sent``
    bytes, and their size."""
    end = 0
    for i, frame in enumerate(frames):
        if end + len(frame) > sent:
            return i, end
        end += len(frame)
    return len(frames), end


class Outbound:
    """Frames queued for one connection, bounded by messages and by bytes.

    Frames stay queued (and counted) until wholly written: the bound covers the frames in
    flight, and a write that fails leaves the unwritten ones to be counted as dropped. A
    frame cut by a partial write stays the one object all connections of the user share
    (``offset`` says how far into it the socket got): the queue never holds a private copy
    of its unwritten rest.
    """

    __slots__ = (
        "max_messages",
        "max_bytes",
        "frames",
        "offset",
        "messages",
        "size",
        "missed",
        "missed_since",
    )

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.frames: list[bytes | memoryview] = []
        self.offset = 0  # bytes of frames[0] already written
        self.messages = 0  # message frames queued (control frames do not count)
        self.size = 0  # unwritten bytes queued
        # Message frames dropped because the queue was full, and since when: what the
        # client is told once its queue has been written out.
        self.missed = 0
        self.missed_since = ""

    def __bool__(self) -> bool:
        return bool(self.frames)

    def push(self, frame: bytes | memoryview) -> bool:
        """Queue a message frame; False when the queue is full (by messages or bytes). A
        frame larger than the byte bound still goes alone into an empty queue."""
        if self.messages >= self.max_messages or (
            self.messages and self.size + len(frame) > self.max_bytes
        ):
            return False
        self.frames.append(frame)
        self.messages += 1
        self.size += len(frame)
        return True

    def push_control(self, frame: bytes) -> None:
        """Queue a control frame (ping); it does not count against the message bound."""
        self.frames.append(frame)
        self.size += len(frame)

    def clear(self) -> None:
        """Empty the queue: written, or not to be written."""
        self.frames.clear()
        self.offset = 0
        self.messages = 0
        self.size = 0

    def _chunk(self) -> int:
        """How many queued frames make the next write: whole frames up to WRITE_CHUNK
        bytes, at least one."""
        frames = self.frames
        count = len(frames)
        size = len(frames[0]) - self.offset
        n = 1
        while n < count:
            size += len(frames[n])
            if size > WRITE_CHUNK:
                break
            n += 1
        return n

    def next_write(self) -> tuple[int, bytes | memoryview]:
        """The next write: how many queued frames, and their unwritten bytes. A frame
        that goes alone is not copied, whatever its size. The queue must not be empty."""
        frames = self.frames
        whole = self.size <= WRITE_CHUNK  # the usual case: all of it
        n = len(frames) if whole else self._chunk()
        if self.offset:
            first = memoryview(frames[0])[self.offset :]
            return n, first if n == 1 else b"".join([first, *frames[1:n]])
        if n == 1:
            return 1, frames[0]
        return n, b"".join(frames if whole else frames[:n])

    def advance(self, written: int) -> None:
        """``written`` more bytes of the queue went out: the frames wholly written leave
        it, and ``offset`` says how far into the next one the socket got."""
        frames = self.frames
        if written == self.size:  # all of it: the write of every delivered message
            frames.clear()
            self.offset = self.messages = self.size = 0
            return
        count, size = wholly_sent(frames, self.offset + written)
        messages = sum(frame is not PING_FRAME for frame in frames[:count])
        del frames[:count]
        self.offset += written - size
        self.messages -= messages
        self.size -= written

    def miss(self, since: str) -> None:
        """A message frame was dropped for a full queue; ``since`` counts for the first."""
        if not self.missed:
            self.missed_since = since
        self.missed += 1

    def take_missed(self) -> tuple[int, str]:
        """How many frames were missed, since when; counting starts afresh."""
        missed, self.missed = self.missed, 0
        return missed, self.missed_since
