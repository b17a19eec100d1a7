"""A real Redis Cluster for the tests: redis-server processes on free loopback ports,
joined by ``redis-cli --cluster create``, killed by PID."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import redis
import trio

from smap_notify.cluster import parse_nodes
from tests.support.daemon import Daemon, serve_in_process
from tests.support.observe import publish_at, redis_publisher
from tests.support.redis import RedisServer, TlsFiles, free_port

NODE_TIMEOUT_MS = 1000
PASSWORD = "s3cret-cluster-pass-for-tests"  # requirepass of ``running_cluster(locked=True)``
READY_WITHIN = 60.0  # the cluster's own convergence, not the daemon's part


def address(server: RedisServer) -> str:
    return f"127.0.0.1:{server.port}"


@attrs.define
class Cluster:
    nodes: list[RedisServer]
    password: str | None = None  # every node's requirepass (and masterauth)
    tls: TlsFiles | None = None  # every node speaks TLS only, its bus included

    def publisher(self, port: int) -> redis.Redis:
        """A client of the node on ``port`` that fails fast (password and TLS as set)."""
        return redis_publisher(port, self.password, self.tls.ca if self.tls else None)

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None]

    def by_address(self, text: str) -> RedisServer:
        return next(n for n in self.nodes if address(n) == text)

    def ready(self) -> bool:
        """Every live node sees the cluster ok and every other live node connected, and
        every replica has its master's data (a replica that never synced is never
        promoted: its data is too old for a failover)."""
        live = self.live()
        for node in live:
            try:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = client.execute_command("CLUSTER", "NODES")
                    replication = client.info("replication")
            except redis.RedisError:
                return False
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
            info = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in info:
                return False
            text = text.decode() if isinstance(text, bytes) else str(text)
            if len([n for n in parse_nodes(text) if not n.failed]) < len(live):
                return False
        return True


def wait_ready(cluster: Cluster, timeout: float = READY_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while not cluster.ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not converge")
        time.sleep(0.1)


@contextlib.contextmanager
def running_cluster(
    tmp_path: Path, masters: int = 3, locked: bool = False, tls: TlsFiles | None = None
) -> Iterator[Cluster]:
    """``masters`` masters, each with one replica; ``locked``: every node asks for
    ``PASSWORD``, of clients and of each other; ``tls``: every node speaks TLS only, to
    clients, replicas and the other nodes."""
    password = PASSWORD if locked else None
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (apt-get install redis-tools)")
    nodes = []
    for i in range(2 * masters):
        workdir = tmp_path / f"node{i}"
        workdir.mkdir()
        args = [
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
            # The bus port defaults to the port + 10000, past 65535 for most free ports.
            *("--cluster-port", str(free_port())),
            # A replica's first sync starts at once (default: 5 s later).
            *("--repl-diskless-sync-delay", "0"),
            *(("--masterauth", password) if password is not None else ()),
            *(("--tls-cluster", "yes", "--tls-replication", "yes") if tls is not None else ()),
        ]
        nodes.append(RedisServer(workdir, tls=tls, password=password, args=tuple(args)))
    cluster = Cluster(nodes, password, tls)
    auth = ["-a", password, "--no-auth-warning"] if password is not None else []
    if tls is not None:
        auth += ["--tls", "--cacert", str(tls.ca)]
    try:
        for node in nodes:
            node.start()
        subprocess.run(
            [cli, *auth, "--cluster", "create", *map(address, nodes)]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        wait_ready(cluster)
        yield cluster
    finally:
        for node in nodes:
            node.kill()


def secured(cluster: Cluster) -> dict[str, str]:
    """The daemon's settings for the cluster's password and TLS."""
    return {
        "REDIS_PASSWORD": cluster.password or "",
        "REDIS_USE_TLS": "true" if cluster.tls is not None else "false",
    }


async def start_daemon(nursery: trio.Nursery, redis_host: str, **env: str) -> Daemon:
    env = {"REDIS_CLUSTER": "true", "REDIS_HOST": redis_host, **env}
    return await serve_in_process(nursery, RedisServer(Path()), **env)


def publish_on(node: RedisServer, channel: str, data: str) -> int | None:
    return publish_at("127.0.0.1", node.port, channel, data)


def own_flags(node: RedisServer) -> frozenset[str]:
    with node.client() as client:
        text = client.execute_command("CLUSTER", "NODES")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return next(n.flags for n in parse_nodes(text) if "myself" in n.flags)
