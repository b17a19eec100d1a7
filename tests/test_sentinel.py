"""Redis Sentinel against a real set: a master, a replica and three sentinels, each a
redis-server on a free loopback port, started and killed by PID.

Each test checks delivery through the master the sentinels name, exactly one resync per
failover, /health (503 while no master is subscribed, 200 naming the master after) and
the accounting invariant from /metrics.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from smap_notify.app import App
from smap_notify.config import load_config

from .conftest import (
    SECRET,
    Daemon,
    DaemonProcess,
    RedisSentinel,
    RedisServer,
    free_port,
    wait_until,
)
from .test_chaos import (
    HealthSample,
    Inbox,
    Published,
    get_health,
    poll_health,
    scrape,
    watch_active,
)

NAME = "mymaster"
FAILOVER_WITHIN = 30.0  # deadline for the sentinels' own failover (not the daemon's part)


def address(server: RedisServer) -> str:
    return f"127.0.0.1:{server.port}"


@attrs.define
class SentinelSet:
    master: RedisServer
    replica: RedisServer
    sentinels: list[RedisSentinel]

    def env(self) -> dict[str, str]:
        return {
            "REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            "REDIS_SENTINEL_MASTER": NAME,
        }

    def named_master(self) -> str:
        """The master's address as the first live sentinel names it."""
        errors = []
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            try:
                host, port = sentinel.master()
                return f"{host}:{port}"
            except redis.RedisError as exc:
                errors.append(exc)
        raise redis.ConnectionError(f"no sentinel answered: {errors}")

    def failover(self, via: int = 1) -> None:
        with self.sentinels[via].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", NAME)

    def ready(self) -> bool:
        for sentinel in self.sentinels:
            if sentinel.proc is None:
                continue
            with sentinel.client() as client:
                state: Any = client.sentinel_master(NAME)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        with self.replica.client() as client:
            info: Any = client.info("replication")
        return bool(info.get("master_link_status") == "up")


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    master = RedisServer(tmp_path / "master")
    replica = RedisServer(tmp_path / "replica", args=("--replicaof", "127.0.0.1", str(master.port)))
    sentinels = [RedisSentinel(tmp_path, master.port, name=NAME) for _ in range(3)]
    sset = SentinelSet(master, replica, sentinels)
    try:
        master.start()
        replica.start()
        for sentinel in sentinels:
            sentinel.start()
        wait_ready(sset)
        yield sset
    finally:
        for sentinel in sentinels:
            sentinel.kill()
        replica.kill()
        master.kill()


def wait_ready(sset: SentinelSet, timeout: float = 30.0) -> None:
    """Sentinels find each other and the replica through the master (hello every 2 s)."""
    deadline = time.monotonic() + timeout
    while not sset.ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the sentinels did not see each other and the replica")
        time.sleep(0.1)


async def start_daemon(nursery: trio.Nursery, sset: SentinelSet, **env: str) -> Daemon:
    environ = {
        "JWT_SECRET_KEY": SECRET,
        "ENV": "dev",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": "0",
        # Nothing listens here: were REDIS_HOST used, nothing would be delivered.
        "REDIS_HOST": f"127.0.0.1:{free_port()}",
        **sset.env(),
        **env,
    }
    app = App.create(load_config(environ), environ=environ)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(app.serve, listeners)
    return Daemon(app, listeners[0].socket.getsockname()[1], sset.master)


def publish_at(host: str, port: int, channel: str, data: str) -> int | None:
    """PUBLISH on one server, failing fast; None when it fails."""
    try:
        with redis.Redis(
            host=host,
            port=port,
            socket_timeout=0.3,
            socket_connect_timeout=0.3,
            retry=Retry(NoBackoff(), 0),
        ) as client:
            return int(client.publish(channel, data))
    except (redis.RedisError, OSError):
        return None


class PublishFlow:
    """Numbered notifications to one user, each published on the server ``where`` names
    at that moment (as a Sentinel- or Cluster-aware publisher does)."""

    def __init__(
        self, where: Callable[[int], tuple[str, int]], user: str, interval: float = 0.02
    ) -> None:
        self.where = where
        self.channel = f"user_noti:{user}"
        self.interval = interval
        self.published: list[Published] = []

    def _publish(self, seq: int, data: str) -> int | None:
        try:
            host, port = self.where(seq)
        except (redis.RedisError, OSError):
            return None
        return publish_at(host, port, self.channel, data)

    async def run(self) -> None:
        for seq in range(1, 1_000_000):
            started = trio.current_time()
            data = json.dumps({"type": "notification", "payload": {"seq": seq}})
            receivers = await trio.to_thread.run_sync(self._publish, seq, data)
            self.published.append(Published(seq, started, trio.current_time(), receivers))
            await trio.sleep(self.interval)

    def first_started_after(self, moment: float) -> int | None:
        return next((p.seq for p in self.published if p.started >= moment), None)


def sentinel_flow(sset: SentinelSet, user: str) -> PublishFlow:
    def where(_seq: int) -> tuple[str, int]:
        host, _, port = sset.named_master().rpartition(":")
        return host, int(port)

    return PublishFlow(where, user)


def sentinel_master_of(doc: dict[str, Any]) -> str | None:
    named = doc["sentinel"]
    assert named["master_name"] == NAME
    return named["master"]


async def run_failover(
    sset: SentinelSet, daemon: Daemon, nursery: trio.Nursery, fault: str
) -> tuple[Inbox, list[HealthSample], float, tuple[float, float]]:
    """Messages flow to one client while ``fault`` happens; returns what the client got,
    the /health samples, when the fault began, and when the subscription was down (from
    its loss to the subscription on the new master)."""
    new_master = address(sset.replica)
    return await run_fault(
        daemon,
        nursery,
        sentinel_flow(sset, "user123"),
        sset.master.kill if fault == "kill" else sset.failover,
        lambda: daemon.app.subscriber.master == new_master,
        sentinel_master_of,
    )


async def run_fault(
    daemon: Daemon,
    nursery: trio.Nursery,
    flow: PublishFlow,
    fault: Callable[[], None],
    moved: Callable[[], bool],
    server_of: Callable[[dict[str, Any]], str | None],
) -> tuple[Inbox, list[HealthSample], float, tuple[float, float]]:
    """Messages flow to one client while ``fault`` runs (in a thread) until the
    subscriber is active again where ``moved`` says; returns what the client got, the
    /health samples, when the fault began, and when the subscription was down."""
    app = daemon.app
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    inbox = Inbox()
    health: list[HealthSample] = []
    changes: list[tuple[float, bool]] = []
    async with trio.open_nursery() as tasks:
        tasks.start_soon(inbox.collect, ws)
        tasks.start_soon(watch_active, lambda: app.subscriber.active, changes)
        tasks.start_soon(poll_health, daemon.port, health)
        tasks.start_soon(flow.run)
        await wait_until(lambda: len(inbox.data()) >= 5)
        t_fault = trio.current_time()
        await trio.to_thread.run_sync(fault)
        await wait_until(
            lambda: any(not active and t >= t_fault for t, active in changes), FAILOVER_WITHIN
        )
        # Asked at once: the retry waits at least 50 ms, so this one sees the outage.
        health.append(await get_health(daemon.port))
        await wait_until(lambda: app.subscriber.active and moved(), FAILOVER_WITHIN)
        t_moved = trio.current_time()
        # Delivery resumes from the new server.
        await wait_until(
            lambda: (
                (first := flow.first_started_after(t_moved)) is not None
                and any(seq >= first for _, seq in inbox.data())
            )
        )
        await wait_until(
            lambda: any(
                s.status == 200 and s.started >= t_moved and server_of(s.doc) for s in health
            ),
            15,
        )
        settled = len(inbox.data()) + 10
        await wait_until(lambda: len(inbox.data()) >= settled)
        tasks.cancel_scope.cancel()
    t_lost = next(t for t, active in changes if not active and t >= t_fault)
    return inbox, health, t_fault, (t_lost, t_moved)


def check_one_failover(
    daemon: Daemon,
    old_master: str,
    inbox: Inbox,
    health: list[HealthSample],
    t_fault: float,
    down: tuple[float, float],
    server_of: Callable[[dict[str, Any]], str | None] = sentinel_master_of,
) -> None:
    """The client was never reconnected, got every message once and in order, and exactly
    one resync; /health was 200 before, 503 while no server was subscribed, and every 200
    after the fault named the new one (``server_of`` reads it from the document)."""
    app = daemon.app
    assert inbox.closed is None
    assert app.counters.handshakes_accepted == 1 and app.hub.connection_count == 1
    seqs = [seq for _, seq in inbox.data()]
    assert seqs == sorted(set(seqs)), "in order, no duplicates"
    assert any(t < t_fault for t, _ in inbox.data()), "the same client received before"
    resyncs = inbox.resyncs()
    assert len(resyncs) == 1, resyncs
    position, _, frame = resyncs[0]
    assert frame["payload"]["reason"] == "redis_reconnected"
    assert position < len(inbox.frames) - 1, "messages came after the resync"
    assert app.counters.redis_reconnects == 1

    new_master = app.subscriber.master
    assert new_master is not None and new_master != old_master
    assert all(s.status == 200 for s in health if s.finished < t_fault)
    t_lost, t_moved = down
    assert any(s.status == 503 and t_lost <= s.started <= t_moved for s in health)
    for sample in health:
        named = server_of(sample.doc)
        active = sample.doc["subscriber"]["active"]
        # No 200 while no server is subscribed. (Judged from the document itself: the
        # test sees the subscription come back a poll later than the daemon does.)
        assert active == (named is not None), sample
        if sample.status == 200:
            assert active, "no 200 while no master is subscribed"
            # Until the daemon moved, the old master (a manual failover leaves it up).
            expected = {new_master} if sample.started >= t_moved else {old_master, new_master}
            assert named in expected, sample
        else:
            # A request sent just before the fault may be answered after it.
            assert sample.doc["status"] == "degraded" and sample.finished >= t_fault, sample
    assert health[-1].status == 200


async def check_accounting(daemon: Daemon) -> None:
    accounting = await scrape(daemon.port)
    assert accounting.balanced, accounting
    assert daemon.app.counters.received == daemon.app.counters.accounted()


async def test_delivers_through_the_master_the_sentinels_name(
    sentinel_set: SentinelSet, nursery: trio.Nursery
) -> None:
    """REDIS_HOST is not used: the subscription is on the master the sentinels name, and
    /health says which one."""
    daemon = await start_daemon(nursery, sentinel_set)
    await daemon.wait_subscribed()
    assert daemon.app.subscriber.master == address(sentinel_set.master)
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    await trio.to_thread.run_sync(sentinel_set.master.publish, "user123", {"type": "alert"})
    with trio.fail_after(10):
        frame = json.loads(await ws.get_message())
    assert frame["type"] == "alert"
    sample = await get_health_until_200(daemon)
    assert sample.doc["sentinel"] == {"master_name": NAME, "master": address(sentinel_set.master)}
    await check_accounting(daemon)


async def get_health_until_200(daemon: Daemon) -> HealthSample:
    samples: list[HealthSample] = []

    async def ok() -> bool:
        samples.append(await get_health(daemon.port))
        return samples[-1].status == 200

    with trio.fail_after(10):
        while not await ok():
            await trio.sleep(0.05)
    return samples[-1]


async def fail_over_while_messages_flow(
    sset: SentinelSet, nursery: trio.Nursery, fault: str
) -> Daemon:
    """One failover (``kill`` or ``failover``) with the common checks; returns the daemon."""
    daemon = await start_daemon(nursery, sset)
    await daemon.wait_subscribed()
    old_master = address(sset.master)
    inbox, health, t_fault, down = await run_failover(sset, daemon, nursery, fault)
    check_one_failover(daemon, old_master, inbox, health, t_fault, down)
    await check_accounting(daemon)
    if fault == "kill":  # down for Sentinel's detection and election: seconds
        assert any(s.status == 503 and s.started >= t_fault for s in health)
    return daemon


@pytest.mark.slow
async def test_master_killed_while_messages_flow_moves_to_the_promoted_replica(
    sentinel_set: SentinelSet, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    await fail_over_while_messages_flow(sentinel_set, nursery, "kill")
    outage, line = one_restored(caplog, f"redis={address(sentinel_set.replica)}")
    print(f"master killed -> resubscribed: {outage} s ({line})")


def one_restored(caplog: pytest.LogCaptureFixture, where: str) -> tuple[str, str]:
    """The outage (seconds, as logged) and the line of the one "subscription restored",
    which names ``where``."""
    restored = [r.getMessage() for r in caplog.records if "subscription restored" in r.getMessage()]
    assert len(restored) == 1 and where in restored[0], restored
    outage = re.search(r"outage=([0-9.]+)s", restored[0])
    assert outage is not None
    return outage.group(1), restored[0]


@pytest.mark.slow
async def test_a_manual_failover_moves_off_the_demoted_master_that_stays_up(
    sentinel_set: SentinelSet, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """SENTINEL FAILOVER leaves the old master running (a master for seconds more, then a
    replica): the daemon must not stay on it, where nothing is published any more."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    await fail_over_while_messages_flow(sentinel_set, nursery, "failover")
    assert sentinel_set.master.proc is not None and sentinel_set.master.proc.poll() is None
    lost = [r.getMessage() for r in caplog.records if "subscription lost" in r.getMessage()]
    assert len(lost) == 1 and "MasterMoved" in lost[0], lost


@pytest.mark.slow
async def test_one_sentinel_down_the_others_find_and_follow_the_master(
    sentinel_set: SentinelSet, nursery: trio.Nursery
) -> None:
    """The first sentinel listed is down from the start: the daemon asks the next one,
    watches a live one, and follows a failover."""
    await trio.to_thread.run_sync(sentinel_set.sentinels[0].kill)
    await fail_over_while_messages_flow(sentinel_set, nursery, "failover")


async def test_no_sentinel_answers_health_says_which_and_why(nursery: trio.Nursery) -> None:
    """Every sentinel down: the daemon serves, /health is 503 with each sentinel's error,
    and it keeps retrying."""
    ports = [free_port(), free_port()]
    environ = {
        "JWT_SECRET_KEY": SECRET,
        "ENV": "dev",
        "REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in ports),
        "REDIS_SENTINEL_MASTER": NAME,
    }
    app = App.create(load_config(environ), environ=environ)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(app.serve, listeners)
    await wait_until(lambda: app.subscriber.attempts >= 2)
    sample = await get_health(listeners[0].socket.getsockname()[1])
    assert sample.status == 503
    error = sample.doc["subscriber"]["last_error"]
    assert "MasterNotFound" in error and all(f"127.0.0.1:{p}" in error for p in ports), error
    assert sample.doc["sentinel"] == {"master_name": NAME, "master": None}


def test_the_start_line_names_the_sentinels(
    daemon_process: Callable[..., DaemonProcess],
) -> None:
    ports = [free_port(), free_port()]
    sentinels = ",".join(f"127.0.0.1:{p}" for p in ports)
    daemon = daemon_process(REDIS_SENTINELS=sentinels, REDIS_SENTINEL_MASTER=NAME)
    line = start_line(daemon)
    assert f"redis=sentinel sentinel_master={NAME} sentinels={sentinels}" in line
    assert daemon.stop() == 0


def start_line(daemon: DaemonProcess) -> str:
    """The daemon's "starting smap-notify" log line, once written."""
    deadline = time.monotonic() + 10
    while "starting smap-notify" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return next(line for line in daemon.log().splitlines() if "starting smap-notify" in line)
