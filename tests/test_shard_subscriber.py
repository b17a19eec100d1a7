"""The sharded subscriber's reading of Redis's replies, without sockets: confirmations,
messages, MOVED and Redis's own sunsubscribe after a slot move."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import redis

from smap_notify.cluster import NodeAddress, NodeLocator, parse_nodes
from smap_notify.config import Config
from smap_notify.hub import Batch, RawMessage
from smap_notify.inbox import Inbox
from smap_notify.metrics import Counters
from smap_notify.shard_subscriber import ShardWorker
from smap_notify.shards import SlotMap, channel_slot
from smap_notify.subscriber import SubscriberState
from smap_notify.subscriptions import Requests, Subscription

A = NodeAddress("127.0.0.1", 7000)
B = NodeAddress("127.0.0.1", 7001)
CHANNEL = "user_noti:u1"
ALL_ON_A = SlotMap.from_nodes(
    parse_nodes("a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-16383")
)


def worker() -> tuple[ShardWorker, Any]:
    config = Config(jwt_secret_key="x" * 32, redis_cluster=True, redis_host="127.0.0.1:7000")
    requests = Requests()
    shard = ShardWorker(
        config,
        Inbox[Batch](4),
        SubscriberState(),
        Counters(),
        requests,
        NodeLocator(config, socket_timeout=0.1),
    )
    shard.placement.want(CHANNEL)
    assert shard.placement.place(ALL_ON_A, lambda node: True, now=1.0) == ({A: [CHANNEL]}, [])
    shard.map_due = time.monotonic() + 60
    return shard, SimpleNamespace(address=A, leaving=set())


async def test_a_confirmation_is_handed_on_and_a_message_batched() -> None:
    shard, link = worker()
    try:
        batch: list[RawMessage] = []
        assert shard._take(link, [b"ssubscribe", CHANNEL.encode(), 1], batch) == 0
        assert shard._confirmed == [Subscription(CHANNEL, False)]
        assert CHANNEL in shard.placement.confirmed
        assert shard._take(link, [b"smessage", CHANNEL.encode(), b"{}"], batch) == 2
        assert batch == [(CHANNEL.encode(), b"{}")]
    finally:
        shard.requests.close()


async def test_moved_parks_the_channel_and_asks_the_node_named_first() -> None:
    shard, link = worker()
    try:
        slot = channel_slot(CHANNEL)
        shard._take(link, redis.ResponseError(f"MOVED {slot} 127.0.0.1:7001"), [])
        assert CHANNEL not in shard.placement.on and CHANNEL in shard.placement.parked
        assert shard.map_prefer == [B] and shard.map_due <= time.monotonic()
        assert CHANNEL not in shard.placement.missed  # never confirmed: nothing missed
    finally:
        shard.requests.close()


async def test_redis_s_own_sunsubscribe_marks_the_channel_missed_and_rereads_the_map() -> None:
    shard, link = worker()
    try:
        shard._take(link, [b"ssubscribe", CHANNEL.encode(), 1], [])
        shard._take(link, [b"sunsubscribe", CHANNEL.encode(), 0], [])
        assert CHANNEL not in shard.placement.on and CHANNEL in shard.placement.missed
        assert shard.map_due <= time.monotonic()
        # One the daemon asked for is no move.
        shard.placement.unpark()
        shard.placement.place(ALL_ON_A, lambda node: True, now=2.0)
        link.leaving.add(CHANNEL)
        shard._take(link, [b"sunsubscribe", CHANNEL.encode(), 0], [])
        assert shard.placement.on[CHANNEL] == A and not link.leaving
    finally:
        shard.requests.close()
