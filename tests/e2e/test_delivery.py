"""End to end: real redis-server, the daemon, real WebSocket clients over loopback."""

from __future__ import annotations

import json
import logging
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from tests.support.daemon import DEV_ORIGIN, Daemon, make_token, wait_until

# Copied from the contract (shared/spec/samples) so the tests run from any checkout.
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def sample(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / name).read_text())


async def receive(ws: trio_websocket.WebSocketConnection, timeout: float = 5) -> str:
    with trio.fail_after(timeout):
        message = await ws.get_message()
    assert isinstance(message, str), "notifications are text frames"
    return message


async def test_progress_sample_arrives_as_one_frame_with_contract_envelope(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    progress = sample("redis-in_user_noti_project_progress.json")
    user = progress["channel"].split(":", 1)[1]
    ws = await daemon.connect(user, nursery=nursery)
    await daemon.wait_connections(1)
    assert await daemon.publish(user, progress["message"]) == 1
    frame = await receive(ws)
    expected_payload = json.dumps(progress["message"]["payload"], separators=(",", ":"))
    assert frame.startswith('{"type":"project_progress","payload":' + expected_payload)
    doc = json.loads(frame)
    assert list(doc) == ["type", "payload", "timestamp"]
    assert doc["payload"] == progress["message"]["payload"]
    stamp = datetime.fromisoformat(doc["timestamp"])
    assert stamp.utcoffset() is not None and "." in doc["timestamp"]


@pytest.mark.parametrize(
    "name",
    [
        "redis-in_user_noti_project_completed.json",
        "redis-in_user_noti_dryrun_result.json",
    ],
)
async def test_real_publisher_samples_arrive_intact(
    start_daemon: Any, nursery: trio.Nursery, name: str
) -> None:
    daemon: Daemon = await start_daemon()
    data = sample(name)
    user = data["channel"].split(":", 1)[1]
    ws = await daemon.connect(user, nursery=nursery)
    await daemon.wait_connections(1)
    raw = json.dumps(data["message"])
    await daemon.publish(user, raw)
    frame = await receive(ws)
    doc = json.loads(frame)
    assert doc["type"] == data["message"]["type"]
    assert json.dumps(doc["payload"]) == json.dumps(data["message"]["payload"])


async def test_generic_samples_and_unknown_types_are_delivered_unchanged(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    examples = sample("redis-in_user_noti_generic.json")["examples"]
    for example in examples:
        await daemon.publish("user123", example["message"])
    for example in examples:
        doc = json.loads(await receive(ws))
        assert doc["type"] == example["message"]["type"]
        assert doc["payload"] == example["message"]["payload"]
    assert daemon.app.counters.by_type["unknown"] == 1  # order_created


async def test_every_tab_of_a_user_receives_and_other_users_do_not(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    tabs = [await daemon.connect("alice", nursery=nursery) for _ in range(3)]
    other = await daemon.connect("bob", nursery=nursery)
    await daemon.wait_connections(4)
    await daemon.publish("alice", {"type": "notification", "payload": {"n": 1}})
    await daemon.publish("bob", {"type": "notification", "payload": {"n": 2}})
    for tab in tabs:
        assert json.loads(await receive(tab))["payload"] == {"n": 1}
    assert json.loads(await receive(other))["payload"] == {"n": 2}
    assert daemon.app.counters.frames_sent == 4


async def test_messages_arrive_in_publish_order(start_daemon: Any, nursery: trio.Nursery) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    client = daemon.redis.client()
    pipe = client.pipeline(transaction=False)
    for i in range(500):
        pipe.publish("user_noti:user123", json.dumps({"type": "update", "payload": {"i": i}}))
    await trio.to_thread.run_sync(pipe.execute)
    received = [json.loads(await receive(ws))["payload"]["i"] for _ in range(500)]
    assert received == list(range(500))


async def test_payload_fidelity_numbers_key_order_and_unicode(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    raw = (
        '{"type":"notification","payload":{"z":15,"a":15.0,"m":[1,2.50,1e3],'
        '"text":"Xin chào 👋 <b>&amp;</b>","nested":{"y":null,"b":true}}}'
    )
    await daemon.publish("user123", raw)
    frame = await receive(ws)
    payload_text = frame.split('"payload":', 1)[1].rsplit(',"timestamp"', 1)[0]
    assert payload_text == (
        '{"z":15,"a":15.0,"m":[1,2.5,1000.0],'
        '"text":"Xin chào 👋 <b>&amp;</b>","nested":{"y":null,"b":true}}'
    )


async def test_missing_payload_is_delivered_as_null(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await daemon.publish("user123", '{"type":"ping","extra":1}')
    doc = json.loads(await receive(ws))
    assert list(doc) == ["type", "payload", "timestamp"]
    assert doc["type"] == "ping" and doc["payload"] is None


async def test_bad_messages_are_not_delivered_and_the_next_good_one_is(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    bad = [
        "not json at all",
        "[1,2,3]",
        '{"type": 5, "payload": {}}',
        '{"type":"project_progress","payload":{"project_id":"","status":"X","total":1,'
        '"done":1,"errors":0,"progress_percent":100}}',
        '{"type":"project_progress","payload":{"project_id":"p","status":"X","total":1,'
        '"done":1,"errors":0,"progress_percent":101}}',
    ]
    for message in bad:
        await daemon.publish("user123", message)
    await daemon.publish("user123", {"type": "alert", "payload": {"ok": True}})
    doc = json.loads(await receive(ws))
    assert doc["type"] == "alert" and doc["payload"] == {"ok": True}
    counters = daemon.app.counters
    assert counters.rejected == {
        "invalid_json": 1,
        "not_object": 1,
        "invalid_type": 1,
        "invalid_payload": 2,
    }
    assert counters.received == counters.accounted() == 6


async def test_invalid_payload_delivered_when_configured(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(DELIVER_INVALID_PAYLOADS="true")
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await daemon.publish(
        "user123",
        '{"type":"project_progress","payload":{"project_id":"p","status":"X","total":-1,'
        '"done":1,"errors":0,"progress_percent":5}}',
    )
    doc = json.loads(await receive(ws))
    assert doc["payload"]["total"] == -1


async def test_messages_for_offline_users_are_counted_as_dropped(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    await daemon.publish("nobody", {"type": "notification", "payload": {}})
    await wait_until(lambda: daemon.app.counters.received == 1)
    assert daemon.app.counters.dropped["no_connection"] == 1


async def test_user_id_with_colon_is_routed_whole(start_daemon: Any, nursery: trio.Nursery) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("tenant:42", nursery=nursery)
    await daemon.wait_connections(1)
    await daemon.publish("tenant:42", {"type": "notification", "payload": 1})
    assert json.loads(await receive(ws))["payload"] == 1


async def test_client_messages_are_ignored_and_client_pings_answered(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await ws.send_message('{"type":"ping"}')
    with trio.fail_after(5):
        await ws.ping(b"are you there")
    await daemon.publish("user123", {"type": "notification", "payload": "after"})
    assert json.loads(await receive(ws))["payload"] == "after"


@pytest.mark.parametrize(
    "message",
    ["x" * 513, b"x" * 513, "\u4e2d" * 171, "\U0001f600" * 129, "\u00e9" * 257],
    ids=["ascii", "binary", "cjk-513-bytes", "emoji-516-bytes", "latin-514-bytes"],
)
async def test_oversized_client_message_closes_with_1009(
    start_daemon: Any, nursery: trio.Nursery, message: str | bytes
) -> None:
    # WS_MAX_MESSAGE_SIZE counts bytes; trio-websocket counts a text message's characters.
    daemon: Daemon = await start_daemon(WS_MAX_MESSAGE_SIZE="512")
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await ws.send_message(message)
    with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
        await ws.get_message()
    assert info.value.reason.code == 1009
    await daemon.wait_connections(0)
    assert daemon.app.counters.connections_closed == {"message_too_big": 1}


async def test_a_client_message_of_exactly_the_limit_in_bytes_is_read_and_ignored(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_MAX_MESSAGE_SIZE="512")
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await ws.send_message("\u4e2d" * 170 + "xy")  # 512 bytes
    await daemon.publish("user123", {"type": "notification", "payload": "still open"})
    assert json.loads(await receive(ws))["payload"] == "still open"


async def test_notifier_hears_connects_and_disconnects(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    calls: list[tuple[Any, ...]] = []

    class Recorder:
        def on_user_connected(self, user_id: str, filters: Any = None) -> None:
            calls.append(("connected", user_id))

        def on_user_disconnected(
            self, user_id: str, has_other_connections: bool, filters: Any = None
        ) -> None:
            calls.append(("disconnected", user_id, has_other_connections))

    daemon.app.hub.presence = Recorder()
    first = await daemon.connect("u", nursery=nursery)
    second = await daemon.connect("u", nursery=nursery)
    await daemon.wait_connections(2)
    await first.aclose()
    await daemon.wait_connections(1)
    await second.aclose()
    await daemon.wait_connections(0)
    assert calls == [
        ("connected", "u"),
        ("connected", "u"),
        ("disconnected", "u", True),
        ("disconnected", "u", False),
    ]


async def test_a_client_that_never_reads_does_not_delay_another_tab(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_SEND_BUFFER="64", WS_WRITE_WAIT="60s")
    stalled = await open_raw_websocket(daemon.port, make_token("user123"))
    reader = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(2)
    count = 3000
    got = await publish_in_steps(daemon, reader, count)
    assert got == list(range(count))
    counters = daemon.app.counters
    assert counters.frames_dropped["queue_full"] > 0
    assert counters.delivered == count
    stalled_conn = next(
        c for c in daemon.app.hub.connections() if c.stream.raw is not None and c.queue.messages
    )
    assert stalled_conn.queue.messages <= 64
    stalled.close()


async def test_overflow_policy_disconnect_closes_the_slow_client_only(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_SEND_BUFFER="16", WS_OVERFLOW_POLICY="disconnect")
    stalled = await open_raw_websocket(daemon.port, make_token("user123"))
    reader = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(2)
    got = await publish_in_steps(daemon, reader, 2000)
    assert got == list(range(2000))
    await daemon.wait_connections(1)
    assert daemon.app.counters.connections_closed["queue_full"] == 1
    stalled.close()


async def publish_in_steps(
    daemon: Daemon, reader: trio_websocket.WebSocketConnection, count: int, step: int = 50
) -> list[int]:
    """Publish 2 KB messages in steps the reading tab keeps up with; return what it got."""
    client = daemon.redis.client()
    got: list[int] = []
    for start in range(0, count, step):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + step)):
            message = {"type": "update", "payload": {"i": i, "b": "y" * 2000}}
            pipe.publish("user_noti:user123", json.dumps(message))
        await trio.to_thread.run_sync(pipe.execute)
        while len(got) < min(count, start + step):
            got.append(json.loads(await receive(reader))["payload"]["i"])
    return got


async def open_raw_websocket(port: int, token: str, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket that completes the handshake and then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await trio.to_thread.run_sync(sock.connect, ("127.0.0.1", port))
    request = (
        "GET /ws HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {DEV_ORIGIN}\r\nCookie: smap_auth_token={token}\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await trio.to_thread.run_sync(sock.recv, 1)
        assert chunk, "closed during handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    # RFC 6455's own example key and answer: the handshake used the client's key.
    assert b": s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head, head
    return sock


async def open_expiring_websocket(daemon: Daemon) -> socket.socket:
    """A raw WebSocket whose token expires 1.5 s from now."""
    sock = await open_raw_websocket(daemon.port, make_token("user123", ttl=1.5), rcvbuf=65536)
    await daemon.wait_connections(1)
    return sock


async def read_until_close_frame(sock: socket.socket) -> bytes:
    """What the daemon sends, from its close frame on (close frames are sent whole)."""
    data = b""
    with trio.fail_after(10):
        while b"\x88" not in data:
            chunk = await trio.to_thread.run_sync(sock.recv, 4096)
            assert chunk, f"the socket ended without a close frame: {data!r}"
            data += chunk
    return data[data.index(b"\x88") :]


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A final, masked client-to-server frame of under 126 bytes."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


async def read_to_end(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the daemon sends until it ends the stream."""
    data = b""
    with trio.fail_after(timeout):
        while chunk := await trio.to_thread.run_sync(sock.recv, 4096):
            data += chunk
    return data


async def close_code(ws: trio_websocket.WebSocketConnection) -> int:
    """Read until the daemon closes ``ws``; the code of its close frame."""
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as info:
        while True:
            await ws.get_message()
    return int(info.value.reason.code)


async def test_token_expiry_closes_the_connection_cleanly_with_4001(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", token=make_token("user123", ttl=1.5), nursery=nursery)
    await daemon.wait_connections(1)
    assert await close_code(ws) == 4001
    await daemon.wait_connections(0)
    assert daemon.app.counters.connections_closed["token_expired"] == 1


async def test_tokens_that_expire_together_do_not_flood_the_log(
    start_daemon: Any, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Each expiry was logged at INFO without a rate limit, unlike every other close
    (713 lines in an outside soak); tokens issued together expire together."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon: Daemon = await start_daemon()
    token = make_token("user123", ttl=1.5)
    sockets = [await daemon.connect("user123", token=token, nursery=nursery) for _ in range(12)]
    await daemon.wait_connections(12)
    assert [await close_code(ws) for ws in sockets] == [4001] * 12
    await daemon.wait_connections(0)
    assert daemon.app.counters.connections_closed["token_expired"] == 12
    lines = [r for r in caplog.records if r.getMessage().startswith("token expired, closing")]
    assert 1 <= len(lines) <= 5, len(lines)


async def test_token_expiry_waits_for_the_clients_close_frame_before_closing_the_socket(
    start_daemon: Any,
) -> None:
    # A browser counts the close as clean (wasClean) only when the TCP connection ends after
    # both close frames; a socket closed first answers the client's close frame with RST.
    daemon: Daemon = await start_daemon()
    sock = await open_expiring_websocket(daemon)
    close = await read_until_close_frame(sock)
    assert int.from_bytes(close[2:4], "big") == 4001, close
    # The daemon waits for our close frame (up to its 2 s grace): no end of stream yet.
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        early = await trio.to_thread.run_sync(sock.recv, 4096)
        pytest.fail(f"the daemon closed the socket before the close handshake: {early!r}")
    sock.sendall(client_frame(0x8, (4001).to_bytes(2, "big")))
    sock.settimeout(5)
    assert await trio.to_thread.run_sync(sock.recv, 4096) == b"", "then it ends the stream"
    await daemon.wait_connections(0)
    assert daemon.app.counters.connections_closed["token_expired"] == 1
    sock.close()


async def test_token_expiry_drops_a_client_that_never_answers_the_close_frame(
    start_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon: Daemon = await start_daemon()
    sock = await open_expiring_websocket(daemon)
    data = await read_to_end(sock)  # the token's 1.5 s, then the 2 s close grace
    assert b"\x88\x0f" + (4001).to_bytes(2, "big") + b"token expired" in data, data
    await daemon.wait_connections(0)
    assert daemon.app.counters.connections_closed["token_expired"] == 1
    # trio-websocket closes the socket as the grace runs out, just before the hub logs it.
    await wait_until(lambda: "closing connection reason=token_expired" in caplog.text)
    sock.close()


async def test_a_ping_that_crosses_the_expiry_close_frame_is_not_an_error(
    start_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="smap_notify")
    daemon: Daemon = await start_daemon()
    sock = await open_expiring_websocket(daemon)
    await read_until_close_frame(sock)
    sock.sendall(client_frame(0x9))  # a ping, as if sent just before our close arrived
    await read_to_end(sock)  # dropped after the close grace
    await wait_until(lambda: "closing connection reason=token_expired" in caplog.text)
    assert "frame after our close" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    sock.close()


async def test_silent_client_is_closed_after_pong_wait(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_PING_INTERVAL="100ms", WS_PONG_WAIT="400ms")
    sock = await open_raw_websocket(daemon.port, make_token("user123"), rcvbuf=65536)
    await daemon.wait_connections(1)
    # The raw client reads pings but never answers them: the daemon must hang up.
    data = await read_to_end(sock)
    assert b"\x89\x00" in data, "the daemon sent WebSocket pings"
    await daemon.wait_connections(0)
    assert daemon.app.counters.connections_closed["pong_timeout"] == 1
    sock.close()


async def test_answering_client_survives_many_ping_intervals(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_PING_INTERVAL="50ms", WS_PONG_WAIT="200ms")
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await trio.sleep(1.0)  # twenty ping intervals: the time itself is what is tested
    assert daemon.app.hub.connection_count == 1
    await daemon.publish("user123", {"type": "notification", "payload": "still here"})
    assert json.loads(await receive(ws))["payload"] == "still here"
