"""``smap-notify-demo``, the README's first command, run as a new user runs it: a real
Redis, the real daemon it starts, what it prints, and Ctrl-C to its process group."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from smap_notify.demo import choose_port
from tests.support.daemon import REPO
from tests.support.redis import RedisServer, free_port

DEMO = [sys.executable, "-c", "import sys; from smap_notify.demo import main; sys.exit(main())"]
OWN_SETTINGS = ("NOTIFY_", "LISTEN_", "WATCHDOG_", "JOURNAL_", "WS_", "REDIS_", "JWT_", "ENV")


class Output:
    """The demo's stdout and stderr, line by line, read by a thread as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; got:\n" + self.text()) from None
            if line is None:
                raise AssertionError(f"output ended before {text!r}:\n" + self.text())
            self.lines.append(line)
            if text in line:
                return line

    def text(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return "\n".join(self.lines)
            if line is not None:
                self.lines.append(line)


@contextmanager
def run_demo(**env: str) -> Iterator[tuple[subprocess.Popen[str], Output]]:
    """The demo in a process group of its own, as a terminal runs it; killed if left."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(OWN_SETTINGS)}
    environ.update(env, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        DEMO,
        env=environ,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc, Output(proc)
    finally:
        # The whole group, also when the demo itself is gone: a daemon it left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def active_connections(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("GET", "/health")
    doc = json.loads(conn.getresponse().read())
    conn.close()
    return int(doc["websocket"]["active_connections"])


def test_demo_prints_what_its_client_receives_and_ctrl_c_stops_everything(
    redis_server: RedisServer,
) -> None:
    port = free_port()
    with run_demo(REDIS_HOST=f"127.0.0.1:{redis_server.port}", WS_PORT=str(port)) as (demo, out):
        out.wait_for(f"* Using the Redis at 127.0.0.1:{redis_server.port}")
        out.wait_for(f"ws://127.0.0.1:{port}/ws")
        out.wait_for("A demo client is connected")
        deadline = time.monotonic() + 10
        while active_connections(port) != 1:  # no event to await from outside
            assert time.monotonic() < deadline, "the demo client never connected"
            time.sleep(0.05)
        message = {"type": "notification", "payload": {"title": "Hello", "body": "It works"}}
        redis.Redis(port=redis_server.port).publish("user_noti:demo-user", json.dumps(message))
        frame = json.loads(out.wait_for("<<< ").removeprefix("<<< "))
        assert (frame["type"], frame["payload"]) == ("notification", message["payload"])
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C reaches the demo and its daemon
        assert demo.wait(30) == 0
        out.wait_for("INFO smap_notify.app: stopped")
        assert "Traceback" not in out.text()
        assert "reconnecting" not in out.text()
        # The daemon got Ctrl-C too and finishes its own drain: the demo sent SIGTERM on
        # top, which cut the drain short or, arriving as the daemon exited, killed it.
        assert "received SIGTERM" not in out.text()
        with pytest.raises(ProcessLookupError):
            os.killpg(demo.pid, 0)  # the daemon is gone too


def test_closing_the_terminal_stops_the_demo_its_daemon_and_its_redis() -> None:
    """SIGHUP to the group (the terminal closed) killed the demo by default, and the
    daemon, which takes SIGHUP as a reload, stayed on its port with the throwaway Redis."""
    port = free_port()
    with run_demo(REDIS_HOST=f"127.0.0.1:{free_port()}", WS_PORT=str(port)) as (demo, out):
        line = out.wait_for("* No Redis answered, so a throwaway redis-server runs on")
        redis_port = int(line.rpartition(":")[2])
        out.wait_for("A demo client is connected")
        os.killpg(demo.pid, signal.SIGHUP)
        assert demo.wait(30) == 0
        for gone in (redis_port, port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", gone), timeout=2).close()
        with pytest.raises(ProcessLookupError):
            os.killpg(demo.pid, 0)


def test_demo_without_a_redis_starts_its_own_and_stops_it_on_ctrl_c() -> None:
    """A user's host may have no Redis: the demo runs a throwaway redis-server."""
    port = free_port()
    with run_demo(REDIS_HOST=f"127.0.0.1:{free_port()}", WS_PORT=str(port)) as (demo, out):
        line = out.wait_for("* No Redis answered, so a throwaway redis-server runs on")
        redis_port = int(line.rpartition(":")[2])
        out.wait_for("A demo client is connected")
        assert redis.Redis(port=redis_port).ping()
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(30) == 0
        out.wait_for("INFO smap_notify.app: stopped")
        # The throwaway Redis outlives the daemon: Ctrl-C used to stop both at once.
        assert "redis subscription lost" not in out.text()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()
        with pytest.raises(ProcessLookupError):
            os.killpg(demo.pid, 0)  # redis-server and the daemon are gone


def test_demo_refuses_a_ws_port_that_is_in_use_instead_of_hanging(
    redis_server: RedisServer,
) -> None:
    """Another listener on the port took the demo's connections and it waited forever."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"REDIS_HOST": f"127.0.0.1:{redis_server.port}", "WS_PORT": str(port)}
        with run_demo(**env) as (demo, out):
            assert demo.wait(30) == 1
            assert f"smap-notify-demo: WS_PORT={port} is in use on 127.0.0.1" in out.text()


def test_the_default_port_gives_way_when_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        default = taken.getsockname()[1]
        port, note = choose_port(None, default)
    assert port != default
    assert note == f"* Port {default} is in use, so the demo listens on {port}"


def test_a_free_default_port_is_taken_as_it_is() -> None:
    default = free_port()
    assert choose_port(None, default) == (default, "")
