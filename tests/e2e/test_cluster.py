"""Redis Cluster against a real one: three masters and three replicas, each a
redis-server on a free loopback port (``redis-cli --cluster create``), killed by PID.

Classic PUBLISH reaches every node: the daemon subscribes on one node and moves to
another when it fails. Each test checks delivery whatever node the publisher uses, and
the kill test exactly one resync, /health (503 while no node is subscribed, 200 naming
the node after) and the accounting invariant from /metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trio
from trio_websocket import WebSocketConnection

from smap_notify.cluster import NodeAddress, parse_nodes
from smap_notify.config import ConfigError, load_config
from tests.support.cluster import (
    Cluster,
    address,
    own_flags,
    publish_on,
    running_cluster,
    secured,
    start_daemon,
)
from tests.support.daemon import SECRET, DaemonProcess, wait_until
from tests.support.observe import (
    PublishFlow,
    check_accounting,
    check_one_failover,
    get_health,
    one_restored,
    run_fault,
    start_line,
)
from tests.support.redis import RedisServer, free_port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as cluster:
        yield cluster


def cluster_flow(cluster: Cluster, user: str) -> PublishFlow:
    """Each notification published on the next live node in turn."""

    def where(seq: int) -> tuple[str, int]:
        live = cluster.live()
        return "127.0.0.1", live[seq % len(live)].port

    return PublishFlow(where, user)


def cluster_node_of(doc: dict[str, Any]) -> str | None:
    return doc["cluster"]["node"]


@pytest.mark.parametrize("mode", ["pattern", "user"])
async def test_delivers_whatever_node_the_publisher_uses(
    cluster: Cluster, nursery: trio.Nursery, mode: str
) -> None:
    """Subscribed on one node, the daemon gets what is published on each of the six."""
    daemon = await start_daemon(nursery, address(cluster.nodes[0]), REDIS_SUBSCRIBE=mode)
    await daemon.wait_subscribed()
    assert daemon.app.subscriber.master == address(cluster.nodes[0])
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    for i, node in enumerate(cluster.nodes):
        data = json.dumps({"type": "alert", "payload": {"seq": i}})
        await trio.to_thread.run_sync(publish_on, node, "user_noti:user123", data)
        with trio.fail_after(10):
            frame = json.loads(await ws.get_message())
        assert frame["payload"]["seq"] == i, f"published on {address(node)}"
    sample = await get_health(daemon.port)
    assert sample.status == 200
    assert sample.doc["cluster"] == {"node": address(cluster.nodes[0])}
    assert sample.doc["subscriber"]["mode"] == mode
    await check_accounting(daemon)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pattern", "user"])
@pytest.mark.parametrize("topology", ["locked_cluster", "tls_cluster"])
async def test_a_cluster_that_asks_for_a_password_or_tls_delivers(
    topology: str, request: pytest.FixtureRequest, nursery: trio.Nursery, mode: str
) -> None:
    cluster: Cluster = request.getfixturevalue(topology)
    daemon = await start_daemon(
        nursery, address(cluster.nodes[0]), REDIS_SUBSCRIBE=mode, **secured(cluster)
    )
    await daemon.wait_subscribed()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    for i, node in enumerate(cluster.nodes[:2]):  # a master and another node
        data = json.dumps({"type": "alert", "payload": {"seq": i}})
        with node.client() as client:  # with the password, over TLS
            await trio.to_thread.run_sync(client.publish, "user_noti:user123", data)
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["payload"]["seq"] == i
    sample = await get_health(daemon.port)
    assert sample.status == 200 and sample.doc["subscriber"]["active"]
    await check_accounting(daemon)


@pytest.mark.parametrize("mode", ["pattern", "user"])
async def test_subscribed_node_killed_while_messages_flow_moves_to_another(
    cluster: Cluster, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    # The first node listed is the one killed; the second lets the daemon find the others.
    seeds = f"{address(cluster.nodes[0])},{address(cluster.nodes[1])}"
    daemon = await start_daemon(nursery, seeds, REDIS_SUBSCRIBE=mode)
    app = daemon.app
    await daemon.wait_subscribed()
    old_node = app.subscriber.master
    assert old_node == address(cluster.nodes[0])
    inbox, health, t_fault, down = await run_fault(
        daemon,
        nursery,
        cluster_flow(cluster, "user123"),
        cluster.by_address(old_node).kill,
        lambda: app.subscriber.master != old_node,
        cluster_node_of,
    )
    check_one_failover(daemon, old_node, inbox, health, t_fault, down, cluster_node_of)
    await check_accounting(daemon)
    new_node = app.subscriber.master
    outage, line = one_restored(caplog, f"redis={new_node} cluster=true")
    print(f"node killed -> resubscribed ({mode}): {outage} s ({line})")


@pytest.mark.slow
async def test_a_node_the_cluster_failed_while_it_stays_up_is_left(
    cluster: Cluster, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopped node (SIGSTOP: its socket stays open) is failed by the others: the watch
    sees it and the subscriber moves, with one resync."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    seeds = ",".join(address(n) for n in cluster.nodes[:2])
    daemon = await start_daemon(nursery, seeds)
    app = daemon.app
    await daemon.wait_subscribed()
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    stopped = cluster.nodes[0]
    stopped.pause()
    try:
        await wait_until(
            lambda: app.subscriber.active and app.subscriber.master != address(stopped), 30
        )
        await expect_resync_then_delivery(ws, cluster.nodes[-1])
    finally:
        stopped.resume()
    lost = [r.getMessage() for r in caplog.records if "subscription lost" in r.getMessage()]
    assert len(lost) == 1 and "MasterMoved" in lost[0] and " failed (says " in lost[0], lost


@pytest.mark.slow
async def test_a_node_the_cluster_forgot_is_left(
    cluster: Cluster, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """CLUSTER FORGET on every other node removes a replica from the cluster while it
    stays up (and still believes itself a member): the subscriber leaves it."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    replica = next(n for n in cluster.nodes if "slave" in own_flags(n))
    daemon = await start_daemon(nursery, address(replica))
    app = daemon.app
    await daemon.wait_subscribed()
    assert app.subscriber.master == address(replica)
    ws = await daemon.connect("user123", nursery=nursery)
    await daemon.wait_connections(1)
    with replica.client() as client:
        node_id = client.execute_command("CLUSTER", "MYID")
    others = [n for n in cluster.nodes if n is not replica]
    for node in others:
        with node.client() as client:
            client.execute_command("CLUSTER", "FORGET", node_id)
    await wait_until(lambda: app.subscriber.active and app.subscriber.master != address(replica))
    await expect_resync_then_delivery(ws, others[0])
    lost = [r.getMessage() for r in caplog.records if "subscription lost" in r.getMessage()]
    assert len(lost) == 1 and " is no longer in the cluster (says " in lost[0], lost
    await check_accounting(daemon)


async def expect_resync_then_delivery(ws: WebSocketConnection, node: RedisServer) -> None:
    """The client gets one resync, then what is published on ``node``."""
    data = json.dumps({"type": "alert", "payload": {"seq": 1}})
    await trio.to_thread.run_sync(publish_on, node, "user_noti:user123", data)
    frames: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while not any(f["type"] == "alert" for f in frames):
            frames.append(json.loads(await ws.get_message()))
    assert [f["type"] for f in frames] == ["resync", "alert"]


async def test_no_node_answers_health_says_which_and_why(nursery: trio.Nursery) -> None:
    ports = [free_port(), free_port()]
    daemon = await start_daemon(nursery, ",".join(f"127.0.0.1:{p}" for p in ports))
    await wait_until(lambda: daemon.app.subscriber.attempts >= 2)
    sample = await get_health(daemon.port)
    assert sample.status == 503
    error = sample.doc["subscriber"]["last_error"]
    assert "NodeNotFound" in error and all(f"127.0.0.1:{p}" in error for p in ports), error
    assert sample.doc["cluster"] == {"node": None}


async def test_a_server_not_in_cluster_mode_is_named(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, address(redis_server))
    await wait_until(lambda: daemon.app.subscriber.attempts >= 1)
    error = daemon.app.subscriber.last_error
    assert "not a cluster node (REDIS_CLUSTER=true?)" in error, error


def test_the_start_line_names_the_cluster_nodes(
    daemon_process: Callable[..., DaemonProcess],
) -> None:
    nodes = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    daemon = daemon_process(REDIS_CLUSTER="true", REDIS_HOST=nodes)
    assert f"redis=cluster nodes={nodes} pubsub=classic " in start_line(daemon)
    assert daemon.stop() == 0


def test_several_redis_hosts_only_with_a_cluster() -> None:
    base = {"JWT_SECRET_KEY": SECRET, "REDIS_HOST": "10.0.0.1:7000,10.0.0.2:7000"}
    with pytest.raises(ConfigError, match="only the nodes of a Redis Cluster"):
        load_config(base)
    config = load_config({**base, "REDIS_CLUSTER": "true"})
    assert config.redis_addresses == [("10.0.0.1", 7000), ("10.0.0.2", 7000)]
    with pytest.raises(ConfigError, match="REDIS_DB must be 0 with REDIS_CLUSTER"):
        load_config({**base, "REDIS_CLUSTER": "true", "REDIS_DB": "1"})
    with pytest.raises(ConfigError, match="REDIS_HOST must be host:port"):
        load_config({**base, "REDIS_HOST": "10.0.0.1:7000,nope", "REDIS_CLUSTER": "true"})


def test_parse_nodes_reads_flags_addresses_and_hostnames() -> None:
    text = (
        "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n"
        "b2 10.0.0.2:7001@17001,redis-b.example master,fail - 0 0 2 disconnected\n"
        "c3 :0@0 master,noaddr - 0 0 3 disconnected\n"
    )
    nodes = parse_nodes(text)
    assert [n.id for n in nodes] == ["a1", "b2", "c3"]
    assert nodes[0].address == NodeAddress("127.0.0.1", 7000)
    assert nodes[1].address == NodeAddress("redis-b.example", 7001) and nodes[1].failed
    assert nodes[2].address is None and not nodes[0].failed
    with pytest.raises(redis.InvalidResponse, match="CLUSTER NODES"):
        parse_nodes("+OK")
