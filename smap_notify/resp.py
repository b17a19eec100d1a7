"""The subscribed connection's replies, read off its socket directly: one ``poll`` and one
read per wake-up, parsed with hiredis into batches bounded in messages and bytes. The
subscriber threads (classic and sharded) own it; nothing else reads that socket."""

from __future__ import annotations

import contextlib
import os
import select
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

import hiredis
import redis

from .hub import RawMessage
from .memory import LARGE
from .redis_client import (
    CLOSED_BY_REDIS,
    not_redis,
)

MAX_BATCH: Final = 256

# A batch also ends at this many bytes of message data: with few large messages (a
# publisher's 1 MB reports) 256 of them would hold hundreds of megabytes in flight.
MAX_BATCH_BYTES: Final = 4 << 20
READ_SIZE: Final = 65536


class Replies:
    """RESP2 replies read straight off the subscribed connection's socket.

    redis-py's ``can_read``/``read_response`` cost six system calls per wake-up (two polls
    for readability, a peek for a closed socket, a poll before each timed ``recv``); this
    costs one ``poll`` and, on a plain socket, one ``readv`` per wake-up, with redis-py's
    own connection still doing everything else (connect, AUTH, SELECT, PSUBSCRIBE, PING).
    The socket's private ``_sock`` is pinned by ``tests/test_internals.py``.
    """

    def __init__(self, conn: Any) -> None:
        sock = conn._sock
        if sock is None:
            raise redis.ConnectionError("redis connection is not open")
        self._sock: Any = sock  # socket.socket or ssl.SSLSocket
        self._fd = sock.fileno()
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._reader = hiredis.Reader()
        self._buf = bytearray(READ_SIZE)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._more = False  # complete replies may be buffered (a batch filled up)
        self._batch_bytes = 0  # message data in the batch being read
        self._wake_fd: int | None = None

    def wake_on(self, fd: int) -> None:
        """Let ``wait`` also end when ``fd`` becomes readable (the plan changed)."""
        self._wake_fd = fd
        self._poll.register(fd, select.POLLIN)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def buffered(self) -> bool:
        """Replies may be waiting without the socket being readable."""
        return self._more or (self._tls and self._sock.pending() > 0)

    @property
    def more(self) -> bool:
        """The last read filled its batch: complete replies may be waiting already."""
        return self._more

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` (whole milliseconds: ``poll``'s unit) for a reply."""
        if self._more or (self._tls and self._sock.pending()):
            return True
        ready = self._poll.poll(seconds * 1000)
        if self._wake_fd is None:
            return bool(ready)
        readable = False
        for fd, _ in ready:
            if fd == self._fd:
                readable = True
            else:  # woken: the caller's next turn issues the changes
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 4096)  # one byte per wake-up; any left wakes the next poll
        return readable

    def linger(self, seconds: float) -> bool:
        """Sleep ``seconds`` whatever arrives meanwhile, then say whether a reply is waiting.

        A ``poll`` would return at the first message, and counts whole milliseconds
        (0.3 ms would be 1 ms); ``select`` fails on descriptors past 1023, which a
        reconnect among thousands of clients can get.
        """
        time.sleep(seconds)
        return self.wait(0)

    def read(
        self, take: Callable[[Any, list[RawMessage]], int | None], batch: list[RawMessage]
    ) -> None:
        """Read what has arrived and ``take`` each complete reply, up to ``MAX_BATCH``
        messages or ``MAX_BATCH_BYTES`` (``take`` returns the bytes it added to ``batch``).
        Afterwards ``more`` says whether the batch is full."""
        reader = self._reader
        self._more = False
        if not batch:
            self._batch_bytes = 0
        unread = True  # the socket may hold more than has been read
        large = False
        try:
            while True:
                reply = reader.gets()
                while reply is not False:
                    added = take(reply, batch)
                    if added:
                        self._batch_bytes += added
                        large = large or added >= LARGE
                    if len(batch) >= MAX_BATCH or self._batch_bytes >= MAX_BATCH_BYTES:
                        self._more = True
                        return
                    reply = reader.gets()
                if not unread:
                    return
                unread = self._fill()
        except hiredis.ProtocolError as exc:
            raise not_redis(exc) from None
        finally:
            # hiredis keeps its buffer at the largest reply's size until the next read: a
            # large message would stay in memory as long as Redis stays quiet.
            if large and not reader.has_data():
                self._reader = hiredis.Reader()

    def _fill(self) -> bool:
        """One read from the socket; True when more may be waiting (the buffer filled up)."""
        try:
            if self._tls:
                if not self._sock.pending() and not self._poll.poll(0):
                    return False
                n = self._sock.recv_into(self._buf)
            else:
                n = os.readv(self._fd, (self._buf,))
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        if n == 0:
            raise redis.ConnectionError(CLOSED_BY_REDIS)
        self._reader.feed(self._buf, 0, n)  # type: ignore[arg-type]  # any buffer works
        # A short read took all there was; what comes later, the next wait sees. Over TLS a
        # read returns one record (16 KB at most): the next call looks for more, cheaply.
        return self._tls or n == len(self._buf)
