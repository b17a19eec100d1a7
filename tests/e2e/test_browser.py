"""A real headless Chromium runs SMAP's web UI reconnect logic against the daemon.

The page (``tests/browser/``) reconnects with exponential backoff only after an unclean
close (``!event.wasClean``) and reports every event to a small HTTP server in the test,
which also serves the page from ``http://127.0.0.1:<port>`` (an origin dev mode allows).
The daemon runs as a real process on a fixed port, so it can be restarted under the page.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio

from tests.support.daemon import (
    DaemonProcess,
    Spawned,
    daemon_env,
    listening_socket,
    make_token,
)
from tests.support.notify import NotifyReceiver, is_
from tests.support.redis import RedisServer, free_port
from tests.support.ws import publish, wait_connections

PAGE_DIR = Path(__file__).resolve().parent / "browser"
PAGE_FILES = {
    "/reconnect.html": "text/html; charset=utf-8",
    "/reconnect.js": "text/javascript; charset=utf-8",
}
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

Event = dict[str, Any]

pytestmark = pytest.mark.slow


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (Debian package chromium)")
        pytest.skip("chromium is not installed (Debian package chromium)")
    return path


class PageServer:
    """Serves the page and collects the events it POSTs to /event, in a thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path not in PAGE_FILES:
                    self.send_error(404)
                    return
                body = (PAGE_DIR / path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", PAGE_FILES[path])
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                event = json.loads(self.rfile.read(length))
                with server._lock:
                    server.events.append(event)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def page_url(self, ws_url: str, token: str) -> str:
        query = urlencode({"ws": ws_url, "token": token})
        return f"http://127.0.0.1:{self.port}/reconnect.html?{query}"

    def snapshot(self) -> list[Event]:
        """Events in the order the page saw them (fetches may land out of order)."""
        with self._lock:
            return sorted(self.events, key=lambda e: e["seq"])

    async def expect(self, predicate: Callable[[Event], bool], timeout: float = 30.0) -> Event:
        """The first event (in page order) that satisfies ``predicate``."""
        with trio.fail_after(timeout):
            while True:
                for event in self.snapshot():
                    if predicate(event):
                        return event
                await trio.sleep(0.02)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Open a URL in headless Chromium; its whole process group is killed afterwards."""
    chromium = chromium_path()
    started: list[subprocess.Popen[bytes]] = []

    def open_page(url: str) -> subprocess.Popen[bytes]:
        profile = tmp_path / f"chromium-profile-{len(started)}"
        with (tmp_path / f"chromium-{len(started)}.log").open("wb") as log:
            proc = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        return proc

    yield open_page
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def of_type(kind: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda e: e["type"] == kind and all(e.get(k) == v for k, v in fields.items())


def message_with(payload: Any) -> Callable[[Event], bool]:
    return lambda e: e["type"] == "message" and json.loads(e["data"])["payload"] == payload


async def test_browser_reconnects_after_a_restart_and_receives_again(
    daemon_process: Callable[..., DaemonProcess],
    redis_server: RedisServer,
    page_server: PageServer,
    browser: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    first = daemon_process(WS_PORT=str(port), SHUTDOWN_TIMEOUT="2s")
    browser(page_server.page_url(f"ws://127.0.0.1:{port}/ws", make_token("alice")))

    loaded = await page_server.expect(of_type("loaded"))
    assert loaded["cookie"], "the page holds the token in the smap_auth_token cookie"
    opened = await page_server.expect(of_type("open"))
    await wait_connections(port, 1)
    await publish(redis_server, "alice", {"type": "notification", "payload": "before"})
    await page_server.expect(message_with("before"))

    assert first.stop() == 0  # what `systemctl restart` does first
    closed = await page_server.expect(of_type("close", attempt=opened["attempt"]))
    assert closed["wasClean"] is False, closed
    assert closed["code"] == 1006, closed
    assert closed["reconnect"] is True

    second = daemon_process(WS_PORT=str(port), SHUTDOWN_TIMEOUT="2s")
    reopened = await page_server.expect(
        lambda e: e["type"] == "open" and e["attempt"] > opened["attempt"]
    )
    await wait_connections(port, 1)
    await publish(redis_server, "alice", {"type": "notification", "payload": "after"})
    received = await page_server.expect(message_with("after"))
    assert received["attempt"] == reopened["attempt"]
    assert second.stop() == 0


async def test_expired_token_closes_cleanly_with_4001_and_the_page_does_not_reconnect(
    daemon_process: Callable[..., DaemonProcess],
    redis_server: RedisServer,
    page_server: PageServer,
    browser: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    daemon = daemon_process(WS_PORT=str(port))
    # Long enough for Chromium to start and connect, short enough to expire in the test.
    token = make_token("alice", ttl=6)
    browser(page_server.page_url(f"ws://127.0.0.1:{port}/ws", token))

    opened = await page_server.expect(of_type("open"))
    await wait_connections(port, 1)
    await publish(redis_server, "alice", {"type": "notification", "payload": "hello"})
    await page_server.expect(message_with("hello"))

    closed = await page_server.expect(of_type("close"))
    assert closed["attempt"] == opened["attempt"]
    assert closed["code"] == 4001, closed
    assert closed["wasClean"] is True, closed
    assert closed["reconnect"] is False
    await wait_connections(port, 0)
    # Ten times the first backoff step: the quiet itself is what is tested.
    await trio.sleep(2.0)
    later = [e for e in page_server.snapshot() if e.get("attempt", 0) > opened["attempt"]]
    assert later == [], "the page tried again after a deliberate close"
    assert "handshake rejected" not in daemon.log()
    assert "token expired" in daemon.log()


async def test_browser_behind_a_held_socket_reconnects_on_its_first_retry(
    spawn: Callable[..., Spawned],
    notify_socket: NotifyReceiver,
    redis_server: RedisServer,
    page_server: PageServer,
    browser: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    """With the socket unit holding the port, a restart refuses the browser nothing."""
    with listening_socket() as listener:
        port = listener.getsockname()[1]
        env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path)
        first = spawn(env, listen_sock=listener)
        await notify_socket.expect(is_("READY"))
        browser(page_server.page_url(f"ws://127.0.0.1:{port}/ws", make_token("alice")))
        opened = await page_server.expect(of_type("open"))
        await wait_connections(port, 1)

        assert first.stop() == 0
        closed = await page_server.expect(of_type("close"))
        assert (closed["attempt"], closed["wasClean"]) == (opened["attempt"], False), closed
        # The retry waits in the held socket's backlog while no process runs.
        second = spawn(env, listen_sock=listener)
        await notify_socket.expect(is_("READY"))
        reopened = await page_server.expect(of_type("open", attempt=opened["attempt"] + 1))
        await wait_connections(port, 1)
        await publish(redis_server, "alice", {"type": "notification", "payload": "after"})
        received = await page_server.expect(message_with("after"))
        assert received["attempt"] == reopened["attempt"]
        closes = [e for e in page_server.snapshot() if e["type"] == "close"]
        assert closes == [closed], "no attempt failed during the restart"
        assert second.stop() == 0
