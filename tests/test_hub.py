"""Hub routing decisions that need no sockets."""

from __future__ import annotations

import json
import logging
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from smap_notify.config import Config, Duration
from smap_notify.connection import CloseReason, Connection, State
from smap_notify.frames import PING_FRAME, close_frame
from smap_notify.hub import DRYRUN_LOG_BURST, Hub, Resync, ResyncReason, drain_plan
from smap_notify.inbox import Inbox
from smap_notify.metrics import Counters
from smap_notify.websocket import ConnStream


def connection(
    user: str, max_messages: int = 4, filters: dict[str, str] | None = None
) -> Connection:
    stream: Any = SimpleNamespace()
    return Connection(
        user,
        stream,
        trio.Lock(),
        expires_at=time.time() + 3600,
        max_messages=max_messages,
        max_bytes=1 << 20,
        write_wait=1.0,
        filters=filters,
    )


async def start_hub(nursery: trio.Nursery, config: Config | None = None) -> Hub:
    hub = Hub(config or Config(jwt_secret_key="x" * 32), Counters())
    await nursery.start(hub.serve, Inbox(2))
    return hub


def register(hub: Hub, *conns: Connection) -> None:
    """Register ``conns`` as the server does: a reservation, then the connection."""
    for conn in conns:
        assert hub.try_reserve(conn.user_id) is None
        hub.register(conn)


async def test_message_for_a_user_whose_only_connection_is_closing_is_counted_so(
    nursery: trio.Nursery,
) -> None:
    hub = await start_hub(nursery)
    ours, _theirs = socket.socketpair()
    conn = socket_connection("u", ours)
    register(hub, conn)
    await conn.send_locked(close_frame(1000))  # trio-websocket's close frame
    assert conn.state is State.CLOSE_SENT
    hub.route_batch([(b"user_noti:u", b'{"type":"alert"}')])
    assert hub.counters.dropped == {"connection_closed": 1}
    assert hub.counters.received == hub.counters.accounted() == 1


async def test_reservations_enforce_both_caps_and_are_released(nursery: trio.Nursery) -> None:
    hub = await start_hub(nursery)
    hub.config = Config(
        jwt_secret_key="x" * 32, ws_max_connections=3, ws_max_connections_per_user=2
    )
    assert hub.try_reserve("a") is None
    assert hub.try_reserve("a") is None
    assert hub.try_reserve("a") == (429, "max_connections_per_user")
    assert hub.try_reserve("b") is None
    assert hub.try_reserve("c") == (503, "max_connections")
    hub.release("b")
    assert hub.try_reserve("c") is None


async def start_pinging_hub(
    nursery: trio.Nursery, interval: float, pong_wait: float, count: int
) -> list[Connection]:
    """A hub with ``count`` registered connections whose socket is never writable: their
    pings stay queued where a test sees them."""
    hub = await start_hub(
        nursery,
        Config(
            jwt_secret_key="x" * 32,
            ws_ping_interval=Duration(interval),
            ws_pong_wait=Duration(pong_wait),
            ws_max_connections=1000,
            ws_max_connections_per_user=1000,
        ),
    )
    conns = []
    for _ in range(count):
        conn = connection("u")
        conn.stream = SimpleNamespace(
            last_receive=trio.current_time(),
            socket_open=False,
            write_nowait=lambda data: None,  # closed: nothing is written
            abort=lambda: None,
        )
        register(hub, conn)
        conns.append(conn)
    return conns


async def test_pings_are_spread_over_the_interval_and_reach_every_connection_once(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    conns = await start_pinging_hub(nursery, 30, 60, 300)

    def pinged() -> int:
        return sum(conn.queue.frames.count(PING_FRAME) for conn in conns)

    await trio.sleep(14.5)  # a new connection's grace (half the interval): no pings
    assert pinged() == 0
    await trio.sleep(1.05)  # between two slots
    first = [conn.queue.frames.count(PING_FRAME) for conn in conns]
    per_second = []
    for _ in range(30):  # one interval
        before = pinged()
        await trio.sleep(1)
        per_second.append(pinged() - before)
    after = [conn.queue.frames.count(PING_FRAME) for conn in conns]
    assert [b - a for a, b in zip(first, after, strict=True)] == [1] * 300, "once each"
    # A thirtieth each second, not all at once.
    assert max(per_second) <= 300 // 30 + 1, per_second


async def test_each_second_of_pings_is_cut_into_small_slices(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The pongs of one slice come back together and delay whatever message is behind
    them: a second's pings in one go was a thirtieth of all connections at once."""
    conns = await start_pinging_hub(nursery, 30, 60, 1000)

    def pinged() -> int:
        return sum(conn.queue.frames.count(PING_FRAME) for conn in conns)

    await trio.sleep(15.05)
    per_window = []
    for _ in range(300):  # 30 s in windows of 0.1 s
        before = pinged()
        await trio.sleep(0.1)
        per_window.append(pinged() - before)
    assert sum(per_window) == 1000
    assert max(per_window) <= 1000 * 0.1 / 30 + 2, max(per_window)


async def test_a_silent_new_connection_is_pinged_before_its_pong_wait_runs_out(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    # The tightest setting allowed: WS_PONG_WAIT only a little over WS_PING_INTERVAL. A
    # client that sends nothing must still get a ping to answer before it is dropped.
    conns = await start_pinging_hub(nursery, 30, 33, 60)
    await trio.sleep(32.5)
    assert all(conn.queue.frames.count(PING_FRAME) >= 1 for conn in conns)
    assert not any(conn.closed for conn in conns)


async def test_closing_lines_are_rate_limited_and_a_shutdown_logs_none_per_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A network blip or a restart can end 10,000 connections at once: as many lines
    would hit journald's per-unit rate limit and hide the lines that matter."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    hub = await start_hub(nursery)
    for reason in (CloseReason.PONG_TIMEOUT, CloseReason.SHUTDOWN):
        for n in range(50):
            hub._on_abort(connection(f"u{n}"), reason)
    closing = [r.getMessage() for r in caplog.records if "closing connection" in r.getMessage()]
    assert len(closing) == 5
    assert all("reason=pong_timeout" in line for line in closing)


async def test_a_flood_of_dryrun_results_is_held_back_and_long_fields_are_cut(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Every dryrun_result was logged at INFO, whole and without a rate limit, even for
    users with no connection: 10,000 of them with 5,000-character job ids added 41 MB of
    log in an outside audit."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    hub = await start_hub(nursery)
    payload = {"job_id": "J" * 5000, "platform": "tiktok", "status": "success"}
    message = json.dumps({"type": "dryrun_result", "payload": payload}).encode()
    hub.route_batch([(b"user_noti:nobody", message)] * 500)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dryrun")]
    assert len(lines) == DRYRUN_LOG_BURST
    assert all(len(line) < 600 for line in lines), len(lines[0])
    assert lines[0].endswith("platform=tiktok status=success")
    assert hub.counters.received == hub.counters.accounted() == 500


async def test_a_long_user_id_does_not_push_the_reason_out_of_the_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines are cut at 4,096 characters; a 5,000-character user id (the channel is the
    publisher's) took type= and detail= with it."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    hub = await start_hub(nursery)
    channel = b"user_noti:" + b"U" * 5000
    hub.route_batch([(channel, b'{"type":"x","payload":NaN}'), (channel, b'{"type":"x"}')])
    rejected, unknown = [r.getMessage() for r in caplog.records]
    assert rejected.startswith("message rejected reason=invalid_json user=UUU")
    assert " type=- detail=not JSON" in rejected and len(rejected) < 600
    # Routed, not "delivered": this user has no connection, and the message is dropped.
    assert unknown.startswith("unknown message type routed unchanged user=UUU")
    assert unknown.endswith(" type=x") and len(unknown) < 300
    assert hub.counters.dropped == {"no_connection": 1}


def socket_connection(user: str, sock: socket.socket, max_messages: int = 4) -> Connection:
    """A connection of ``user`` that writes to ``sock``."""
    return Connection(
        user,
        ConnStream(trio.SocketStream(trio.socket.from_stdlib_socket(sock))),
        trio.Lock(),
        expires_at=time.time() + 3600,
        max_messages=max_messages,
        max_bytes=1 << 20,
        write_wait=1.0,
    )


async def registered_to_a_closed_peer(nursery: trio.Nursery) -> tuple[Hub, Connection]:
    """A hub with one connection of user "u" whose client end is already closed."""
    hub = await start_hub(nursery)
    ours, theirs = socket.socketpair()
    theirs.close()
    conn = socket_connection("u", ours)
    register(hub, conn)
    return hub, conn


async def test_a_write_error_is_one_metric_label_and_the_os_error_goes_to_the_log(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The OS error's text was part of the label: write_error: ... Broken pipe, ...
    Connection reset by peer: one time series per errno wording."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    hub, conn = await registered_to_a_closed_peer(nursery)
    hub.route_batch([(b"user_noti:u", b'{"type":"alert","payload":{}}')])
    assert conn.closed
    hub.unregister(conn, CloseReason.CLOSED)
    assert dict(hub.counters.connections_closed) == {"write_error": 1}
    assert dict(hub.counters.frames_dropped) == {"write_error": 1}
    assert "closing connection reason=write_error" in caplog.text
    assert "detail='Broken pipe'" in caplog.text


async def test_a_connection_closed_for_its_token_keeps_that_reason_when_the_close_fails(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that does not read and whose token expired: the close frame cannot be
    written, and the close was counted as a write error."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    hub, conn = await registered_to_a_closed_peer(nursery)
    conn.begin_close(CloseReason.TOKEN_EXPIRED)  # what the keep-alive sweep does
    conn.abort(CloseReason.WRITE_ERROR, "Broken pipe")
    hub.unregister(conn, CloseReason.CLOSED)
    assert dict(hub.counters.connections_closed) == {"token_expired": 1}
    assert "reason=token_expired" in caplog.text
    assert "detail='write_error: Broken pipe'" in caplog.text


async def test_a_connection_whose_queue_is_full_misses_the_resync_and_is_told_later(
    nursery: trio.Nursery,
) -> None:
    """The Redis-reconnect resync was skipped for a full queue without a word: the client
    later got its queued frames and nothing saying that it missed an outage."""
    hub = await start_hub(nursery)
    full, free = connection("slow", max_messages=1), connection("fast")
    register(hub, full, free)
    assert full.queue.push(b"queued")
    hub.flush = lambda: None  # type: ignore[method-assign]  # no sockets: keep queues as they are
    hub.broadcast_resync(Resync(ResyncReason.REDIS_RECONNECTED, "2026-11-30T17:00:00.000000+00:00"))
    assert free.queue.messages == 1
    assert full.queue.frames == [b"queued"]
    assert (full.queue.missed, full.queue.missed_since) == (1, "2026-11-30T17:00:00.000000+00:00")
    assert hub.counters.frames_dropped == {"queue_full": 1}
    assert hub.counters.resyncs_sent == 1


async def test_clients_are_not_dropped_for_the_silence_of_a_stalled_daemon(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """After the daemon itself did not run for longer than WS_PONG_WAIT (SIGSTOP, a VM
    paused), every client was dropped as pong_timeout at the first tick; skipping that one
    tick still dropped those not pinged since (an outside re-check: half of them). Their
    silence now counts from the end of the stall: each gets its ping and a whole
    WS_PONG_WAIT to answer it."""
    conns = await start_pinging_hub(nursery, 2, 5, 10)
    await trio.sleep(1.5)  # the keep-alive ticks, then sleeps
    for conn in conns:
        conn.stream.last_receive = trio.current_time()
    autojump_clock.jump(12)  # the event loop stopped for 12 s
    resumed = trio.current_time()
    pings = {id(conn): len(conn.queue.frames) for conn in conns}
    answered: set[int] = set()
    while trio.current_time() < resumed + 6:
        await trio.sleep(0.1)
        for conn in conns[1:]:  # every client but the first answers each new ping
            if len(conn.queue.frames) > pings[id(conn)]:
                pings[id(conn)] = len(conn.queue.frames)
                conn.stream.last_receive = trio.current_time()
                answered.add(id(conn))
    assert len(answered) == 9, "each was pinged after the stall"
    assert [conn.close_reason for conn in conns] == ["pong_timeout"] + [None] * 9


def frames_of(data: bytes) -> list[bytes]:
    """The payloads of unmasked frames under 64 KB written back to back."""
    out = []
    while data:
        size, start = data[1], 2
        if size == 126:
            size, start = int.from_bytes(data[2:4], "big"), 4
        out.append(data[start : start + size])
        data = data[start + size :]
    return out


@pytest.mark.parametrize("resync_on_drop", [True, False])
async def test_a_client_that_missed_frames_is_told_how_many_since_the_first(
    nursery: trio.Nursery, resync_on_drop: bool
) -> None:
    """Once caught up, one resync: how many frames it missed, since the first one; none
    with RESYNC_ON_DROP=false."""
    config = Config(jwt_secret_key="x" * 32, resync_on_drop=resync_on_drop)
    hub = await start_hub(nursery, config)
    ours, theirs = socket.socketpair()
    conn = socket_connection("u", ours, max_messages=1)
    register(hub, conn)
    conn.flushing = True  # a write of ours waits for the client: the queue stays full
    alert = (b"user_noti:u", b'{"type":"alert","payload":1}')
    hub.route_batch([alert])  # queued
    hub.route_batch([alert])  # dropped: the first
    first = conn.queue.missed_since
    hub.route_batch([alert, alert])  # dropped too, later
    assert (conn.queue.missed, conn.queue.missed_since) == (3, first)
    conn.flushing = False
    conn.write_nowait(nursery)  # the flush catches up ...
    hub._on_drained(conn)  # ... and says so
    sent = [json.loads(frame) for frame in frames_of(theirs.recv(65536))]
    assert sent[0]["payload"] == 1
    if resync_on_drop:
        assert sent[1]["payload"] == {"reason": "frames_dropped", "since": first, "dropped": 3}
        assert hub.counters.resyncs_sent == 1
    else:
        assert len(sent) == 1 and hub.counters.resyncs_sent == 0
    assert conn.queue.missed == 0
    assert hub.counters.dropped == {"queue_full": 3}  # every connection of the user full
    assert hub.counters.frames_dropped == {"queue_full": 3}


async def test_no_resync_after_an_outage_with_resync_on_reconnect_false(
    nursery: trio.Nursery,
) -> None:
    hub = await start_hub(nursery, Config(jwt_secret_key="x" * 32, resync_on_reconnect=False))
    conn = connection("u")
    register(hub, conn)
    hub.flush = lambda: None  # type: ignore[method-assign]  # no sockets
    hub.broadcast_resync(Resync(ResyncReason.REDIS_RECONNECTED, "2026-11-30T17:00:00.000000+00:00"))
    assert conn.queue.frames == [] and hub.counters.resyncs_sent == 0


async def test_frames_left_in_a_closed_connections_queue_are_counted_as_dropped(
    nursery: trio.Nursery,
) -> None:
    hub = await start_hub(nursery)
    conn = connection("u")
    register(hub, conn)
    assert hub.counters.handshakes_accepted == 1
    assert conn.queue.push(b"one") and conn.queue.push(b"two")
    hub.unregister(conn, CloseReason.CLIENT_CLOSED)
    assert hub.counters.frames_dropped == {"connection_closed": 2}
    assert hub.counters.connections_closed == {"client_closed": 1}


async def test_a_drain_closes_every_connection_as_shutdown(nursery: trio.Nursery) -> None:
    hub = await start_hub(nursery)
    pairs = [socket.socketpair() for _ in range(3)]
    for n, (ours, _theirs) in enumerate(pairs):
        register(hub, socket_connection(f"u{n}", ours))
    await hub.drain(0.0)
    for conn in list(hub.connections()):
        assert conn.closed
        hub.unregister(conn, CloseReason.CONNECTION_LOST)  # what the reader then sees
    assert hub.counters.connections_closed == {"shutdown": 3}
    assert all(theirs.recv(16) == b"" for _ours, theirs in pairs)


async def test_a_drain_spreads_the_closes_over_its_window(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """Closes all at once would bring every browser back at once: a drain closes the
    connections in slices over its window, beginning at once and done within it."""
    hub = await start_hub(nursery)
    pairs = [socket.socketpair() for _ in range(20)]
    conns = [socket_connection(f"u{n}", ours) for n, (ours, _theirs) in enumerate(pairs)]
    register(hub, *conns)

    def closed() -> int:
        return sum(conn.closed for conn in conns)

    started = trio.current_time()
    async with trio.open_nursery() as draining:
        draining.start_soon(hub.drain, 3.0)
        await trio.sleep(0.01)
        assert 1 <= closed() <= 2
        await trio.sleep(1.5)
        assert 8 <= closed() <= 12, "half of them halfway through the window"
    assert closed() == 20
    assert trio.current_time() - started <= 3.0
    for _ours, theirs in pairs:
        theirs.close()


async def test_a_resync_naming_channels_goes_to_their_users_only(nursery: trio.Nursery) -> None:
    config = Config(jwt_secret_key="x" * 32)
    hub = await start_hub(nursery, config)
    a, a2, b = connection("a"), connection("a"), connection("b")
    register(hub, a, a2, b)
    hub.flush = lambda: None  # type: ignore[method-assign]  # no sockets
    since = "2026-11-30T17:00:00.000000+00:00"
    hub.broadcast_resync(
        Resync(ResyncReason.REDIS_RECONNECTED, since, frozenset({"user_noti:a", "x"}))
    )
    assert len(a.queue.frames) == len(a2.queue.frames) == 1 and b.queue.frames == []
    assert hub.counters.resyncs_sent == 2


def test_a_drain_spreads_its_closes_over_the_window_ten_slices_a_second_at_most() -> None:
    assert drain_plan(1000, 10.0) == (10, 0.1)
    assert drain_plan(3, 10.0) == (1, 10.0 / 3)
    assert drain_plan(5, 0.0) == (5, 0.0)
    assert drain_plan(1001, 10.0) == (11, 0.1)
