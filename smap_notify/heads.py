"""HTTP request heads: read off a connection up to their blank line (bounded), parsed
with h11 into a ``HandshakeRequest``, and the plain HTTP responses the daemon writes
(errors, the HTTP endpoints), each closing its connection. Pure but for ``read_head``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

import h11

from .handshake import HandshakeRequest, Rejection
from .websocket import ConnStream


class HeadError(Exception):
    def __init__(self, status: int, reason: Rejection, detail: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail


# The blank line that ends a request head: CRLF, or a bare LF as h11 and Go accept too.
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")


def head_end(data: bytes | bytearray, start: int = 0) -> int | None:
    """Where the request head in ``data`` ends (after its blank line), if it does; the
    blank line is looked for from ``start`` on."""
    match = _HEAD_END.search(data, start)
    return match.end() if match else None


async def read_head(stream: ConnStream, limit: int) -> bytes:
    """Bytes up to the end of the request head (and whatever came with them)."""
    buf = bytearray()
    scanned = 0
    # Each chunk is scanned once, with the 3 bytes before it that may begin the blank line:
    # the work stays linear in the head's size however the client cuts it.
    while (end := head_end(buf, scanned)) is None:
        if len(buf) > limit:
            raise HeadError(
                431, Rejection.HEAD_TOO_LARGE, f"over {limit} bytes (HTTP_MAX_HEADER_SIZE)"
            )
        chunk = await stream.raw.receive_some(4096)
        if not chunk:
            raise HeadError(0, Rejection.CLOSED_BEFORE_HEAD)
        scanned = max(0, len(buf) - 3)
        buf += chunk
    if end > limit:
        raise HeadError(
            431, Rejection.HEAD_TOO_LARGE, f"{end} bytes, over {limit} (HTTP_MAX_HEADER_SIZE)"
        )
    return bytes(buf)


# h11 quotes the offending line or value in its message (``illegal request line:
# bytearray(b'GET /ws?token=...')``, ``Illegal header value b'...'``): a token or a cookie.
_QUOTED_REQUEST_TEXT: Final = re.compile(r":? (?:bytearray\()?b['\"]")


def origin_form(target: str) -> str:
    """``target`` in origin form: an absolute-form target (``http://host/health?x``) as
    its path and query (RFC 9112 3.2.2 has servers accept both)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    path_start = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path = rest[path_start:]
    return path if path.startswith("/") else "/" + path


def parse_head(data: bytes, limit: int) -> HandshakeRequest:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        # The log line says what was wrong, never the request text itself.
        detail = _QUOTED_REQUEST_TEXT.split(str(exc), 1)[0]
        raise HeadError(exc.error_status_hint, Rejection.BAD_REQUEST, detail) from None
    if not isinstance(event, h11.Request):
        raise HeadError(400, Rejection.BAD_REQUEST, "no complete request")
    fields: dict[str, list[str]] = {}
    for name, value in event.headers:
        fields.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    # RFC 9110 5.3 joins repeated fields with a comma; Cookie fields are joined with "; "
    # (RFC 6265 5.4), so that every cookie stays findable. One join per name keeps the
    # work linear in the number of lines.
    headers = {
        key: ("; " if key == "cookie" else ", ").join(values) for key, values in fields.items()
    }
    return HandshakeRequest(
        event.method.decode("ascii", "replace"),
        origin_form(event.target.decode("latin-1")),
        headers,
        event.http_version.decode("ascii", "replace"),
    )


def http_response(
    status: int,
    body: bytes,
    content_type: str,
    extra_headers: Sequence[tuple[str, str]] = (),
    *,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    conn = h11.Connection(h11.SERVER)
    # h11 must see a request before it writes a response (HEAD: headers, no body).
    method = b"HEAD" if head_only else b"GET"
    conn.receive_data(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        ("Cache-Control", "no-store"),
        *extra_headers,
    ]
    response = h11.Response(status_code=status, headers=headers, reason=_reason_phrase(status))
    out = conn.send(response) or b""
    if not head_only:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    return out


def _reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
