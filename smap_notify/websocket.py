"""The WebSocket: trio-websocket's server connections over our own socket stream.

Every use of trio-websocket's and wsproto's private parts is in this module (checked by
tests/test_internals.py against the locked versions, and that no other module has any).
Every byte of a WebSocket frame reaches the socket through ``ConnStream``'s
``write_nowait`` (never waits) or ``send_some`` (waits for progress, bounded): the
connection's queued frames, and trio-websocket's own (pongs, close frames), which arrive
in ``send_all`` under its stream lock, the lock our flushes take too, and go out after the
frames queued before them. Frames never interleave.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Protocol

import trio
import trio_websocket
import wsproto.utilities

from .handshake import WS_PATH

logger = logging.getLogger(__name__)

# Client messages trio-websocket buffers before its reader waits for ours.
MESSAGE_QUEUE_SIZE: Final = 4


class StreamOwner(Protocol):
    """What ``ConnStream`` asks of the connection that owns it once it is open."""

    async def send_locked(self, data: bytes | bytearray | memoryview) -> None:
        """Send trio-websocket's frame ``data`` after our queued ones; under the lock."""

    def stream_closing(self) -> None:
        """trio-websocket is closing the stream."""


class ConnStream(trio.abc.Stream):
    """The socket stream handed to trio-websocket, and the one way to write a frame.

    It replays the request head we already read, records when anything last arrived
    (pongs and data alike keep a connection alive), and sends trio-websocket's writes
    through the connection that owns it, after our pending frames.
    """

    # Bytes that came with the request head (a client that sent frames without waiting
    # for the 101): held back until ``upgraded`` is set, because wsproto's server-side
    # handshake drops whatever follows the request. Class attributes: most connections
    # never have any, and an idle connection's memory counts.
    after_upgrade = b""
    upgraded: trio.Event | None = None

    def __init__(self, raw: trio.SocketStream) -> None:
        self.raw = raw
        self.prefix = b""
        self.last_receive = trio.current_time()
        self.owner: StreamOwner | None = None

    def replay_upgrade(self, key: str, early: bytes) -> None:
        """Have trio-websocket's handshake read an upgrade request with the client's
        ``key``, and then the bytes that came after the client's head (``early``) once
        the upgrade is answered.

        The client's own head was parsed and checked already (origin, cookie, version);
        its other headers, the token's cookie among them, would only be parsed a second
        time, by wsproto's h11, and kept in memory for the connection's life."""
        self.prefix = (
            f"GET {WS_PATH} HTTP/1.1\r\nHost: smap-notify\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}"
            "\r\n\r\n"
        ).encode("latin-1")
        if early:
            self.after_upgrade = early
            self.upgraded = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        if self.after_upgrade and self.upgraded is not None:
            await self.upgraded.wait()
            data, self.after_upgrade = self.after_upgrade, b""
            return data
        data = await self.raw.receive_some(max_bytes)
        self.last_receive = trio.current_time()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # trio-websocket calls this holding its stream lock (write_lock()).
        owner = self.owner
        if owner is None:  # the handshake: its own deadline covers it
            await self.raw.send_all(data)
            return
        await owner.send_locked(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self.owner is not None:
            self.owner.stream_closing()
        await self.raw.aclose()

    @property
    def socket_open(self) -> bool:
        """Whether the socket is still open (trio-websocket closes it after a close
        handshake)."""
        return self.raw.socket.fileno() >= 0

    def write_nowait(self, data: bytes | memoryview) -> int | None:
        """Write what the socket takes of ``data`` now, without waiting: how much it took
        (0 when its buffer is full), None when the socket is closed. Raises OSError when
        the connection is broken."""
        fd = self.raw.socket.fileno()
        if fd < 0:
            return None
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    async def send_some(self, data: bytes | memoryview, wait: float) -> int | None:
        """Send what the socket takes of ``data``, waiting at most ``wait`` seconds for it
        to take anything: how much it took, None when it took nothing in time.

        The wait is for progress, not for the whole of ``data``: a client that keeps
        reading keeps its connection whatever the frame's size. trio's ``send_all``
        forgets how much it sent when cancelled, so the socket's ``send`` is called here:
        a cancellation reaches it only while it waits, before it sends anything."""
        sock = self.raw.socket
        try:
            with trio.move_on_after(wait):
                return await sock.send(data)
        except OSError as exc:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("socket was already closed") from exc
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        return None

    def abort(self) -> None:
        """Close the socket at once, without a close frame (browsers see 1006, unclean)."""
        self.raw.socket.close()


class ReaderNursery:
    """Runs trio-websocket's reader tasks in the server's connection nursery, so that a
    connection needs no nursery of its own; a reader that fails is logged, not fatal.

    trio-websocket's ``wrap_server_stream`` uses only ``start_soon`` of the nursery it is
    given (tests/test_internals.py checks this)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[[], Awaitable[None]], name: object = None) -> None:
        self._nursery.start_soon(_guarded, fn)


async def _guarded(fn: Callable[[], Awaitable[None]]) -> None:
    try:
        await fn()
    except trio_websocket.ConnectionClosed as exc:
        # Its answer to a client's protocol error could not be written (the client does
        # not read, WS_WRITE_WAIT): the connection is gone, as it would have been.
        logger.debug("websocket reader stopped: %s", exc)
    except wsproto.utilities.LocalProtocolError as exc:
        # A client's ping that crossed our close frame: trio-websocket answers it, which
        # wsproto refuses once we are closing (python-trio/trio-websocket#184). Nothing
        # is wrong with the daemon; the close ends by its grace period.
        logger.debug("websocket reader stopped by a frame after our close: %s", exc)
    except Exception:
        logger.exception("websocket reader failed")


async def accept_websocket(
    readers: ReaderNursery, stream: ConnStream, *, max_message_size: int
) -> trio_websocket.WebSocketConnection:
    """Answer the upgrade whose request ``stream`` replays; the open connection keeps
    none of the handshake's state."""
    request = await trio_websocket.wrap_server_stream(
        readers,  # type: ignore[arg-type]  # only start_soon is used
        stream,
        message_queue_size=MESSAGE_QUEUE_SIZE,
        max_message_size=max_message_size,
    )
    ws = await request.accept()
    if stream.upgraded is not None:
        stream.upgraded.set()
    release_handshake_state(ws)
    return ws


def write_lock(ws: trio_websocket.WebSocketConnection) -> trio.StrictFIFOLock:
    """trio-websocket's stream lock, held by it for every write it makes: whoever holds
    it may write to the stream."""
    lock: trio.StrictFIFOLock = ws._stream_lock
    return lock


def release_handshake_state(ws: trio_websocket.WebSocketConnection) -> None:
    """Drop what an open connection no longer needs: the upgrade's h11 state and the
    request headers (which include the token's cookie). About 2 KB per connection."""
    ws._wsproto.handshake = _FINISHED_HANDSHAKE  # type: ignore[assignment]
    ws._handshake_headers = ()


class _FinishedHandshake:
    """Stands in for wsproto's H11Handshake once the connection is open: wsproto then only
    asks it for (no more) events."""

    def events(self) -> Iterator[object]:
        return iter(())


_FINISHED_HANDSHAKE: Final = _FinishedHandshake()
