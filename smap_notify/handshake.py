"""Deciding a WebSocket handshake: origin policy, token, limits. Pure: no I/O."""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import json
import math
from collections.abc import Iterable
from typing import Final
from urllib.parse import parse_qs, urlsplit

import attrs
import jwt
from jwt.types import Options

from .channels import parse_filters
from .config import Config

JWT_ALGORITHMS: Final = ["HS256", "HS384", "HS512"]
FAR_FUTURE: Final = 10**12  # seconds since 1970: the year 33658
WS_PATH: Final = "/ws"


@attrs.frozen
class HandshakeRequest:
    """What the handshake decision needs from an HTTP request head."""

    method: str
    target: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    http_version: str = "1.1"

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and _has_token(self.headers.get("upgrade", ""), "websocket")
            and _has_token(self.headers.get("connection", ""), "upgrade")
            and bool(self.headers.get("sec-websocket-key"))
        )


def _has_token(value: str, token: str) -> bool:
    """Whether the comma-separated header ``value`` lists ``token`` (case-insensitive),
    as RFC 6455 4.2.1 asks of Upgrade and Connection."""
    return token in [part.strip().lower() for part in value.split(",")]


def upgrade_problem(request: HandshakeRequest) -> str | None:
    """What makes an upgrade request invalid under RFC 6455 4.2.1 beyond its headers'
    presence: HTTP/1.1 or later, and a key that is 16 bytes in base64 (as gorilla checks)."""
    if request.http_version in ("1.0", "0.9"):
        return f"HTTP/{request.http_version}: a WebSocket upgrade needs HTTP/1.1"
    key = request.headers.get("sec-websocket-key", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return f"Sec-WebSocket-Key is not 16 bytes in base64: {key[:40]!r}"
    return None


@attrs.frozen
class Accept:
    user_id: str
    expires_at: float  # the token's exp, Unix seconds
    token_in_query: bool
    used_previous_secret: bool = False
    # Topic field -> value (?projectId=...); None: the connection filters nothing.
    filters: dict[str, str] | None = attrs.field(default=None, eq=False)


class Rejection(enum.StrEnum):
    """Why a connection was refused before the upgrade: the label of
    smap_notify_handshake_rejections."""

    # The request head (server.py).
    NO_FILE_DESCRIPTORS = "no_file_descriptors"
    TOO_MANY_HEADS = "too_many_heads"
    HEAD_CROWDED_OUT = "head_crowded_out"
    HEAD_TOO_LARGE = "head_too_large"
    BAD_REQUEST = "bad_request"
    CLOSED_BEFORE_HEAD = "closed_before_head"  # not counted: nothing to answer
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    # The handshake (decide), in the order it is checked.
    DRAINING = "draining"
    ORIGIN_MISSING = "origin_missing"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    INVALID_FILTER = "invalid_filter"
    NOT_WEBSOCKET = "not_websocket"
    BAD_WEBSOCKET_VERSION = "bad_websocket_version"
    # Capacity (the hub).
    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_USER = "max_connections_per_user"


@attrs.frozen
class Reject:
    status: int
    reason: Rejection
    body: bytes
    detail: str = ""  # for the log line; never contains the token
    content_type: str = "application/json"
    extra_headers: tuple[tuple[str, str], ...] = ()


def json_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()


MISSING_TOKEN: Final = json_error("missing token parameter")
INVALID_TOKEN: Final = json_error("invalid or expired token")


def _origin_host(origin: str) -> str | None:
    try:
        parts = urlsplit(origin)
        host = parts.hostname
        _ = parts.port  # a malformed port makes the origin malformed
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return host


def is_localhost_origin(origin: str) -> bool:
    """http(s) origin whose host is localhost or 127.0.0.1, any port."""
    return _origin_host(origin) in ("localhost", "127.0.0.1")


def is_private_subnet_origin(origin: str, subnets: Iterable[str]) -> bool:
    """http(s) origin whose host is an IP literal inside one of ``subnets`` (IPv6 in
    brackets, as browsers send it: ``http://[fd00::5]:3000``)."""
    host = _origin_host(origin)
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in subnets)


def origin_allowed(origin: str | None, config: Config) -> bool:
    """The origin policy of CONTRACT section 4, by ENV."""
    if not origin:
        return False
    if origin in config.allowed_origins:
        return True
    if config.production:
        return False
    return is_localhost_origin(origin) or is_private_subnet_origin(
        origin, config.dev_origin_subnets
    )


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return ""


def _no_token(request: HandshakeRequest, cookie_name: str) -> str:
    """The log's detail for a request without a token: the names of the cookies it had
    (never their values), so that a COOKIE_NAME that differs from identity-srv's shows."""
    # A part without "=" is a cookie with an empty name: what it holds is its value.
    names = [
        name.strip()[:40]
        for part in request.headers.get("cookie", "").split(";")
        if (name := part.partition("=")[0]).strip() and "=" in part
    ]
    sent = f" (cookies sent: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
    which = "an empty" if cookie_name in names else "no"
    return f"{which} {cookie_name} cookie{sent if names else ''} and no token parameter"


def find_token(request: HandshakeRequest, cookie_name: str) -> tuple[str, bool]:
    """The token from the cookie, else from ``?token=``; second value: it came from the query."""
    token = _cookie(request.headers.get("cookie", ""), cookie_name)
    if token:
        return token, False
    values = parse_qs(request.query).get("token", [])
    return (values[0], True) if values and values[0] else ("", False)


@attrs.frozen
class TokenClaims:
    user_id: str
    expires_at: float
    used_previous_secret: bool


class TokenError(Exception):
    pass


_DECODE_OPTIONS: Final[Options] = {
    "require": ["exp", "sub"],
    "verify_aud": False,
    "verify_iss": False,
    # Like the original: a token minted by a clock slightly ahead is fine.
    "verify_iat": False,
    # exp is checked below against the caller's clock, one clock for all.
    "verify_exp": False,
    # CONTRACT section 4 checks sub, exp and nbf only; PyJWT 2.10+ would refuse a token
    # whose jti is not a string.
    "verify_jti": False,
}


def _decode(token: str, secret: str) -> dict[str, object]:
    return jwt.decode(token, secret, algorithms=JWT_ALGORITHMS, options=_DECODE_OPTIONS)


def verify_token(token: str, secrets: Iterable[str], now: float) -> TokenClaims:
    """Verify an HMAC JWT against the current secret, then the previous one (rotation)."""
    last: Exception | None = None
    for index, secret in enumerate(s for s in secrets if s):
        try:
            claims = _decode(token, secret)
        except jwt.InvalidSignatureError as exc:
            last = exc
            continue
        except jwt.PyJWTError as exc:
            raise TokenError(f"{type(exc).__name__}: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise TokenError("claim sub must be a non-empty string")
        exp = claims["exp"]
        if (
            isinstance(exp, bool)
            or not isinstance(exp, int | float)
            or (isinstance(exp, float) and not math.isfinite(exp))
        ):
            # NaN, Infinity (1e400 in JSON too) would never pass: a token that never expires.
            raise TokenError(f"claim exp must be a number (seconds since 1970), got {exp!r:.40}")
        if exp <= now:
            raise TokenError("token has expired (claim exp is not in the future)")
        # An integer exp may be beyond any float (10**400): far enough to mean never.
        return TokenClaims(sub, float(min(exp, FAR_FUTURE)), index > 0)
    raise TokenError(f"{type(last).__name__}: {last}" if last else "no secret configured")


def decide(request: HandshakeRequest, config: Config, now: float) -> Accept | Reject:
    """Origin first, then token, then the upgrade itself. Capacity is the hub's call."""
    origin = request.headers.get("origin")
    if not origin_allowed(origin, config):
        return Reject(
            403,
            Rejection.ORIGIN_MISSING if not origin else Rejection.ORIGIN_NOT_ALLOWED,
            json_error("origin not allowed"),
            f"origin={origin[:200]!r}" if origin else "no Origin header",
        )
    token, in_query = find_token(request, config.cookie_name)
    if not token:
        return Reject(
            401, Rejection.MISSING_TOKEN, MISSING_TOKEN, _no_token(request, config.cookie_name)
        )
    try:
        claims = verify_token(token, (config.jwt_secret_key, config.jwt_previous_secret_key), now)
    except TokenError as exc:
        return Reject(401, Rejection.INVALID_TOKEN, INVALID_TOKEN, str(exc))
    params = parse_qs(request.query)
    filters, bad = parse_filters(params, config.channels.filter_fields)
    if bad is not None:
        value = params[bad][0]
        return Reject(
            400,
            Rejection.INVALID_FILTER,
            json_error(f"invalid {bad}: only alphanumeric, underscore, and hyphen allowed"),
            f"{bad}={value[:60]!r} user={claims.user_id}",
        )
    if not request.is_websocket_upgrade:
        return Reject(
            400,
            Rejection.NOT_WEBSOCKET,
            json_error("not a websocket request"),
            "missing Upgrade: websocket, Connection: upgrade or Sec-WebSocket-Key",
        )
    if problem := upgrade_problem(request):
        return Reject(400, Rejection.NOT_WEBSOCKET, json_error("not a websocket request"), problem)
    version = request.headers.get("sec-websocket-version", "")
    if version.strip() != "13":
        return Reject(
            426,
            Rejection.BAD_WEBSOCKET_VERSION,
            json_error("unsupported websocket version"),
            f"version={version[:20]!r}",
            extra_headers=(("Sec-WebSocket-Version", "13"),),
        )
    return Accept(claims.user_id, claims.expires_at, in_query, claims.used_previous_secret, filters)
