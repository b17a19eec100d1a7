"""REDIS_HOST pointing at trouble other than a stopped Redis: a name server that does not
answer, and a port where something else than Redis listens. Neither may end the daemon,
hold up its watchdog, its shutdown or /health.

The hanging name server is simulated by replacing ``socket.getaddrinfo`` for one made-up
name (a real one needs root and a private /etc/resolv.conf); everything else is real: the
daemon in this event loop, a real redis-server, real sockets.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import hiredis
import pytest
import redis
import trio

from smap_notify.config import Config
from smap_notify.metrics import Counters
from smap_notify.redis_client import SOCKET_TIMEOUT, resolve
from smap_notify.subscriber import SubscriberState, _error_kind, _Worker
from tests.support.daemon import Daemon, http_request, wait_until
from tests.support.redis import RedisServer

STUCK = "redis.stuck.invalid"


class HangingResolver:
    """``socket.getaddrinfo`` that blocks for ``STUCK`` until ``answer`` is called."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.released = threading.Event()
        self.calls = 0

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        flags = args[3] if len(args) > 3 else kwargs.get("flags", 0)
        if host == STUCK and not flags & socket.AI_NUMERICHOST:
            self.calls += 1
            self.released.wait(60)
            host = "127.0.0.1"
        return self.real(host, port, *args, **kwargs)

    def answer(self) -> None:
        self.released.set()


@pytest.fixture
def hanging_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[HangingResolver]:
    resolver = HangingResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    try:
        yield resolver
    finally:
        resolver.answer()  # never leave a lookup thread waiting


def test_resolve_gives_up_at_its_deadline_and_reuses_the_lookup_in_flight(
    hanging_resolver: HangingResolver,
) -> None:
    for _ in range(3):
        with pytest.raises(OSError, match="did not answer within 0.05s"):
            resolve(STUCK, 6379, 0.05)
    assert hanging_resolver.calls == 1, "one lookup thread, however often it is retried"
    hanging_resolver.answer()
    assert resolve(STUCK, 6379, 5) == ["127.0.0.1"]
    assert resolve("127.0.0.1", 6379, 0.05) == ["127.0.0.1"]


async def test_a_name_server_that_does_not_answer_is_a_redis_outage_not_a_hang(
    start_daemon: Any, redis_server: RedisServer, hanging_resolver: HangingResolver
) -> None:
    daemon: Daemon = await start_daemon(
        wait_subscribed=False, REDIS_HOST=f"{STUCK}:{redis_server.port}"
    )
    with trio.fail_after(5):
        status, _, body = await http_request(daemon.port, "/health")
    assert status == 503
    doc = json.loads(body)
    assert "DNS lookup of redis.stuck.invalid did not answer" in doc["redis"]["error"]
    # The subscriber thread keeps its heartbeat (and so the watchdog) going meanwhile: it
    # gives each lookup SOCKET_TIMEOUT, then backs off and looks again.
    subscriber = daemon.app.subscriber
    beats: dict[int, float] = {}  # attempts so far: the heartbeat first seen with them

    def looked_again_twice() -> bool:
        assert daemon.app.subscriber_alive(), "the heartbeat went stale"
        beats.setdefault(subscriber.attempts, subscriber.heartbeat)
        return len(beats) >= 3

    await wait_until(looked_again_twice, 8 * SOCKET_TIMEOUT)
    assert list(beats.values()) == sorted(set(beats.values())), "a heartbeat with each attempt"
    assert hanging_resolver.calls == 1, "the attempts share the lookup in flight"
    assert daemon.app.subscriber.state == "retrying"
    assert daemon.app.subscriber.last_error == (
        f"ConnectionError: DNS lookup of {STUCK} did not answer within {SOCKET_TIMEOUT:g}s"
    )
    # The name server answers at last: subscribed, with the same lookup.
    hanging_resolver.answer()
    await daemon.wait_subscribed()
    assert hanging_resolver.calls <= 2


async def serve_not_redis(reply: bytes, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP server that answers anything with ``reply`` (an HTTP or SSH port)."""

    async def answer(stream: trio.SocketStream) -> None:
        with trio.move_on_after(1):
            await stream.receive_some()
        await stream.send_all(reply)
        await stream.aclose()

    await trio.serve_tcp(answer, 0, host="127.0.0.1", task_status=task_status)


@pytest.mark.parametrize(
    ("reply", "password"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", ""),
        (b"SSH-2.0-OpenSSH_9.2p1\r\n", ""),
        (b":abc\r\n", ""),
        # With a password, redis-py itself parses the answer to AUTH.
        (b":abc\r\n", "secret"),
    ],
    ids=["http", "ssh", "bad-integer", "bad-integer-to-auth"],
)
async def test_something_else_than_redis_on_the_port_is_retried_not_fatal(
    start_daemon: Any,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    reply: bytes,
    password: str,
) -> None:
    listeners = await nursery.start(serve_not_redis, reply)
    port = listeners[0].socket.getsockname()[1]
    daemon: Daemon = await start_daemon(
        wait_subscribed=False, REDIS_HOST=f"127.0.0.1:{port}", REDIS_PASSWORD=password
    )
    await wait_until(lambda: daemon.app.subscriber.attempts >= 2)
    assert daemon.app.subscriber.state == "retrying"
    for _ in range(2):
        status, _, body = await http_request(daemon.port, "/health")
        assert status == 503, body
        doc = json.loads(body)
        assert "not a Redis reply" in doc["redis"]["error"]
        assert "not a Redis reply" in doc["subscriber"]["last_error"]
    warnings = [r.getMessage() for r in caplog.records if "redis subscription" in r.getMessage()]
    assert warnings, "no warning names the failure"
    assert f"redis=127.0.0.1:{port}" in warnings[0]
    assert "not a Redis reply" in warnings[0]
    assert "is REDIS_HOST a Redis server" in warnings[0]


async def serve_short_pmessage(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Speaks RESP like Redis, confirms PSUBSCRIBE, then sends a pmessage of 3 elements."""

    async def answer(stream: trio.SocketStream) -> None:
        reader = hiredis.Reader()
        while data := await stream.receive_some():
            reader.feed(data)
            while (command := reader.gets()) is not False:
                if command[0].upper() == b"PSUBSCRIBE":
                    await stream.send_all(
                        b"*3\r\n$10\r\npsubscribe\r\n$11\r\nuser_noti:*\r\n:1\r\n"
                        b"*3\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:u1\r\n"
                    )
                else:
                    await stream.send_all(b"+OK\r\n")

    await trio.serve_tcp(answer, 0, host="127.0.0.1", task_status=task_status)


async def test_a_pmessage_redis_never_sends_is_retried_not_fatal(
    start_daemon: Any, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # It ended the daemon: an IndexError in the subscriber thread, exit 70.
    listeners = await nursery.start(serve_short_pmessage)
    port = listeners[0].socket.getsockname()[1]
    daemon: Daemon = await start_daemon(wait_subscribed=False, REDIS_HOST=f"127.0.0.1:{port}")

    def losses() -> list[str]:
        return [r.getMessage() for r in caplog.records if "subscription lost" in r.getMessage()]

    await wait_until(lambda: len(losses()) >= 4)
    assert "not a Redis reply (a pmessage of 3 elements: bytes, bytes, bytes)" in losses()[0]
    # Each subscription lost at once is a flap: the wait before the next one grows.
    assert [line.rsplit(" flaps=", 1)[-1] for line in losses()[:4]] == ["1", "2", "3", "4"]
    status, _, _ = await http_request(daemon.port, "/health")
    assert status in (200, 503)  # still answering: subscribed for moments, then cut again


def test_failures_are_told_apart_by_their_errno_and_redis_answer() -> None:
    kinds = {
        _error_kind(redis.ConnectionError("Error 111 connecting to r:6379. Connection refused.")),
        _error_kind(redis.ConnectionError("Error -2 connecting to r:6379. Name not known.")),
        _error_kind(redis.ConnectionError("redis closed the connection")),
        _error_kind(redis.AuthenticationError("NOAUTH Authentication required.")),
        _error_kind(redis.AuthenticationError("WRONGPASS invalid username-password pair")),
    }
    assert len(kinds) == 5
    assert _error_kind(redis.ConnectionError("Error 111 connecting to s:1. Refused.")) in kinds


@pytest.mark.parametrize(
    ("exc", "tls", "hint"),
    [
        (redis.ConnectionError("Connection not ready"), False, "wrote before it was asked"),
        (ConnectionResetError(104, "Connection reset by peer"), False, "REDIS_USE_TLS?"),
        (ConnectionResetError(104, "Connection reset by peer"), True, ""),
        (redis.ConnectionError("Error 111 connecting to r:6379."), False, ""),
    ],
)
def test_an_attempts_error_says_what_redis_pys_words_do_not(
    exc: Exception, tls: bool, hint: str
) -> None:
    """A server that speaks first (an SSH banner, Redis at maxclients) gave only redis-py's
    "Connection not ready"; a TLS-only Redis only a reset."""
    config = Config(jwt_secret_key="x" * 32, redis_use_tls=tls)
    inbox: Any = None  # the hint needs no inbox
    worker = _Worker(config, inbox, SubscriberState(), Counters())
    said = worker._connect_hint(exc)
    assert (hint in said) if hint else said == ""
    worker.state.active = True  # a subscription that was up and is lost: no guessing
    assert worker._connect_hint(exc) == ""


@pytest.mark.parametrize(
    "reply",
    [
        [b"pmessage", b"user_noti:*", 5, b"{}"],
        [b"pmessage", b"user_noti:*", None, b"{}"],
        [b"pmessage", b"user_noti:*", b"user_noti:u", 7],
        [b"pmessage", b"user_noti:*", b"user_noti:u", [b"x"]],
        [b"pmessage", b"user_noti:*", b"user_noti:u"],
    ],
)
def test_a_pmessage_of_other_shapes_is_not_a_redis_reply(reply: list[Any]) -> None:
    """An integer channel reached the hub and was logged with a traceback as an
    internal_error (outside re-check): Redis sends bulk strings only."""
    config = Config(jwt_secret_key="x" * 32)
    inbox: Any = None
    worker = _Worker(config, inbox, SubscriberState(), Counters())
    batch: list[Any] = []
    with pytest.raises(redis.InvalidResponse, match="not a Redis reply"):
        worker._take(reply, batch)
    assert batch == []
    assert worker._take([b"pmessage", b"user_noti:*", b"user_noti:u", b"{}"], batch) == 2
    assert batch == [(b"user_noti:u", b"{}")]
