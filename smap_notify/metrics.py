"""Counters kept as plain integers on the hot path, exposed to Prometheus on scrape."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


@attrs.define
class Counters:
    """Every outcome of every message, counted once.

    Accounting invariant: ``received == delivered + sum(dropped) + sum(rejected)``.
    """

    received: int = 0
    delivered: int = 0  # messages that reached at least one connection's queue
    dropped: Tally[str] = attrs.Factory(Tally)  # messages, by reason
    rejected: Tally[str] = attrs.Factory(Tally)  # messages, by reason
    by_type: Tally[str] = attrs.Factory(Tally)  # routed messages, by type label
    by_channel: Tally[str] = attrs.Factory(Tally)  # received messages, by matching template
    frames_sent: int = 0  # frames queued for a connection (one per connection per message)
    frames_dropped: Tally[str] = attrs.Factory(Tally)  # frames lost, by reason
    resyncs_sent: int = 0
    handshakes_accepted: int = 0
    handshake_rejections: Tally[str] = attrs.Factory(Tally)
    connections_closed: Tally[str] = attrs.Factory(Tally)
    redis_reconnects: int = 0
    redis_subscribe_commands: int = 0  # SUBSCRIBE and PSUBSCRIBE commands sent
    redis_unsubscribe_commands: int = 0  # UNSUBSCRIBE and PUNSUBSCRIBE commands sent

    def accounted(self) -> int:
        return self.delivered + sum(self.dropped.values()) + sum(self.rejected.values())


@attrs.define
class Gauges:
    """Live values read at scrape time."""

    connections: Callable[[], int]
    users: Callable[[], int]
    subscriber_active: Callable[[], bool]
    circuit_state: Callable[[], str]
    draining: Callable[[], bool]


class DaemonCollector(Collector):
    def __init__(self, counters: Counters, gauges: Gauges) -> None:
        self.counters = counters
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        yield _counter(
            "smap_notify_messages_received", "Messages received from Redis Pub/Sub.", c.received
        )
        yield _counter(
            "smap_notify_messages_delivered",
            "Messages queued to at least one WebSocket connection.",
            c.delivered,
        )
        yield _labelled(
            "smap_notify_messages_dropped", "Messages not delivered, by reason.", c.dropped
        )
        yield _labelled(
            "smap_notify_messages_rejected",
            "Invalid messages not delivered, by reason.",
            c.rejected,
        )
        yield _labelled(
            "websocket_messages_by_type",
            "Routed messages by type; unknown types share the label 'unknown'.",
            c.by_type,
            label="type",
        )
        yield _labelled(
            "smap_notify_messages_by_channel",
            "Received messages by the channel template they matched (CHANNELS).",
            c.by_channel,
            label="channel",
        )
        yield _counter(
            "smap_notify_frames_sent",
            "Frames queued for delivery, one per connection (those lost later are also"
            " in smap_notify_frames_dropped).",
            c.frames_sent,
        )
        yield _labelled(
            "smap_notify_frames_dropped",
            "Frames lost before reaching the socket.",
            c.frames_dropped,
        )
        yield _counter(
            "smap_notify_resyncs_sent",
            "Resync frames queued: after a Redis outage, and to clients that missed frames.",
            c.resyncs_sent,
        )
        yield _counter(
            "smap_notify_handshakes_accepted", "WebSocket upgrades accepted.", c.handshakes_accepted
        )
        yield _labelled(
            "smap_notify_handshake_rejections",
            "Requests to /ws refused before the upgrade, by reason.",
            c.handshake_rejections,
        )
        yield _labelled(
            "smap_notify_connections_closed",
            "WebSocket connections ended, by reason.",
            c.connections_closed,
        )
        yield _counter(
            "smap_notify_redis_reconnects",
            "Re-established Redis subscriptions.",
            c.redis_reconnects,
        )
        yield _counter(
            "smap_notify_redis_subscribe_commands",
            "SUBSCRIBE and PSUBSCRIBE commands sent to Redis (each names up to 1,000).",
            c.redis_subscribe_commands,
        )
        yield _counter(
            "smap_notify_redis_unsubscribe_commands",
            "UNSUBSCRIBE and PUNSUBSCRIBE commands sent to Redis (each names up to 1,000).",
            c.redis_unsubscribe_commands,
        )
        g = self.gauges
        yield _gauge("websocket_active_connections", "Open WebSocket connections.", g.connections())
        yield _gauge(
            "websocket_active_users", "Users with at least one open connection.", g.users()
        )
        yield _gauge(
            "smap_notify_subscriber_active",
            "1 while the Redis subscription is established.",
            int(g.subscriber_active()),
        )
        state = GaugeMetricFamily(
            "smap_notify_redis_circuit_state",
            "Circuit breaker guarding Redis health checks (1 for the current state).",
            labels=["state"],
        )
        current = g.circuit_state()
        for name in ("closed", "open", "half_open"):
            state.add_metric([name], int(name == current))
        yield state
        yield _gauge("smap_notify_draining", "1 while shutting down.", int(g.draining()))


def _counter(name: str, doc: str, value: int) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, values: Tally[str], label: str = "reason") -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def make_registry(counters: Counters, gauges: Gauges) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DaemonCollector(counters, gauges))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """Prometheus exposition in the format the scraper asked for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def stats_document(
    counters: Counters, gauges: Gauges, timestamp: str, uptime: float
) -> dict[str, Any]:
    """The original's JSON /metrics shape, served at /stats."""
    return {
        "service": "websocket-service",
        "timestamp": timestamp,
        "uptime_seconds": int(uptime),
        "connections": {"active": gauges.connections(), "total_unique_users": gauges.users()},
        "messages": {
            "received_from_redis": counters.received,
            "sent_to_clients": counters.frames_sent,
            "failed": sum(counters.frames_dropped.values()),
        },
    }
