"""Redis Sentinel against a real set: a master, a replica and three sentinels, each a
redis-server on a free loopback port, started and killed by PID.

Each test checks delivery through the master the sentinels name, exactly one resync per
failover, /health (503 while no master is subscribed, 200 naming the master after) and
the accounting invariant from /metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trio

from tests.support.daemon import Daemon, DaemonProcess, serve_in_process, wait_until
from tests.support.observe import (
    HealthSample,
    Inbox,
    PublishFlow,
    check_accounting,
    check_one_failover,
    get_health,
    one_restored,
    run_fault,
    start_line,
)
from tests.support.redis import RedisSentinel, RedisServer, free_port

NAME = "mymaster"


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
    env = {
        # Nothing listens here: were REDIS_HOST used, nothing would be delivered.
        "REDIS_HOST": f"127.0.0.1:{free_port()}",
        **sset.env(),
        **env,
    }
    return await serve_in_process(nursery, sset.master, **env)


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
    check_one_failover(daemon, old_master, inbox, health, t_fault, down, sentinel_master_of)
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
    daemon = await serve_in_process(
        nursery,
        RedisServer(Path()),
        REDIS_SENTINELS=",".join(f"127.0.0.1:{p}" for p in ports),
        REDIS_SENTINEL_MASTER=NAME,
    )
    await wait_until(lambda: daemon.app.subscriber.attempts >= 2)
    sample = await get_health(daemon.port)
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
