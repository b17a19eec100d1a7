"""Baseline relay for the benchmark: the smap-notify contract on asyncio.

This is what a competent developer would write with the two obvious asyncio libraries,
``websockets`` (server) and ``redis.asyncio`` (Pub/Sub, with hiredis when installed). It is
the yardstick of issue 4, not a product: no Prometheus, no systemd, no drain on shutdown.

Contract covered (docs/CONTRACT.md sections 1-4):

- PSUBSCRIBE ``user_noti:*``; the user id is everything after the prefix.
- Message ``{"type": str, "payload": any}``; anything else is dropped and logged.
- ``GET /ws``: Origin checked first (production list, or in non-production mode also
  localhost/127.0.0.1 on any port and three private /24 subnets), then the JWT (HMAC,
  ``JWT_SECRET_KEY``, ``sub`` = user id, ``exp`` required) from the ``smap_auth_token`` cookie
  or the deprecated ``?token=`` query parameter. Rejections are plain HTTP before the upgrade.
- The envelope ``{"type","payload","timestamp"}`` is serialised and encoded once per message
  and the same bytes go to every connection of that user, one text frame per message.
- Each connection has a bounded queue (256) drained by its own writer task; a client that
  lets it overflow is disconnected, so one slow client never delays the others.
- Keep-alive by the library (ping every 30 s, 30 s to answer), inbound messages over 512 bytes
  close with 1009, the connection closes when the token expires. ``GET /health``.

Environment: WS_HOST, WS_PORT, REDIS_HOST (host:port), REDIS_PASSWORD, REDIS_DB,
JWT_SECRET_KEY (required), COOKIE_NAME, ENV, WS_MAX_CONNECTIONS, WS_MAX_CONNECTIONS_PER_USER,
LOGGER_LEVEL.

Run: ``JWT_SECRET_KEY=... python bench/asyncio_relay.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import jwt
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("asyncio_relay")

PATTERN = "user_noti:*"
PREFIX = b"user_noti:"
QUEUE_SIZE = 256
PRODUCTION_ORIGINS = frozenset(
    {
        "https://smap.tantai.dev",
        "https://smap-api.tantai.dev",
        "http://smap.tantai.dev",
        "http://smap-api.tantai.dev",
    }
)
DEV_SUBNETS = tuple(
    ipaddress.ip_network(n) for n in ("172.16.21.0/24", "172.16.19.0/24", "192.168.1.0/24")
)


class Settings:
    def __init__(self, env: dict[str, str]) -> None:
        self.host = env.get("WS_HOST", "0.0.0.0")
        self.port = int(env.get("WS_PORT", "8081"))
        redis_host = env.get("REDIS_HOST", "localhost:6379")
        host, _, port = redis_host.rpartition(":")
        self.redis_host = host or redis_host
        self.redis_port = int(port) if host else 6379
        self.redis_password = env.get("REDIS_PASSWORD") or None
        self.redis_db = int(env.get("REDIS_DB", "0") or 0)
        self.secret = env.get("JWT_SECRET_KEY", "")
        if not self.secret:
            raise SystemExit("JWT_SECRET_KEY is required")
        self.cookie_name = env.get("COOKIE_NAME", "smap_auth_token")
        self.production = env.get("ENV", "production").strip().lower() in ("", "production")
        self.max_connections = int(env.get("WS_MAX_CONNECTIONS", "10000"))
        self.max_per_user = int(env.get("WS_MAX_CONNECTIONS_PER_USER", "0") or 0)
        level = env.get("LOGGER_LEVEL", "info").lower()
        self.log_level = {"warn": "WARNING"}.get(level, level.upper())


def _json_response(status: int, body: dict[str, object]) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


class Client:
    """One open WebSocket: its bounded queue and the task that drains it."""

    __slots__ = ("ws", "user", "queue", "writer")

    def __init__(self, ws: ServerConnection, user: str) -> None:
        self.ws = ws
        self.user = user
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        self.writer: asyncio.Task[None] | None = None

    async def write_loop(self) -> None:
        queue, ws = self.queue, self.ws
        try:
            while True:
                frame = await queue.get()
                # bytes with text=True: one text frame, no second encoding per connection.
                await ws.send(frame, text=True)
        except ConnectionClosed:
            pass


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.users: dict[str, set[Client]] = {}
        self.count = 0
        self.subscribed = False
        self.last_message_at: str | None = None
        self.started = time.monotonic()
        self.redis = aioredis.Redis(
            host=settings.redis_host,
            port=settings.redis_port,
            password=settings.redis_password,
            db=settings.redis_db,
            socket_keepalive=True,
            health_check_interval=30,
        )
        self.stats = {"delivered": 0, "dropped_no_user": 0, "invalid": 0, "overflow": 0}

    # ---- handshake -------------------------------------------------------------------
    def origin_allowed(self, origin: str | None) -> bool:
        if not origin:
            return False
        if origin in PRODUCTION_ORIGINS:
            return True
        if self.s.production:
            return False
        try:
            host = urlsplit(origin).hostname
        except ValueError:
            return False
        if host in ("localhost", "127.0.0.1"):
            return True
        try:
            addr = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        return addr.version == 4 and any(addr in net for net in DEV_SUBNETS)

    def token_from(self, request: Request) -> str | None:
        for header in request.headers.get_all("Cookie"):
            for part in header.split(";"):
                name, _, value = part.strip().partition("=")
                if name == self.s.cookie_name and value:
                    return value
        query = urlsplit(request.path).query
        if query:
            values = parse_qs(query).get("token")
            if values and values[0]:
                log.warning("token passed as query parameter (deprecated)")
                return values[0]
        return None

    async def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/health":
            return self.health()
        if path != "/ws":
            return conn.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return conn.respond(http.HTTPStatus.BAD_REQUEST, "Bad Request\n")
        if not self.origin_allowed(request.headers.get("Origin")):
            return conn.respond(http.HTTPStatus.FORBIDDEN, "Forbidden\n")
        token = self.token_from(request)
        if token is None:
            return _json_response(401, {"error": "missing token parameter"})
        try:
            claims = jwt.decode(
                token,
                self.s.secret,
                algorithms=["HS256", "HS384", "HS512"],
                options={"require": ["exp", "sub"], "verify_aud": False},
            )
            user = claims["sub"]
            if not isinstance(user, str) or not user:
                raise jwt.InvalidTokenError("sub")
        except jwt.PyJWTError:
            return _json_response(401, {"error": "invalid or expired token"})
        if self.count >= self.s.max_connections:
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        if self.s.max_per_user and len(self.users.get(user, ())) >= self.s.max_per_user:
            return conn.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        conn.user_id = user  # type: ignore[attr-defined]
        conn.token_exp = float(claims["exp"])  # type: ignore[attr-defined]
        return None

    def health(self) -> Response:
        healthy = self.subscribed
        return _json_response(
            200 if healthy else 503,
            {
                "status": "healthy" if healthy else "degraded",
                "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
                "websocket": {
                    "active_connections": self.count,
                    "total_unique_users": len(self.users),
                },
                "subscriber": {
                    "active": self.subscribed,
                    "last_message_at": self.last_message_at,
                    "pattern": PATTERN,
                },
                "uptime_seconds": int(time.monotonic() - self.started),
            },
        )

    # ---- connections -----------------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        user: str = ws.user_id  # type: ignore[attr-defined]
        client = Client(ws, user)
        self.users.setdefault(user, set()).add(client)
        self.count += 1
        client.writer = asyncio.create_task(client.write_loop())
        loop = asyncio.get_running_loop()
        delay = ws.token_exp - time.time()  # type: ignore[attr-defined]
        expiry = loop.call_later(
            max(delay, 0.0), lambda: asyncio.ensure_future(ws.close(1008, "token expired"))
        )
        try:
            async for _ in ws:  # client data (the web UI's JSON ping) is read and ignored
                pass
        except ConnectionClosed:
            pass
        finally:
            expiry.cancel()
            client.writer.cancel()
            conns = self.users.get(user)
            if conns is not None:
                conns.discard(client)
                if not conns:
                    del self.users[user]
            self.count -= 1

    # ---- Redis -----------------------------------------------------------------------
    def route(self, channel: bytes, data: bytes) -> None:
        user = channel[len(PREFIX) :].decode("utf-8", "replace")
        if not user:
            self.stats["invalid"] += 1
            log.warning("empty user id in channel %r", channel)
            return
        try:
            msg = json.loads(data)
        except ValueError as exc:
            self.stats["invalid"] += 1
            log.warning("message for %s is not JSON: %s", user, exc)
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.stats["invalid"] += 1
            log.warning("message for %s has no string type", user)
            return
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        self.last_message_at = now
        conns = self.users.get(user)
        if not conns:
            self.stats["dropped_no_user"] += 1
            return
        frame = json.dumps(
            {"type": msg["type"], "payload": msg.get("payload"), "timestamp": now},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        for client in tuple(conns):
            try:
                client.queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.stats["overflow"] += 1
                log.warning("queue full for a connection of %s: disconnecting it", user)
                conns.discard(client)
                asyncio.ensure_future(client.ws.close(1008, "too slow"))
            else:
                self.stats["delivered"] += 1

    async def subscribe_forever(self) -> None:
        backoff = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(PATTERN)
                async for msg in pubsub.listen():
                    kind = msg["type"]
                    if kind == "pmessage":
                        self.route(msg["channel"], msg["data"])
                    elif kind == "psubscribe":
                        self.subscribed = True
                        backoff = 0.5
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                self.subscribed = False
                log.warning("redis subscriber lost (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


async def main() -> None:
    settings = Settings(dict(os.environ))
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    relay = Relay(settings)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    subscriber = asyncio.create_task(relay.subscribe_forever())
    async with serve(
        relay.handler,
        settings.host,
        settings.port,
        process_request=relay.process_request,
        compression=None,
        ping_interval=30,
        ping_timeout=30,
        close_timeout=10,
        max_size=512,
        server_header=None,
        backlog=1024,
    ):
        log.info("listening on %s:%d", settings.host, settings.port)
        await stop
    subscriber.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await subscriber
    await relay.redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
