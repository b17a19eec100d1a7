"""The Redis subscriber: PSUBSCRIBE CHANNELS' patterns in a worker thread, batches to the hub.

redis-py's synchronous client runs in one worker thread for the daemon's lifetime. The
thread detects a dead or wedged subscription itself (a PING on the subscribed
connection when nothing has arrived for a while), reconnects forever with capped,
jittered backoff, and tells the hub with a ``Resync`` marker when a lost subscription is
back, in order with the messages.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import attrs
import redis
import trio

from .config import Config
from .hub import InboxItem, RawMessage, Resync, ResyncReason
from .inbox import Inbox
from .metrics import Counters
from .outage import Outage, Report
from .redis_client import (
    CLOSED_BY_REDIS,
    PASSWORD_HINT,
    REDIS_FAILURES,
    Address,
    Locator,
    MasterMoved,
    SubscriptionDead,
    error_reply,
    make_client,
    not_redis,
    reconnect_delay,
)
from .resp import (
    MAX_BATCH,
    Replies,
)
from .subscriptions import Requests, Subscription, batches

if TYPE_CHECKING:
    from .shards import ShardNode

logger = logging.getLogger(__name__)

POLL_SECONDS: Final = 0.25
PROBE_AFTER: Final = 1.0  # silence after which the subscription is probed with PING
DEAD_AFTER: Final = 3.0  # silence after which the subscription is declared dead
STALLED_AFTER: Final = 1.0  # a longer gap between two turns of the loop: this thread stalled
# Before handing a batch over, the thread lingers for more messages when the stream is
# steady: every hand-over costs both threads a wake-up whatever the batch holds, so fewer,
# larger batches cost less per message, for at most MAX_LINGER of latency. Slower than
# STEADY_RATE (measured over RATE_WINDOW) nothing lingers: most messages would wait for
# nothing. From STEADY_RATE about one gap between messages; from FAST_RATE LONG_LINGER,
# growing with the rate up to MAX_LINGER. bench/profile-notes.rst has the measurements
# behind these figures.
STEADY_RATE: Final = 1500.0
FAST_RATE: Final = 3000.0
LONG_LINGER: Final = 0.0009
LINGER_PER_RATE: Final = 1e-7  # seconds of linger per message/s
MAX_LINGER: Final = 0.003
RATE_WINDOW: Final = 0.01
_COMMANDS: Final = {
    ("subscribe", True): "SUBSCRIBE",
    ("subscribe", False): "UNSUBSCRIBE",
    ("psubscribe", True): "PSUBSCRIBE",
    ("psubscribe", False): "PUNSUBSCRIBE",
}


# Tuples, not sets: a reply's first element need not be hashable (a peer that is not Redis).
_SUBSCRIBED: Final = (b"subscribe", b"psubscribe")
_UNSUBSCRIBED: Final = (b"unsubscribe", b"punsubscribe")
_PONG: Final = (b"pong", b"PONG")  # subscribed, or holding nothing yet


@attrs.define
class SubscriberState:
    """Shared with the event loop; written only by the subscriber thread."""

    active: bool = False
    state: str = "starting"  # starting, subscribed, retrying
    last_message_at: datetime | None = None
    last_error: str = ""
    heartbeat: float = attrs.Factory(time.monotonic)
    attempts: int = 0
    subscriptions: int = 0  # successful subscriptions (connections to Redis) so far
    channels: int = 0  # channels and patterns held, as Redis last counted them
    # With sentinels or a cluster: the server subscribed on (host:port), None while none is.
    master: str | None = None
    # REDIS_PUBSUB=sharded: each master subscribed on or down; None in classic Pub/Sub.
    shards: tuple[ShardNode, ...] | None = None


@attrs.define
class Patterns:
    """The patterns the subscription is to hold (CHANNELS). The event loop replaces the
    tuple whole on a reload; the subscriber thread, the only one that talks to its Redis
    connection (redis-py's PubSub is not thread-safe), reads it each turn and
    re-subscribes."""

    wanted: tuple[str, ...]


@attrs.define
class Coalescer:
    """How long the subscriber lingers for more messages before a hand-over.

    Pure: fed the monotonic clock and the size of each hand-over.
    """

    window_start: float = -1e9
    window_count: int = 0
    rate: float = 0.0  # messages/s over the last complete window

    def linger(self, now: float, batched: int) -> float:
        """Seconds to wait for more before handing over ``batched`` messages read at ``now``."""
        # A rate from a window that ended long ago says nothing about this stream.
        if batched >= MAX_BATCH or now - self.window_start >= 2 * RATE_WINDOW:
            return 0.0
        if self.rate >= FAST_RATE:
            return min(MAX_LINGER, max(LONG_LINGER, self.rate * LINGER_PER_RATE))
        if self.rate >= STEADY_RATE:
            return min(LONG_LINGER, 1.0 / self.rate)
        return 0.0

    def handed_over(self, now: float, count: int) -> None:
        self.window_count += count
        elapsed = now - self.window_start
        if elapsed >= RATE_WINDOW:
            self.rate = self.window_count / elapsed
            self.window_start = now
            self.window_count = 0


async def run_redis_subscriber(
    config: Config,
    inbox: Inbox[InboxItem],
    state: SubscriberState,
    counters: Counters,
    patterns: Patterns | None = None,
    requests: Requests | None = None,
    locator: Locator | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the subscriber thread until cancelled; started at once, subscribed or not.
    With ``requests`` (REDIS_SUBSCRIBE=user) it holds what they ask, not ``patterns``.
    With a ``locator`` (Sentinel, Cluster), its watch runs in a second thread."""
    worker = _Worker(config, inbox, state, counters, patterns, requests, locator)
    with inbox.send:
        async with trio.open_nursery() as nursery:
            if locator is not None:
                nursery.start_soon(
                    partial(trio.to_thread.run_sync, locator.watch, thread_name="redis-locator")
                )
            task_status.started()
            await trio.to_thread.run_sync(worker.run, thread_name="redis-subscriber")


def _error_kind(exc: Exception) -> str:
    """What kind of failure: the exception and the start of its text (``NOAUTH``,
    ``Error 111`` of "Error 111 connecting to ...", ``redis`` of "redis closed the ...")."""
    words = str(exc).split(" ", 2)
    return f"{type(exc).__name__}:{' '.join(words[:2] if words[0] == 'Error' else words[:1])}"


class _Worker:
    def __init__(
        self,
        config: Config,
        inbox: Inbox[InboxItem],
        state: SubscriberState,
        counters: Counters,
        patterns: Patterns | None = None,
        requests: Requests | None = None,
        locator: Locator | None = None,
    ) -> None:
        self.config = config
        self.locator = locator
        self.master: Address | None = None  # with a locator: the one connected to
        self.inbox = inbox
        self.state = state
        self.counters = counters
        self.patterns = patterns or Patterns(config.channels.patterns)
        self.requests = requests
        # The channel and data of the reply just read, if it was a ``message``: Redis
        # writes a PUBLISH's ``message`` and ``pmessage`` to one subscriber back to back,
        # so a ``pmessage`` right after it with the same channel and data is that
        # publication again (held by a channel and a per-user pattern at once, while the
        # plan moves from one to the other).
        self._exact: tuple[bytes, bytes] | None = None
        self._confirmed: list[Subscription] = []
        self.subscribed_patterns: tuple[str, ...] = ()  # asked for on this connection
        self.unconfirmed = 0  # PSUBSCRIBE confirmations before the subscription is made
        self.alive_at: float | None = None  # wall clock of the last reply from Redis
        self.outage = Outage()
        # The last look at the socket found it empty: delivery had caught up. A cut that
        # comes then is not Redis's output limit at work, however recent a backlog was.
        self.kept_up = True

    def run(self) -> None:
        state = self.state
        while True:
            trio.from_thread.check_cancelled()
            try:
                self._session()
            except (*REDIS_FAILURES, SubscriptionDead) as exc:
                behind = self._behind_hint(exc)
                error = f"{type(exc).__name__}: {exc}" + (
                    behind or self._closed_hint(exc) or self._connect_hint(exc)
                )
                state.last_error = error
                report = self.outage.failed(
                    monotonic=time.monotonic(),
                    wall=time.time(),
                    active=state.active,
                    starting=state.state == "starting",
                    moved=isinstance(exc, MasterMoved),
                    alive_at=self.alive_at,
                    behind=bool(behind),
                    kind=_error_kind(exc),
                    attempts=state.attempts,
                )
                if report is Report.LOST:
                    flaps = self.outage.flaps
                    logger.warning(
                        "redis subscription %s, retrying redis=%s error=%s%s",
                        "lost" if state.active else "unavailable",
                        self._where(),
                        error,
                        f" flaps={flaps}" if state.active and flaps else "",
                    )
                elif report is Report.STILL_DOWN:
                    logger.warning(
                        "redis still unavailable redis=%s attempts=%d error=%s",
                        self._where(),
                        state.attempts,
                        error,
                    )
                else:
                    logger.debug("redis reconnect failed redis=%s error=%s", self._where(), error)
                state.active = False
                state.master = None
                state.state = "retrying"
                state.channels = 0
                if self.requests is not None:
                    self.requests.lost()
            delay = reconnect_delay(state.attempts, self.outage.flaps)
            state.attempts += 1
            self._sleep(delay)

    def _where(self) -> str:
        """The Redis of the log lines: REDIS_HOST, or the server the locator named."""
        if self.locator is None:
            return self.config.redis_host
        return self.locator.describe(self.master)

    def _connect_hint(self, exc: Exception) -> str:
        """What an attempt's error means when redis-py's words do not say it."""
        if self.state.active:
            return ""
        if isinstance(exc, redis.ConnectionError) and str(exc) == "Connection not ready":
            # redis-py's pool found data waiting on a new connection before any command.
            return (
                " (the server wrote before it was asked: not a Redis server, or a Redis"
                " refusing new clients, e.g. at its maxclients)"
            )
        if isinstance(exc, redis.AuthenticationError):
            return PASSWORD_HINT
        if isinstance(exc, ConnectionResetError) and not self.config.redis_use_tls:
            return " (a Redis that accepts only TLS resets plain connections: REDIS_USE_TLS?)"
        return ""

    def _behind_hint(self, exc: Exception) -> str:
        """Why Redis may have closed a subscription that had fallen behind.

        Redis cuts a subscriber whose unsent replies pass its output limit; the daemon then
        reads the backlog that reached its socket, in full batches, up to the close.
        """
        if (
            isinstance(exc, redis.ConnectionError | ConnectionError)
            and self.state.active
            and not self.kept_up
            and self.outage.was_behind(time.monotonic())
        ):
            return (
                " (delivery was behind the publishers: Redis may have closed the"
                " subscriber at its client-output-buffer-limit for pubsub)"
            )
        return ""

    def _closed_hint(self, exc: Exception) -> str:
        """Why Redis may have closed a subscription that kept up."""
        if self.state.active and str(exc) == CLOSED_BY_REDIS:
            return (
                " (by Redis: a restart, CLIENT KILL, or a single message larger than its"
                " client-output-buffer-limit for pubsub)"
            )
        return ""

    def _waiting(self) -> None:
        trio.from_thread.check_cancelled()
        self.state.heartbeat = time.monotonic()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._waiting()
            time.sleep(min(left, 0.1))

    def _session(self) -> None:
        address = None
        if self.locator is not None:
            self.master = self.locator.find(self._waiting)
            address = self.master.pair
        client = make_client(self.config, address=address)
        pubsub = client.pubsub(ignore_subscribe_messages=False)
        self._exact = None
        try:
            wanted = self.patterns.wanted
            self.subscribed_patterns = wanted
            try:
                if self.requests is None:
                    self.unconfirmed = len(wanted)
                    pubsub.psubscribe(*wanted)
                    self.counters.redis_subscribe_commands += 1
                else:
                    # Every channel in batches, then a PING: Redis answers in order, so
                    # its PONG says all of them are confirmed.
                    self.unconfirmed = 1
                    self._send(pubsub, self.requests.snapshot(), True)
                    pubsub.ping()
            except (ValueError, redis.InvalidResponse) as exc:
                # redis-py parsed an answer to AUTH or SELECT that Redis never gives; which
                # exception it raises for that differs between its releases.
                raise not_redis(exc) from None
            self._listen(pubsub)
        finally:
            try:
                pubsub.close()
                client.close()
            except Exception:  # closing a broken connection must not hide why it broke
                logger.debug("closing redis connection failed", exc_info=True)

    def _send(self, pubsub: Any, subs: list[Subscription], subscribe: bool) -> None:
        """(P)SUBSCRIBE or (P)UNSUBSCRIBE ``subs``, many per command: written straight to
        the subscribed connection, which this thread alone uses (``PubSub``'s own lock and
        retry have nothing to guard, and a failed write ends the session)."""
        for kind, names in batches(subs):
            if pubsub.connection is None:  # the session's first command connects
                pubsub.execute_command(_COMMANDS[kind, subscribe], *names)
            else:
                pubsub.connection.send_command(
                    _COMMANDS[kind, subscribe], *names, check_health=False
                )
            if subscribe:
                self.counters.redis_subscribe_commands += 1
            else:
                self.counters.redis_unsubscribe_commands += 1

    def _apply(self, pubsub: Any, requests: Requests) -> None:
        """Issue what the plan changed since the last turn: subscriptions first, so that a
        channel that moves to a pattern (or back) is never held by neither."""
        changes = requests.take_changes()
        self._send(pubsub, [s for s, on in changes.items() if on], True)
        self._send(pubsub, [s for s, on in changes.items() if not on], False)

    def _listen(self, pubsub: Any) -> None:
        replies = Replies(pubsub.connection)
        requests = self.requests
        if requests is not None:
            replies.wake_on(requests.wake_fd)
        state = self.state
        last_rx = time.monotonic()
        probed_at = 0.0
        coalescer = Coalescer()
        locator, master = self.locator, self.master
        looked_empty = False
        while True:
            trio.from_thread.check_cancelled()
            if locator is not None and (named := locator.current()) != master:
                # A demoted master stays up as a replica, where nothing is published; a
                # node the cluster failed may stay up, cut off from the publishers.
                raise MasterMoved(locator.moved(named))
            if requests is not None:
                if requests.pending:
                    self._apply(pubsub, requests)
            elif self.patterns.wanted != self.subscribed_patterns:
                self._resubscribe(pubsub)
            turn = time.monotonic()
            stalled = turn - state.heartbeat > STALLED_AFTER
            state.heartbeat = turn
            # The last look found the socket empty, or this one does: caught up.
            self.kept_up = looked_empty or not replies.wait(0)
            looked_empty = False
            if self.kept_up and requests is not None and requests.pending:
                continue  # woken by a change: issue it before waiting
            if self.kept_up and not replies.wait(POLL_SECONDS):
                looked_empty = True  # woken by a change, or the poll timed out
                now = time.monotonic()
                stalled = stalled or now - turn > POLL_SECONDS + STALLED_AFTER
                if stalled:
                    # This thread did not run (the process was stopped, the VM paused):
                    # that silence is not Redis's. Probe now; dead only if the probe goes
                    # unanswered.
                    last_rx = max(last_rx, now - PROBE_AFTER)
                silent = now - last_rx
                if silent > DEAD_AFTER:
                    raise SubscriptionDead(f"no reply from redis for {silent:.1f}s")
                if stalled or (silent > PROBE_AFTER and now - probed_at > PROBE_AFTER):
                    pubsub.ping()
                    probed_at = now
                continue
            last_rx = time.monotonic()
            self.alive_at = time.time()
            batch: list[RawMessage] = []
            try:
                replies.read(self._take, batch)
                # Under a steady stream, linger briefly for the next messages: every
                # hand-over costs two thread wake-ups, which would otherwise be paid per
                # message.
                linger = coalescer.linger(last_rx, MAX_BATCH if replies.more else len(batch))
                if linger and replies.linger(linger):
                    replies.read(self._take, batch)
            finally:
                # Also when the read ended in the connection's close: what was read before
                # it is delivered (ahead of the resync that follows the reconnect).
                if batch:
                    handed_at = self._hand_over(batch, full=replies.more)
                    coalescer.handed_over(handed_at, len(batch))
                if self._confirmed:
                    assert requests is not None
                    requests.confirmed(self._confirmed)
                    self._confirmed = []
            # Only replies, and the read took all there was: that was a look at an empty
            # socket (a batch's hand-over may have waited for the hub meanwhile).
            looked_empty = not batch and not replies.more
            # The hub has the batch: one large message must not stay alive here until
            # the next one arrives.
            del batch

    def _resubscribe(self, pubsub: Any) -> None:
        """Subscribe to the patterns a reload added, then leave those it removed, on the
        same connection: nothing published on a kept pattern is missed."""
        wanted, old = self.patterns.wanted, self.subscribed_patterns
        added = [p for p in wanted if p not in old]
        removed = [p for p in old if p not in wanted]
        if added:
            pubsub.psubscribe(*added)
            self.counters.redis_subscribe_commands += 1
            if not self.state.active:
                self.unconfirmed += len(added)
        if removed:
            pubsub.punsubscribe(*removed)
            self.counters.redis_unsubscribe_commands += 1
        self.subscribed_patterns = wanted
        logger.info(
            "redis subscription changed pattern=%s added=%s removed=%s",
            ",".join(wanted),
            ",".join(added) or "-",
            ",".join(removed) or "-",
        )

    def _hand_over(self, batch: list[RawMessage], *, full: bool) -> float:
        """Queue ``batch`` for the hub; returns when (time.monotonic()). ``full``: the
        batch filled up, more was waiting. Either that or a hub still busy with the batches
        before means the subscriber is behind: Redis buffers meanwhile."""
        self.state.last_message_at = datetime.fromtimestamp(self.alive_at or time.time(), UTC)
        handed_at = time.monotonic()
        now = time.time()
        waited = self.inbox.put_from_thread(batch, self._waiting)
        # More was waiting in the socket, or the hub was still busy: Redis buffers meanwhile.
        self.outage.handed_over(handed_at, now, behind=full or waited)
        return handed_at

    def _take(self, reply: Any, batch: list[RawMessage]) -> int:
        """Add a message to ``batch``; returns its size (0 for other replies)."""
        kind = reply[0] if isinstance(reply, list) and reply else reply
        if kind == b"pmessage":
            # Redis sends pattern, channel and data, each a bulk string.
            if len(reply) != 4 or not (type(reply[2]) is bytes and type(reply[3]) is bytes):
                raise redis.InvalidResponse(
                    f"not a Redis reply (a pmessage of {len(reply)} elements:"
                    f" {', '.join(type(part).__name__ for part in reply)}):"
                    " is REDIS_HOST a Redis server?"
                )
            data = reply[3]
            exact, self._exact = self._exact, None
            if exact is not None and exact[0] == reply[2] and exact[1] == data:
                return 0
            batch.append((reply[2], data))
            return len(data)
        self._exact = None
        if kind == b"message":
            if len(reply) != 3 or not (type(reply[1]) is bytes and type(reply[2]) is bytes):
                raise redis.InvalidResponse(
                    f"not a Redis reply (a message of {len(reply)} elements): is REDIS_HOST a"
                    " Redis server?"
                )
            data = reply[2]
            self._exact = (reply[1], data)
            batch.append((reply[1], data))
            return len(data)
        if kind in _SUBSCRIBED or kind in _UNSUBSCRIBED:
            # [kind, name, how many channels and patterns the connection now holds]
            if len(reply) == 3 and type(reply[2]) is int:
                self.state.channels = reply[2]
            if kind in _SUBSCRIBED:
                if self.requests is not None:
                    name = reply[1].decode("utf-8", "surrogateescape")
                    self._confirmed.append(Subscription(name, kind == b"psubscribe"))
                elif not self.state.active:
                    # One confirmation per pattern; the subscription is made once all
                    # are in. Those of patterns a reload added change nothing.
                    self.unconfirmed -= 1
                    if self.unconfirmed <= 0:
                        self._subscribed()
        elif kind in _PONG and self.requests is not None and not self.state.active:
            # The PING sent after the channels: every one of them is confirmed.
            self._subscribed()
        elif isinstance(reply, Exception):
            if not self.state.active:
                # Redis refused PSUBSCRIBE: no password given where one is required
                # (NOAUTH), an ACL that denies the pattern (NOPERM), ... Waiting on would
                # leave the daemon unsubscribed and silent about why.
                raise error_reply(reply)
            # Subscribed, only our PING gets other replies: LOADING (Redis loading its
            # dataset) or BUSY (a long script) still prove Redis is there, and Pub/Sub
            # keeps working through both.
            if self.requests is not None:
                # A (P)(UN)SUBSCRIBE refused (an ACL that denies the channel): say so.
                logger.warning("redis refused a subscription command error=%s", reply)
            else:
                logger.debug("redis answered the liveness probe with an error=%s", reply)
        # pong (our probe) and anything else only prove the connection is alive
        return 0

    def _holding(self) -> str:
        """What the log lines say is subscribed: the patterns, or (user mode) how many
        channels and patterns the plan holds."""
        if self.requests is None:
            return f"pattern={','.join(self.subscribed_patterns)}"
        return f"mode=user channels={self.state.channels}"

    def _subscribed(self) -> None:
        state = self.state
        restored = self.outage.subscribed(time.monotonic(), time.time())
        if restored is None:
            logger.info("redis subscribed %s redis=%s", self._holding(), self._where())
        else:
            if restored.reconnected:
                self.counters.redis_reconnects += 1
            logger.warning(
                "redis subscription %s %s redis=%s outage=%.1fs attempts=%d",
                "restored" if restored.reconnected else "established",
                self._holding(),
                self._where(),
                restored.outage,
                state.attempts,
            )
            # Clients connected during the outage may have missed messages: tell them.
            # redis_connected: nothing was delivered before, so nothing was missed since.
            if restored.since is None:
                resync = Resync(ResyncReason.REDIS_CONNECTED, None)
            else:
                since = datetime.fromtimestamp(restored.since, UTC)
                resync = Resync(
                    ResyncReason.REDIS_RECONNECTED, since.isoformat(timespec="microseconds")
                )
            self.inbox.put_from_thread(resync, self._waiting)
        self.alive_at = time.time()
        state.subscriptions += 1
        state.master = None if self.master is None else str(self.master)
        state.active = True
        state.state = "subscribed"
        state.attempts = 0
        state.last_error = ""
