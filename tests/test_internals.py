"""The private parts of trio-websocket, wsproto and redis-py that the hot path relies on.

requirements/ locks the versions these were checked against; if an upgrade changes any of
this, these tests say so before the daemon misbehaves (README.rst, "Upgrading
dependencies").
"""

from __future__ import annotations

import ast
import fcntl
import importlib
import inspect
import os
import resource
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import trio
import trio_websocket
import wsproto
from redis._parsers import _RESP2Parser
from trio_websocket import _impl
from wsproto.handshake import H11Handshake

import smap_notify
from smap_notify import resp
from smap_notify.config import Config
from smap_notify.redis_client import make_client
from smap_notify.resp import MAX_BATCH, Replies
from smap_notify.websocket import _FINISHED_HANDSHAKE, ConnStream, release_handshake_state

# -- which modules may touch which library's private parts --------------------------------

PACKAGE = Path(smap_notify.__file__).parent

# Library -> (the modules that may use its private names, the modules checked). A module
# split out of an owner joins its row.
PRIVATE_PARTS: dict[str, tuple[set[str], set[str] | None]] = {
    "trio_websocket": ({"websocket.py"}, None),  # None: every module is checked
    "wsproto": ({"websocket.py"}, None),
    # redis-py's belong to the subscriber side; checked here on the WebSocket side only.
    "redis": (
        {"redis_client.py", "resp.py", "shard_subscriber.py", "subscriber.py"},
        {"websocket.py", "frames.py", "outbound.py", "connection.py", "hub.py", "server.py"},
    ),
}


def private_names(library: str) -> set[str]:
    """Names of ``library``'s private attributes: ``self._x`` it assigns or defines."""
    names: set[str] = set()
    package = importlib.import_module(library)
    for path in Path(package.__file__ or "").parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = node.name
            else:
                continue
            if name.startswith("_") and not name.endswith("__"):
                names.add(name)
    return names


def private_uses(tree: ast.AST, library: str, names: set[str]) -> list[str]:
    """Where ``tree`` imports a private module or name of ``library``, or reads one of
    its private ``names`` off something other than ``self``."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            imported = [module] if module else []
            imported += [alias.name for alias in node.names]
            if module.split(".")[0] == library or any(
                name.split(".")[0] == library for name in imported
            ):
                if any(part.startswith("_") for name in imported for part in name.split(".")):
                    uses.append(f"line {node.lineno}: import {', '.join(imported)}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            uses.append(f"line {node.lineno}: .{node.attr}")
    return uses


@pytest.mark.parametrize("library", sorted(PRIVATE_PARTS))
def test_private_parts_of_a_library_are_used_in_its_one_module(library: str) -> None:
    owners, checked = PRIVATE_PARTS[library]
    names = private_names(library)
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in owners or (checked is not None and path.name not in checked):
            continue
        uses = private_uses(ast.parse(path.read_text()), library, names)
        if uses:
            found[path.name] = uses
    assert found == {}, f"private parts of {library} outside {sorted(owners)}"


def test_the_private_names_check_sees_the_uses_it_guards_against() -> None:
    names = private_names("trio_websocket") | private_names("wsproto")
    tree = ast.parse(
        "from trio_websocket._impl import WebSocketConnection\n"
        "import wsproto._x\n"
        "lock = ws._stream_lock\n"
        "ws._wsproto.handshake = None\n"
        "self._stream_lock = None\n"
    )
    uses = private_uses(tree, "trio_websocket", names) + private_uses(tree, "wsproto", names)
    assert "line 1: import trio_websocket._impl, WebSocketConnection" in uses
    assert "line 2: import wsproto._x" in uses
    assert {"line 3: ._stream_lock", "line 4: ._wsproto"} <= set(uses)
    assert not any(use.startswith("line 5") for use in uses)
    owners = PRIVATE_PARTS["trio_websocket"][0]
    assert private_uses(ast.parse((PACKAGE / "websocket.py").read_text()), "trio_websocket", names)
    assert owners == {"websocket.py"}


def test_trio_websocket_writes_only_through_send_under_its_stream_lock() -> None:
    source = inspect.getsource(_impl.WebSocketConnection._send)
    assert "async with self._stream_lock:" in source
    assert "await self._stream.send_all(data)" in source
    init = inspect.getsource(_impl.WebSocketConnection.__init__)
    assert "self._stream_lock = trio.StrictFIFOLock()" in init
    assert "self._handshake_headers" in init
    # No other place writes to the stream directly.
    module = inspect.getsource(_impl)
    assert module.count("self._stream.send_all(") == 1


def test_wrap_server_stream_only_needs_start_soon_from_its_nursery() -> None:
    source = inspect.getsource(_impl.wrap_server_stream)
    assert "nursery.start_soon(connection._reader_task)" in source
    assert source.count("nursery.") == 1


def test_wsproto_uses_the_handshake_only_for_events_once_open() -> None:
    source = inspect.getsource(wsproto.WSConnection)
    uses = [line.strip() for line in source.splitlines() if "self.handshake" in line]
    # All but the last run only while self.connection is None, i.e. before the upgrade.
    assert uses == [
        "self.handshake = H11Handshake(connection_type)",
        "return self.handshake.state",
        "self.handshake.initiate_upgrade_connection(headers, path)",
        "data += self.handshake.send(event)",
        "self.connection = self.handshake.connection",
        "self.handshake.receive_data(data)",
        "self.connection = self.handshake.connection",
        "yield from self.handshake.events()",
    ]
    assert "_h11_connection" in inspect.getsource(H11Handshake.__init__)


async def test_released_connection_still_speaks_websocket() -> None:
    """A server connection with its handshake state released answers pings and messages."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        done = trio.Event()

        async def serve_one(raw: trio.SocketStream) -> None:
            stream = ConnStream(raw)
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            release_handshake_state(ws)
            assert ws._wsproto.handshake is _FINISHED_HANDSHAKE
            assert ws._handshake_headers == ()
            await ws.send_message(await ws.get_message())
            await ws.aclose()
            done.set()

        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        client = await trio_websocket.connect_websocket(
            nursery, "127.0.0.1", port, "/", use_ssl=False
        )
        with trio.fail_after(5):
            await client.ping(b"x")
            await client.send_message("echo")
            assert await client.get_message() == "echo"
            await done.wait()
        nursery.cancel_scope.cancel()


# -- redis-py: the subscriber reads the subscribed connection's socket itself --------------


def test_redis_connection_keeps_its_socket_in_sock(redis_server: Any) -> None:
    client = make_client(Config(jwt_secret_key="x", redis_host=f"127.0.0.1:{redis_server.port}"))
    pubsub = client.pubsub()
    try:
        pubsub.psubscribe("user_noti:*")
        sock = pubsub.connection._sock
        assert isinstance(sock, socket.socket)
        # Timed sockets are non-blocking underneath: a read with nothing there cannot hang.
        assert os.get_blocking(sock.fileno()) is False
        replies = Replies(pubsub.connection)
        assert replies.wait(2.0)
        batch: list[Any] = []
        taken: list[Any] = []
        replies.read(lambda reply, _batch: taken.append(reply), batch)
        assert taken == [[b"psubscribe", b"user_noti:*", 1]]
        # make_client's connections parse with redis-py's pure-Python RESP2 parser (see
        # there why), chosen through the pool's connection_kwargs.
        assert isinstance(pubsub.connection._parser, _RESP2Parser)
    finally:
        pubsub.close()
        client.close()


def _pmessage(i: int) -> bytes:
    data = b'{"type":"n","payload":%d}' % i
    return b"*4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n$%d\r\n%s\r\n" % (
        len(data),
        data,
    )


def test_replies_end_a_batch_of_large_messages_at_max_batch_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """256 messages of 1 MB made one batch: 256 MB in flight per batch, two batches queued
    for the hub and a third being read. (A smaller bound here, so that the socket holds
    several batches' worth.)"""
    monkeypatch.setattr(resp, "MAX_BATCH_BYTES", 35_000)
    a, b = socket.socketpair()
    a.setblocking(False)
    payloads = [bytes([65 + i]) * 10_000 for i in range(12)]
    head = b"*4\r\n$8\r\npmessage\r\n$11\r\nuser_noti:*\r\n$11\r\nuser_noti:1\r\n"
    try:
        b.sendall(b"".join(head + b"$%d\r\n%s\r\n" % (len(p), p) for p in payloads))
        replies = Replies(SimpleNamespace(_sock=a))
        batches, full = [], []

        def take(reply: Any, into: list[Any]) -> int:
            into.append(reply[3])
            return len(reply[3])

        while replies.wait(0.0):
            batch: list[Any] = []
            replies.read(take, batch)
            if batch:  # after a full batch, a look that finds nothing more
                batches.append(batch)
                full.append(replies.more)
        assert [len(batch) for batch in batches] == [4, 4, 4]
        assert full == [True, True, True]
        assert [p for batch in batches for p in batch] == payloads
    finally:
        a.close()
        b.close()


def test_replies_split_big_bursts_into_batches_and_say_more_is_there() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        n = MAX_BATCH * 2 + 10
        b.sendall(b"".join(_pmessage(i) for i in range(n)))
        replies = Replies(SimpleNamespace(_sock=a))
        sizes = []
        seen: list[Any] = []
        while replies.wait(0.0):
            batch: list[Any] = []
            replies.read(lambda reply, into: into.append(reply[3]), batch)
            sizes.append(len(batch))
            seen += batch
        assert sizes == [MAX_BATCH, MAX_BATCH, 10]
        assert seen == [b'{"type":"n","payload":%d}' % i for i in range(n)]
        # A partial reply waits for the rest; EOF is a connection error.
        b.sendall(_pmessage(n)[:20])
        assert replies.wait(1.0)
        batch = []
        replies.read(lambda reply, into: into.append(reply), batch)
        assert batch == [] and not replies.wait(0.0)
        b.close()
        assert replies.wait(1.0)
        with pytest.raises(redis.ConnectionError):
            replies.read(lambda reply, into: into.append(reply), batch)
    finally:
        a.close()


def test_replies_wait_briefly_on_descriptors_past_1023() -> None:
    # A reconnect while thousands of clients are connected gets a high descriptor, where
    # select() raises ValueError: that would kill the subscriber thread.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        if hard != resource.RLIM_INFINITY and hard < 1100:
            pytest.skip(f"open-file limit {hard} is below 1100")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    a, b = socket.socketpair()
    high = socket.socket(fileno=fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 1024))
    try:
        assert high.fileno() >= 1024
        replies = Replies(SimpleNamespace(_sock=high))
        assert not replies.wait(0.0003)
        b.sendall(_pmessage(1))
        assert replies.wait(0.0003)
        batch: list[Any] = []
        replies.read(lambda reply, into: into.append(reply[3]), batch)
        assert batch == [b'{"type":"n","payload":1}']
    finally:
        high.close()
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
