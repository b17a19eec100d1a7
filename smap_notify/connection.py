"""One WebSocket connection's outbound side: a bounded queue and coalesced, direct writes.

trio-websocket owns the handshake, the reading and the close handshake. Outbound
notification frames bypass its per-message ``send_message`` (one ``send_all``, lock and
task switch per frame): the hub queues ready-made frames and, after each Redis batch,
writes everything a connection has pending in one non-blocking write. Only when the
socket cannot take it all does a flush task wait for writability. trio-websocket's own
writes (pongs, close frames) come here through ``ConnStream.send_all`` and wait for the
frames queued before them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Final

import trio
import trio_websocket

from .frames import PING_FRAME, PROTOCOL_FAILURES, close_frame, is_close_frame
from .websocket import ConnStream

logger = logging.getLogger(__name__)

# Frames joined for one write at most (a larger frame goes alone, uncopied): the copy
# each connection makes of what it sends.
WRITE_CHUNK: Final = 64 * 1024
_ids = itertools.count(1)


def _wholly_sent(frames: Sequence[bytes | memoryview], sent: int) -> tuple[int, int]:
    """Of ``frames`` written back to back, how many lie wholly among the first ``sent``
    bytes, and their size."""
    end = 0
    for i, frame in enumerate(frames):
        if end + len(frame) > sent:
            return i, end
        end += len(frame)
    return len(frames), end


class Connection:
    """A registered WebSocket of one user, with its bounded outbound queue."""

    __slots__ = (
        "id",
        "user_id",
        "stream",
        "lock",
        "expires_at",
        "max_messages",
        "max_bytes",
        "write_wait",
        "pending",
        "offset",
        "pending_messages",
        "pending_bytes",
        "flushing",
        "dirty",
        "close_sent",
        "closed",
        "close_reason",
        "closing",
        "opened",
        "on_abort",
        "on_drained",
        "missed",
        "missed_since",
        "ws",
        "filters",
    )

    def __init__(
        self,
        user_id: str,
        stream: ConnStream,
        lock: trio.StrictFIFOLock | trio.Lock,
        *,
        expires_at: float,
        max_messages: int,
        max_bytes: int,
        write_wait: float,
        filters: dict[str, str] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.user_id = user_id
        self.stream = stream
        # trio-websocket's own stream lock: held by it for every write it makes.
        self.lock = lock
        self.expires_at = expires_at
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.write_wait = write_wait
        self.pending: list[bytes | memoryview] = []
        # Bytes of pending[0] already written. A frame cut by a partial write stays the
        # one object all connections of the user share: the queue never holds a private
        # copy of its unwritten rest. pending_bytes is the queue's size less this.
        self.offset = 0
        self.pending_messages = 0
        self.pending_bytes = 0
        self.flushing = False
        self.dirty = False
        self.close_sent = False
        self.closed = False
        self.close_reason = ""
        # Set while the hub closes the connection with a close handshake; set() when done.
        self.closing: trio.Event | None = None
        self.opened = trio.current_time()
        self.on_abort: Callable[[Connection, str, str], None] | None = None
        # Frames dropped because the queue was full, since when; on_drained tells the
        # client once its queue has been written out.
        self.missed = 0
        self.missed_since = ""
        self.on_drained: Callable[[Connection], None] | None = None
        self.ws: trio_websocket.WebSocketConnection | None = None
        # Topic field -> value asked for with ?{field}Id= (None: no filter at all).
        self.filters = filters
        stream.owner = self

    def __repr__(self) -> str:
        return f"<Connection conn={self.id} user={self.user_id}>"

    @property
    def writable(self) -> bool:
        return not (self.closed or self.close_sent)

    def push(self, frame: bytes | memoryview) -> bool:
        """Queue a message frame; False when the queue is full (by messages or bytes)."""
        if self.pending_messages >= self.max_messages or (
            self.pending_messages and self.pending_bytes + len(frame) > self.max_bytes
        ):
            return False
        self.pending.append(frame)
        self.pending_messages += 1
        self.pending_bytes += len(frame)
        return True

    def push_control(self, frame: bytes) -> None:
        """Queue a control frame (ping); it does not count against the message bound."""
        self.pending.append(frame)
        self.pending_bytes += len(frame)

    def write_nowait(self, nursery: trio.Nursery) -> None:
        """Write what is pending without waiting; start a flush task for what is left."""
        self.dirty = False
        if not self.pending or self.flushing or not self.writable:
            return
        if self.lock.locked():
            self._start_flush(nursery)
            return
        stream = self.stream
        if not stream.socket_open:  # trio-websocket closed it after a close handshake
            return
        pending = self.pending
        while True:
            n, data = self._next_write()
            try:
                written = stream.write_nowait(data)
            except OSError as exc:
                self.abort("write_error", exc.strerror or str(exc))
                return
            if written == len(data) and n == len(pending):
                # _clear(), inline: this is the write of every delivered message.
                pending.clear()
                self.offset = 0
                self.pending_messages = 0
                self.pending_bytes = 0
                return
            self._advance(written)
            if written < len(data):
                self._start_flush(nursery)
                return

    def _clear(self) -> None:
        """Empty the queue: written, or not to be written."""
        self.pending.clear()
        self.offset = 0
        self.pending_messages = 0
        self.pending_bytes = 0

    def _chunk(self) -> int:
        """How many queued frames make the next write: whole frames up to WRITE_CHUNK
        bytes, at least one.

        Joining frames copies them; joining the whole queue copied up to
        WS_SEND_BUFFER_BYTES for each slow connection, though the frames themselves are
        shared by all connections of a user (100 slow tabs: +312 MB).
        """
        pending = self.pending
        count = len(pending)
        size = len(pending[0]) - self.offset
        n = 1
        while n < count:
            size += len(pending[n])
            if size > WRITE_CHUNK:
                break
            n += 1
        return n

    def _next_write(self) -> tuple[int, bytes | memoryview]:
        """The next write: how many queued frames, and their unwritten bytes. A frame
        that goes alone is not copied, whatever its size."""
        pending = self.pending
        whole = self.pending_bytes <= WRITE_CHUNK  # the usual case: all of it
        n = len(pending) if whole else self._chunk()
        if self.offset:
            first = memoryview(pending[0])[self.offset :]
            return n, first if n == 1 else b"".join([first, *pending[1:n]])
        if n == 1:
            return 1, pending[0]
        return n, b"".join(pending if whole else pending[:n])

    def _advance(self, written: int) -> None:
        """``written`` more bytes of the queue went out: the frames wholly written leave
        it, and ``offset`` says how far into the next one the socket got."""
        pending = self.pending
        count, size = _wholly_sent(pending, self.offset + written)
        messages = sum(frame is not PING_FRAME for frame in pending[:count])
        del pending[:count]
        self.offset += written - size
        self.pending_messages -= messages
        self.pending_bytes -= written

    def _start_flush(self, nursery: trio.Nursery) -> None:
        self.flushing = True
        nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            async with self.lock:
                await self.flush_pending_locked()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort("write_error", str(exc))
        finally:
            self.flushing = False
        # Frames are dropped only while a flush waits for the client: this is where it
        # has caught up.
        if self.missed and self.writable and self.on_drained is not None:
            self.on_drained(self)

    async def flush_pending_locked(self) -> None:
        """Send everything pending as the socket takes it; the caller holds ``lock``.

        Frames stay queued (and counted) until wholly written, so a write that fails
        leaves the unwritten ones to be counted as dropped, and the queue's bound covers
        the frames in flight."""
        while self.pending and not self.closed:
            _, data = self._next_write()
            self._advance(await self._send_some(data))

    async def send_bounded(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``, a frame that is not queued (a pong, a close frame), as the
        socket takes it; the caller holds ``lock``."""
        sent = 0
        with memoryview(data) as view:
            while sent < len(view):
                with view[sent:] as rest:
                    sent += await self._send_some(rest)

    async def _send_some(self, data: bytes | memoryview) -> int:
        """Send what the socket takes of ``data``; drop the connection when it takes
        nothing for WS_WRITE_WAIT. The caller holds ``lock``."""
        sent = await self.stream.send_some(data, self.write_wait)
        if sent is None:
            self.abort("write_timeout")
            raise trio.BrokenResourceError("write timed out")
        return sent

    async def send_locked(self, data: bytes | bytearray | memoryview) -> None:
        """trio-websocket's frame (a pong, a close frame), after every frame queued
        before it; trio-websocket holds ``lock``."""
        if is_close_frame(data):
            # No notification frame may follow our close frame.
            self.close_sent = True
        await self.flush_pending_locked()
        # Pongs and close frames are bounded like notifications: a client that sends pings
        # and never reads would otherwise hold trio-websocket's reader in this write.
        await self.send_bounded(data)

    def stream_closing(self) -> None:
        """trio-websocket closes the stream right after failing the connection on a
        client's protocol error; the server's handler may not have run yet to send the
        close frame."""
        if self.ws is not None and self.ws.closed is not None:
            self.send_failure_close(self.ws.closed.code)

    def send_failure_close(self, code: int) -> None:
        """After a client's protocol error (1002, 1007), write a close frame with ``code``
        now if nothing of ours is half-written; the connection is failing, so whatever is
        queued is not sent.

        trio-websocket ends such a connection without a close frame (wsproto leaves it
        OPEN), where RFC 6455 7.1.7 says the endpoint SHOULD send one, which tells the
        client what it did wrong."""
        if code not in PROTOCOL_FAILURES or self.close_sent or self.closed:
            return
        if self.flushing or self.lock.locked() or not self.stream.socket_open:
            return
        self.close_sent = True
        self._clear()
        with contextlib.suppress(OSError):
            self.stream.write_nowait(close_frame(code))

    def abort(self, reason: str, detail: str = "") -> None:
        """Drop the connection uncleanly, so the browser's reconnect logic engages.

        ``reason`` is a metric label, one of a fixed few; ``detail`` (an OS error's text)
        goes to the log only. A connection the hub was already closing for a reason
        (token_expired) keeps that reason when the close itself fails.
        """
        if self.closed:
            return
        self.closed = True
        if self.close_reason and self.close_reason != reason:
            detail = f"{reason}: {detail}" if detail else reason
        self.close_reason = self.close_reason or reason
        if self.on_abort is not None:
            self.on_abort(self, self.close_reason, detail)
        self._clear()
        self.stream.abort()
