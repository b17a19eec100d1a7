"""heads.py: reading, parsing and answering HTTP request heads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import h11
import pytest

from smap_notify import heads as heads_module
from smap_notify.handshake import (
    find_token,
)
from smap_notify.heads import HeadError, http_response, parse_head, read_head
from tests.test_handshake import MISSING_TOKEN_BODY


def test_parse_head_records_the_http_version() -> None:
    head = b"GET /ws HTTP/1.0\r\nHost: x\r\n\r\n"
    assert parse_head(head, 8192).http_version == "1.0"
    assert parse_head(head.replace(b"1.0", b"1.1"), 8192).http_version == "1.1"


def test_parse_head_returns_method_target_and_lowercased_headers() -> None:
    head = (
        b"GET /ws?token=abc HTTP/1.1\r\n"
        b"Host: notify.example\r\n"
        b"Origin: https://smap.tantai.dev\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"\r\n"
    )
    request = parse_head(head, 8192)
    assert (request.method, request.target) == ("GET", "/ws?token=abc")
    assert (request.path, request.query) == ("/ws", "token=abc")
    assert request.headers["origin"] == "https://smap.tantai.dev"
    assert request.headers["sec-websocket-version"] == "13"
    assert request.is_websocket_upgrade


def test_parse_head_joins_repeated_headers() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\ncookie: b=2\r\n\r\n"
    assert parse_head(head, 8192).headers["cookie"] == "a=1; b=2"


def test_many_cookie_lines_are_joined_in_order() -> None:
    """2,500 Cookie lines (the 32 KB head limit's worth): every cookie stays findable,
    in order. Each line was appended to the joined text so far, a copy of the whole,
    which cost the square of their number; now each name is joined once."""
    lines = b"".join(b"Cookie: c%d=v%d\r\n" % (i, i) for i in range(2500))
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\n" + lines + b"Cookie: smap_auth_token=t\r\n\r\n"
    request = parse_head(head, 1 << 20)
    cookies = request.headers["cookie"].split("; ")
    assert cookies[:3] == ["c0=v0", "c1=v1", "c2=v2"] and len(cookies) == 2501
    assert find_token(request, "smap_auth_token") == ("t", False)


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("http://notify.example/health", "/health", ""),
        ("HTTPS://notify.example:8080/ws?token=abc", "/ws", "token=abc"),
        ("http://notify.example", "/", ""),
        ("http://notify.example?x=1", "/", "x=1"),
        ("/health", "/health", ""),
    ],
)
def test_absolute_form_targets_are_read_like_origin_form(
    target: str, path: str, query: str
) -> None:
    """RFC 9112 3.2.2: a server accepts ``GET http://host/health HTTP/1.1`` (as the
    original's Go server does); it got 404."""
    request = parse_head(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 8192)
    assert (request.path, request.query) == (path, query)


def test_parse_head_ignores_bytes_after_the_head() -> None:
    request = parse_head(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\x81\x85junk", 8192)
    assert request.path == "/health"


def test_parse_head_decodes_header_values_as_latin1() -> None:
    request = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\n\r\n", 8192)
    assert request.headers["x-name"] == "café"


@pytest.mark.parametrize(
    "head",
    [
        b"garbage\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n\r\n",  # HTTP/1.1 requires Host
        b"GET /ws HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\n",  # incomplete
        b"",
        b"\r\n\r\n",
    ],
)
def test_parse_head_rejects_bad_heads_with_400(head: bytes) -> None:
    with pytest.raises(HeadError) as info:
        parse_head(head, 8192)
    assert info.value.status == 400
    assert info.value.reason == "bad_request"


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        (b"GET /ws?token=SECRET &x=1 HTTP/1.1\r\nHost: x\r\n\r\n", "illegal request line"),
        (b"GET /ws?token=SECRET&l=\xe9 HTTP/1.1\r\nHost: x\r\n\r\n", "illegal request line"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nCookie : t=SECRET\r\n\r\n", "illegal header line"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nCookie: t=SECRET\x00\r\n\r\n", "illegal header line"),
    ],
)
def test_parse_head_says_what_was_wrong_without_quoting_the_request(
    head: bytes, detail: str
) -> None:
    # The detail goes to the log; the request text may hold a token or a cookie.
    with pytest.raises(HeadError) as info:
        parse_head(head, 8192)
    assert info.value.status == 400
    assert info.value.detail == detail


def test_parse_head_rejects_an_incomplete_head_over_the_limit_with_431() -> None:
    with pytest.raises(HeadError) as info:
        parse_head(b"GET /ws HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 5000, 1024)
    assert info.value.status == 431


async def test_read_head_collects_chunks_until_the_blank_line() -> None:
    data = await read_head(fake_stream(b"GET / HTTP/1.1\r\nHo", b"st: x\r\n\r", b"\nextra"), 8192)
    assert data == b"GET / HTTP/1.1\r\nHost: x\r\n\r\nextra"
    assert parse_head(data, 8192).path == "/"


@pytest.mark.parametrize("blank", [b"\r\n\r\n", b"\n\n", b"\r\n\n"])
async def test_read_head_finds_a_blank_line_sent_a_byte_at_a_time(blank: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x" + blank
    data = await read_head(fake_stream(*(head[i : i + 1] for i in range(len(head)))), 8192)
    assert data == head


async def test_read_head_scans_each_byte_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A head trickled a byte at a time used to be rescanned whole on every receive: the
    square of its length in CPU (26 KB: 4.7 s)."""
    scanned = []
    pattern = heads_module._HEAD_END

    class Counting:
        def search(self, data: bytes, pos: int = 0) -> Any:
            scanned.append(len(data) - pos)
            return pattern.search(data, pos)

    monkeypatch.setattr(heads_module, "_HEAD_END", Counting())
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n"
    chunks = [head[i : i + 1] for i in range(len(head))]
    assert await read_head(fake_stream(*chunks), 8192) == head
    assert sum(scanned) <= 4 * len(head)


async def test_read_head_reports_a_close_before_the_head() -> None:
    with pytest.raises(HeadError) as info:
        await read_head(fake_stream(b"GET / HTTP/1.1\r\n"), 8192)
    assert (info.value.status, info.value.reason) == (0, "closed_before_head")


async def test_read_head_refuses_a_head_over_the_limit_with_431() -> None:
    chunks = [b"GET / HTTP/1.1\r\n"] + [b"X: " + b"a" * 1000 + b"\r\n"] * 5
    with pytest.raises(HeadError) as info:
        await read_head(fake_stream(*chunks), 2048)
    assert (info.value.status, info.value.reason) == (431, "head_too_large")


async def test_read_head_refuses_a_complete_head_over_the_limit() -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 3000 + b"\r\n\r\n"
    with pytest.raises(HeadError) as info:
        await read_head(fake_stream(head), 2048)
    assert info.value.status == 431


@pytest.mark.parametrize(
    ("status", "body", "ctype"),
    [
        (401, MISSING_TOKEN_BODY, "application/json"),
        (403, b'{"error":"origin not allowed"}', "application/json"),
        (200, b"# HELP x\n", "text/plain; version=0.0.4; charset=utf-8"),
        (503, b"", "application/json"),
        (200, "héllo".encode(), "text/plain; charset=utf-8"),
    ],
)
def test_http_response_is_parseable_http11_with_length_and_close(
    status: int, body: bytes, ctype: str
) -> None:
    raw = http_response(status, body, ctype)
    assert raw.startswith(b"HTTP/1.1 ")
    response, received = parse_response(raw)
    headers = headers_of(response)
    assert response.status_code == status
    assert received == body
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"] == ctype.encode()


def test_http_response_carries_extra_headers() -> None:
    raw = http_response(426, b"{}", "application/json", [("Sec-WebSocket-Version", "13")])
    response, _ = parse_response(raw)
    assert headers_of(response)[b"sec-websocket-version"] == b"13"


def test_http_response_for_head_has_length_but_no_body() -> None:
    raw = http_response(200, b'{"status":"healthy"}', "application/json", head_only=True)
    assert raw.endswith(b"\r\n\r\n")
    response, received = parse_response(raw, method=b"HEAD")
    assert received == b""
    assert headers_of(response)[b"content-length"] == b"20"


def fake_stream(*chunks: bytes) -> Any:
    return SimpleNamespace(raw=FakeRaw(list(chunks)))


def parse_response(raw: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return response, body
        else:
            raise AssertionError(event)


def headers_of(response: h11.Response) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in response.headers}


class FakeRaw:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""
