"""Real ``redis-server`` processes (plain, TLS, sentinel) on free loopback ports, started
and stopped by PID."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trustme

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: servers that
    are given their ports up front (a cluster's six nodes and their bus ports) must not
    be given the same one twice."""
    if len(_handed_out) > 10_000:  # the ephemeral range holds about 28,000
        _handed_out.clear()
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@attrs.frozen
class TlsFiles:
    """PEM files for a TLS redis-server: the CA that signed it, its chain and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def issue(cls, folder: Path) -> TlsFiles:
        """A new CA, and a certificate it signed for 127.0.0.1 and localhost."""
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        cert = ca.issue_cert("127.0.0.1", "localhost")
        files = cls(folder / "ca.pem", folder / "redis.pem", folder / "redis.key")
        ca.cert_pem.write_to_path(str(files.ca))
        cert.private_key_pem.write_to_path(str(files.key))
        for index, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(files.cert), append=index > 0)
        return files


class ExitedAtStart(RuntimeError):
    """The server exited before it answered (its port was taken meanwhile, say)."""


def wait_for_ping(
    client: Callable[[], redis.Redis],
    failure: str,
    timeout: float = 10,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ExitedAtStart(f"{failure}: it exited with {proc.returncode}")
        try:
            with client() as c:
                if c.ping():
                    return
        except (redis.ConnectionError, redis.TimeoutError):  # not up, or not Redis
            time.sleep(0.01)
    if proc is not None and proc.poll() is not None:
        raise ExitedAtStart(f"{failure}: it exited with {proc.returncode}")
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
        self.started = False  # once: restarts keep the port tests know

    def start(self) -> None:
        """Start, or start again on the same port. A first start whose port (or cluster
        bus port) another process took since it was chosen moves to fresh ones."""
        for attempt in range(3):
            try:
                self._start()
                self.started = True
                return
            except ExitedAtStart:
                if self.started or attempt == 2:
                    raise
                self.port = free_port()
                self.args = tuple(
                    str(free_port()) if i and self.args[i - 1] == "--cluster-port" else arg
                    for i, arg in enumerate(self.args)
                )

    def _start(self) -> None:
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
        wait_for_ping(
            self.client, f"redis-server did not start on port {self.port}", proc=self.proc
        )

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
