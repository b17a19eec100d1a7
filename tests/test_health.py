"""The /health document (CONTRACT section 6): healthy only when Redis and the subscriber are."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from smap_notify.config import load_config
from smap_notify.health import RedisHealth, RedisProbe, health_document
from smap_notify.shards import ShardNode
from smap_notify.subscriber import SubscriberState
from tests.support.daemon import SECRET
from tests.support.redis import RedisServer

# Copied from the contract (shared/spec/samples) so the tests run from any checkout.
SAMPLES = Path(__file__).resolve().parent / "samples"
UP = RedisHealth(True, ping_ms=0.5)
DOWN = RedisHealth(False, error="ConnectionError: connection refused")
LAST = datetime(2025, 12, 7, 9, 59, 55, 250000, tzinfo=UTC)


def subscriber(active: bool = True, last: datetime | None = LAST, **kw: Any) -> SubscriberState:
    state = SubscriberState(active=active, state="subscribed" if active else "retrying", **kw)
    state.last_message_at = last
    return state


def document(
    redis_health: RedisHealth = UP,
    sub: SubscriberState | None = None,
    *,
    draining: bool = False,
    **overrides: Any,
) -> tuple[int, dict[str, Any]]:
    kwargs: dict[str, Any] = {
        "redis_health": redis_health,
        "subscriber": sub if sub is not None else subscriber(),
        "connections": 150,
        "users": 75,
        "circuit_state": "closed",
        "draining": draining,
        "timestamp": "2025-12-07T17:00:00.500000+07:00",
        "uptime": 86400.9,
    }
    kwargs.update(overrides)
    return health_document(**kwargs)


def keys_of(doc: Any, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return set()
    out = set()
    for key, value in doc.items():
        out.add(prefix + key)
        out |= keys_of(value, f"{prefix}{key}.")
    return out


# -- status --------------------------------------------------------------------------------


def test_healthy_and_200_when_redis_answers_and_subscriber_is_active() -> None:
    status, doc = document()
    assert status == 200
    assert doc["status"] == "healthy"


@pytest.mark.parametrize(("redis_health", "active"), [(DOWN, True), (UP, False), (DOWN, False)])
def test_degraded_and_503_otherwise(redis_health: RedisHealth, active: bool) -> None:
    status, doc = document(redis_health, subscriber(active=active))
    assert status == 503
    assert doc["status"] == "degraded"
    assert doc["subscriber"]["active"] is active


@pytest.mark.parametrize(("redis_health", "active"), [(UP, True), (DOWN, False)])
def test_draining_is_503(redis_health: RedisHealth, active: bool) -> None:
    status, doc = document(redis_health, subscriber(active=active), draining=True)
    assert status == 503
    assert doc["status"] != "healthy"


# -- shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["healthy", "degraded"])
def test_document_has_every_key_of_the_original(case: str) -> None:
    original = json.loads((SAMPLES / "http_health_response.json").read_text())[case]
    _, doc = document(UP if case == "healthy" else DOWN)
    assert keys_of(original) <= keys_of(doc)
    assert list(doc)[:2] == ["status", "timestamp"]


def test_contract_shape_values() -> None:
    _, doc = document()
    assert doc["timestamp"] == "2025-12-07T17:00:00.500000+07:00"
    assert doc["redis"] == {"status": "connected", "ping_ms": 0.5}
    assert doc["websocket"] == {"active_connections": 150, "total_unique_users": 75}
    assert doc["subscriber"]["active"] is True
    assert doc["subscriber"]["pattern"] == "user_noti:*"
    assert doc["uptime_seconds"] == 86400
    assert isinstance(doc["uptime_seconds"], int)


def test_disconnected_redis_reports_the_error_and_no_ping() -> None:
    _, doc = document(DOWN)
    assert doc["redis"] == {"status": "disconnected", "error": DOWN.error}


def test_document_is_json_serialisable() -> None:
    for args in ((UP, subscriber()), (DOWN, subscriber(active=False, last=None))):
        _, doc = document(*args)
        assert json.loads(json.dumps(doc)) == doc


def test_circuit_breaker_state_is_reported() -> None:
    _, doc = document(DOWN, circuit_state="open")
    assert doc["circuit_breaker"] == {"state": "open"}


def test_subscriber_error_is_reported_and_empty_error_is_null() -> None:
    _, failing = document(sub=subscriber(active=False, last_error="TimeoutError: no reply"))
    assert failing["subscriber"]["last_error"] == "TimeoutError: no reply"
    assert failing["subscriber"]["state"] == "retrying"
    _, fine = document()
    assert fine["subscriber"]["last_error"] is None


# -- last_message_at -----------------------------------------------------------------------


def test_last_message_at_is_null_before_the_first_message() -> None:
    _, doc = document(sub=subscriber(last=None))
    assert doc["subscriber"]["last_message_at"] is None
    assert "0001-01-01" not in json.dumps(doc)


def test_last_message_at_is_rfc3339_with_offset() -> None:
    _, doc = document()
    text = doc["subscriber"]["last_message_at"]
    assert text == "2025-12-07T09:59:55.250000+00:00"
    assert datetime.fromisoformat(text) == LAST


def test_last_message_at_keeps_a_local_offset() -> None:
    local = LAST.astimezone(timezone(timedelta(hours=7)))
    _, doc = document(sub=subscriber(last=local))
    parsed = datetime.fromisoformat(doc["subscriber"]["last_message_at"])
    assert parsed == LAST
    assert parsed.utcoffset() == timedelta(hours=7)


def test_no_message_yet_does_not_make_the_service_degraded() -> None:
    status, _ = document(sub=subscriber(last=None))
    assert status == 200


async def test_a_stop_does_not_wait_for_a_ping_stuck_on_a_stopped_redis(
    redis_server: RedisServer,
) -> None:
    """With SHUTDOWN_TIMEOUT under 1 s, a /health PING stuck on a SIGSTOPped Redis held
    the process for its whole PING_TIMEOUT (1 s): cancelling the check waited for the
    thread. The check now lets go at once; the thread ends on its own timeout."""
    finished = threading.Event()

    class Probe(RedisProbe):
        def _ping(self) -> RedisHealth:
            try:
                return super()._ping()
            finally:
                finished.set()

    config = load_config({"JWT_SECRET_KEY": SECRET, "REDIS_HOST": f"127.0.0.1:{redis_server.port}"})
    probe = Probe(config)
    assert (await probe.check()).connected
    finished.clear()
    redis_server.pause()
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe.check)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert not finished.is_set(), "the stop waited for the PING"
    finally:
        redis_server.resume()
    await trio.to_thread.run_sync(finished.wait, 10)
    probe.close()


class CountingProbe(RedisProbe):
    """A probe whose PING answers ``up`` at once and is counted; no Redis involved."""

    def __init__(self) -> None:
        super().__init__(load_config({"JWT_SECRET_KEY": SECRET, "REDIS_HOST": "127.0.0.1:1"}))
        self.up = False
        self.pings = 0

    def _ping(self) -> RedisHealth:
        self.pings += 1
        return UP if self.up else DOWN


async def opened_probe() -> CountingProbe:
    probe = CountingProbe()
    for _ in range(probe.breaker.failure_threshold):
        assert not (await probe.check()).connected
    assert probe.breaker.state == "open" and probe.pings == probe.breaker.failure_threshold
    return probe


async def test_an_open_breaker_answers_without_a_ping_until_its_reset(
    mock_clock: trio.testing.MockClock,
) -> None:
    probe = await opened_probe()
    pings = probe.pings
    mock_clock.jump(probe.breaker.reset_after - 0.001)
    for _ in range(10):
        health = await probe.check()
        assert health.error == f"circuit open after: {DOWN.error}"
    assert probe.pings == pings
    mock_clock.jump(0.001)
    probe.up = True
    assert (await probe.check()).connected, "one trial once reset_after has passed"
    assert probe.pings == pings + 1 and probe.breaker.state == "closed"
    probe.close()


async def test_a_new_subscription_lets_the_next_ping_through_an_open_breaker(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Redis is back when the subscriber subscribed again: /health says 200 at once
    instead of after the breaker's reset_after."""
    probe = await opened_probe()
    probe.up = True
    assert not (await probe.check(subscriptions=0)).connected
    assert (await probe.check(subscriptions=1)).connected
    assert probe.breaker.state == "closed"
    probe.close()


async def test_concurrent_checks_share_one_ping() -> None:
    probe = CountingProbe()
    answers: list[RedisHealth] = []

    async def check() -> None:
        answers.append(await probe.check())

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(check)
    assert answers == [DOWN] * 100 and probe.pings == 1
    probe.close()


def test_sharded_pubsub_lists_each_master_and_the_ones_down() -> None:
    shards = (
        ShardNode("127.0.0.1:7000", True, 12, ""),
        ShardNode("127.0.0.1:7001", False, 0, "ConnectionError: refused"),
    )
    status, doc = document(
        sub=subscriber(active=False, channels=12, shards=shards), cluster=True, mode="user"
    )
    assert status == 503
    assert doc["subscriber"]["mode"] == "user" and doc["subscriber"]["channels"] == 12
    assert doc["cluster"] == {
        "node": None,
        "pubsub": "sharded",
        "nodes": 2,
        "down": ["127.0.0.1:7001"],
        "shards": [
            {"node": "127.0.0.1:7000", "up": True, "channels": 12, "error": None},
            {
                "node": "127.0.0.1:7001",
                "up": False,
                "channels": 0,
                "error": "ConnectionError: refused",
            },
        ],
    }
