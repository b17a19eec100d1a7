"""Fixtures: real redis-server processes on free loopback ports, the daemon in-process
or as a subprocess, real WebSocket clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
import redis
import trio
import trio_websocket

from smap_notify.app import App
from smap_notify.config import load_config

SECRET = "test-secret-with-enough-bytes-for-hs256-000"
DEV_ORIGIN = "http://localhost:3000"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


@attrs.frozen
class TlsFiles:
    """PEM files for a TLS redis-server: the CA that signed it, its chain and key."""

    ca: Path
    cert: Path
    key: Path


def wait_for_ping(client: Callable[[], redis.Redis], failure: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with client() as c:
                if c.ping():
                    return
        except redis.ConnectionError:
            time.sleep(0.01)
    raise RuntimeError(failure)


class RedisServer:
    """A redis-server we start, pause, kill and restart on the same port, by PID; with
    ``tls``, it listens for TLS only."""

    def __init__(
        self,
        workdir: Path,
        tls: TlsFiles | None = None,
        password: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.tls = tls
        self.password = password
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        options = ["--port", str(self.port)]
        if self.tls is not None:
            options = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            options += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            options += ["--tls-ca-cert-file", str(self.tls.ca)]
        if self.password is not None:
            options += ["--requirepass", self.password]
        options += self.args
        self.proc = subprocess.Popen(
            [
                binary,
                *options,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_ping(self.client, f"redis-server did not start on port {self.port}")

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=5,
            password=self.password,
            ssl=self.tls is not None,
            ssl_ca_certs=str(self.tls.ca) if self.tls is not None else None,
        )

    def publish(self, user: str, message: Any) -> int:
        return self.publish_to(f"user_noti:{user}", message)

    def publish_to(self, channel: str, message: Any) -> int:
        data = message if isinstance(message, bytes | str) else json.dumps(message)
        with self.client() as client:
            return int(client.publish(channel, data))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


class RedisSentinel:
    """A ``redis-server --sentinel`` we start and kill by PID, monitoring one master; its
    configuration file (which it rewrites) is its own."""

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        name: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.port = free_port()
        self.name = name
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
            f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_ping(self.client, f"redis sentinel did not start on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def master(self) -> tuple[str, int]:
        """The master's address as this sentinel names it."""
        with self.client() as client:
            host, port = client.sentinel_get_master_addr_by_name(self.name)
        return str(host.decode() if isinstance(host, bytes) else host), int(port)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


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


@pytest.fixture
async def start_daemon(
    nursery: trio.Nursery, redis_server: RedisServer
) -> AsyncIterator[DaemonFactory]:
    """Start the daemon in this test's event loop, with settings as environment names."""

    async def start(wait_subscribed: bool = True, **env: str) -> Daemon:
        environ = {
            "JWT_SECRET_KEY": SECRET,
            "ENV": "dev",
            "WS_HOST": "127.0.0.1",
            "WS_PORT": "0",
            "REDIS_HOST": f"127.0.0.1:{redis_server.port}",
            **env,
        }
        config = load_config(environ)
        app = App.create(config, environ=environ)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(app.serve, listeners)
        daemon = Daemon(app, listeners[0].socket.getsockname()[1], redis_server)
        if wait_subscribed:
            await daemon.wait_subscribed()
        return daemon

    yield start


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


@pytest.fixture
def daemon_process(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ``python -m smap_notify`` as a real process; stopped by PID afterwards."""
    started: list[DaemonProcess] = []

    def start(
        wait_ready: bool = True,
        args: tuple[str, ...] = (),
        command: tuple[str, ...] = ("-m", "smap_notify"),
        **env: str,
    ) -> DaemonProcess:
        port = int(env.pop("WS_PORT", free_port()))
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_", "LISTEN_", "WATCHDOG_", "JOURNAL_"))
        }
        environ.update(
            {
                "JWT_SECRET_KEY": SECRET,
                "ENV": "dev",
                "WS_HOST": "127.0.0.1",
                "WS_PORT": str(port),
                "REDIS_HOST": f"127.0.0.1:{redis_server.port}",
                "LOGGER_LEVEL": "info",
                "PYTHONUNBUFFERED": "1",
                **env,
            }
        )
        log_path = tmp_path / f"daemon-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *command, *args],
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                pass_fds=env_pass_fds(environ),
            )
        daemon = DaemonProcess(proc, port, log_path)
        started.append(daemon)
        if wait_ready:
            wait_for_port(port, proc)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


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
