"""Fixtures: real redis-server processes on free loopback ports, the daemon in-process
or as a subprocess, real WebSocket clients."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.support.cluster import Cluster, running_cluster
from tests.support.daemon import (
    REPO,
    SECRET,
    Daemon,
    DaemonFactory,
    DaemonProcess,
    Spawned,
    env_pass_fds,
    open_spawner,
    serve_in_process,
    wait_for_port,
)
from tests.support.notify import NotifyReceiver, open_notify_receiver
from tests.support.redis import (
    RedisServer,
    TlsFiles,
    free_port,
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
async def start_daemon(
    nursery: trio.Nursery, redis_server: RedisServer
) -> AsyncIterator[DaemonFactory]:
    """Start the daemon in this test's event loop, with settings as environment names."""

    async def start(wait_subscribed: bool = True, **env: str) -> Daemon:
        env = {"REDIS_HOST": f"127.0.0.1:{redis_server.port}", **env}
        daemon = await serve_in_process(nursery, redis_server, **env)
        if wait_subscribed:
            await daemon.wait_subscribed()
        return daemon

    yield start


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


# A stand-in for systemd's notify socket.
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyReceiver]:
    with open_notify_receiver(tmp_path) as receiver:
        yield receiver


# Daemon processes started through a wrapper (socket activation, WATCHDOG_PID).
@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Spawned]]:
    with open_spawner(tmp_path) as start:
        yield start


@pytest.fixture
def locked_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A Redis Cluster (three masters, three replicas) whose nodes ask for a password."""
    with running_cluster(tmp_path, locked=True) as cluster:
        yield cluster


@pytest.fixture
def tls_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A Redis Cluster whose nodes speak TLS only (clients, replicas, the bus); a daemon
    in this process trusts its CA (OpenSSL reads ``SSL_CERT_FILE``)."""
    tls = TlsFiles.issue(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    with running_cluster(tmp_path, tls=tls) as cluster:
        yield cluster
