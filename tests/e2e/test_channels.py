"""CHANNELS end to end: the seed's, the topic era's and the successor's schemes against a
real redis-server, with real WebSocket clients over loopback."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

from tests.support.channels import (
    MARKER,
    SUCCESSOR,
    TOPIC_ERA,
    frames_until_marker,
    sample,
)
from tests.support.daemon import DEV_ORIGIN, WS_UPGRADE_HEADERS, Daemon, http_request, make_token


async def health_pattern(daemon: Daemon) -> str:
    _, _, body = await http_request(daemon.port, "/health")
    pattern: str = json.loads(body)["subscriber"]["pattern"]
    return pattern


async def test_the_topic_eras_three_sockets_each_get_what_the_web_ui_expects(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(CHANNELS=TOPIC_ERA)
    phase = sample("later_topic_project_phase.json")
    flat = sample("later_topic_job_and_project_flat.json")
    user = phase["channel"].rsplit(":", 1)[1]
    dashboard = await daemon.connect(user, nursery=nursery)
    project_page = await daemon.connect(user, nursery=nursery, query="projectId=proj_xyz")
    dry_run = await daemon.connect(user, nursery=nursery, query="jobId=job_789&campaignId=x")
    await daemon.wait_connections(3)

    # As published, byte for byte (the web UI parses them as they are).
    progress = json.dumps(phase["message"])
    other_project = json.dumps(flat["project_flat"]["message"])
    job = json.dumps(flat["job"]["message"])
    other_job = json.dumps({"platform": "YOUTUBE", "status": "DONE"})
    seed = sample("redis-in_user_noti_project_progress.json")["message"]
    published = [
        (f"project:proj_xyz:{user}", progress),
        (f"project:proj_123:{user}", other_project),
        (f"job:job_789:{user}", job),
        (f"job:job_000:{user}", other_job),
        (f"user_noti:{user}", json.dumps(seed)),
        (f"user_noti:{user}", json.dumps(MARKER)),
    ]
    for channel, data in published:
        assert await daemon.publish_to(channel, data) == 1

    got = {}
    for name, ws in (("dashboard", dashboard), ("project", project_page), ("job", dry_run)):
        frames = await frames_until_marker(ws)
        # The user_noti message comes in the envelope, the others unchanged.
        assert json.loads(frames[-1])["payload"] == seed["payload"]
        got[name] = frames[:-1]
    assert got["dashboard"] == [progress, other_project, job, other_job]
    assert got["project"] == [progress, job, other_job]
    assert got["job"] == [progress, other_project, job]

    c = daemon.app.counters
    assert c.by_channel == {
        "project:{project}:{user}": 2,
        "job:{job}:{user}": 2,
        "user_noti:{user}": 2,
    }
    _, _, body = await http_request(daemon.port, "/metrics")
    assert 'smap_notify_messages_by_channel_total{channel="project:{project}:{user}"} 2.0' in (
        body.decode()
    )
    assert await health_pattern(daemon) == "user_noti:*,project:*,job:*"


async def test_the_successors_scheme_with_a_broadcast_to_everyone(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(CHANNELS=SUCCESSOR)
    alice = await daemon.connect("alice", nursery=nursery)
    alice_campaign = await daemon.connect("alice", nursery=nursery, query="campaignId=c1")
    bob = await daemon.connect("bob", nursery=nursery, query="eventId=maintenance")
    await daemon.wait_connections(3)
    await daemon.publish_to("campaign:c1:user:alice", {"type": "update", "payload": "c1"})
    await daemon.publish_to("campaign:c2:user:alice", {"type": "update", "payload": "c2"})
    await daemon.publish_to("alert:a1:user:alice", {"type": "alert", "payload": "a1"})
    await daemon.publish_to("system:maintenance", {"type": "notification", "payload": "m"})
    await daemon.publish_to("system:release", {"type": "notification", "payload": "r"})
    # Not subscribed under this scheme: never reaches the daemon.
    assert await daemon.publish_to("user_noti:alice", {"type": "alert", "payload": "x"}) == 0
    # Its pattern, not its template: a campaign id outside the rule.
    await daemon.publish_to("campaign:c.1:user:alice", {"type": "alert", "payload": "x"})
    for user in ("alice", "bob"):
        await daemon.publish_to(f"alert:end:user:{user}", MARKER)

    def payloads(frames: list[str]) -> list[Any]:
        return [json.loads(f)["payload"] for f in frames]

    assert payloads(await frames_until_marker(alice)) == ["c1", "c2", "a1", "m", "r"]
    assert payloads(await frames_until_marker(alice_campaign)) == ["c1", "a1", "m", "r"]
    assert payloads(await frames_until_marker(bob)) == ["m"]
    c = daemon.app.counters
    assert c.rejected == {"bad_channel": 1}
    assert await health_pattern(daemon) == "project:*,campaign:*,alert:*,system:*"


async def test_the_seed_scheme_keeps_user_ids_with_colons_next_to_topic_templates(
    start_daemon: Any, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(CHANNELS=TOPIC_ERA)
    ws = await daemon.connect("tenant:42:alice", nursery=nursery, query="projectId=p1")
    await daemon.wait_connections(1)
    await daemon.publish("tenant:42:alice", {"type": "alert", "payload": "hi"})
    frame = json.loads(await ws.get_message())
    assert list(frame) == ["type", "payload", "timestamp"] and frame["payload"] == "hi"


@pytest.mark.parametrize(
    ("query", "name"), [("projectId=p.1", "projectId"), ("jobId=%20&projectId=p1", "jobId")]
)
async def test_a_bad_filter_is_answered_400_and_counted(
    start_daemon: Any, caplog: pytest.LogCaptureFixture, query: str, name: str
) -> None:
    daemon: Daemon = await start_daemon(CHANNELS=TOPIC_ERA)
    headers = {
        **WS_UPGRADE_HEADERS,
        "Origin": DEV_ORIGIN,
        "Cookie": f"smap_auth_token={make_token('alice')}",
    }
    with caplog.at_level(logging.INFO, logger="smap_notify"):
        status, _, body = await http_request(daemon.port, f"/ws?{query}", headers)
    assert status == 400
    assert body == (
        b'{"error":"invalid ' + name.encode() + b": only alphanumeric, underscore,"
        b' and hyphen allowed"}'
    )
    assert daemon.app.counters.handshake_rejections == {"invalid_filter": 1}
    assert daemon.app.hub.connection_count == 0
    assert f"reason=invalid_filter {name}=" in caplog.text
    _, _, metrics = await http_request(daemon.port, "/metrics")
    assert 'smap_notify_handshake_rejections_total{reason="invalid_filter"} 1.0' in (
        metrics.decode()
    )


async def test_an_accepted_handshakes_debug_line_names_its_filters(
    start_daemon: Any, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    daemon: Daemon = await start_daemon(CHANNELS=TOPIC_ERA)
    with caplog.at_level(logging.DEBUG, logger="smap_notify"):
        await daemon.connect("alice", nursery=nursery, query="jobId=j1&projectId=p1")
        await daemon.connect("bob", nursery=nursery)
        await daemon.wait_connections(2)
    opened = [r.getMessage() for r in caplog.records if "connection opened" in r.getMessage()]
    assert any("user=alice filters=projectId:p1,jobId:j1" in line for line in opened)
    assert any("user=bob filters=-" in line for line in opened)
