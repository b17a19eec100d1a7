"""End to end over real sockets: handshake rejections, /health, /metrics, /stats, process."""

from __future__ import annotations

import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from functools import partial
from typing import Any

import jwt
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import (
    DEV_ORIGIN,
    REPO,
    WS_UPGRADE_HEADERS,
    Daemon,
    daemon_env,
    http_request,
    make_token,
    wait_for_port,
    wait_until,
)
from tests.support.redis import RedisServer
from tests.support.ws import upgrade_status


def ws_headers(
    token: str | None = None, origin: str | None = DEV_ORIGIN, **extra: str
) -> dict[str, str]:
    headers = dict(WS_UPGRADE_HEADERS)
    if origin is not None:
        headers["Origin"] = origin
    if token is not None:
        headers["Cookie"] = f"smap_auth_token={token}"
    headers.update(extra)
    return headers


@pytest.mark.parametrize(
    ("headers", "target", "status", "body"),
    [
        (ws_headers(token=None), "/ws", 401, {"error": "missing token parameter"}),
        (ws_headers(token="not.a.jwt"), "/ws", 401, {"error": "invalid or expired token"}),
        (ws_headers(make_token(ttl=-10)), "/ws", 401, {"error": "invalid or expired token"}),
        (
            ws_headers(make_token(secret="another-secret-with-enough-bytes-000000")),
            "/ws",
            401,
            {"error": "invalid or expired token"},
        ),
        (ws_headers(make_token(), origin="https://evil.com"), "/ws", 403, None),
        (ws_headers(make_token(), origin=None), "/ws", 403, None),
        # Origin is checked before the token: a bad origin learns nothing about tokens.
        (ws_headers(token=None, origin="https://evil.com"), "/ws", 403, None),
        ({"Origin": DEV_ORIGIN, "Cookie": f"smap_auth_token={make_token()}"}, "/ws", 400, None),
        (ws_headers(token=None), f"/ws?token={make_token()}", 426, None),
    ],
    ids=[
        "missing-token",
        "malformed-token",
        "expired-token",
        "wrong-secret",
        "bad-origin",
        "no-origin",
        "bad-origin-before-token",
        "not-websocket",
        "query-token-bad-version",
    ],
)
async def test_handshake_rejections_are_plain_http_before_the_upgrade(
    start_daemon: Any,
    headers: dict[str, str],
    target: str,
    status: int,
    body: dict[str, str] | None,
) -> None:
    daemon: Daemon = await start_daemon()
    if status == 426:
        headers = {**headers, "Sec-WebSocket-Version": "8"}
    got_status, got_headers, got_body = await http_request(daemon.port, target, headers)
    assert got_status == status
    assert got_headers["content-type"] == "application/json"
    if body is not None:
        assert json.loads(got_body) == body
    assert daemon.app.hub.connection_count == 0
    assert sum(daemon.app.counters.handshake_rejections.values()) == 1


async def test_production_mode_rejects_localhost_and_accepts_configured_origin(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(ENV="production", ALLOWED_ORIGINS="https://smap.tantai.dev")
    status, _, _ = await http_request(daemon.port, "/ws", ws_headers(make_token()))
    assert status == 403
    ws = await daemon.connect("user123", origin="https://smap.tantai.dev", nursery=nursery)
    await daemon.wait_connections(1)
    await ws.aclose()


async def test_query_token_is_accepted_and_never_logged(
    start_daemon: Any, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    daemon: Daemon = await start_daemon()
    token = make_token("q-user")
    ws = await daemon.connect("q-user", token=token, query_token=True, nursery=nursery)
    await daemon.wait_connections(1)
    await daemon.publish("q-user", {"type": "alert", "payload": 1})
    with trio.fail_after(5):
        assert json.loads(await ws.get_message())["payload"] == 1
    assert any("deprecated" in r.getMessage() for r in caplog.records)
    assert not any(token in r.getMessage() for r in caplog.records)


async def test_per_user_cap_answers_429_and_global_cap_503(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_MAX_CONNECTIONS_PER_USER="2", WS_MAX_CONNECTIONS="3")
    await daemon.connect("a", nursery=nursery)
    await daemon.connect("a", nursery=nursery)
    status, _, _ = await http_request(daemon.port, "/ws", ws_headers(make_token("a")))
    assert status == 429
    await daemon.connect("b", nursery=nursery)
    await daemon.wait_connections(3)
    status, _, _ = await http_request(daemon.port, "/ws", ws_headers(make_token("c")))
    assert status == 503
    assert daemon.app.counters.handshake_rejections == {
        "max_connections_per_user": 1,
        "max_connections": 1,
    }


async def test_oversized_head_gets_431_and_slow_head_is_dropped(start_daemon: Any) -> None:
    daemon: Daemon = await start_daemon(HTTP_MAX_HEADER_SIZE="2048", WS_HANDSHAKE_TIMEOUT="300ms")
    status, _, _ = await http_request(daemon.port, "/health", {"X-Big": "a" * 4000})
    assert status == 431
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
    await stream.send_all(b"GET /ws HTTP/1.1\r\n")
    with trio.fail_after(5):
        assert await stream.receive_some() == b"", "the daemon hangs up on an unfinished head"
    assert daemon.app.counters.handshake_rejections["handshake_timeout"] == 1


async def test_health_is_healthy_with_null_last_message_before_the_first(start_daemon: Any) -> None:
    daemon: Daemon = await start_daemon()
    status, headers, body = await http_request(daemon.port, "/health")
    doc = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert doc["status"] == "healthy"
    assert doc["redis"]["status"] == "connected" and doc["redis"]["ping_ms"] >= 0
    assert doc["websocket"] == {"active_connections": 0, "total_unique_users": 0}
    assert doc["subscriber"]["active"] is True
    assert doc["subscriber"]["last_message_at"] is None
    assert doc["subscriber"]["pattern"] == "user_noti:*"
    assert isinstance(doc["uptime_seconds"], int)
    await daemon.publish("x", {"type": "ping"})
    await wait_until(lambda: daemon.app.subscriber.last_message_at is not None)
    _, _, body = await http_request(daemon.port, "/health")
    assert json.loads(body)["subscriber"]["last_message_at"] is not None


async def test_an_absolute_form_target_is_served_like_origin_form(start_daemon: Any) -> None:
    """``GET http://host/health HTTP/1.1`` (RFC 9112 3.2.2; the original's Go server
    accepts it) got 404."""
    daemon: Daemon = await start_daemon()
    status, _, body = await http_request(daemon.port, f"http://127.0.0.1:{daemon.port}/health")
    assert status == 200 and json.loads(body)["status"] == "healthy"


async def test_an_upgrade_header_without_the_websocket_token_is_400(start_daemon: Any) -> None:
    """``Upgrade: notwebsocketatall`` got 101."""
    daemon: Daemon = await start_daemon()
    headers = ws_headers(make_token(), Upgrade="notwebsocketatall")
    status, _, _ = await http_request(daemon.port, "/ws", headers)
    assert status == 400
    assert dict(daemon.app.counters.handshake_rejections) == {"not_websocket": 1}
    assert daemon.app.hub.connection_count == 0


async def test_a_connection_closed_before_its_head_is_no_rejection(start_daemon: Any) -> None:
    """Nothing was refused: load balancers' TCP checks and browsers' preconnects open
    and close connections without a request all the time, so they are not counted as
    handshake rejections (README lists no such reason)."""
    daemon: Daemon = await start_daemon()
    for sent in (b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n"):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        if sent:
            await stream.send_all(sent)
        await wait_until(lambda: len(daemon.app.server._heads) == 1)
        await stream.aclose()
        await wait_until(lambda: not daemon.app.server._heads)
    assert sum(daemon.app.counters.handshake_rejections.values()) == 0
    metrics = (await http_request(daemon.port, "/metrics"))[2].decode()
    assert "closed_before_head" not in metrics


async def test_health_is_degraded_when_redis_is_down_and_recovers(start_daemon: Any) -> None:
    daemon: Daemon = await start_daemon()
    daemon.redis.kill()
    status, _, body = await http_request(daemon.port, "/health")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "degraded"
    assert doc["redis"]["status"] == "disconnected" and doc["redis"]["error"]
    daemon.redis.start()
    await daemon.wait_subscribed()

    async def healthy() -> bool:
        status, _, _ = await http_request(daemon.port, "/health")
        return status == 200

    with trio.fail_after(15):
        while not await healthy():
            await trio.sleep(0.1)


async def test_redis_down_at_start_serves_degraded_then_subscribes(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    redis_server.kill()
    daemon: Daemon = await start_daemon(wait_subscribed=False)
    await wait_until(lambda: daemon.app.subscriber.state == "retrying")
    status, _, body = await http_request(daemon.port, "/health")
    assert status == 503
    assert json.loads(body)["subscriber"]["active"] is False
    ws = await daemon.connect("user123", nursery=nursery)
    daemon.redis.start()
    await daemon.wait_subscribed()
    await daemon.publish("user123", {"type": "notification", "payload": "after start"})
    with trio.fail_after(5):
        while True:
            doc = json.loads(await ws.get_message())
            if doc["type"] != "resync":
                break
    assert doc["payload"] == "after start"


async def test_metrics_are_prometheus_text_with_types_and_accounting(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.connect("user123", nursery=nursery)  # a second tab: one user, two connections
    await daemon.wait_connections(2)
    for message in (
        {
            "type": "project_progress",
            "payload": {
                "project_id": "p",
                "status": "DONE",
                "total": 1,
                "done": 1,
                "errors": 0,
                "progress_percent": 100,
            },
        },
        {"type": "brand_new_type", "payload": {}},
        "garbage",
    ):
        await daemon.publish("user123", message)
    await daemon.publish("offline-user", {"type": "alert"})
    with trio.fail_after(5):
        await ws.get_message()
        await ws.get_message()
    await wait_until(lambda: daemon.app.counters.received == 4)
    status, headers, body = await http_request(daemon.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("websocket_messages_by_type_total", (("type", "project_progress"),))] == 1
    assert samples[("websocket_messages_by_type_total", (("type", "unknown"),))] == 1
    assert samples[("smap_notify_messages_rejected_total", (("reason", "invalid_json"),))] == 1
    assert samples[("smap_notify_messages_dropped_total", (("reason", "no_connection"),))] == 1
    assert samples[("websocket_active_connections", ())] == 2
    assert samples[("websocket_active_users", ())] == 1
    received = samples[("smap_notify_messages_received_total", ())]
    delivered = samples[("smap_notify_messages_delivered_total", ())]
    assert received == 4 and delivered == 2
    stats = json.loads((await http_request(daemon.port, "/stats"))[2])
    assert stats["connections"] == {"active": 2, "total_unique_users": 1}


async def test_stats_keeps_the_original_json_shape(start_daemon: Any) -> None:
    daemon: Daemon = await start_daemon()
    status, _, body = await http_request(daemon.port, "/stats")
    doc = json.loads(body)
    assert status == 200
    assert set(doc) == {"service", "timestamp", "uptime_seconds", "connections", "messages"}
    assert set(doc["messages"]) == {"received_from_redis", "sent_to_clients", "failed"}


async def test_unknown_path_is_404_and_post_is_405(start_daemon: Any) -> None:
    daemon: Daemon = await start_daemon()
    assert (await http_request(daemon.port, "/nope"))[0] == 404
    assert (await http_request(daemon.port, "/health", method="POST"))[0] == 405


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything the daemon answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(request)
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
    await stream.aclose()
    return data


async def test_rejections_have_reason_phrases_and_compact_json_bodies(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(
        WS_MAX_CONNECTIONS_PER_USER="1", HTTP_MAX_HEADER_SIZE="2048"
    )
    await daemon.connect("a", nursery=nursery)
    await daemon.wait_connections(1)
    cases = [
        (
            ws_headers(make_token("a")),
            b"429 Too Many Requests",
            b"max connections per user reached",
        ),
        (ws_headers(token=None), b"401 Unauthorized", b"missing token parameter"),
        ({"X-Big": "a" * 4000}, b"431 Request Header Fields Too Large", b"head too large"),
    ]
    for headers, status_line, error in cases:
        lines = ["GET /ws HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers.items())]
        answer = await raw_exchange(daemon.port, ("\r\n".join(lines) + "\r\n\r\n").encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 " + status_line
        assert body == b'{"error":"' + error + b'"}'


async def test_a_head_with_bare_lf_line_ends_is_answered_not_held(start_daemon: Any) -> None:
    """h11 and Go's net/http take LF for CRLF; the daemon used to wait for a CRLF blank
    line until WS_HANDSHAKE_TIMEOUT."""
    daemon: Daemon = await start_daemon(WS_HANDSHAKE_TIMEOUT="60s")
    with trio.fail_after(5):
        answer = await raw_exchange(daemon.port, b"GET /health HTTP/1.1\nHost: x\n\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_frames_sent_with_the_upgrade_request_are_not_lost(start_daemon: Any) -> None:
    """A client may send frames right behind its request, without waiting for the 101:
    here a close frame (1000), which the daemon must answer."""
    daemon: Daemon = await start_daemon()
    lines = [
        "GET /ws HTTP/1.1",
        "Host: x",
        *(f"{k}: {v}" for k, v in ws_headers(make_token()).items()),
    ]
    close = b"\x88\x82" + bytes(4) + b"\x03\xe8"  # masked (zero key) close, code 1000
    with trio.fail_after(5):
        answer = await raw_exchange(daemon.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + close)
    head, _, frames = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames == b"\x88\x02\x03\xe8"


async def test_head_request_to_ws_gets_headers_without_a_body(start_daemon: Any) -> None:
    daemon: Daemon = await start_daemon()
    answer = await raw_exchange(daemon.port, b"HEAD /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Content-Length: 30" in head.title()
    assert body == b""


async def test_a_refused_head_is_logged_with_its_size(
    start_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon: Daemon = await start_daemon(HTTP_MAX_HEADER_SIZE="2048")
    status, _, _ = await http_request(daemon.port, "/ws", {"Cookie": "c=" + "x" * 3000})
    assert status == 431
    lines = [r.getMessage() for r in caplog.records if "status=431" in r.getMessage()]
    assert len(lines) == 1
    assert "reason=head_too_large" in lines[0]
    assert "HTTP_MAX_HEADER_SIZE" in lines[0]
    assert "xxxx" not in lines[0]


async def test_a_browser_sized_cookie_jar_fits_the_default_head_limit(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    # Chromium sends every cookie of the domain: here 8 unrelated 1 KB cookies.
    daemon: Daemon = await start_daemon()
    jar = "".join(f"analytics{i}={'v' * 1000}; " for i in range(8))
    ws = await daemon.connect("jar", other_cookies=jar, nursery=nursery)
    await daemon.wait_connections(1)
    await ws.aclose()


async def test_a_client_that_resets_during_the_upgrade_is_no_error(
    start_daemon: Any, caplog: pytest.LogCaptureFixture, nursery: trio.Nursery
) -> None:
    caplog.set_level(logging.DEBUG, logger="smap_notify")
    daemon: Daemon = await start_daemon(WS_MAX_CONNECTIONS_PER_USER="1")
    lines = [
        "GET /ws HTTP/1.1",
        "Host: x",
        *(f"{k}: {v}" for k, v in ws_headers(make_token()).items()),
    ]
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", daemon.port))
    await sock.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    # Closing with SO_LINGER 0 sends a reset: the head is already queued on the daemon's
    # side, its answer (101) meets the reset.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    def ended() -> bool:
        return any(
            "during the upgrade" in r.getMessage() or r.levelno >= logging.ERROR
            for r in caplog.records
        )

    await wait_until(ended)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    await wait_until(lambda: daemon.app.hub.connection_count == 0)
    status, _, _ = await http_request(daemon.port, "/health")
    assert status == 200
    # The failed upgrade gave its place back: the user's one connection is still to be had.
    await daemon.connect(nursery=nursery)
    await daemon.wait_connections(1)


def test_sigterm_closes_clients_uncleanly_and_exits_zero(daemon_process: Any) -> None:
    daemon = daemon_process()

    async def scenario() -> int | None:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.connect_websocket(
                nursery,
                "127.0.0.1",
                daemon.port,
                "/ws",
                use_ssl=False,
                extra_headers=[
                    ("Origin", DEV_ORIGIN),
                    ("Cookie", f"smap_auth_token={make_token()}"),
                ],
            )
            daemon.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15), pytest.raises(trio_websocket.ConnectionClosed) as info:
                await ws.get_message()
            return info.value.reason.code

    code = trio.run(scenario)
    assert code == 1006, "an unclean close makes SMAP's web UI reconnect"
    assert daemon.proc.wait(15) == 0
    log = daemon.log()
    assert "Traceback" not in log and "stopped" in log


# The daemon, with one more signal arriving just as its drain ends: Ctrl-C in a terminal
# reaches smap-notify-demo and the daemon at once, and the demo then sends SIGTERM.
SIGNAL_AS_THE_DRAIN_ENDS = """
import signal, sys
from smap_notify import app, entry

drain = app.App.shutdown

async def shutdown(self, **kwargs):
    await drain(self, **kwargs)
    signal.raise_signal(signal.SIGTERM)

app.App.shutdown = shutdown
sys.exit(entry.main())  # as the installed command: a stop signal during start-up is kept
"""


def test_a_signal_as_the_drain_ends_is_logged_not_fatal(daemon_process: Any) -> None:
    """Trio hands signals still queued when its receiver closes back to the default
    handlers: SIGTERM's killed the process (status -15) before it logged that it stopped."""
    daemon = daemon_process(command=("-c", SIGNAL_AS_THE_DRAIN_ENDS))
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(15) == 0
    log = daemon.log()
    assert "received SIGINT, shutting down" in log
    assert "received SIGTERM while stopping" in log
    assert log.rstrip().endswith("stopped")


def test_a_request_accepted_before_a_stop_is_answered_not_cut_off(daemon_process: Any) -> None:
    """A connection taken from the backlog just before SIGTERM (a load balancer's health
    check, a restart behind the socket unit) got no answer: the process ended as soon as
    the drain did, its request half read."""
    daemon = daemon_process()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as client:
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "shutting down connections=0" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.01)
        client.sendall(b"\r\n")
        response = client.recv(65536)
    assert response.startswith(b"HTTP/1.1 503 "), response
    assert b'"status":"draining"' in response
    assert daemon.proc.wait(15) == 0


def test_a_short_secret_is_one_warning_at_start_not_a_raw_python_warning(
    daemon_process: Any,
) -> None:
    """PyJWT warns on the first token checked with a short key, as two raw lines of
    Python source on stderr: no log format, no journald priority, a library's path."""
    daemon = daemon_process(JWT_SECRET_KEY="dev-secret")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, "dev-secret")

    assert trio.run(partial(upgrade_status, daemon.port, "u1", token=token)) == 101
    assert daemon.stop() == 0
    log = daemon.log()
    assert "WARNING smap_notify: JWT_SECRET_KEY is 10 bytes long" in log
    assert "dev-secret" not in log
    assert "InsecureKeyLengthWarning" not in log


@pytest.mark.parametrize("setting", ["WS_PORT", "ADMIN_PORT"])
def test_a_port_in_use_exits_70_with_one_line_saying_so(daemon_process: Any, setting: str) -> None:
    """70: systemd restarts it, since the address may come free (an old process exiting)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = daemon_process(wait_ready=False, **{setting: str(port)})
        assert daemon.proc.wait(15) == 70
    log = daemon.log()
    assert f"CRITICAL smap_notify: cannot listen on 127.0.0.1:{port}: Address already in use" in log
    assert "Traceback" not in log


def test_missing_secret_exits_78_listing_every_problem(daemon_process: Any) -> None:
    daemon = daemon_process(wait_ready=False, JWT_SECRET_KEY="", WS_PING_INTERVAL="soon")
    assert daemon.proc.wait(15) == 78
    log = daemon.log()
    assert "JWT_SECRET_KEY" in log and "WS_PING_INTERVAL" in log


async def test_drain_reports_on_health_refuses_upgrades_and_closes_spread_out(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(SHUTDOWN_TIMEOUT="5s")
    clients = [await daemon.connect(f"u{i}", nursery=nursery) for i in range(20)]
    await daemon.wait_connections(20)
    counts: list[int] = []

    async def watch_count() -> None:
        while True:
            if not counts or counts[-1] != daemon.app.hub.connection_count:
                counts.append(daemon.app.hub.connection_count)
            await trio.sleep(0.005)

    nursery.start_soon(watch_count)
    nursery.start_soon(daemon.app.shutdown)
    await wait_until(lambda: daemon.app.draining)
    status, _, body = await http_request(daemon.port, "/health")
    assert status == 503 and json.loads(body)["status"] == "draining"
    status, headers, _ = await http_request(daemon.port, "/ws", ws_headers(make_token("late")))
    assert status == 503 and headers["retry-after"]
    for ws in clients:
        with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as info:
            await ws.get_message()
        assert info.value.reason.code == 1006
    await daemon.wait_connections(0)
    # Closed a few at a time, not all at once (test_hub checks the spread in Trio's clock).
    await wait_until(lambda: counts[-1] == 0)
    assert counts[0] == 20
    assert len([n for n in counts if 0 < n < 20]) >= 3, counts


async def test_connection_outlives_the_handshake_timeout(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(WS_HANDSHAKE_TIMEOUT="200ms")
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await trio.sleep(1.0)  # five handshake timeouts: the time itself is what is tested
    await daemon.publish("user123", {"type": "notification", "payload": "later"})
    with trio.fail_after(5):
        assert json.loads(await ws.get_message())["payload"] == "later"
    assert daemon.app.counters.handshake_rejections["handshake_timeout"] == 0


# The daemon with few file descriptors, as under a low LimitNOFILE=.
FEW_DESCRIPTORS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
from smap_notify import entry
sys.exit(entry.main())
"""


def test_running_out_of_descriptors_is_one_warning_and_503_not_a_traceback_flood(
    daemon_process: Any,
) -> None:
    daemon = daemon_process(command=("-c", FEW_DESCRIPTORS), WS_MAX_CONNECTIONS_PER_USER="1000")
    upgrade = (
        "\r\n".join(
            [
                "GET /ws HTTP/1.1",
                "Host: x",
                *(f"{k}: {v}" for k, v in ws_headers(make_token()).items()),
            ]
        ).encode()
        + b"\r\n\r\n"
    )
    held: list[socket.socket] = []
    try:
        # WebSockets, each holding a descriptor of the daemon's: more than its 128 allow
        # (a LimitNOFILE= too low for the clients); the last ones wait in the backlog.
        for n in range(160):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            if n % 20 == 19:  # gone (reset) before the daemon gets to it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                continue
            sock.sendall(upgrade)
            held.append(sock)
        answer = b""
        while chunk := held[-1].recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        assert answer.endswith(b'{"error":"server busy"}')
    finally:
        for sock in held:
            sock.close()
    # The descriptors come back as the daemon sees its clients go.
    deadline = time.monotonic() + 10
    while (status := trio.run(http_request, daemon.port, "/health")[0]) != 200:
        assert time.monotonic() < deadline, f"/health still answers {status}"
        time.sleep(0.1)
    assert daemon.proc.poll() is None, "clients that reset while refused end nothing"
    assert daemon.stop() == 0
    log = daemon.log()
    assert "open files limit 128 is below WS_MAX_CONNECTIONS=10000" in log
    assert "cannot accept connections: Too many open files (open files limit 128" in log
    assert "Traceback" not in log
    assert log.count("cannot accept connections") == 1, "once, then every 10 s"


def health_status(port: int) -> int | str:
    """/health's status, or why there was none (a 503 answered before the request was
    read ends in a reset)."""
    try:
        return trio.run(http_request, port, "/health")[0]
    except (OSError, trio.BrokenResourceError) as exc:
        return repr(exc)


def test_silent_connections_cannot_crowd_out_everyone_else(daemon_process: Any) -> None:
    """Connections that never send a request held a descriptor each until
    WS_HANDSHAKE_TIMEOUT: a burst of them, and every client, /health included, got 503
    until then. Now request heads are capped below the open-files limit: beyond the cap a
    new connection gets 503 at once while the heads are young, and closes the oldest one
    once it has had a second to arrive."""
    daemon = daemon_process(command=("-c", FEW_DESCRIPTORS), WS_HANDSHAKE_TIMEOUT="60s")
    silent = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(120)]
    try:
        # 128 descriptors, 64 of them for the daemon's own needs: the burst leaves none.
        answer = b""
        while chunk := silent[-1].recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
        deadline = time.monotonic() + 10  # far below WS_HANDSHAKE_TIMEOUT
        while (status := health_status(daemon.port)) != 200:
            assert time.monotonic() < deadline, f"/health still answers {status}"
            time.sleep(0.1)
        silent[0].settimeout(10)
        assert silent[0].recv(1) == b"", "the oldest silent connection was closed"
    finally:
        for sock in silent:
            sock.close()
    metrics = trio.run(http_request, daemon.port, "/metrics")[2].decode()
    for reason in ("too_many_heads", "head_crowded_out"):
        assert f'smap_notify_handshake_rejections_total{{reason="{reason}"}}' in metrics
    assert daemon.stop() == 0
    log = daemon.log()
    assert "refused a connection (503): " in log
    assert "closed a connection whose request head was not complete after" in log
    assert "cannot accept connections" not in log
    assert "Traceback" not in log


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_daemon_is_still_importing_is_not_the_default_action(
    daemon_process: Any, signum: signal.Signals
) -> None:
    """The first handler is installed before the imports (about 0.3 s): SIGTERM then stops
    the daemon the usual way (exit 0, logged), a SIGHUP does not kill it."""
    daemon = daemon_process(wait_ready=False)
    deadline = time.monotonic() + 10
    while not catches(daemon.proc.pid, signum):
        assert time.monotonic() < deadline and daemon.proc.poll() is None
        time.sleep(0.0005)
    daemon.proc.send_signal(signum)
    if signum == signal.SIGTERM:
        assert daemon.proc.wait(30) == 0
        log = daemon.log()
        assert "received SIGTERM, shutting down" in log
        assert "stopped" in log
    else:
        wait_for_port(daemon.port, daemon.proc)
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


# The early signal handling alone, with real signals: the same stop signal twice before
# the daemon's own handling is up takes the default action (a hung start-up stays stoppable).
TWICE_EARLY = """
import os, signal
from smap_notify import signals
signals.catch_early_signals()
os.kill(os.getpid(), signal.SIGTERM)
print("recorded", signals._early, flush=True)
os.kill(os.getpid(), signal.SIGHUP)
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGTERM)
print("survived", flush=True)
"""


def test_a_stop_signal_sent_twice_during_start_up_takes_its_default_action() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TWICE_EARLY], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert done.returncode == -signal.SIGTERM
    assert done.stdout == f"recorded [{int(signal.SIGTERM)}]\n"


EARLY_UNUSED = """
import os, signal
from smap_notify import signals
signals.catch_early_signals()
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGHUP)
print([signal.Signals(s).name for s in signals.take_early_signals()], flush=True)
"""


def test_an_unused_signal_during_start_up_is_passed_on_to_be_logged() -> None:
    # It was recorded, then dropped without a line once the daemon was up.
    done = subprocess.run(
        [sys.executable, "-c", EARLY_UNUSED], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert done.returncode == 0
    assert done.stdout == "['SIGUSR1']\n"


def test_a_log_reader_that_went_away_does_not_change_the_exit_status(
    redis_server: RedisServer,
) -> None:
    """journald restarted, a pipe closed: lines written after that fail, and Python's own
    flush at exit used to turn a clean stop's 0 into 120."""
    env = daemon_env(redis_server)
    del env["PYTHONUNBUFFERED"]  # as under the unit: stderr buffered between lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "smap_notify"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        assert b"starting smap-notify" in proc.stdout.readline()
        port = int(env["WS_PORT"])
        wait_for_port(port, proc)
        proc.stdout.close()  # the reader goes away
        for _ in range(20):  # lines to write: handshake rejections
            assert (
                trio.run(http_request, port, "/ws", ws_headers(None, origin="https://x"))[0] == 403
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (b"\x81\x02hi", 1002, "protocol_error"),  # unmasked: clients must mask
        (b"\xc1\x82" + bytes(4) + b"hi", 1002, "protocol_error"),  # RSV1 without an extension
        (b"\x81\x82" + bytes(4) + b"\xff\xfe", 1007, "invalid_data"),  # text, not UTF-8
    ],
    ids=["unmasked", "reserved-bit", "not-utf8"],
)
async def test_a_client_that_breaks_the_protocol_gets_a_close_frame_saying_how(
    start_daemon: Any, caplog: pytest.LogCaptureFixture, frame: bytes, code: int, reason: str
) -> None:
    """RFC 6455 7.1.7: the endpoint SHOULD send a close frame when it fails the connection;
    trio-websocket cut the socket without one, and the close was counted as client_closed
    with nothing logged."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon: Daemon = await start_daemon()
    lines = [
        "GET /ws HTTP/1.1",
        "Host: x",
        *(f"{k}: {v}" for k, v in ws_headers(make_token()).items()),
    ]
    with trio.fail_after(5):
        answer = await raw_exchange(daemon.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + frame)
    head, _, frames = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert frames == b"\x88\x02" + code.to_bytes(2, "big")
    await daemon.wait_connections(0)
    assert dict(daemon.app.counters.connections_closed) == {reason: 1}
    assert f"client broke the WebSocket protocol reason={reason}" in caplog.text
