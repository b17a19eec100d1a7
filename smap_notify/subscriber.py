"""The Redis subscriber: PSUBSCRIBE CHANNELS' patterns in a worker thread, batches to the hub.

redis-py's synchronous client runs in one worker thread for the daemon's lifetime. The
thread detects a dead or wedged subscription itself (a PING on the subscribed
connection when nothing has arrived for a while), reconnects forever with capped,
jittered backoff, and tells the hub with a ``Resync`` marker when a lost subscription is
back, in order with the messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import hiredis
import redis
import trio
from redis._parsers import _RESP2Parser
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from .config import Config
from .hub import Batch, RawMessage, Resync
from .inbox import Inbox
from .memory import LARGE
from .metrics import Counters
from .subscriptions import Requests, Subscription, batches

if TYPE_CHECKING:
    from .shards import ShardNode

logger = logging.getLogger(__name__)

POLL_SECONDS: Final = 0.25
PROBE_AFTER: Final = 1.0  # silence after which the subscription is probed with PING
DEAD_AFTER: Final = 3.0  # silence after which the subscription is declared dead
STALLED_AFTER: Final = 1.0  # a longer gap between two turns of the loop: this thread stalled
BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 1.0
MAX_BATCH: Final = 256
# A batch also ends at this many bytes of message data: with few large messages (a
# publisher's 1 MB reports) 256 of them would hold hundreds of megabytes in flight.
MAX_BATCH_BYTES: Final = 4 << 20
READ_SIZE: Final = 65536
# Before handing a batch over, the thread lingers for more messages when the stream is
# steady: every hand-over costs both threads a wake-up (150-300 µs of CPU on a slow VM,
# whatever the batch holds), so fewer, larger batches cost less per message, for at most
# MAX_LINGER of latency. The rate is measured over RATE_WINDOW. Measured on a VM half as
# fast as the one of the earlier benchmark tables, the daemon on a core of its own:
#   - Slower than STEADY_RATE: no linger (most messages would wait for nothing).
#   - From STEADY_RATE: about one gap between messages (2,000 msg/s: 0.5 ms; 54% -> 40% of
#     a core, p99 0.85 -> 1.5 ms).
#   - From FAST_RATE: LONG_LINGER, and from 9,000 msg/s 0.1 ms more per 1,000 msg/s, up to
#     MAX_LINGER (4,000 msg/s: 41% of a core; 29,758 msg/s, 80% of the daemon's maximum
#     there: 0.3 ms batches of about 8 kept it at 99% of a core with p99 8-60 ms, 0.9 ms
#     at 98-99% and 10-60 ms, 3 ms of about 90 messages at 80% and 7 ms).
STEADY_RATE: Final = 1500.0
FAST_RATE: Final = 3000.0
LONG_LINGER: Final = 0.0009
LINGER_PER_RATE: Final = 1e-7  # seconds of linger per message/s
MAX_LINGER: Final = 0.003
RATE_WINDOW: Final = 0.01
SOCKET_TIMEOUT: Final = 2.0
# A cut this soon after a full batch (a backlog in the socket) may be Redis's output limit.
BEHIND_WITHIN: Final = 2.0
# A subscription lost sooner than FLAP_WITHIN after it was made is a flap (a peer that
# subscribes, then breaks the protocol; a Redis that keeps cutting us): the wait before
# the next attempt then grows with each flap, up to FLAP_CAP, instead of starting again
# from BACKOFF_BASE (every cycle costs a warning pair and a resync to every client).
FLAP_WITHIN: Final = 10.0
FLAP_CAP: Final = 5.0


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


class Address(Protocol):
    """A server a ``Locator`` names; ``str()`` is its ``host:port``."""

    @property
    def pair(self) -> tuple[str, int]: ...


class Locator(Protocol):
    """Where to subscribe when REDIS_HOST alone does not say it: Sentinel's master
    (sentinel.py), a live node of a Redis Cluster (cluster.py). Thread-safe."""

    def find(self, between: Callable[[], None] = ...) -> Address:
        """Ask for the server to subscribe on (before each connect); ``between`` runs
        before each question."""

    def current(self) -> Address | None:
        """The server to be on now: the subscriber leaves its own when this changes."""

    def moved(self, named: Address | None) -> str:
        """Why the subscriber must leave its server, ``current()`` being ``named``."""

    def describe(self, address: Address | None) -> str:
        """The ``redis=`` of the log lines."""

    def probe_address(self) -> Address:
        """The server the /health PING goes to."""

    def watch(self) -> None:
        """Follow changes until cancelled (a thread of its own)."""

    def close(self) -> None: ...


class SubscriptionDead(Exception):
    pass


class MasterMoved(SubscriptionDead):
    """The locator names another server than the one subscribed to (the sentinels'
    new master; another node for one the cluster failed or forgot)."""


# The error when Redis ends the subscription's connection (end of stream).
CLOSED_BY_REDIS: Final = "redis closed the connection"


# What talking to Redis may raise when Redis, or whatever answers on REDIS_HOST, fails:
# ValueError is redis-py's parser on a reply that is not Redis's (":abc").
REDIS_FAILURES: Final = (redis.RedisError, OSError, ValueError)


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


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with jitter (half to full of the capped delay)."""
    capped = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt, 16)))
    return capped * (0.5 + 0.5 * (rng or random).random())


def reconnect_delay(attempt: int, flaps: int, rng: random.Random | None = None) -> float:
    """The wait before the next attempt: the backoff, or after ``flaps`` subscriptions
    in a row that were lost within FLAP_WITHIN, at least one that doubles with each."""
    delay = backoff_delay(attempt, rng)
    if flaps:
        delay = max(delay, min(FLAP_CAP, BACKOFF_BASE * (2 ** min(flaps, 16))))
    return delay


def sleep_in_thread(seconds: float) -> None:
    """Sleep ``seconds`` in a worker thread, ending early when its Trio call is cancelled."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        trio.from_thread.check_cancelled()
        time.sleep(min(left, 0.1))


class _Lookup:
    """One ``getaddrinfo`` in a daemon thread of its own: the C library's resolver takes
    no deadline and cannot be interrupted (with unreachable name servers a lookup lasts
    30 s or more), and a thread stuck in it must not hold up anything else."""

    def __init__(self, host: str, port: int) -> None:
        self.done = threading.Event()
        self.addresses: list[str] = []
        self.error: OSError | None = None
        threading.Thread(target=self._run, args=(host, port), name="redis-dns", daemon=True).start()

    def _run(self, host: str, port: int) -> None:
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            self.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        except OSError as exc:
            self.error = exc
        finally:
            self.done.set()


class LookupTimeout(OSError):
    pass


_lookups: dict[tuple[str, int], _Lookup] = {}
_lookups_lock = threading.Lock()


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses of ``host``, waiting at most ``timeout`` seconds for the resolver.

    One lookup per name at a time: a caller that gives up leaves the lookup running, and
    the next caller waits for that one (or takes its answer) instead of starting another,
    so a resolver that hangs costs one thread, not one per retry.
    """
    try:  # an address literal needs no lookup
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        return [str(infos[0][4][0])]
    except socket.gaierror:
        pass
    key = (host, port)
    with _lookups_lock:
        lookup = _lookups.get(key)
        if lookup is None:
            try:
                lookup = _Lookup(host, port)
            except RuntimeError as exc:  # no thread to be had (TasksMax): like an outage
                raise OSError(f"DNS lookup of {host} not started: {exc}") from None
            _lookups[key] = lookup
    if not lookup.done.wait(timeout):
        raise LookupTimeout(f"DNS lookup of {host} did not answer within {timeout:g}s")
    with _lookups_lock:
        if _lookups.get(key) is lookup:
            del _lookups[key]
    if lookup.error is not None:
        raise lookup.error
    if not lookup.addresses:
        raise OSError(f"DNS lookup of {host} returned no address")
    return lookup.addresses


def _connect_resolved(conn: Any, connect: Callable[[], Any]) -> Any:
    """redis-py's plain socket connect, to each address of ``conn.host`` in turn, with the
    name looked up by ``resolve`` (bounded by the connect timeout) instead of inside it."""
    host = conn.host
    try:
        addresses = resolve(host, conn.port, conn.socket_connect_timeout or SOCKET_TIMEOUT)
    except LookupTimeout as exc:
        # As is: redis-py words an OSError as "Error <it> connecting to <host>".
        raise redis.ConnectionError(str(exc)) from None
    error: OSError | None = None
    for address in addresses:
        conn.host = address
        try:
            return connect()
        except OSError as exc:
            error = exc
        finally:
            conn.host = host
    assert error is not None
    raise error


class BoundedConnection(redis.Connection):
    def _connect(self) -> Any:
        return _connect_resolved(self, super()._connect)


class BoundedSSLConnection(redis.SSLConnection):
    def _connect(self) -> Any:
        # The TCP connect to the looked-up address; TLS checks the name in REDIS_HOST.
        sock = _connect_resolved(self, lambda: redis.Connection._connect(self))
        try:
            return self._wrap_socket_with_ssl(sock)
        except (OSError, redis.RedisError):
            sock.close()
            raise


def make_client(
    config: Config,
    *,
    socket_timeout: float = SOCKET_TIMEOUT,
    address: tuple[str, int] | None = None,
) -> redis.Redis:
    """A client of ``address`` (by default REDIS_HOST's) that fails fast: reconnecting is
    the caller's job."""
    host, port = address or config.redis_address
    return fail_fast_client(
        host,
        port,
        db=config.redis_db,
        password=config.redis_password,
        tls=config.redis_use_tls,
        socket_timeout=socket_timeout,
    )


def fail_fast_client(
    host: str, port: int, *, password: str, tls: bool, socket_timeout: float, db: int = 0
) -> redis.Redis:
    """A client without retries, with bounded connects and name lookups."""
    client = redis.Redis(
        host=host,
        port=port,
        db=db,
        password=password or None,
        ssl=tls,
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
    # redis-py's hiredis parser takes a fresh TLS 1.3 connection for a dirty one when the
    # server's session tickets arrive just after the handshake (the raw socket is
    # readable, no reply is): 2-4% of connects failed with "Connection not ready".
    # The pure-Python parser reads through the SSL object and sees no data. It only
    # parses the connect handshake and PINGs here; Replies reads the messages.
    client.connection_pool.connection_kwargs["parser_class"] = _RESP2Parser
    # Host names are looked up with a deadline (resolve), not inside redis-py's connect.
    pool = client.connection_pool
    pool.connection_class = BoundedSSLConnection if tls else BoundedConnection
    return client


async def run_redis_subscriber(
    config: Config,
    inbox: Inbox[Batch],
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


def not_redis(exc: Exception) -> redis.InvalidResponse:
    """Something else answers on REDIS_HOST (an HTTP or SSH port, a TLS-only Redis)."""
    return redis.InvalidResponse(
        f"not a Redis reply ({exc}): is REDIS_HOST a Redis server and REDIS_USE_TLS right?"
    )


def error_reply(reply: Exception) -> redis.RedisError:
    """An error reply read off the subscribed connection, as redis-py would raise it."""
    text = str(reply)
    if text.startswith(("NOAUTH", "WRONGPASS")):
        return redis.AuthenticationError(text)
    return redis.ResponseError(text)


class _Worker:
    def __init__(
        self,
        config: Config,
        inbox: Inbox[Batch],
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
        self.lost_at: datetime | None = None
        self.alive_at: float | None = None  # wall clock of the last reply from Redis
        self.ever_subscribed = False
        self.behind_at: float | None = None  # when it was last behind at a hand-over
        # Wall clock of the first hand-over that found the subscriber behind (a full batch,
        # or the hub still busy) since it last kept up for BEHIND_WITHIN.
        self.behind_since: float | None = None
        self.subscribed_at: float | None = None  # time.monotonic() of the last subscription
        self.flaps = 0  # subscriptions in a row lost within FLAP_WITHIN
        # The last look at the socket found it empty: delivery had caught up. A cut that
        # comes then is not Redis's output limit at work, however recent a backlog was.
        self.kept_up = True

    def run(self) -> None:
        state = self.state
        kinds: set[str] = set()  # the kinds of failure logged during this outage
        while True:
            trio.from_thread.check_cancelled()
            try:
                self._session()
            except (*REDIS_FAILURES, SubscriptionDead) as exc:
                if state.active:
                    subscribed_at = self.subscribed_at
                    # Moving to the master the sentinels name is no fault of Redis's.
                    flapped = (
                        subscribed_at is not None
                        and time.monotonic() - subscribed_at < FLAP_WITHIN
                        and not isinstance(exc, MasterMoved)
                    )
                    self.flaps = self.flaps + 1 if flapped else 0
                behind = self._behind_hint(exc)
                error = f"{type(exc).__name__}: {exc}" + (
                    behind or self._closed_hint(exc) or self._connect_hint(exc)
                )
                state.last_error = error
                kind = _error_kind(exc)
                if state.active or state.state == "starting":
                    kinds = {kind}
                    # A wedged connection was lost when it went silent, not when noticed.
                    lost = self.alive_at or time.time()
                    if behind and self.behind_since is not None:
                        # Cut for falling behind: what Redis dropped was published after
                        # the backlog began, and the backlog that did arrive was read up
                        # to the cut. The resync's since must not be later than the loss.
                        lost = min(lost, self.behind_since)
                    self.lost_at = self.lost_at or datetime.fromtimestamp(lost, UTC)
                    logger.warning(
                        "redis subscription %s, retrying redis=%s error=%s%s",
                        "lost" if state.active else "unavailable",
                        self._where(),
                        error,
                        f" flaps={self.flaps}" if state.active and self.flaps else "",
                    )
                elif state.attempts % 30 == 0 or kind not in kinds:
                    # Every 30th attempt, and at once when Redis's answer is new (it came
                    # back, now asking for a password).
                    kinds.add(kind)
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
            delay = reconnect_delay(state.attempts, self.flaps)
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
            return " (Redis refused the password or asks for one: REDIS_PASSWORD?)"
        if isinstance(exc, ConnectionResetError) and not self.config.redis_use_tls:
            return " (a Redis that accepts only TLS resets plain connections: REDIS_USE_TLS?)"
        return ""

    def _behind_hint(self, exc: Exception) -> str:
        """Why Redis may have closed a subscription that had fallen behind.

        Redis cuts a subscriber whose unsent replies pass its output limit; the daemon then
        reads the backlog that reached its socket, in full batches, up to the close.
        """
        behind_at = self.behind_at
        if (
            isinstance(exc, redis.ConnectionError | ConnectionError)
            and self.state.active
            and not self.kept_up
            and behind_at is not None
            and time.monotonic() - behind_at < BEHIND_WITHIN
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
        """(P)SUBSCRIBE or (P)UNSUBSCRIBE ``subs``, many per command."""
        for kind, names in batches(subs):
            pubsub.execute_command(_COMMANDS[kind, subscribe], *names)
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
            self.kept_up = not replies.wait(0)
            if self.kept_up and requests is not None and requests.pending:
                continue  # woken by a change: issue it before waiting
            if self.kept_up and not replies.wait(POLL_SECONDS):
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
        if full or waited:  # more was waiting in the socket, or the hub was still busy
            if self.behind_since is None:
                self.behind_since = now
            self.behind_at = handed_at
        elif self.behind_at is not None and handed_at - self.behind_at > BEHIND_WITHIN:
            # Caught up a while ago (the last batch before a cut is seldom full).
            self.behind_since = None
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

    def _subscribed(self) -> None:
        state = self.state
        lost_at = self.lost_at
        self.subscribed_at = time.monotonic()
        if lost_at is None:
            logger.info(
                "redis subscribed pattern=%s redis=%s",
                ",".join(self.subscribed_patterns),
                self._where(),
            )
        else:
            outage = (datetime.now(UTC) - lost_at).total_seconds()
            if self.ever_subscribed:
                self.counters.redis_reconnects += 1
            logger.warning(
                "redis subscription %s pattern=%s redis=%s outage=%.1fs attempts=%d",
                "restored" if self.ever_subscribed else "established",
                ",".join(self.subscribed_patterns),
                self._where(),
                outage,
                state.attempts,
            )
            # Clients connected during the outage may have missed messages: tell them.
            # redis_connected: nothing was delivered before, so nothing was missed since.
            reason = "redis_reconnected" if self.ever_subscribed else "redis_connected"
            since = lost_at.isoformat(timespec="microseconds") if self.ever_subscribed else None
            self.inbox.put_from_thread(Resync(reason, since), self._waiting)
        self.ever_subscribed = True
        self.lost_at = None
        self.alive_at = time.time()
        state.subscriptions += 1
        state.master = None if self.master is None else str(self.master)
        state.active = True
        state.state = "subscribed"
        state.attempts = 0
        state.last_error = ""


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


class Replies:
    """RESP2 replies read straight off the subscribed connection's socket.

    redis-py's ``can_read``/``read_response`` cost six system calls per wake-up (two polls
    for readability, a peek for a closed socket, a poll before each timed ``recv``); this
    costs one ``poll`` and, on a plain socket, one ``readv`` per wake-up, with redis-py's
    own connection still doing everything else (connect, AUTH, SELECT, PSUBSCRIBE, PING).
    The socket's private ``_sock`` is pinned by ``tests/test_internals.py``.
    """

    def __init__(self, conn: Any) -> None:
        sock = conn._sock
        if sock is None:
            raise redis.ConnectionError("redis connection is not open")
        self._sock: Any = sock  # socket.socket or ssl.SSLSocket
        self._fd = sock.fileno()
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._reader = hiredis.Reader()
        self._buf = bytearray(READ_SIZE)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._more = False  # complete replies may be buffered (a batch filled up)
        self._batch_bytes = 0  # message data in the batch being read
        self._wake_fd: int | None = None

    def wake_on(self, fd: int) -> None:
        """Let ``wait`` also end when ``fd`` becomes readable (the plan changed)."""
        self._wake_fd = fd
        self._poll.register(fd, select.POLLIN)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def buffered(self) -> bool:
        """Replies may be waiting without the socket being readable."""
        return self._more or (self._tls and self._sock.pending() > 0)

    @property
    def more(self) -> bool:
        """The last read filled its batch: complete replies may be waiting already."""
        return self._more

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` (whole milliseconds: ``poll``'s unit) for a reply."""
        if self._more or (self._tls and self._sock.pending()):
            return True
        ready = self._poll.poll(seconds * 1000)
        if self._wake_fd is None:
            return bool(ready)
        readable = False
        for fd, _ in ready:
            if fd == self._fd:
                readable = True
            else:  # woken: the caller's next turn issues the changes
                with contextlib.suppress(BlockingIOError):
                    while os.read(fd, 4096):
                        pass
        return readable

    def linger(self, seconds: float) -> bool:
        """Sleep ``seconds`` whatever arrives meanwhile, then say whether a reply is waiting.

        A ``poll`` would return at the first message, and counts whole milliseconds
        (0.3 ms would be 1 ms); ``select`` fails on descriptors past 1023, which a
        reconnect among thousands of clients can get.
        """
        time.sleep(seconds)
        return self.wait(0)

    def read(
        self, take: Callable[[Any, list[RawMessage]], int | None], batch: list[RawMessage]
    ) -> None:
        """Read what has arrived and ``take`` each complete reply, up to ``MAX_BATCH``
        messages or ``MAX_BATCH_BYTES`` (``take`` returns the bytes it added to ``batch``).
        Afterwards ``more`` says whether the batch is full."""
        reader = self._reader
        self._more = False
        if not batch:
            self._batch_bytes = 0
        unread = True  # the socket may hold more than has been read
        large = False
        try:
            while True:
                reply = reader.gets()
                while reply is not False:
                    added = take(reply, batch)
                    if added:
                        self._batch_bytes += added
                        large = large or added >= LARGE
                    if len(batch) >= MAX_BATCH or self._batch_bytes >= MAX_BATCH_BYTES:
                        self._more = True
                        return
                    reply = reader.gets()
                if not unread:
                    return
                unread = self._fill()
        except hiredis.ProtocolError as exc:
            raise not_redis(exc) from None
        finally:
            # hiredis keeps its buffer at the largest reply's size until the next read: a
            # large message would stay in memory as long as Redis stays quiet.
            if large and not reader.has_data():
                self._reader = hiredis.Reader()

    def _fill(self) -> bool:
        """One read from the socket; True when more may be waiting (the buffer filled up)."""
        try:
            if self._tls:
                if not self._sock.pending() and not self._poll.poll(0):
                    return False
                n = self._sock.recv_into(self._buf)
            else:
                n = os.readv(self._fd, (self._buf,))
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        if n == 0:
            raise redis.ConnectionError(CLOSED_BY_REDIS)
        self._reader.feed(self._buf, 0, n)  # type: ignore[arg-type]  # any buffer works
        # A short read took all there was; what comes later, the next wait sees. Over TLS a
        # read returns one record (16 KB at most): the next call looks for more, cheaply.
        return self._tls or n == len(self._buf)
