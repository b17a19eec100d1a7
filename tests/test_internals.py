"""The private parts of trio-websocket and wsproto that the hot path relies on.

pyproject.toml pins both libraries; if an upgrade changes any of this, these tests say so
before the daemon misbehaves.
"""

from __future__ import annotations

import inspect

import trio
import trio_websocket
import wsproto
from trio_websocket import _impl
from wsproto.handshake import H11Handshake

from smap_notify.connection import ConnStream
from smap_notify.server import _FINISHED_HANDSHAKE, release_handshake_state


def test_trio_websocket_writes_only_through_send_under_its_stream_lock() -> None:
    source = inspect.getsource(_impl.WebSocketConnection._send)
    assert "async with self._stream_lock:" in source
    assert "await self._stream.send_all(data)" in source
    init = inspect.getsource(_impl.WebSocketConnection.__init__)
    assert "self._stream_lock = trio.StrictFIFOLock()" in init
    assert "self._handshake_headers" in init
    # No other place writes to the stream directly.
    module = inspect.getsource(_impl)
    assert module.count("self._stream.send_all(") == 1


def test_wrap_server_stream_only_needs_start_soon_from_its_nursery() -> None:
    source = inspect.getsource(_impl.wrap_server_stream)
    assert "nursery.start_soon(connection._reader_task)" in source
    assert source.count("nursery.") == 1


def test_wsproto_uses_the_handshake_only_for_events_once_open() -> None:
    source = inspect.getsource(wsproto.WSConnection)
    uses = [line.strip() for line in source.splitlines() if "self.handshake" in line]
    # All but the last run only while self.connection is None, i.e. before the upgrade.
    assert uses == [
        "self.handshake = H11Handshake(connection_type)",
        "return self.handshake.state",
        "self.handshake.initiate_upgrade_connection(headers, path)",
        "data += self.handshake.send(event)",
        "self.connection = self.handshake.connection",
        "self.handshake.receive_data(data)",
        "self.connection = self.handshake.connection",
        "yield from self.handshake.events()",
    ]
    assert "_h11_connection" in inspect.getsource(H11Handshake.__init__)


async def test_released_connection_still_speaks_websocket() -> None:
    """A server connection with its handshake state released answers pings and messages."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        done = trio.Event()

        async def serve_one(raw: trio.SocketStream) -> None:
            stream = ConnStream(raw)
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            release_handshake_state(ws)
            assert ws._wsproto.handshake is _FINISHED_HANDSHAKE
            assert ws._handshake_headers == ()
            await ws.send_message(await ws.get_message())
            await ws.aclose()
            done.set()

        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        client = await trio_websocket.connect_websocket(
            nursery, "127.0.0.1", port, "/", use_ssl=False
        )
        with trio.fail_after(5):
            await client.ping(b"x")
            await client.send_message("echo")
            assert await client.get_message() == "echo"
            await done.wait()
        nursery.cancel_scope.cancel()
