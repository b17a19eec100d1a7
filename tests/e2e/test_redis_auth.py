"""REDIS_PASSWORD against a real redis-server with ``requirepass``: the subscriber and
the health check authenticate; a wrong password is reported (never the password itself)
and retried, not fatal."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from tests.support.daemon import Daemon, http_request, wait_until
from tests.support.redis import RedisServer

PASSWORD: Final = "s3cret-redis-pass-for-tests"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Overrides conftest's: ``start_daemon`` then points the daemon at this one."""
    with RedisServer(tmp_path, password=PASSWORD) as server:
        yield server


async def test_the_right_password_subscribes_delivers_and_health_is_200(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(REDIS_PASSWORD=PASSWORD)
    ws = await daemon.connect("alice", nursery=nursery)
    await daemon.wait_connections(1)
    assert await daemon.publish("alice", {"type": "alert", "payload": "hi"}) == 1
    with trio.fail_after(10):
        assert json.loads(await ws.get_message())["payload"] == "hi"
    status, _, body = await http_request(daemon.port, "/health")
    assert status == 200, body


@pytest.mark.parametrize("password", ["wrong-password", ""])
async def test_a_wrong_or_missing_password_is_reported_without_the_password(
    start_daemon: Any,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    password: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="smap_notify")
    daemon: Daemon = await start_daemon(wait_subscribed=False, REDIS_PASSWORD=password)
    subscriber = daemon.app.subscriber
    await wait_until(lambda: subscriber.state == "retrying" and bool(subscriber.last_error))
    assert "REDIS_PASSWORD?" in subscriber.last_error, subscriber.last_error
    status, _, body = await http_request(daemon.port, "/health")
    assert status == 503, body
    assert "REDIS_PASSWORD?" in json.loads(body)["subscriber"]["last_error"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("Authentication" in line for line in warnings), warnings
    everything = "\n".join(r.getMessage() for r in caplog.records) + body.decode()
    for secret in {password, PASSWORD} - {""}:
        assert secret not in everything


async def test_redis_back_with_a_password_is_said_at_once_not_at_the_30th_attempt(
    start_daemon: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    with RedisServer(tmp_path) as plain:
        daemon: Daemon = await start_daemon(REDIS_HOST=f"127.0.0.1:{plain.port}")
        plain.kill()
        await wait_until(lambda: "subscription lost" in caplog.text)
        plain.password = PASSWORD  # the same Redis comes back, now asking for a password
        plain.start()

        def said() -> bool:
            return any(
                r.levelno == logging.WARNING and "REDIS_PASSWORD?" in r.getMessage()
                for r in caplog.records
            )

        await wait_until(said, timeout=5)
        assert daemon.app.subscriber.attempts < 30
