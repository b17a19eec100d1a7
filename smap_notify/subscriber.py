"""The Redis subscriber: PSUBSCRIBE user_noti:* in a worker thread, batches to the hub.

redis-py's synchronous client runs in one worker thread for the daemon's lifetime. The
thread detects a dead or wedged subscription itself (a PING on the subscribed
connection when nothing has arrived for a while), reconnects forever with capped,
jittered backoff, and tells the hub with a ``Resync`` marker when a lost subscription is
back, in order with the messages.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import redis
import trio
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from .config import Config
from .hub import Batch, RawMessage, Resync
from .inbox import Inbox
from .messages import CHANNEL_PATTERN
from .metrics import Counters

logger = logging.getLogger(__name__)

POLL_SECONDS: Final = 0.25
PROBE_AFTER: Final = 1.0  # silence after which the subscription is probed with PING
DEAD_AFTER: Final = 3.0  # silence after which the subscription is declared dead
BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 1.0
MAX_BATCH: Final = 256
COALESCE_SECONDS: Final = 0.0003  # lingering for more messages adds at most this latency
COALESCE_WHEN_WITHIN: Final = 0.002  # ... and only when the last hand-over was this recent
SOCKET_TIMEOUT: Final = 2.0


@attrs.define
class SubscriberState:
    """Shared with the event loop; written only by the subscriber thread."""

    active: bool = False
    state: str = "starting"  # starting, subscribed, retrying
    last_message_at: datetime | None = None
    last_error: str = ""
    heartbeat: float = attrs.Factory(time.monotonic)
    attempts: int = 0
    subscriptions: int = 0  # successful PSUBSCRIBEs so far


class SubscriptionDead(Exception):
    pass


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with jitter (half to full of the capped delay)."""
    capped = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt, 16)))
    return capped * (0.5 + 0.5 * (rng or random).random())


def make_client(config: Config, *, socket_timeout: float = SOCKET_TIMEOUT) -> redis.Redis:
    """A client that fails fast: reconnecting is the caller's job."""
    host, port = config.redis_address
    return redis.Redis(
        host=host,
        port=port,
        db=config.redis_db,
        password=config.redis_password or None,
        ssl=config.redis_use_tls,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        # RESP2: Pub/Sub messages are plain replies (RESP3 pushes bypass read_response).
        protocol=2,
        # No CLIENT SETINFO or maintenance-notification handshake: one round trip per connect.
        driver_info=None,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


async def run_redis_subscriber(
    config: Config,
    inbox: Inbox[Batch],
    state: SubscriberState,
    counters: Counters,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the subscriber thread until cancelled; started at once, subscribed or not."""
    worker = _Worker(config, inbox, state, counters)
    with inbox.send:
        task_status.started()
        await trio.to_thread.run_sync(worker.run, thread_name="redis-subscriber")


class _Worker:
    def __init__(
        self,
        config: Config,
        inbox: Inbox[Batch],
        state: SubscriberState,
        counters: Counters,
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.state = state
        self.counters = counters
        self.lost_at: datetime | None = None
        self.alive_at: float | None = None  # wall clock of the last reply from Redis
        self.ever_subscribed = False

    def run(self) -> None:
        state = self.state
        host = self.config.redis_host
        while True:
            trio.from_thread.check_cancelled()
            try:
                self._session()
            except (redis.RedisError, OSError, SubscriptionDead) as exc:
                error = f"{type(exc).__name__}: {exc}"
                state.last_error = error
                if state.active or state.state == "starting":
                    # A wedged connection was lost when it went silent, not when noticed.
                    self.lost_at = self.lost_at or datetime.fromtimestamp(
                        self.alive_at or time.time(), UTC
                    )
                    logger.warning(
                        "redis subscription %s, retrying redis=%s error=%s",
                        "lost" if state.active else "unavailable",
                        host,
                        error,
                    )
                elif state.attempts % 30 == 0:
                    logger.warning(
                        "redis still unavailable redis=%s attempts=%d error=%s",
                        host,
                        state.attempts,
                        error,
                    )
                else:
                    logger.debug("redis reconnect failed redis=%s error=%s", host, error)
                state.active = False
                state.state = "retrying"
            delay = backoff_delay(state.attempts)
            state.attempts += 1
            self._sleep(delay)

    def _waiting(self) -> None:
        trio.from_thread.check_cancelled()
        self.state.heartbeat = time.monotonic()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._waiting()
            time.sleep(min(left, 0.1))

    def _session(self) -> None:
        client = make_client(self.config)
        pubsub = client.pubsub(ignore_subscribe_messages=False)
        try:
            pubsub.psubscribe(CHANNEL_PATTERN)
            self._listen(pubsub)
        finally:
            try:
                pubsub.close()
                client.close()
            except Exception:  # closing a broken connection must not hide why it broke
                logger.debug("closing redis connection failed", exc_info=True)

    def _listen(self, pubsub: Any) -> None:
        # Replies are read straight off the subscribed connection: PubSub.get_message
        # builds a dict and runs its handler bookkeeping for every message.
        conn = pubsub.connection
        state = self.state
        last_rx = time.monotonic()
        probed_at = 0.0
        handed_at = 0.0
        while True:
            trio.from_thread.check_cancelled()
            state.heartbeat = time.monotonic()
            if not conn.can_read(timeout=POLL_SECONDS):
                now = time.monotonic()
                silent = now - last_rx
                if silent > DEAD_AFTER:
                    raise SubscriptionDead(f"no reply from redis for {silent:.1f}s")
                if silent > PROBE_AFTER and now - probed_at > PROBE_AFTER:
                    pubsub.ping()
                    probed_at = now
                continue
            last_rx = time.monotonic()
            self.alive_at = time.time()
            batch: list[RawMessage] = []
            # Under a steady stream, linger briefly for the next message: every hand-over
            # costs two thread wake-ups, which would otherwise be paid per message.
            linger = COALESCE_SECONDS if last_rx - handed_at < COALESCE_WHEN_WITHIN else 0.0
            while True:
                self._take(conn.read_response(), batch)
                if len(batch) >= MAX_BATCH:
                    break
                if not conn.can_read(timeout=0):
                    if not linger or not conn.can_read(timeout=linger):
                        break
                    linger = 0.0
            if batch:
                state.last_message_at = datetime.fromtimestamp(self.alive_at, UTC)
                self.inbox.put_from_thread(batch, self._waiting)
                handed_at = time.monotonic()

    def _take(self, reply: Any, batch: list[RawMessage]) -> None:
        kind = reply[0] if isinstance(reply, list) else reply
        if kind == b"pmessage":
            batch.append((reply[2], reply[3]))
        elif kind == b"psubscribe":
            self._subscribed()
        # pong (our probe) and anything else only prove the connection is alive

    def _subscribed(self) -> None:
        state = self.state
        lost_at = self.lost_at
        if lost_at is None:
            logger.info(
                "redis subscribed pattern=%s redis=%s", CHANNEL_PATTERN, self.config.redis_host
            )
        else:
            outage = (datetime.now(UTC) - lost_at).total_seconds()
            if self.ever_subscribed:
                self.counters.redis_reconnects += 1
            logger.warning(
                "redis subscription %s pattern=%s outage=%.1fs attempts=%d",
                "restored" if self.ever_subscribed else "established",
                CHANNEL_PATTERN,
                outage,
                state.attempts,
            )
            # Clients connected during the outage may have missed messages: tell them.
            reason = "redis_reconnected" if self.ever_subscribed else "redis_connected"
            since = lost_at.isoformat(timespec="microseconds")
            self.inbox.put_from_thread(Resync(reason, since), self._waiting)
        self.ever_subscribed = True
        self.lost_at = None
        self.alive_at = time.time()
        state.subscriptions += 1
        state.active = True
        state.state = "subscribed"
        state.attempts = 0
        state.last_error = ""
