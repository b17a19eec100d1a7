"""The listener: one port for /ws (WebSocket upgrades) and the HTTP endpoints."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio
import trio_websocket

from .admission import (
    HEAD_CROWDED_AFTER,
    MIN_PENDING_HEADS,
    head_cap,
    heads_to_close,
)
from .channels import FILTER_SUFFIX
from .config import Config
from .connection import CloseReason, Connection
from .frames import PROTOCOL_FAILURES
from .handshake import WS_PATH, Accept, HandshakeRequest, Reject, Rejection, decide, json_error
from .heads import (
    HeadError,
    head_end,
    http_response,
    parse_head,
    read_head,
)
from .hub import Hub
from .logs import LimitedLogger
from .websocket import ConnStream, ReaderNursery, accept_websocket, write_lock

logger = logging.getLogger(__name__)


# accept() failures that mean "no resources right now", as in trio.serve_listeners.
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY: Final = 0.1
REFUSE_AT_MOST: Final = 1000  # clients answered 503 per shortage
OUT_OF_DESCRIPTORS_FOR: Final = 5.0  # seconds a shortage shows in STATUS=


# An HTTP endpoint: (request, remote) -> (status, content type, body).
Endpoint = Callable[[HandshakeRequest], Awaitable[tuple[int, str, bytes]]]


async def _refuse(stream: trio.SocketStream) -> None:
    """Answer 503 and close; a client that is gone already changes nothing."""
    sock = stream.socket
    try:
        with trio.move_on_after(0.1):
            await stream.send_all(OUT_OF_DESCRIPTORS_RESPONSE)
        sock.shutdown(socket.SHUT_WR)
        # Take the request, or closing with it unread would reset the connection.
        os.read(sock.fileno(), 65536)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        sock.close()


def _open_devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _descriptor_free() -> bool:
    """Whether a descriptor is free besides the spare's (which a refusal just freed)."""
    taken = []
    try:
        for _ in range(2):
            taken.append(_open_devnull())
    except OSError:
        return False
    finally:
        for fd in taken:
            os.close(fd)
    return True


# The answer to clients accepted only to be refused while descriptors are short.
OUT_OF_DESCRIPTORS_RESPONSE: Final = http_response(
    503, json_error("server busy"), "application/json", (("Retry-After", "5"),)
)


class Server:
    """Accepts connections; answers HTTP; upgrades /ws and runs each WebSocket."""

    def __init__(
        self,
        config: Config,
        hub: Hub,
        endpoints: dict[str, Endpoint],
    ) -> None:
        self.config = config
        self.hub = hub
        self.counters = hub.counters
        self.endpoints = endpoints
        self.draining = False
        self._accept_scope = trio.CancelScope()
        self._readers: ReaderNursery | None = None
        self._log = LimitedLogger(logger, burst=10)
        # A shortage of descriptors (or of room for request heads) lasts: say so once,
        # then every 10 s with the count.
        self._shortage_log = LimitedLogger(logger, burst=1)
        # Kept open while serving, to be closed when descriptors run out, so that the
        # clients waiting in the backlog can still be accepted and answered 503.
        self._spare_fd: int | None = None
        self._descriptors_short_at: float | None = None
        # Request heads being read, oldest first: (since, the scope that closes it).
        self._heads: dict[ConnStream, tuple[float, trio.CancelScope]] = {}
        # Accepted connections whose request is not answered (nor upgraded) yet.
        self._answering = 0
        self._answered = trio.Event()  # set, and replaced, as each one is

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        admin: Sequence[trio.SocketListener] = (),
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until ``stop_accepting``; connections live on until the caller cancels.
        ``admin`` listeners answer the HTTP endpoints and nothing else (no upgrade)."""
        self._take_spare()
        try:
            async with trio.open_nursery() as connections:
                self._readers = ReaderNursery(connections)
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept, listener, connections, False)
                        for listener in admin:
                            accepting.start_soon(self._accept, listener, connections, True)
                        task_status.started(listeners)
        finally:
            self._release_spare()

    def stop_accepting(self) -> None:
        self._accept_scope.cancel()

    async def wait_answered(self) -> None:
        """Until every request accepted so far is answered or upgraded: a stop must not
        cut off a client whose connection was taken from the backlog a moment before."""
        while self._answering:
            await self._answered.wait()

    @property
    def out_of_descriptors(self) -> bool:
        """Whether an accept failed for want of file descriptors in the last few seconds."""
        at = self._descriptors_short_at
        return at is not None and trio.current_time() - at < OUT_OF_DESCRIPTORS_FOR

    def _take_spare(self) -> None:
        """Hold one descriptor to free when they run out (see _refuse_backlog)."""
        if self._spare_fd is None:
            with contextlib.suppress(OSError):
                self._spare_fd = _open_devnull()

    def _release_spare(self) -> None:
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    async def _accept(
        self, listener: trio.SocketListener, connections: trio.Nursery, admin: bool
    ) -> None:
        """trio.serve_listeners' loop, but running out of descriptors is a rate-limited
        warning (no traceback: trio's own logs one per 0.1 s) and a 503 for whoever waits
        in the backlog, instead of silence until they give up."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    self._descriptors_short(exc)
                    await self._refuse_backlog(listener)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if self._spare_fd is None:  # lost to another thread in a shortage
                    self._take_spare()
                # Counted from here, not from when its task first runs: a stop that
                # comes in between must wait for this one too.
                self._answering += 1
                connections.start_soon(self._handle, stream, admin)

    def _descriptors_short(self, exc: OSError) -> None:
        self._descriptors_short_at = trio.current_time()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._shortage_log.log(
            logging.WARNING,
            "accept",
            "cannot accept connections: %s (open files limit %d, %d WebSockets open,"
            " %d request heads being read); answering 503 until descriptors free up: raise"
            " LimitNOFILE= or lower WS_MAX_CONNECTIONS",
            os.strerror(exc.errno or 0),
            soft,
            self.hub.connection_count,
            len(self._heads),
        )

    async def _refuse_backlog(self, listener: trio.SocketListener) -> None:
        """Answer 503 to the clients waiting in the backlog, on the descriptor kept spare
        for it (one at a time: each is closed before the next is accepted), until the
        backlog is empty or descriptors are free again."""
        if self._spare_fd is None:  # lost to another thread: _accept takes it back
            return
        self._release_spare()
        try:
            for _ in range(REFUSE_AT_MOST):
                with trio.move_on_after(0.01) as waiting:
                    stream = await listener.accept()
                if waiting.cancelled_caught:
                    break
                self.counters.handshake_rejections[Rejection.NO_FILE_DESCRIPTORS] += 1
                await _refuse(stream)
                if _descriptor_free():
                    break  # the shortage is over: serve the next ones
        except OSError:
            pass  # another thread took the descriptor first
        finally:
            self._take_spare()

    async def _handle(self, raw: trio.SocketStream, admin: bool = False) -> None:
        """One accepted connection, which ``_accept`` counted in ``_answering``."""
        try:
            try:
                stream = ConnStream(raw)
                deadline = trio.current_time() + self.config.ws_handshake_timeout
                with trio.move_on_at(deadline) as scope:
                    accepted = await self._answer_request(stream, admin)
            finally:
                self._answering -= 1
                self._answered.set()
                self._answered = trio.Event()
            if scope.cancelled_caught:
                self._handshake_timed_out("request head")
            elif accepted is not None:
                # The handshake deadline covers the upgrade, not the connection's life.
                await self._upgrade_and_run(stream, accepted, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio_websocket.ConnectionClosed:
            # The client reset the connection while its upgrade was being answered.
            logger.debug("client went away during the upgrade")
        except Exception:
            # A defect, but one a client can trigger again and again: rate-limited.
            self._log.log(
                logging.ERROR, "handler_failed", "connection handler failed", exc_info=True
            )
        finally:
            with trio.CancelScope(shield=True):
                await raw.aclose()

    async def _read_head(self, stream: ConnStream) -> bytes | None:
        """The request head, or None when there was no room for it or it was closed to
        make room (_make_room)."""
        now = trio.current_time()
        if not self._make_room(now):
            # Too many heads, all younger than HEAD_CROWDED_AFTER (a burst of silent
            # connections): refused at once, before they take every descriptor.
            self.counters.handshake_rejections[Rejection.TOO_MANY_HEADS] += 1
            await stream.raw.send_all(OUT_OF_DESCRIPTORS_RESPONSE)
            return None
        scope = trio.CancelScope()
        self._heads[stream] = (now, scope)
        try:
            with scope:
                return await read_head(stream, self.config.http_max_header_size)
            return None
        finally:
            self._heads.pop(stream, None)

    def _make_room(self, now: float) -> bool:
        """Close the oldest request heads still being read when there are too many for
        the descriptors left: connections that send nothing (a slowloris) would otherwise
        hold every descriptor until WS_HANDSHAKE_TIMEOUT, and everyone, /health included,
        would get 503. False: no room, and every head is too young to close."""
        heads = self._heads
        if len(heads) < MIN_PENDING_HEADS:
            return True
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = head_cap(soft, self.hub.connection_count)
        close, room = heads_to_close([since for since, _ in heads.values()], now, cap)
        for stream in list(itertools.islice(heads, close)):
            since, scope = heads.pop(stream)
            scope.cancel()
            self.counters.handshake_rejections[Rejection.HEAD_CROWDED_OUT] += 1
            self._shortage_log.log(
                logging.WARNING,
                "head_crowded_out",
                "closed a connection whose request head was not complete after %.1fs, to"
                " make room: %d heads being read (at most %d with the open files limit %d"
                " and %d WebSockets open)",
                now - since,
                len(heads),
                cap,
                soft,
                self.hub.connection_count,
            )
        if not room:
            self._shortage_log.log(
                logging.WARNING,
                "too_many_heads",
                "refused a connection (503): %d request heads being read, all under"
                " %.0fs old (at most %d with the open files limit %d and %d WebSockets"
                " open)",
                len(heads),
                HEAD_CROWDED_AFTER,
                cap,
                soft,
                self.hub.connection_count,
            )
        return room

    def _handshake_timed_out(self, phase: str) -> None:
        self.counters.handshake_rejections[Rejection.HANDSHAKE_TIMEOUT] += 1
        self._log.log(logging.INFO, "timeout", "handshake timed out phase=%s", phase)

    async def _answer_request(self, stream: ConnStream, admin: bool) -> Accept | None:
        """Read the request head and answer it; an Accept means: upgrade this one (never
        on an ``admin`` listener, where /ws is not found)."""
        config = self.config
        try:
            head = await self._read_head(stream)
            if head is None:
                return None
            request = parse_head(head, config.http_max_header_size)
        except HeadError as exc:
            if exc.reason is not Rejection.CLOSED_BEFORE_HEAD:
                self.counters.handshake_rejections[exc.reason] += 1
            if exc.status:
                self._log.log(
                    logging.INFO,
                    exc.reason,
                    "request rejected status=%d reason=%s %s",
                    exc.status,
                    exc.reason,
                    exc.detail,
                )
                body = json_error(exc.reason.replace("_", " "))
                await stream.raw.send_all(http_response(exc.status, body, "application/json"))
            return None
        if admin or request.path != WS_PATH:
            await self._serve_http(stream, request)
            return None
        decision = self._decide(request)
        if isinstance(decision, Reject):
            self._reject(decision, request)
            await stream.raw.send_all(
                http_response(
                    decision.status,
                    decision.body,
                    decision.content_type,
                    decision.extra_headers,
                    head_only=request.method == "HEAD",
                )
            )
            return None
        stream.replay_upgrade(
            request.headers["sec-websocket-key"], head[head_end(head) or len(head) :]
        )
        return decision

    async def _on_client_message(
        self, ws: trio_websocket.WebSocketConnection, message: str | bytes
    ) -> None:
        """Client data messages (the web UI's JSON pings) carry nothing for us. A text
        message over WS_MAX_MESSAGE_SIZE bytes closes the connection with 1009, as a longer
        one does: trio-websocket counts a text message's characters, up to 4 bytes each."""
        limit = self.config.ws_max_message_size
        if isinstance(message, str) and len(message) * 4 > limit and utf8_size(message) > limit:
            await ws.aclose(1009, f"Exceeded maximum message size: {limit} bytes")

    def _decide(self, request: HandshakeRequest) -> Accept | Reject:
        if self.draining:
            return Reject(
                503,
                Rejection.DRAINING,
                b'{"error":"shutting down"}',
                "the daemon is shutting down",
                extra_headers=(("Retry-After", "1"),),
            )
        decision = decide(request, self.config, time.time())
        if isinstance(decision, Accept):
            full = self.hub.try_reserve(decision.user_id)
            if full is not None:
                status, reason = full
                return Reject(
                    status,
                    reason,
                    json_error(reason.replace("_", " ") + " reached"),
                    f"user={decision.user_id}",
                    extra_headers=(("Retry-After", "5"),),
                )
        return decision

    def _reject(self, decision: Reject, request: HandshakeRequest) -> None:
        self.counters.handshake_rejections[decision.reason] += 1
        self._log.log(
            logging.INFO,
            decision.reason,
            "handshake rejected status=%d reason=%s %s",
            decision.status,
            decision.reason,
            decision.detail,
        )

    async def _serve_http(self, stream: ConnStream, request: HandshakeRequest) -> None:
        endpoint = self.endpoints.get(request.path)
        if request.method not in ("GET", "HEAD"):
            status, ctype, body = 405, "application/json", b'{"error":"method not allowed"}'
        elif endpoint is None:
            status, ctype, body = 404, "application/json", b'{"error":"not found"}'
        else:
            status, ctype, body = await endpoint(request)
        await stream.raw.send_all(
            http_response(status, body, ctype, head_only=request.method == "HEAD")
        )

    async def _upgrade_and_run(self, stream: ConnStream, accept: Accept, deadline: float) -> None:
        config = self.config
        if accept.token_in_query:
            self._log.log(
                logging.WARNING,
                "query_token",
                "token passed as query parameter (deprecated; use the %s cookie) user=%s",
                config.cookie_name,
                accept.user_id,
            )
        registered = admitted = False
        try:
            with trio.move_on_at(deadline) as scope:
                admitted = True
                # In user mode: until Redis has confirmed the user's subscriptions, so a
                # message published once the client sees the 101 reaches it.
                await self.hub.admit(accept.user_id, accept.filters)
                assert self._readers is not None, "Server.serve is not running"
                ws = await accept_websocket(
                    self._readers, stream, max_message_size=config.ws_max_message_size
                )
            if scope.cancelled_caught:
                self._handshake_timed_out("upgrade")
                stream.abort()
                return
            conn = Connection(
                accept.user_id,
                stream,
                write_lock(ws),
                expires_at=accept.expires_at,
                max_messages=config.ws_send_buffer,
                max_bytes=config.ws_send_buffer_bytes,
                write_wait=config.ws_write_wait,
                filters=accept.filters,
                ws=ws,
            )
            self.hub.register(conn)
            registered = True
            logger.debug(
                "connection opened conn=%d user=%s filters=%s",
                conn.id,
                conn.user_id,
                format_filters(accept.filters),
            )
            reason = CloseReason.CLOSED
            try:
                # Client messages are read and dropped; this also keeps trio-websocket's
                # reader answering pings and close frames.
                while True:
                    await self._on_client_message(ws, await ws.get_message())
            except trio_websocket.ConnectionClosed as exc:
                reason = _closed_reason(exc)
                if exc.reason is not None and exc.reason.code in PROTOCOL_FAILURES:
                    conn.send_failure_close(exc.reason.code)
                    self._log.log(
                        logging.INFO,
                        reason,
                        "client broke the WebSocket protocol reason=%s conn=%d user=%s detail=%r",
                        reason,
                        conn.id,
                        conn.user_id,
                        exc.reason.reason or "",
                    )
            finally:
                self.hub.unregister(conn, reason)
                # trio-websocket ends our get_message as soon as its close frame is out;
                # during the hub's close handshake the socket stays open for the client's
                # close frame, which would otherwise meet a reset (an unclean close).
                await conn.finish()
                logger.debug(
                    "connection closed conn=%d user=%s reason=%s",
                    conn.id,
                    conn.user_id,
                    conn.close_reason or reason,
                )
        finally:
            if not registered:
                if admitted:
                    self.hub.withdraw(accept.user_id, accept.filters)
                else:
                    self.hub.release(accept.user_id)


def format_filters(filters: dict[str, str] | None) -> str:
    """``projectId:p1,jobId:j1`` as asked in the query, ``-`` for none."""
    if not filters:
        return "-"
    return ",".join(f"{field}{FILTER_SUFFIX}:{value}" for field, value in filters.items())


def utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


def _closed_reason(exc: trio_websocket.ConnectionClosed) -> CloseReason:
    """How the client's side ended."""
    code = exc.reason.code if exc.reason else None
    return _CLOSE_CODE_REASONS.get(code, CloseReason.CLIENT_CLOSED)  # type: ignore[arg-type]


_CLOSE_CODE_REASONS: Final[dict[int, CloseReason]] = {
    1009: CloseReason.MESSAGE_TOO_BIG,
    1006: CloseReason.CONNECTION_LOST,
    1002: CloseReason.PROTOCOL_ERROR,  # a frame the RFC forbids (unmasked, reserved bits or opcode)
    1007: CloseReason.INVALID_DATA,  # a text message that is not UTF-8
}
