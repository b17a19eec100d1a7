"""Hub routing decisions that need no sockets."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import trio

from smap_notify.config import Config
from smap_notify.connection import Connection
from smap_notify.hub import Hub
from smap_notify.inbox import Inbox
from smap_notify.metrics import Counters


def connection(user: str, max_messages: int = 4) -> Connection:
    stream: Any = SimpleNamespace()
    return Connection(
        user,
        stream,
        trio.Lock(),
        expires_at=time.time() + 3600,
        max_messages=max_messages,
        max_bytes=1 << 20,
        write_wait=1.0,
    )


async def start_hub(nursery: trio.Nursery) -> Hub:
    hub = Hub(Config(jwt_secret_key="x" * 32), Counters())
    await nursery.start(hub.serve, Inbox(2))
    return hub


async def test_message_for_a_user_whose_only_connection_is_closing_is_counted_so(
    nursery: trio.Nursery,
) -> None:
    hub = await start_hub(nursery)
    conn = connection("u")
    assert hub.try_reserve("u") is None
    hub.register(conn)
    conn.close_sent = True
    hub.route_batch([(b"user_noti:u", b'{"type":"alert"}')])
    assert hub.counters.dropped == {"connection_closed": 1}
    assert hub.counters.received == hub.counters.accounted() == 1


async def test_reservations_enforce_both_caps_and_are_released(nursery: trio.Nursery) -> None:
    hub = await start_hub(nursery)
    hub.config = Config(
        jwt_secret_key="x" * 32, ws_max_connections=3, ws_max_connections_per_user=2
    )
    assert hub.try_reserve("a") is None
    assert hub.try_reserve("a") is None
    assert hub.try_reserve("a") == (429, "max_connections_per_user")
    assert hub.try_reserve("b") is None
    assert hub.try_reserve("c") == (503, "max_connections")
    hub.release("b")
    assert hub.try_reserve("c") is None
