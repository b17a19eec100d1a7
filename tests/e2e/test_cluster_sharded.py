"""REDIS_PUBSUB=sharded against a real Redis Cluster (three masters, three replicas).

Publishers SPUBLISH on the master owning the channel's slot, found here with
CLUSTER SLOTS and ``redis.crc.key_slot`` (not the daemon's code). Each test checks
delivery, what Redis holds (PUBSUB SHARDNUMSUB on the owner), the resyncs each client
got, /health and the accounting invariant from /metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
import trio
from redis.crc import key_slot

from tests.support.channels import MARKER
from tests.support.cluster import (
    PASSWORD,
    Cluster,
    address,
    running_cluster,
    secured,
    start_daemon,
)
from tests.support.daemon import Daemon, wait_until
from tests.support.observe import Inbox, check_accounting, get_health, redis_publisher, scrape
from tests.support.redis import RedisServer, free_port
from tests.support.ws import RawWebSocket

SHARDED = {"REDIS_SUBSCRIBE": "user", "REDIS_PUBSUB": "sharded"}
FAILOVER_WITHIN = 60.0  # the cluster's own detection and promotion, not the daemon's part


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as cluster:
        yield cluster


def owner_port(cluster: Cluster, channel: str) -> int:
    """The port of the master serving ``channel``'s slot, as a live node sees it."""
    slot = key_slot(channel.encode())
    for node in cluster.live():
        try:
            with cluster.publisher(node.port) as client:
                ranges = client.execute_command("CLUSTER", "SLOTS")
        except (redis.RedisError, OSError):
            continue
        for first, last, master, *_ in ranges:
            if first <= slot <= last:
                return int(master[1])
    raise redis.ConnectionError("no node answered CLUSTER SLOTS")


def owner(cluster: Cluster, channel: str) -> RedisServer:
    port = owner_port(cluster, channel)
    return next(n for n in cluster.nodes if n.port == port)


def spublish(cluster: Cluster, channel: str, data: str) -> int | None:
    """SPUBLISH on the slot's owner, as a cluster-aware publisher does; None on failure."""
    try:
        with cluster.publisher(owner_port(cluster, channel)) as client:
            return int(client.execute_command("SPUBLISH", channel, data))
    except (redis.RedisError, OSError):
        return None


def shard_subscribers(cluster: Cluster, channel: str) -> int:
    with cluster.publisher(owner_port(cluster, channel)) as client:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


def users_on_each_master(cluster: Cluster, prefix: str = "u") -> list[str]:
    """One user per master, whose channel hashes to a slot of that master."""
    found: dict[int, str] = {}
    for i in range(1000):
        user = f"{prefix}{i}"
        found.setdefault(owner_port(cluster, f"user_noti:{user}"), user)
        if len(found) == 3:
            return list(found.values())
    raise AssertionError("three masters not covered")


async def health_doc(daemon: Daemon) -> dict[str, Any]:
    sample = await get_health(daemon.port)
    doc: dict[str, Any] = sample.doc
    doc["http_status"] = sample.status
    return doc


async def start_sharded(nursery: trio.Nursery, cluster: Cluster, **env: str) -> Daemon:
    daemon = await start_daemon(nursery, address(cluster.nodes[0]), **SHARDED, **env)
    await daemon.wait_subscribed()
    return daemon


@pytest.mark.parametrize("topology", ["cluster", "locked_cluster", "tls_cluster"])
async def test_spublish_reaches_users_whose_channels_are_on_different_masters(
    topology: str, request: pytest.FixtureRequest, nursery: trio.Nursery
) -> None:
    """Also when every node asks for a password, or speaks TLS only."""
    cluster: Cluster = request.getfixturevalue(topology)
    daemon = await start_sharded(nursery, cluster, **secured(cluster))
    users = users_on_each_master(cluster)
    sockets = [await daemon.connect(user, nursery=nursery) for user in users]
    for i, (user, ws) in enumerate(zip(users, sockets, strict=True)):
        data = json.dumps({"type": "alert", "payload": {"seq": i}})
        receivers = await trio.to_thread.run_sync(spublish, cluster, f"user_noti:{user}", data)
        assert receivers == 1, user
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["payload"]["seq"] == i
        assert shard_subscribers(cluster, f"user_noti:{user}") == 1
    doc = await health_doc(daemon)
    assert doc["http_status"] == 200
    assert doc["subscriber"]["mode"] == "user" and doc["subscriber"]["channels"] == 3
    shards = doc["cluster"]
    assert shards["pubsub"] == "sharded" and shards["node"] is None
    owners = {f"127.0.0.1:{owner_port(cluster, f'user_noti:{u}')}" for u in users}
    assert shards["nodes"] == 3 and shards["down"] == []
    assert {s["node"] for s in shards["shards"]} == owners
    assert all(s["up"] and s["channels"] == 1 for s in shards["shards"])
    # One connection per master, whatever the number of users.
    assert daemon.app.counters.redis_subscribe_commands == 3
    await check_accounting(daemon)


async def test_a_message_spublished_the_moment_the_client_sees_the_upgrade_arrives(
    cluster: Cluster, nursery: trio.Nursery
) -> None:
    daemon = await start_sharded(nursery, cluster)
    for i in range(150):
        user = f"race{i}"
        channel = f"user_noti:{user}"
        port = owner_port(cluster, channel)
        with redis_publisher(port) as publisher:
            ws = await RawWebSocket.open(daemon.port, user)
            # Published from this task, blocking it: nothing else runs in between.
            receivers = publisher.execute_command("SPUBLISH", channel, json.dumps(MARKER))
        assert receivers == 1, f"user {i}: not subscribed when the 101 was sent"
        with trio.fail_after(5):
            assert json.loads(await ws.next_text())["payload"] == "end"
        await ws.vanish()
    accounting = await scrape(daemon.port)
    assert accounting.balanced and accounting.delivered == 150


async def test_the_last_tab_unsubscribes_on_the_owner_after_the_grace(
    cluster: Cluster, nursery: trio.Nursery
) -> None:
    daemon = await start_sharded(nursery, cluster, REDIS_UNSUBSCRIBE_GRACE="300ms")
    channel = "user_noti:u1"
    first = await daemon.connect("u1", nursery=nursery)
    second = await daemon.connect("u1", nursery=nursery)
    assert shard_subscribers(cluster, channel) == 1
    await first.aclose()
    await daemon.wait_connections(1)
    assert shard_subscribers(cluster, channel) == 1
    await second.aclose()
    await wait_until(lambda: shard_subscribers(cluster, channel) == 0)
    await wait_until(lambda: daemon.app.subscriber.channels == 0)
    accounting = await scrape(daemon.port)
    assert accounting.metrics["smap_notify_redis_unsubscribe_commands_total"][()] == 1


def move_slot(cluster: Cluster, slot: int, source: RedisServer, target: RedisServer) -> None:
    """Migrate ``slot`` (no keys in it) from ``source`` to ``target``, as ``redis-cli
    --cluster reshard`` does: IMPORTING, MIGRATING, then NODE on both and every master."""
    with redis_publisher(source.port) as src, redis_publisher(target.port) as dst:
        src_id = src.execute_command("CLUSTER", "MYID").decode()
        dst_id = dst.execute_command("CLUSTER", "MYID").decode()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    for node in cluster.live():
        if node not in (source, target):
            with redis_publisher(node.port) as other:
                if b"master" in other.execute_command("ROLE")[0]:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


class Flow:
    """Numbered notifications SPUBLISHed to one user on its slot's current owner."""

    def __init__(self, cluster: Cluster, user: str) -> None:
        self.cluster = cluster
        self.channel = f"user_noti:{user}"
        self.published: list[tuple[int, float, int | None]] = []  # seq, started, receivers

    async def run(self) -> None:
        for seq in range(1, 1_000_000):
            started = trio.current_time()
            data = json.dumps({"type": "notification", "payload": {"seq": seq}})
            receivers = await trio.to_thread.run_sync(spublish, self.cluster, self.channel, data)
            self.published.append((seq, started, receivers))
            await trio.sleep(0.02)

    def delivered_after(self, inbox: Inbox, moment: float) -> bool:
        """Something published after ``moment`` arrived."""
        first = next((seq for seq, t, _ in self.published if t >= moment), None)
        return first is not None and any(seq >= first for _, seq in inbox.data())


@attrs.define
class TwoUsers:
    """Two users on different masters, each with a client and a flow of notifications:
    ``hit`` is the one whose master the test disturbs."""

    channel: str
    hit: Inbox
    other: Inbox
    hit_flow: Flow
    other_flow: Flow

    @classmethod
    async def connect(cls, daemon: Daemon, cluster: Cluster, nursery: trio.Nursery) -> TwoUsers:
        users = users_on_each_master(cluster)[:2]
        inboxes = []
        for user in users:
            ws = await daemon.connect(user, nursery=nursery)
            inboxes.append(Inbox())
            nursery.start_soon(inboxes[-1].collect, ws)
        await daemon.wait_connections(2)
        hit_flow, other_flow = (Flow(cluster, user) for user in users)
        return cls(f"user_noti:{users[0]}", inboxes[0], inboxes[1], hit_flow, other_flow)

    def start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.hit_flow.run)
        nursery.start_soon(self.other_flow.run)

    def flowing(self) -> bool:
        return len(self.hit.data()) >= 5 and len(self.other.data()) >= 5

    def delivered_after(self, moment: float) -> bool:
        return self.hit_flow.delivered_after(self.hit, moment) and self.other_flow.delivered_after(
            self.other, moment
        )


def check_one_resync(inbox: Inbox, t_fault: float) -> None:
    """Every message once and in order, messages before and after the fault, and
    exactly one resync."""
    assert inbox.closed is None
    seqs = [seq for _, seq in inbox.data()]
    assert seqs == sorted(set(seqs)), "in order, no duplicates"
    assert any(t < t_fault for t, _ in inbox.data())
    resyncs = inbox.resyncs()
    assert len(resyncs) == 1, resyncs
    position, _, frame = resyncs[0]
    assert frame["payload"]["reason"] == "redis_reconnected"
    assert position < len(inbox.frames) - 1, "messages came after the resync"


@pytest.mark.slow
async def test_a_slot_migrated_while_messages_flow_is_followed_to_its_new_owner(
    cluster: Cluster, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon = await start_sharded(nursery, cluster)
    users = await TwoUsers.connect(daemon, cluster, nursery)
    channel = users.channel
    source = owner(cluster, channel)
    target = owner(cluster, users.other_flow.channel)
    async with trio.open_nursery() as tasks:
        users.start(tasks)
        await wait_until(users.flowing)
        t_fault = trio.current_time()
        slot = key_slot(channel.encode())
        await trio.to_thread.run_sync(move_slot, cluster, slot, source, target)
        await wait_until(lambda: owner(cluster, channel) is target)
        await wait_until(lambda: bool(users.hit.resyncs()))
        t_back = trio.current_time()
        await wait_until(lambda: users.delivered_after(t_back))
        tasks.cancel_scope.cancel()
    check_one_resync(users.hit, t_fault)
    assert users.other.resyncs() == [], "a user on another slot is not disturbed"
    (_, t_resync, _) = users.hit.resyncs()[0]
    print(f"slot moved -> resubscribed on the new owner, resync after {t_resync - t_fault:.2f} s")
    assert shard_subscribers(cluster, channel) == 1
    with redis_publisher(source.port) as client:
        assert client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 0
    doc = await health_doc(daemon)
    assert doc["http_status"] == 200 and doc["cluster"]["down"] == []
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "slot moved" in line and f"redis={address(source)} cluster=true pubsub=sharded" in line
        for line in lines
    ), lines
    await check_accounting(daemon)


def late_user(cluster: Cluster, master: RedisServer) -> str:
    """A user, not connected yet, whose channel is in a slot of ``master``'s."""
    slots = {key_slot(f"user_noti:late{i}".encode()): f"late{i}" for i in range(2000)}
    with redis_publisher(next(n.port for n in cluster.live())) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    for first, last, owner_, *_ in ranges:
        if int(owner_[1]) == master.port:
            return next(user for slot, user in slots.items() if first <= slot <= last)
    raise AssertionError(f"{address(master)} owns no slot")


@pytest.mark.slow
async def test_a_master_killed_while_messages_flow_fails_over_to_its_replica(
    cluster: Cluster, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    # Every node as a seed: whichever is killed, the daemon can ask the others.
    daemon = await start_daemon(nursery, ",".join(address(n) for n in cluster.nodes), **SHARDED)
    await daemon.wait_subscribed()
    app = daemon.app
    users = await TwoUsers.connect(daemon, cluster, nursery)
    channel = users.channel
    victim = owner(cluster, channel)
    async with trio.open_nursery() as tasks:
        users.start(tasks)
        await wait_until(users.flowing)
        t_fault = trio.current_time()
        await trio.to_thread.run_sync(victim.kill)
        await wait_until(lambda: not app.subscriber.active)
        during = await health_doc(daemon)
        # A new user whose master is down is accepted anyway, and told once it is back.
        late = late_user(cluster, victim)
        with trio.fail_after(5):
            late_ws = await daemon.connect(late, nursery=nursery)
        late_inbox = Inbox()
        tasks.start_soon(late_inbox.collect, late_ws)
        await wait_until(lambda: owner(cluster, channel) is not victim, FAILOVER_WITHIN)
        await wait_until(lambda: app.subscriber.active, FAILOVER_WITHIN)
        t_back = trio.current_time()
        after = await health_doc(daemon)
        await wait_until(lambda: users.delivered_after(t_back))
        tasks.cancel_scope.cancel()
    check_one_resync(users.hit, t_fault)
    assert users.other.resyncs() == [], "a user on another master is not disturbed"
    assert [doc["type"] for _, doc in late_inbox.frames] == ["resync"]
    assert app.counters.redis_reconnects == 1
    # While the killed master owned the slot: 503, naming it as down.
    assert during["http_status"] == 503 and during["subscriber"]["active"] is False
    assert during["cluster"]["down"] == [address(victim)], during
    assert after["http_status"] == 200 and after["cluster"]["down"] == [], after
    new_owner = f"127.0.0.1:{owner_port(cluster, channel)}"
    assert new_owner in {s["node"] for s in after["cluster"]["shards"] if s["up"]}
    assert shard_subscribers(cluster, channel) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("redis shard lost")
        and f"redis={address(victim)} cluster=true pubsub=sharded" in line
        for line in lines
    ), lines
    restored = [line for line in lines if "shard subscription restored" in line]
    assert len(restored) == 1 and f"redis={new_owner} " in restored[0], restored
    print(f"master killed -> resubscribed on its promoted replica: {restored[0]}")
    await check_accounting(daemon)


async def test_a_fixed_broadcast_channel_is_subscribed_on_its_owner_from_start(
    cluster: Cluster, nursery: trio.Nursery
) -> None:
    daemon = await start_sharded(nursery, cluster, CHANNELS="user_noti:{user},notices")
    await wait_until(lambda: shard_subscribers(cluster, "notices") == 1)
    sockets = [
        await daemon.connect(user, nursery=nursery) for user in users_on_each_master(cluster)
    ]
    receivers = await trio.to_thread.run_sync(spublish, cluster, "notices", json.dumps(MARKER))
    assert receivers == 1
    for ws in sockets:
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["payload"] == "end"
    await check_accounting(daemon)


async def test_no_node_answers_health_says_which_and_why(nursery: trio.Nursery) -> None:
    ports = [free_port(), free_port()]
    nodes = ",".join(f"127.0.0.1:{p}" for p in ports)
    daemon = await start_daemon(nursery, nodes, **SHARDED)
    await wait_until(lambda: daemon.app.subscriber.attempts >= 2)
    doc = await health_doc(daemon)
    assert doc["http_status"] == 503 and doc["subscriber"]["state"] == "starting"
    error = doc["subscriber"]["last_error"]
    assert "NodeNotFound" in error and all(f"127.0.0.1:{p}" in error for p in ports), error
    assert doc["cluster"] == {
        "node": None,
        "pubsub": "sharded",
        "nodes": 0,
        "down": [],
        "shards": [],
    }


async def test_a_first_connection_after_an_unseen_slot_move_is_subscribed_on_the_new_owner(
    cluster: Cluster, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The slot moves just before the user connects: the daemon's map (read every
    second) most likely still names the old owner, which answers MOVED; either way the
    101 is sent only once the new owner confirmed."""
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon = await start_sharded(nursery, cluster)
    anchor, user, *_ = users_on_each_master(cluster)
    await daemon.connect(anchor, nursery=nursery)  # the daemon is linked to the target
    channel = f"user_noti:{user}"
    source, target = owner(cluster, channel), owner(cluster, f"user_noti:{anchor}")
    await trio.to_thread.run_sync(move_slot, cluster, key_slot(channel.encode()), source, target)
    ws = await RawWebSocket.open(daemon.port, user)
    with redis_publisher(target.port) as publisher:
        assert publisher.execute_command("SPUBLISH", channel, json.dumps(MARKER)) == 1
    with trio.fail_after(5):
        assert json.loads(await ws.next_text())["payload"] == "end"
    redirected = any("redirected" in r.getMessage() for r in caplog.records)
    print(f"first connection after an unseen slot move: MOVED answered: {redirected}")


async def test_a_wrong_cluster_password_is_reported_without_the_password(
    locked_cluster: Cluster, nursery: trio.Nursery
) -> None:
    wrong = "not-the-cluster-password"
    daemon = await start_daemon(
        nursery, address(locked_cluster.nodes[0]), **SHARDED, REDIS_PASSWORD=wrong
    )
    await wait_until(lambda: daemon.app.subscriber.attempts >= 2)
    doc = await health_doc(daemon)
    assert doc["http_status"] == 503 and not doc["subscriber"]["active"]
    error = doc["subscriber"]["last_error"]
    assert "REDIS_PASSWORD" in error, error
    assert wrong not in json.dumps(doc) and PASSWORD not in json.dumps(doc)
