"""The /health document, and the Redis PING behind it (guarded by a circuit breaker)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Final

import attrs
import redis
import trio

from .breaker import CircuitBreaker
from .channels import DEFAULT
from .config import Config
from .redis_client import REDIS_FAILURES, Address, Locator, make_client, not_redis
from .subscriber import SubscriberState

PING_TIMEOUT: Final = 1.0


@attrs.frozen
class RedisHealth:
    connected: bool
    ping_ms: float | None = None
    error: str | None = None
    loading: bool = False  # answering LOADING: Pub/Sub works, data commands wait

    def as_json(self) -> dict[str, Any]:
        if self.connected:
            doc: dict[str, Any] = {"status": "connected", "ping_ms": self.ping_ms}
            if self.loading:
                doc["loading"] = True
            return doc
        return {"status": "disconnected", "error": self.error}


class RedisProbe:
    """PING Redis on its own connection; one call in flight, none while the breaker is open.

    Concurrent health requests share the call in flight, so an outage never piles up
    threads or slow responses.
    """

    def __init__(
        self,
        config: Config,
        breaker: CircuitBreaker | None = None,
        locator: Locator | None = None,
    ) -> None:
        self.breaker = breaker or CircuitBreaker()
        self._config = config
        self._locator = locator
        self._master: Address | None = None  # the one self._client talks to
        self._client = make_client(config, socket_timeout=PING_TIMEOUT)
        self._limiter = trio.CapacityLimiter(1)
        self._in_flight: trio.Event | None = None
        self._last = RedisHealth(False, error="not checked yet")
        self._subscriptions_seen = 0

    async def check(self, subscriptions: int = 0) -> RedisHealth:
        """PING Redis; ``subscriptions`` (the subscriber's count of successful subscribes)
        changing means Redis is back, so an open breaker tries again at once."""
        if subscriptions != self._subscriptions_seen:
            self._subscriptions_seen = subscriptions
            self.breaker.retry_now()
        if self._in_flight is not None:
            await self._in_flight.wait()
            return self._last
        if not self.breaker.allow(trio.current_time()):
            return RedisHealth(False, error=f"circuit open after: {self._last.error}")
        done = self._in_flight = trio.Event()
        try:
            # Abandoned when cancelled: a stop never waits for a PING stuck on a stopped
            # Redis (up to PING_TIMEOUT, longer than a short SHUTDOWN_TIMEOUT). The
            # thread ends by its own timeout; the limiter stays taken until then.
            self._last = await trio.to_thread.run_sync(
                self._ping, limiter=self._limiter, abandon_on_cancel=True
            )
            if self._last.connected:
                self.breaker.record_success()
            else:
                self.breaker.record_failure(trio.current_time())
        finally:
            self._in_flight = None
            done.set()
        return self._last

    def _ping(self) -> RedisHealth:
        start = time.perf_counter()
        loading = False
        try:
            if self._locator is not None:
                self._follow(self._locator.probe_address())
            self._client.ping()
        except redis.BusyLoadingError:
            # Redis answers, still loading its dataset; the subscription is unaffected.
            loading = True
        except REDIS_FAILURES as exc:
            if isinstance(exc, ValueError | redis.InvalidResponse):
                exc = not_redis(exc)  # redis-py's words for it differ between releases
            return RedisHealth(False, error=f"{type(exc).__name__}: {exc}")
        ms = round((time.perf_counter() - start) * 1000, 3)
        return RedisHealth(True, ping_ms=ms, loading=loading)

    def _follow(self, master: Address) -> None:
        """PING ``master`` from now on (the sentinels' master, a live cluster node)."""
        if master != self._master:
            self._client.close()
            self._client = make_client(
                self._config, socket_timeout=PING_TIMEOUT, address=master.pair
            )
            self._master = master

    def close(self) -> None:
        self._client.close()


def health_document(
    *,
    redis_health: RedisHealth,
    subscriber: SubscriberState,
    sentinel_master: str = "",
    cluster: bool = False,
    connections: int,
    users: int,
    circuit_state: str,
    draining: bool,
    timestamp: str,
    uptime: float,
    pattern: str = DEFAULT.patterns[0],
    mode: str = "pattern",
) -> tuple[int, dict[str, Any]]:
    """Status code and body: 200 only when Redis answers and the subscription is live."""
    if draining:
        status = "draining"
    elif redis_health.connected and subscriber.active:
        status = "healthy"
    else:
        status = "degraded"
    last: datetime | None = subscriber.last_message_at
    doc = {
        "status": status,
        "timestamp": timestamp,
        "redis": redis_health.as_json(),
        "websocket": {"active_connections": connections, "total_unique_users": users},
        "subscriber": {
            "active": subscriber.active,
            "last_message_at": last.isoformat(timespec="microseconds") if last else None,
            "pattern": pattern,  # comma-joined, one per CHANNELS template
            "mode": mode,  # REDIS_SUBSCRIBE
            # Channels and patterns held, as Redis counted them at its last confirmation.
            "channels": subscriber.channels,
            "state": subscriber.state,
            "last_error": subscriber.last_error or None,
        },
        "circuit_breaker": {"state": circuit_state},
        "uptime_seconds": int(uptime),
    }
    if sentinel_master:
        # The master subscribed to, as the sentinels named it; null while none is.
        doc["sentinel"] = {"master_name": sentinel_master, "master": subscriber.master}
    if cluster and subscriber.shards is not None:
        # Sharded Pub/Sub: every master subscribed on (up), or owning wanted channels and
        # not answering (down); "node" is null, there is no single one.
        doc["cluster"] = {
            "node": None,
            "pubsub": "sharded",
            "nodes": len(subscriber.shards),
            "down": [s.node for s in subscriber.shards if not s.up],
            "shards": [
                {"node": s.node, "up": s.up, "channels": s.channels, "error": s.error or None}
                for s in subscriber.shards
            ],
        }
    elif cluster:
        # The cluster node subscribed on; null while none is.
        doc["cluster"] = {"node": subscriber.master}
    return (200 if status == "healthy" else 503), doc
