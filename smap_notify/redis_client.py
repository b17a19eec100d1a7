"""Talking to Redis at all: clients that fail fast (no retries; connects and name lookups
bounded by a deadline), the reconnect backoff, what counts as a Redis failure and how it
is worded, and the ``Locator`` protocol through which Sentinel and Cluster name the
server to use. Shared by the subscribers, the /health probe, Sentinel and Cluster."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import redis
import trio
from redis._parsers import _RESP2Parser
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from .config import Config

BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 1.0
SOCKET_TIMEOUT: Final = 2.0

# After flaps (outage.FLAP_WITHIN) the wait before the next attempt grows with each, up
# to FLAP_CAP, instead of starting again from BACKOFF_BASE.
FLAP_CAP: Final = 5.0


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


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with jitter (half to full of the capped delay)."""
    capped = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** min(attempt, 16)))
    return capped * (0.5 + 0.5 * (rng or random).random())


def reconnect_delay(attempt: int, flaps: int, rng: random.Random | None = None) -> float:
    """The wait before the next attempt: the backoff, or after ``flaps`` subscriptions
    in a row that were lost soon after they were made (``outage.FLAP_WITHIN``), at least one that doubles with each."""
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


PASSWORD_HINT: Final = " (Redis refused the password or asks for one: REDIS_PASSWORD?)"


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
