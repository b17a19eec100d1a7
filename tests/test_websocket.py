"""ConnStream, the one way frames reach a socket, over a socketpair."""

from __future__ import annotations

import trio
import trio.testing

from smap_notify.websocket import ConnStream


def stream_pair(buffer: int = 16 * 1024) -> tuple[ConnStream, trio.socket.SocketType]:
    ours, theirs = trio.socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, buffer)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, buffer)
    return ConnStream(trio.SocketStream(ours)), theirs


async def test_write_nowait_says_how_much_the_socket_took_and_never_waits() -> None:
    stream, client = stream_pair()
    data = b"x" * (1 << 20)
    taken = stream.write_nowait(data)
    assert 0 < taken < len(data)
    assert stream.write_nowait(data) == 0  # full: nothing taken, no wait
    assert await client.recv(16) == b"x" * 16


async def test_send_some_gives_up_after_its_wait_without_sending_anything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, _client = stream_pair()
    while stream.write_nowait(b"y" * 65536):
        pass
    start = trio.current_time()
    assert await stream.send_some(b"z", 3.0) is None
    assert trio.current_time() - start == 3.0


async def test_the_request_head_is_replayed_first_and_held_back_bytes_after_the_upgrade(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, client = stream_pair()
    stream.replay_upgrade("dGhlIHNhbXBsZSBub25jZQ==", b"EARLY")
    head = await stream.receive_some()
    assert head.startswith(b"GET /ws HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in head
    with trio.move_on_after(1.0) as scope:
        await stream.receive_some()
    assert scope.cancelled_caught  # not before the upgrade is answered
    assert stream.upgraded is not None
    stream.upgraded.set()
    assert await stream.receive_some() == b"EARLY"
    await client.send(b"LATER")
    assert await stream.receive_some() == b"LATER"


async def test_an_aborted_stream_is_no_longer_open_nor_written() -> None:
    stream, _client = stream_pair()
    assert stream.socket_open
    stream.abort()
    assert not stream.socket_open
    assert stream.write_nowait(b"x") is None
