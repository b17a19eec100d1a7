"""REDIS_SUBSCRIBE=user end to end: a real redis-server, real WebSocket clients."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio_websocket

from tests.support.channels import MARKER, TOPIC_ERA, frames_until_marker, sample
from tests.support.daemon import Daemon, http_request, wait_until
from tests.support.observe import scrape
from tests.support.redis import RedisServer
from tests.support.ws import RawWebSocket


def pubsub_channels(server: RedisServer) -> set[str]:
    with server.client() as client:
        return {c.decode() for c in client.pubsub_channels()}


def pubsub_patterns(server: RedisServer) -> int:
    with server.client() as client:
        return int(client.pubsub_numpat())


async def health(daemon: Daemon) -> dict[str, Any]:
    _, _, body = await http_request(daemon.port, "/health")
    doc: dict[str, Any] = json.loads(body)
    return doc


async def test_a_message_published_the_moment_the_client_sees_the_upgrade_arrives(
    start_daemon: Any, redis_server: RedisServer
) -> None:
    """Each new user's first connection: the 101 is read, the message published at once."""
    daemon: Daemon = await start_daemon(REDIS_SUBSCRIBE="user")
    with redis_server.client() as publisher:
        for i in range(200):
            user = f"race{i}"
            ws = await RawWebSocket.open(daemon.port, user)
            # Published from this task, blocking it: nothing else runs in between.
            receivers = publisher.publish(f"user_noti:{user}", json.dumps(MARKER))
            assert receivers == 1, f"user {i}: not subscribed when the 101 was sent"
            with trio.fail_after(5):
                assert json.loads(await ws.next_text())["payload"] == "end"
            await ws.vanish()
    accounting = await scrape(daemon.port)
    assert accounting.balanced
    assert accounting.delivered == 200
    assert accounting.metrics["smap_notify_redis_subscribe_commands_total"][()] <= 200


async def test_the_last_tab_unsubscribes_after_the_grace_and_a_quick_reconnect_does_not(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(REDIS_SUBSCRIBE="user", REDIS_UNSUBSCRIBE_GRACE="2s")
    assert pubsub_channels(redis_server) == set()
    first = await daemon.connect("u1", nursery=nursery)
    second = await daemon.connect("u1", nursery=nursery)
    await daemon.wait_connections(2)
    assert pubsub_channels(redis_server) == {"user_noti:u1"}
    doc = await health(daemon)
    assert doc["subscriber"]["mode"] == "user"
    assert doc["subscriber"]["channels"] == 1
    counters = daemon.app.counters
    subscribes = counters.redis_subscribe_commands
    await first.aclose()
    await second.aclose()
    await daemon.wait_connections(0)
    # A tab that comes back within the grace: no UNSUBSCRIBE, no SUBSCRIBE.
    again = await daemon.connect("u1", nursery=nursery)
    await daemon.wait_connections(1)
    assert counters.redis_subscribe_commands == subscribes
    assert counters.redis_unsubscribe_commands == 0
    await again.aclose()
    await daemon.wait_connections(0)
    assert pubsub_channels(redis_server) == {"user_noti:u1"}
    await wait_until(lambda: pubsub_channels(redis_server) == set(), timeout=10)
    assert counters.redis_unsubscribe_commands == 1
    await wait_until(lambda: daemon.app.subscriber.channels == 0)
    assert (await health(daemon))["subscriber"]["channels"] == 0
    # Unsubscribed: a message to that user is not received at all.
    assert await daemon.publish("u1", MARKER) == 0


async def test_a_redis_restart_resubscribes_every_user_before_one_resync_each(
    start_daemon: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smap_notify")
    daemon: Daemon = await start_daemon(REDIS_SUBSCRIBE="user", WS_MAX_CONNECTIONS="5000")
    users = 2000
    clients = []
    for i in range(users):
        clients.append(await RawWebSocket.open(daemon.port, f"user{i}"))
    await daemon.wait_connections(users)
    assert len(pubsub_channels(redis_server)) == users
    before = daemon.app.counters.redis_subscribe_commands
    await trio.to_thread.run_sync(redis_server.kill)
    await wait_until(lambda: not daemon.app.subscriber.active)
    await trio.to_thread.run_sync(redis_server.start)
    await daemon.wait_subscribed()
    # Subscribed again before the resync went out, in a few commands.
    assert len(pubsub_channels(redis_server)) == users
    assert daemon.app.counters.redis_subscribe_commands - before == 2  # 1,000 per command
    with trio.fail_after(20):
        for client in clients:
            assert json.loads(await client.next_text())["type"] == "resync"
    for i in (0, users - 1):
        assert await daemon.publish(f"user{i}", MARKER) == 1
        assert json.loads(await clients[i].next_text())["payload"] == "end"
    assert daemon.app.counters.resyncs_sent == users
    assert (await scrape(daemon.port)).balanced
    # The log says what is held in this mode, not the template's pattern.
    said = [r.getMessage() for r in caplog.records if "redis subscri" in r.getMessage()]
    assert any(m.startswith("redis subscribed mode=user channels=0 ") for m in said), said
    restored = f"redis subscription restored mode=user channels={users} "
    assert any(m.startswith(restored) for m in said), said
    for client in clients:
        await client.vanish()


def without_time(frames: list[str]) -> list[str]:
    """The frames, each envelope's timestamp (the time it was sent) taken out."""
    out = []
    for frame in frames:
        doc = json.loads(frame)
        doc.pop("timestamp", None)
        out.append(json.dumps(doc))
    return out


async def topic_era_frames(
    daemon: Daemon, nursery: trio.Nursery, redis_server: RedisServer
) -> dict[str, list[str]]:
    """The web UI's three sockets for one user, the topic era's traffic, and each
    socket's frames; then the dashboard leaves and the project page gets the same again."""
    phase = sample("later_topic_project_phase.json")
    flat = sample("later_topic_job_and_project_flat.json")
    user = phase["channel"].rsplit(":", 1)[1]
    sockets = {
        "project": await daemon.connect(user, nursery=nursery, query="projectId=proj_xyz"),
        "dashboard": await daemon.connect(user, nursery=nursery),
        "job": await daemon.connect(user, nursery=nursery, query="jobId=job_789"),
    }
    await daemon.wait_connections(3)
    traffic = [
        (f"project:proj_xyz:{user}", json.dumps(phase["message"])),
        (f"project:proj_123:{user}", json.dumps(flat["project_flat"]["message"])),
        (f"job:job_789:{user}", json.dumps(flat["job"]["message"])),
        (f"job:job_000:{user}", json.dumps({"platform": "YOUTUBE", "status": "DONE"})),
        ("project:proj_xyz:someone_else", json.dumps(phase["message"])),
        ("user_noti:someone_else", json.dumps(MARKER)),
        (
            f"user_noti:{user}",
            json.dumps(sample("redis-in_user_noti_project_progress.json")["message"]),
        ),
    ]

    async def publish_all() -> None:
        for channel, data in traffic:
            await daemon.publish_to(channel, data)
        await daemon.publish_to(f"user_noti:{user}", json.dumps(MARKER))

    await publish_all()
    got = {name: without_time(await frames_until_marker(ws)) for name, ws in sockets.items()}
    dashboard = sockets.pop("dashboard")
    await dashboard.aclose()
    await daemon.wait_connections(2)
    await publish_all()
    for name, ws in sockets.items():
        got[name + " after the dashboard left"] = without_time(await frames_until_marker(ws))
    for ws in sockets.values():
        await ws.aclose()
    await daemon.wait_connections(0)
    return got


async def test_both_modes_deliver_exactly_the_same_frames(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    frames = {}
    for mode in ("pattern", "user"):
        daemon: Daemon = await start_daemon(CHANNELS=TOPIC_ERA, REDIS_SUBSCRIBE=mode)
        frames[mode] = await topic_era_frames(daemon, nursery, redis_server)
        accounting = await scrape(daemon.port)
        assert accounting.balanced
    assert frames["pattern"] == frames["user"]
    assert len(frames["user"]["dashboard"]) == 5
    assert len(frames["user"]["project"]) == 4  # not proj_123's
    assert len(frames["user"]["job"]) == 4  # not job_000's
    assert frames["user"]["project after the dashboard left"] == frames["user"]["project"]


async def test_a_reload_changing_channels_subscribes_what_connections_need(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery, tmp_path: Any
) -> None:
    config = tmp_path / "env"
    before = "user_noti:{user},project:{project}:{user}|raw"
    config.write_text(f"CHANNELS={before}\n")
    daemon: Daemon = await start_daemon(
        CHANNELS=before, REDIS_SUBSCRIBE="user", REDIS_UNSUBSCRIBE_GRACE="1s"
    )
    daemon.app.config_file = config
    ws = await daemon.connect("u7", nursery=nursery, query="projectId=p1")
    await daemon.wait_connections(1)
    assert pubsub_channels(redis_server) == {"user_noti:u7", "project:p1:u7"}
    assert pubsub_patterns(redis_server) == 0
    config.write_text(f"CHANNELS={TOPIC_ERA}\n")
    daemon.app.reload()
    await wait_until(
        lambda: (
            pubsub_channels(redis_server) == {"user_noti:u7", "project:p1:u7"}
            and pubsub_patterns(redis_server) == 1
        )  # job:*:u7
    )
    assert await daemon.publish_to("project:p1:u7", json.dumps({"status": "PROCESSING"})) == 1
    assert json.loads(await ws.get_message()) == {"status": "PROCESSING"}
    config.write_text("CHANNELS=alerts:all\n")
    daemon.app.reload()
    await wait_until(
        lambda: (
            pubsub_channels(redis_server) == {"alerts:all"} and pubsub_patterns(redis_server) == 0
        )
    )
    with pytest.raises(trio.TooSlowError), trio.fail_after(0.01):
        await ws.get_message()
    assert isinstance(ws, trio_websocket.WebSocketConnection)
