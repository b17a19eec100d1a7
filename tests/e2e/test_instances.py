"""Several daemons on one host and one port (WS_REUSE_PORT), each with /health and
/metrics of its own (ADMIN_PORT), as real processes against a real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.support.daemon import DaemonProcess, http_request, wait_for_port
from tests.support.redis import RedisServer, free_port
from tests.support.ws import active_connections, open_ws, publish, receive_json

CLIENTS = 40


def start_instance(daemon_process: Any, port: int, **env: str) -> tuple[DaemonProcess, int]:
    admin = free_port()
    daemon: DaemonProcess = daemon_process(
        wait_ready=False,
        WS_PORT=str(port),
        WS_REUSE_PORT="true",
        ADMIN_PORT=str(admin),
        **env,
    )
    wait_for_port(admin, daemon.proc)  # the shared port answers once either is up
    return daemon, admin


@pytest.mark.parametrize("count", [2, 4])
async def test_daemons_share_a_port_and_each_delivers_to_its_own_clients(
    daemon_process: Any, redis_server: RedisServer, count: int
) -> None:
    port = free_port()
    instances = [start_instance(daemon_process, port) for _ in range(count)]
    async with trio.open_nursery() as nursery:
        sockets = [await open_ws(nursery, port, "u-shared") for _ in range(CLIENTS)]
        # The kernel spread the connections: each daemon holds some, and only its own.
        held = [await active_connections(admin) for _, admin in instances]
        assert sum(held) == CLIENTS, held
        assert min(held) > 0, held
        published = await publish(redis_server, "u-shared", {"type": "notification", "payload": 7})
        assert published == count  # each daemon subscribed once
        for ws in sockets:
            assert (await receive_json(ws))["payload"] == 7
        for ws in sockets:
            await ws.aclose()
    for (_, admin), frames in zip(instances, held, strict=True):
        status, _, body = await http_request(admin, "/metrics")
        assert status == 200
        assert f"smap_notify_frames_sent_total {frames}.0" in body.decode(), body.decode()
    assert [daemon.stop() for daemon, _ in instances] == [0] * count
    for daemon, admin in instances:
        assert f"/health and /metrics alone on 127.0.0.1:{admin}" in daemon.log()


async def test_the_admin_port_answers_health_and_metrics_but_upgrades_nothing(
    daemon_process: Any,
) -> None:
    port = free_port()
    _, admin = start_instance(daemon_process, port)
    status, _, body = await http_request(admin, "/health")
    assert status == 200
    assert json.loads(body)["status"] == "healthy"
    assert (await http_request(admin, "/metrics"))[0] == 200
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Origin": "http://localhost:3000",
    }
    status, _, body = await http_request(admin, "/ws", upgrade)
    assert status == 404, body
    assert (await http_request(port, "/health"))[0] == 200
