"""The daemon under test: in-process (``Daemon``) or as a process (``DaemonProcess``,
``open_spawner``), its environment, tokens for it, and plain HTTP requests to it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import trio
import trio.testing
import trio_websocket

from smap_notify.app import App
from smap_notify.config import ENV_NAMES, load_config
from tests.support.redis import (
    RedisServer,
    free_port,
)

SECRET = "test-secret-with-enough-bytes-for-hs256-000"


DEV_ORIGIN = "http://localhost:3000"


REPO = Path(__file__).resolve().parents[2]


def make_token(
    sub: str = "user123",
    *,
    ttl: float = 3600,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (for state that has no event to await)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@attrs.define
class Daemon:
    app: App
    port: int
    redis: RedisServer

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def connect(
        self,
        user: str = "user123",
        *,
        token: str | None = None,
        origin: str | None = DEV_ORIGIN,
        nursery: trio.Nursery,
        query_token: bool = False,
        other_cookies: str = "",
        query: str = "",
        **kwargs: Any,
    ) -> trio_websocket.WebSocketConnection:
        """Open a WebSocket as ``user``; ``other_cookies`` go before the token's cookie,
        ``query`` (``projectId=p1``) after ``/ws?``."""
        token = make_token(user) if token is None else token
        headers = []
        if origin is not None:
            headers.append(("Origin", origin))
        resource = "/ws?" + query if query else "/ws"
        if query_token:
            resource += f"{'&' if query else '?'}token={token}"
        else:
            headers.append(("Cookie", f"{other_cookies}smap_auth_token={token}"))
        return await trio_websocket.connect_websocket(
            nursery,
            "127.0.0.1",
            self.port,
            resource,
            use_ssl=False,
            extra_headers=headers,
            **kwargs,
        )

    async def publish(self, user: str, message: Any) -> int:
        return await trio.to_thread.run_sync(self.redis.publish, user, message)

    async def publish_to(self, channel: str, message: Any) -> int:
        return await trio.to_thread.run_sync(self.redis.publish_to, channel, message)

    async def wait_subscribed(self) -> None:
        await wait_until(lambda: self.app.subscriber.active)

    async def wait_connections(self, count: int) -> None:
        await wait_until(lambda: self.app.hub.connection_count == count)


DaemonFactory = Callable[..., Any]


async def http_request(
    port: int, target: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 request; returns status, lower-cased headers and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


WS_UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


@attrs.define
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def env_pass_fds(environ: dict[str, str]) -> tuple[int, ...]:
    return ()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


# Runs in the child: becomes ``python -m smap_notify`` with the same PID, so LISTEN_PID
# and WATCHDOG_PID can name the daemon, and the passed listening socket lands on fd 3.
WRAPPER = """
import os, sys
fd = os.environ.pop("TEST_LISTEN_FD", "")
if fd:
    fd = int(fd)
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
if os.environ.pop("TEST_WATCHDOG_PID_SELF", ""):
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "smap_notify", *sys.argv[1:]])
"""


async def serve_in_process(nursery: trio.Nursery, redis: RedisServer, **env: str) -> Daemon:
    """The daemon in this test's event loop, on a free loopback port, with settings as
    environment names (a dev secret and origins unless ``env`` says otherwise)."""
    environ = {
        "JWT_SECRET_KEY": SECRET,
        "ENV": "dev",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": "0",
        **env,
    }
    app = App.create(load_config(environ), environ=environ)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(app.serve, listeners)
    return Daemon(app, listeners[0].socket.getsockname()[1], redis)


def daemon_env(redis: RedisServer, **overrides: str) -> dict[str, str]:
    """The environment of a test daemon: none of ours leaks in, dev origins allowed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NOTIFY_", "LISTEN_", "WATCHDOG_", "JOURNAL_")) and k not in ENV_NAMES
    }
    env.update(
        {
            "JWT_SECRET_KEY": SECRET,
            "ENV": "dev",
            "WS_HOST": "127.0.0.1",
            "WS_PORT": str(free_port()),
            "REDIS_HOST": f"127.0.0.1:{redis.port}",
            "LOGGER_LEVEL": "info",
            "SHUTDOWN_TIMEOUT": "2s",
            "PYTHONUNBUFFERED": "1",
            **overrides,
        }
    )
    return env


@attrs.define
class Spawned:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(30)


@contextlib.contextmanager
def open_spawner(tmp_path: Path) -> Iterator[Callable[..., Spawned]]:
    """Start the daemon through WRAPPER (or ``program``); killed by PID afterwards."""
    started: list[Spawned] = []

    def start(
        env: dict[str, str],
        *,
        args: tuple[str, ...] = (),
        listen_sock: socket.socket | None = None,
        watchdog_pid_self: bool = False,
        journal: bool = False,
        program: str = WRAPPER,
    ) -> Spawned:
        env = dict(env)
        pass_fds: tuple[int, ...] = ()
        if listen_sock is not None:
            env["TEST_LISTEN_FD"] = str(listen_sock.fileno())
            pass_fds = (listen_sock.fileno(),)
        if watchdog_pid_self:
            env["TEST_WATCHDOG_PID_SELF"] = "1"
        log_path = tmp_path / f"spawned-{len(started)}.log"
        log_path.touch()
        if journal:
            st = os.stat(log_path)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", program, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                pass_fds=pass_fds,
            )
        spawned = Spawned(proc, log_path)
        started.append(spawned)
        return spawned

    try:
        yield start
    finally:
        for spawned in started:
            if spawned.proc.poll() is None:
                spawned.proc.kill()
                spawned.proc.wait(10)


def listening_socket() -> socket.socket:
    """What systemd's socket unit holds: a bound, listening loopback TCP socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    with trio.fail_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.02)
    return proc.returncode


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False
