"""One WebSocket connection of a user: its state, its outbound queue and its writes.

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
import enum
import itertools
import logging
from collections.abc import Callable
from typing import Final

import trio
import trio_websocket

from .frames import PROTOCOL_FAILURES, close_frame, is_close_frame
from .outbound import Outbound
from .websocket import ConnStream

logger = logging.getLogger(__name__)

_ids = itertools.count(1)


class State(enum.Enum):
    """A connection's life; only the connection's own methods change it."""

    OPEN = "open"  # frames are queued and written
    CLOSING = "closing"  # the hub closes it with a close handshake; frames still go out
    CLOSE_SENT = "close_sent"  # our close frame is out: no frame may follow it
    CLOSED = "closed"  # the socket is closed, or closing without a close frame


class CloseReason(enum.StrEnum):
    """Why a connection ended: the label of smap_notify_connections_closed (and of
    smap_notify_frames_dropped for the frames it still had queued)."""

    CLOSED = "closed"
    CLIENT_CLOSED = "client_closed"
    CONNECTION_LOST = "connection_lost"
    MESSAGE_TOO_BIG = "message_too_big"
    PROTOCOL_ERROR = "protocol_error"
    INVALID_DATA = "invalid_data"
    WRITE_ERROR = "write_error"
    WRITE_TIMEOUT = "write_timeout"
    QUEUE_FULL = "queue_full"
    PONG_TIMEOUT = "pong_timeout"
    TOKEN_EXPIRED = "token_expired"
    SHUTDOWN = "shutdown"


_WRITABLE: Final = frozenset({State.OPEN, State.CLOSING})


class Connection:
    """A registered WebSocket of one user, with its bounded outbound queue."""

    __slots__ = (
        "id",
        "user_id",
        "stream",
        "lock",
        "expires_at",
        "write_wait",
        "queue",
        "flushing",
        "dirty",
        "_state",
        "writable",
        "close_reason",
        "_hub_close",
        "opened",
        "on_abort",
        "on_drained",
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
        ws: trio_websocket.WebSocketConnection | None = None,
    ) -> None:
        self.id = next(_ids)
        self.user_id = user_id
        self.stream = stream
        # trio-websocket's own stream lock: held by it for every write it makes.
        self.lock = lock
        self.expires_at = expires_at
        self.write_wait = write_wait
        self.queue = Outbound(max_messages, max_bytes)
        self.flushing = False  # a flush task waits for the socket
        self.dirty = False  # the hub will write it at its next flush
        self._state = State.OPEN
        # Whether frames may still be queued and written: read for every frame routed,
        # so kept as a field, set with the state by _enter.
        self.writable = True
        self.close_reason: CloseReason | None = None
        # Set once the hub's close handshake is over (state CLOSING, then CLOSE_SENT).
        self._hub_close: trio.Event | None = None
        self.opened = trio.current_time()
        self.on_abort: Callable[[Connection, CloseReason, str], None] | None = None
        # Told once the queue has been written out after frames were dropped.
        self.on_drained: Callable[[Connection], None] | None = None
        self.ws = ws
        # Topic field -> value asked for with ?{field}Id= (None: no filter at all).
        self.filters = filters
        stream.owner = self

    def __repr__(self) -> str:
        return f"<Connection conn={self.id} user={self.user_id}>"

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    def _enter(self, state: State) -> None:
        self._state = state
        self.writable = state in _WRITABLE

    # -- writing -------------------------------------------------------------------

    def write_nowait(self, nursery: trio.Nursery) -> None:
        """Write what is pending without waiting; start a flush task for what is left."""
        self.dirty = False
        queue = self.queue
        frames = queue.frames
        if not frames or self.flushing or not self.writable:
            return
        if self.lock.locked():
            self._start_flush(nursery)
            return
        write = self.stream.write_nowait
        while True:
            _, data = queue.next_write()
            try:
                written = write(data)
            except OSError as exc:
                self.abort(CloseReason.WRITE_ERROR, exc.strerror or str(exc))
                return
            if written is None:  # trio-websocket closed it after a close handshake
                return
            queue.advance(written)
            if not frames:
                return
            if written < len(data):
                self._start_flush(nursery)
                return

    def _start_flush(self, nursery: trio.Nursery) -> None:
        self.flushing = True
        nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            async with self.lock:
                await self.flush_pending_locked()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.abort(CloseReason.WRITE_ERROR, str(exc))
        finally:
            self.flushing = False
        # Frames are dropped only while a flush waits for the client: this is where it
        # has caught up.
        if self.queue.missed and self.writable and self.on_drained is not None:
            self.on_drained(self)

    async def flush_pending_locked(self) -> None:
        """Send everything pending as the socket takes it; the caller holds ``lock``."""
        queue = self.queue
        while queue.frames and self._state is not State.CLOSED:
            _, data = queue.next_write()
            queue.advance(await self._send_some(data))

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
            self.abort(CloseReason.WRITE_TIMEOUT)
            raise trio.BrokenResourceError("write timed out")
        return sent

    async def send_locked(self, data: bytes | bytearray | memoryview) -> None:
        """trio-websocket's frame (a pong, a close frame), after every frame queued
        before it; trio-websocket holds ``lock``."""
        if is_close_frame(data) and self._state is not State.CLOSED:
            self._enter(State.CLOSE_SENT)
        await self.flush_pending_locked()
        # Pongs and close frames are bounded like notifications: a client that sends pings
        # and never reads would otherwise hold trio-websocket's reader in this write.
        await self.send_bounded(data)

    # -- closing -------------------------------------------------------------------

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

        RFC 6455 7.1.7 says the endpoint SHOULD send one, which tells the client what it
        did wrong; trio-websocket ends such a connection without it (wsproto leaves it
        OPEN)."""
        if code not in PROTOCOL_FAILURES or not self.writable:
            return
        if self.flushing or self.lock.locked() or not self.stream.socket_open:
            return
        self._enter(State.CLOSE_SENT)
        self.queue.clear()
        with contextlib.suppress(OSError):
            self.stream.write_nowait(close_frame(code))

    def begin_close(self, reason: CloseReason) -> None:
        """The hub will close this connection with a close handshake (``close``)."""
        self.close_reason = reason
        self._enter(State.CLOSING)
        self._hub_close = trio.Event()

    async def close(self, code: int, text: str, grace: float) -> None:
        """The close handshake ``begin_close`` announced; an abort when the client has
        not answered it within ``grace`` seconds."""
        assert self.ws is not None and self._hub_close is not None
        try:
            with trio.move_on_after(grace) as scope:
                await self.ws.aclose(code, text)
            if scope.cancelled_caught:
                self.abort(self.close_reason or CloseReason.CLOSED)
        finally:
            self._hub_close.set()

    async def finish(self) -> None:
        """The client's side has ended: close the socket, unless the hub's close
        handshake is under way, which needs it open for the client's close frame."""
        if self._hub_close is not None:
            await self._hub_close.wait()
        elif self._state is not State.CLOSED:
            self._enter(State.CLOSED)
            self.stream.abort()
        # Connection and ConnStream refer to each other: without this the pair, with
        # trio-websocket's objects behind it, would wait for the cyclic collector, which
        # runs rarely here (collector.py raises its thresholds).
        self.stream.owner = None
        self.ws = None

    def abort(self, reason: CloseReason, detail: str = "") -> None:
        """Drop the connection uncleanly, so the browser's reconnect logic engages.

        ``detail`` (an OS error's text) goes to the log only. A connection the hub was
        already closing for a reason (token_expired) keeps that reason when the close
        itself fails.
        """
        if self._state is State.CLOSED:
            return
        self._enter(State.CLOSED)
        if self.close_reason and self.close_reason != reason:
            detail = f"{reason}: {detail}" if detail else str(reason)
        self.close_reason = self.close_reason or reason
        if self.on_abort is not None:
            self.on_abort(self, self.close_reason, detail)
        self.queue.clear()
        self.stream.abort()
