"""Real WebSocket clients of the daemon: trio-websocket connections with a token, a
raw client that reads frames byte by byte, and the upgrade's status alone."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import trio
import trio.testing
import trio_websocket

from tests.support.daemon import DEV_ORIGIN, http_request, make_token
from tests.support.redis import RedisServer


def ws_headers(token: str, origin: str | None = DEV_ORIGIN) -> list[tuple[bytes, bytes]]:
    headers = [(b"Cookie", f"smap_auth_token={token}".encode())]
    if origin is not None:
        headers.append((b"Origin", origin.encode()))
    return headers


async def open_ws(
    nursery: trio.Nursery,
    port: int,
    user: str = "user123",
    *,
    token: str | None = None,
    origin: str | None = DEV_ORIGIN,
) -> trio_websocket.WebSocketConnection:
    token = make_token(user) if token is None else token
    with trio.fail_after(10):
        return await trio_websocket.connect_websocket(
            nursery,
            "127.0.0.1",
            port,
            "/ws",
            use_ssl=False,
            extra_headers=ws_headers(token, origin),
        )


async def upgrade_status(
    port: int, user: str = "user123", *, token: str | None = None, origin: str | None = DEV_ORIGIN
) -> int:
    """101 when the daemon accepts a WebSocket (closed again at once), else the HTTP status."""
    status = 101
    try:
        async with trio.open_nursery() as nursery:
            ws = await open_ws(nursery, port, user, token=token, origin=origin)
            await ws.aclose()
    except* trio_websocket.ConnectionRejected as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        assert isinstance(leaf, trio_websocket.ConnectionRejected)
        status = leaf.status_code
    return status


async def receive_json(ws: trio_websocket.WebSocketConnection, timeout: float = 10) -> Any:
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def active_connections(port: int) -> int:
    _, _, body = await http_request(port, "/health")
    return int(json.loads(body)["websocket"]["active_connections"])


async def wait_connections(port: int, n: int, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while await active_connections(port) != n:
            await trio.sleep(0.05)


async def publish(redis: RedisServer, user: str, message: Any) -> int:
    return await trio.to_thread.run_sync(redis.publish, user, message)


async def ws_connect(
    port: int, user: str, nursery: trio.Nursery
) -> trio_websocket.WebSocketConnection:
    return await open_ws(nursery, port, user)


def upgrade_head(port: int, user: str, *, extra: str = "") -> bytes:
    return (
        "GET /ws HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {DEV_ORIGIN}\r\nCookie: smap_auth_token={make_token(user)}\r\n"
        f"{extra}\r\n"
    ).encode()


async def slowloris(port: int, user: str, connected: Callable[[], None]) -> int:
    """A client that sends its upgrade request head one byte a second until the daemon
    closes the connection (``connected`` is called once the TCP connection is open); how
    many bytes of the head it had sent by then."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    connected()
    head = upgrade_head(port, user)
    sent = 0
    async with trio.open_nursery() as own:

        async def drip() -> None:
            nonlocal sent
            for i in range(len(head)):
                await stream.send_all(head[i : i + 1])
                sent += 1
                await trio.sleep(1.0)

        own.start_soon(drip)
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        own.cancel_scope.cancel()
    await stream.aclose()
    return sent


class RawWebSocket:
    """A minimal client on a plain socket: it can stop reading, or vanish without a close
    frame, which no well-behaved library does on purpose."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self.stream = stream
        self.buf = bytearray(buffered)

    @classmethod
    async def open(cls, port: int, user: str, *, rcvbuf: int | None = None) -> RawWebSocket:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await stream.send_all(upgrade_head(port, user))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, "closed during the handshake"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(stream, rest)

    async def _fill(self, size: int) -> None:
        while len(self.buf) < size:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    async def next_text(self) -> str:
        """The next text frame (server frames are unmasked and unfragmented); pings skipped."""
        while True:
            await self._fill(2)
            opcode, size, offset = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if size == 126:
                await self._fill(4)
                size, offset = int.from_bytes(self.buf[2:4], "big"), 4
            elif size == 127:
                await self._fill(10)
                size, offset = int.from_bytes(self.buf[2:10], "big"), 10
            await self._fill(offset + size)
            payload = bytes(self.buf[offset : offset + size])
            del self.buf[: offset + size]
            if opcode == 0x1:
                return payload.decode()
            if opcode == 0x8:
                raise EOFError("close frame")

    async def vanish(self) -> None:
        """Close the TCP connection without a WebSocket close frame."""
        await self.stream.aclose()
