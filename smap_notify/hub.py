"""The hub: who is connected, and routing each Redis batch to their connections."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Final, Protocol

import attrs
import trio

from .channels import wants
from .config import Config
from .connection import CloseReason, Connection
from .frames import PING_FRAME, text_frame
from .handshake import Rejection
from .inbox import Inbox
from .keepalive import KeepAlive, Schedule
from .logs import LimitedLogger
from .memory import LARGE, Trimmer
from .messages import (
    DryRunPayload,
    MessageType,
    Rejected,
    Routed,
    envelope_frame,
    format_timestamp,
    parse_message,
    resync_envelope,
)
from .metrics import Counters

logger = logging.getLogger(__name__)

TOKEN_EXPIRED_CODE: Final = 4001
CLOSE_GRACE: Final = 2.0
# Dry-run results logged at once before the rate limit holds them back (refilled over
# 10 s): dry runs are started by hand, so more than this is a publisher's flood.
DRYRUN_LOG_BURST: Final = 50

RawMessage = tuple[bytes, bytes]  # (channel, data) as Redis delivered it
Batch = list[RawMessage]  # the messages the subscriber read at once


class Dropped(enum.StrEnum):
    """Why a message (smap_notify_messages_dropped) or a frame
    (smap_notify_frames_dropped, besides the CloseReason of a connection that ended with
    frames queued) was not delivered."""

    NO_CONNECTION = "no_connection"  # messages only
    QUEUE_FULL = "queue_full"
    CONNECTION_CLOSED = "connection_closed"


class OverflowPolicy(enum.Enum):
    """WS_OVERFLOW_POLICY: what a frame for a full queue does."""

    DROP = "drop"  # it is dropped, and the client told once it has caught up
    DISCONNECT = "disconnect"  # the connection is dropped


class ResyncReason(enum.StrEnum):
    """The ``reason`` of a resync frame (README, "Protocol")."""

    FRAMES_DROPPED = "frames_dropped"  # the hub dropped frames of a slow connection
    REDIS_RECONNECTED = "redis_reconnected"  # the subscription was lost and is back
    REDIS_CONNECTED = "redis_connected"  # made late: Redis was down when clients came


@attrs.frozen
class Resync:
    """The subscription was lost and is back; clients may have missed messages."""

    reason: ResyncReason
    since: str | None
    # Only the users of these channels may have missed messages (sharded Pub/Sub: one
    # node's channels); None: everyone.
    channels: frozenset[str] | None = None


# What the subscriber hands the hub: a batch of messages, or a resync marker.
InboxItem = Batch | Resync


class Presence(Protocol):
    """Told when a user's connection is being accepted (before the upgrade is answered,
    which waits for the event returned, if any) and when one ended; with the connection's
    filters, which decide what it needs subscribed. (The Go seed's RedisNotifier; in
    user mode, subscriptions.UserSubscriptions.)"""

    def on_user_connected(
        self, user_id: str, filters: Mapping[str, str] | None = None
    ) -> trio.Event | None: ...

    def on_user_disconnected(
        self,
        user_id: str,
        has_other_connections: bool,
        filters: Mapping[str, str] | None = None,
    ) -> None: ...


class LoggingPresence:
    """Presence when nothing needs to know: debug lines."""

    def on_user_connected(
        self, user_id: str, filters: Mapping[str, str] | None = None
    ) -> trio.Event | None:
        logger.debug("user connected user=%s", user_id)
        return None

    def on_user_disconnected(
        self,
        user_id: str,
        has_other_connections: bool,
        filters: Mapping[str, str] | None = None,
    ) -> None:
        logger.debug(
            "user disconnected user=%s has_other_connections=%s", user_id, has_other_connections
        )


class Hub:
    """Connections by user; routes messages, keeps connections alive, drains on shutdown."""

    def __init__(
        self, config: Config, counters: Counters, presence: Presence | None = None
    ) -> None:
        self.config = config
        self.counters = counters
        self.presence: Presence = presence or LoggingPresence()
        self.users: dict[str, set[Connection]] = {}
        self.connection_count = 0
        self._reserved: dict[str, int] = {}
        self._reserved_total = 0
        self._dirty: list[Connection] = []
        self._schedule: Schedule[Connection] = Schedule()
        self._nursery: trio.Nursery | None = None
        self._log = LimitedLogger(logger)
        self._dryrun_log = LimitedLogger(logger, burst=DRYRUN_LOG_BURST)
        self._trimmer = Trimmer()

    # -- registry ---------------------------------------------------------------

    def try_reserve(self, user_id: str) -> tuple[int, Rejection] | None:
        """Hold a place for a connection about to upgrade; (status, reason) when full."""
        if self.connection_count + self._reserved_total >= self.config.ws_max_connections:
            return 503, Rejection.MAX_CONNECTIONS
        held = len(self.users.get(user_id, ())) + self._reserved.get(user_id, 0)
        if held >= self.config.ws_max_connections_per_user:
            return 429, Rejection.MAX_CONNECTIONS_PER_USER
        self._reserved[user_id] = self._reserved.get(user_id, 0) + 1
        self._reserved_total += 1
        return None

    async def admit(self, user_id: str, filters: Mapping[str, str] | None) -> None:
        """A reserved connection is being accepted: tell ``presence``, and wait for what
        it needs first (in user mode, Redis confirming the user's subscriptions)."""
        ready = self._tell(self.presence.on_user_connected, user_id, filters)
        if ready is not None:
            await ready.wait()

    def withdraw(self, user_id: str, filters: Mapping[str, str] | None) -> None:
        """An admitted connection failed before it opened: release its place."""
        self.release(user_id)
        has_other = user_id in self.users or user_id in self._reserved
        self._tell(self.presence.on_user_disconnected, user_id, has_other, filters)

    def release(self, user_id: str) -> None:
        left = self._reserved[user_id] - 1
        if left:
            self._reserved[user_id] = left
        else:
            del self._reserved[user_id]
        self._reserved_total -= 1

    def register(self, conn: Connection) -> None:
        """Turn the user's reservation into a live connection."""
        self.release(conn.user_id)
        conns = self.users.setdefault(conn.user_id, set())
        conns.add(conn)
        self.connection_count += 1
        conn.on_abort = self._on_abort
        conn.on_drained = self._on_drained
        self._schedule.add(conn, trio.current_time(), time.time(), self.config.ws_pong_wait)
        self.counters.handshakes_accepted += 1

    def unregister(self, conn: Connection, reason: CloseReason) -> None:
        conns = self.users.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        conns.remove(conn)
        self._schedule.discard(conn)
        if not conns:
            del self.users[conn.user_id]
        self.connection_count -= 1
        if conn.queue.messages:
            self.counters.frames_dropped[Dropped.CONNECTION_CLOSED] += conn.queue.messages
        self.counters.connections_closed[conn.close_reason or reason] += 1
        has_other = bool(conns) or conn.user_id in self._reserved
        self._tell(self.presence.on_user_disconnected, conn.user_id, has_other, conn.filters)

    def connections(self) -> Iterable[Connection]:
        for conns in self.users.values():
            yield from conns

    def _tell(self, method: object, *args: object) -> trio.Event | None:
        try:
            return method(*args)  # type: ignore[operator]
        except Exception:
            logger.exception("notifier failed user=%s", args[0])
            return None

    def _on_abort(self, conn: Connection, reason: CloseReason, detail: str = "") -> None:
        if conn.queue.messages:
            self.counters.frames_dropped[reason] += conn.queue.messages
        if reason is CloseReason.SHUTDOWN:  # drain() says how many, once
            logger.debug(
                "closing connection reason=%s conn=%d user=%s", reason, conn.id, conn.user_id
            )
        else:  # a network blip can end thousands at once: rate-limited per reason
            self._log.log(
                logging.INFO,
                "close:" + reason,
                "closing connection reason=%s conn=%d user=%s%s",
                reason,
                conn.id,
                conn.user_id,
                f" detail={detail!r}" if detail else "",
            )

    # -- routing ----------------------------------------------------------------

    def route_batch(self, batch: Batch) -> None:
        """Parse and queue a batch of Redis messages, then write each connection once."""
        c = self.counters
        deliver_invalid = self.config.deliver_invalid_payloads
        channels = self.config.channels
        overflow = OverflowPolicy(self.config.ws_overflow_policy)
        timestamp = format_timestamp()
        stamp = timestamp.encode("ascii")
        users = self.users
        nursery = self._nursery_or_fail()
        for channel, data in batch:
            c.received += 1
            if len(data) >= LARGE:
                self._trimmer.want()  # its parse buffers are freed by the next tick
            try:
                result = parse_message(
                    channel, data, deliver_invalid=deliver_invalid, channels=channels
                )
            except Exception as exc:  # one bad message must never stop delivery
                self._log.log(
                    logging.ERROR,
                    "parse_failed",
                    "message parsing failed channel=%.100r",
                    channel,
                    exc_info=True,
                )
                result = Rejected("internal_error", repr(exc))
            if type(result) is Rejected:
                self._log_rejected(result)
                c.rejected[result.reason] += 1
                if result.template:
                    c.by_channel[result.template] += 1
                continue
            assert isinstance(result, Routed)
            c.by_channel[result.template.text] += 1
            c.by_type[result.type_label] += 1
            if (
                not result.known
                or result.invalid is not None
                or result.type == MessageType.DRYRUN_RESULT
            ):
                self._log_routed(result)
            topic = result.topic
            if topic is None and result.user_id is not None:
                conns: Collection[Connection] | None = users.get(result.user_id)
            else:
                conns = self._audience(result.user_id, topic, result.value)
            if not conns:
                c.dropped[Dropped.NO_CONNECTION] += 1
                continue
            raw = result.raw
            framed = (
                text_frame(raw)
                if raw is not None
                else envelope_frame(result.type_json, result.payload_json, stamp)
            )
            frame = self._trimmer.track(framed) if len(framed) >= LARGE else framed
            queued = closing = 0
            for conn in conns:
                if not conn.writable:
                    closing += 1
                    continue
                if not conn.queue.push(frame):
                    # Full of frames from this batch? Write them now, then look again.
                    conn.write_nowait(nursery)
                    if not conn.queue.push(frame):
                        self._overflow(conn, overflow, timestamp)
                        continue
                queued += 1
                if not conn.dirty:
                    self._queue_write(conn)
            if queued:
                c.delivered += 1
                c.frames_sent += queued
            elif closing == len(conns):
                c.dropped[Dropped.CONNECTION_CLOSED] += 1
            else:
                c.dropped[Dropped.QUEUE_FULL] += 1
        self.flush()

    def _audience(self, user: str | None, topic: str | None, value: str) -> list[Connection]:
        """The connections a topic's message or a broadcast (``user`` None) goes to."""
        if user is None:
            candidates: Iterable[Connection] = self.connections()
        else:
            candidates = self.users.get(user, ())
        return [conn for conn in candidates if wants(conn.filters, topic, value)]

    def _overflow(self, conn: Connection, policy: OverflowPolicy, timestamp: str) -> None:
        """``conn``'s queue is full even after a write: WS_OVERFLOW_POLICY decides."""
        self.counters.frames_dropped[Dropped.QUEUE_FULL] += 1
        if policy is OverflowPolicy.DISCONNECT:
            conn.abort(CloseReason.QUEUE_FULL)
        else:
            conn.queue.miss(timestamp)
            self._log.log(
                logging.WARNING,
                "overflow",
                "outbound queue full, frame dropped conn=%d user=%s pending=%d bytes=%d",
                conn.id,
                conn.user_id,
                conn.queue.messages,
                conn.queue.size,
            )

    def _queue_write(self, conn: Connection) -> None:
        """``conn`` has frames: write them at the next ``flush``."""
        conn.dirty = True
        self._dirty.append(conn)

    def flush(self) -> None:
        """One write per connection that has frames queued."""
        nursery = self._nursery_or_fail()
        for conn in self._dirty:
            conn.write_nowait(nursery)
        self._dirty.clear()

    def _on_drained(self, conn: Connection) -> None:
        """``conn`` caught up after frames were dropped for it: one ``resync`` says so, so
        that the client refetches what it missed instead of missing it unawares."""
        missed, since = conn.queue.take_missed()
        if not self.config.resync_on_drop:
            return
        frame = text_frame(
            resync_envelope(ResyncReason.FRAMES_DROPPED, since, format_timestamp(), missed)
        )
        if conn.queue.push(frame):
            self.counters.resyncs_sent += 1
            conn.write_nowait(self._nursery_or_fail())
            self._log.log(
                logging.INFO,
                "resync:frames_dropped",
                "resync sent to a client that missed frames conn=%d user=%s dropped=%d",
                conn.id,
                conn.user_id,
                missed,
            )

    def broadcast_resync(self, resync: Resync) -> None:
        if not self.config.resync_on_reconnect:
            return
        timestamp = format_timestamp()
        frame = text_frame(resync_envelope(resync.reason, resync.since, timestamp))
        sent = full = 0
        for conn in self._resync_audience(resync.channels):
            if not conn.writable:
                continue
            if conn.queue.push(frame):
                sent += 1
                if not conn.dirty:
                    self._queue_write(conn)
            else:
                # Its queue is full: it misses this resync like a message, and the
                # frames_dropped resync it gets once it has caught up covers the outage.
                full += 1
                self.counters.frames_dropped[Dropped.QUEUE_FULL] += 1
                conn.queue.miss(resync.since or timestamp)
        self.counters.resyncs_sent += sent
        self.flush()
        logger.info(
            "resync sent to clients connections=%d reason=%s%s",
            sent,
            resync.reason,
            f" queues_full={full} (told once they catch up)" if full else "",
        )

    def _resync_audience(self, channels: frozenset[str] | None) -> Iterable[Connection]:
        """The connections of the users of ``channels`` (all of them: None, or a broadcast
        channel among them)."""
        if channels is None:
            return self.connections()
        users = set()
        for channel in channels:
            match = self.config.channels.match(channel)
            if isinstance(match, str):
                continue  # a channel no template routes: no connection reads it
            user = match[1]
            if user is None:
                return self.connections()
            users.add(user)
        return [conn for user in users for conn in self.users.get(user, ())]

    # Publishers' text in these lines is cut (a channel, so a user id, can be megabytes):
    # the reason and detail must fit in a line (logs cut lines at 4,096 characters).
    def _log_rejected(self, result: Rejected) -> None:
        self._log.log(
            logging.WARNING,
            "rejected:" + result.reason,
            "message rejected reason=%s user=%.200s type=%.64s detail=%s",
            result.reason,
            result.user_id or "-",
            result.type or "-",
            result.detail,
        )

    def _log_routed(self, result: Routed) -> None:
        # "routed": passed on to the user's connections, if it has any.
        if result.invalid is not None:
            self._log.log(
                logging.WARNING,
                "invalid:" + result.type,
                "invalid payload routed anyway user=%.200s type=%s detail=%s",
                result.user_id or "*",
                result.type,
                result.invalid,
            )
        elif not result.known:
            self._log.log(
                logging.WARNING,
                "unknown_type",
                "unknown message type routed unchanged user=%.200s type=%.64s",
                result.user_id or "*",
                result.type,
            )
        elif isinstance(result.payload, DryRunPayload):
            # A line per dry run, as the contract asks, but a publisher's flood of them
            # is held back like any other.
            self._dryrun_log.log(
                logging.INFO,
                "dryrun_result",
                "dryrun result user=%.200s job_id=%.200s platform=%.64s status=%.64s",
                result.user_id or "*",
                result.payload.job_id,
                result.payload.platform,
                result.payload.status,
            )

    # -- tasks --------------------------------------------------------------------

    async def serve(
        self,
        inbox: Inbox[InboxItem],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Route what the subscriber sends, and keep connections alive, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keepalive)
            task_status.started()
            receive = inbox.receive
            async with receive:
                async for item in receive:
                    self._handle(item)
                    # Drain what is already waiting: fewer wake-ups, bigger writes.
                    while True:
                        inbox.taken()
                        try:
                            item = receive.receive_nowait()
                        except trio.WouldBlock:
                            break
                        self._handle(item)
                    # Let go of the batches handled before waiting: one may hold a large
                    # message, kept alive otherwise until the next batch arrives.
                    del item
            nursery.cancel_scope.cancel()

    def _handle(self, item: InboxItem) -> None:
        if isinstance(item, Resync):
            self.broadcast_resync(item)
        else:
            self.route_batch(item)

    async def _keepalive(self) -> None:
        """One timer for every connection: pings, closing the silent ones, and closing
        those whose token has expired; each tick visits only the connections due."""
        keepalive = KeepAlive(self._schedule, trio.current_time(), self.config.ws_pong_wait)
        while True:
            # The configuration is read afresh each tick: a reload may change it.
            wake = keepalive.plan(self.config.ws_ping_interval, self.config.ws_pong_wait)
            await trio.sleep_until(wake)
            tick = keepalive.tick(trio.current_time(), time.time(), self.config.ws_pong_wait)
            for conn in tick.silent:
                conn.abort(CloseReason.PONG_TIMEOUT)
            for conn in tick.expired:
                conn.begin_close(CloseReason.TOKEN_EXPIRED)
                self._nursery_or_fail().start_soon(self._expire, conn)
            for conn in tick.ping:
                conn.queue.push_control(PING_FRAME)
                if not conn.dirty:
                    self._queue_write(conn)
            self.flush()
            self._trimmer.trim_if_wanted()

    def _nursery_or_fail(self) -> trio.Nursery:
        assert self._nursery is not None, "Hub.serve is not running"
        return self._nursery

    async def _expire(self, conn: Connection) -> None:
        """A clean close (4001), so SMAP's web UI does not reconnect with a dead token."""
        # Rate-limited like the other closes: tokens issued together expire together.
        self._log.log(
            logging.INFO,
            "token_expired",
            "token expired, closing conn=%d user=%s",
            conn.id,
            conn.user_id,
        )
        await conn.close(TOKEN_EXPIRED_CODE, "token expired", CLOSE_GRACE)

    async def drain(self, window: float) -> None:
        """Close every connection, spread over ``window`` seconds so reconnects spread too."""
        conns = list(self.connections())
        if not conns:
            return
        logger.info("closing connections count=%d window=%.1fs", len(conns), window)
        per_slice, step = drain_plan(len(conns), window)
        for start in range(0, len(conns), per_slice):
            for conn in conns[start : start + per_slice]:
                conn.abort(CloseReason.SHUTDOWN)
            if start + per_slice < len(conns):
                await trio.sleep(step)


def drain_plan(count: int, window: float) -> tuple[int, float]:
    """How to close ``count`` connections over ``window`` seconds: so many at a time, so
    many seconds apart (at most ten slices a second)."""
    slices = max(1, min(count, int(window * 10)))
    return -(-count // slices), window / slices
