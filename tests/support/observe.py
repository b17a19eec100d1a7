"""Watching a running daemon from outside while faults happen: a publisher that numbers
its messages, a client inbox, /health polled and /metrics scraped, and the checks that
every failover test shares (one resync, the accounting invariant, /health truthful)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import redis
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.daemon import Daemon, DaemonProcess, http_request, wait_until


@attrs.define
class Inbox:
    """Everything one WebSocket client received, with the (Trio) time it arrived."""

    frames: list[tuple[float, dict[str, Any]]] = attrs.Factory(list)
    closed: trio_websocket.ConnectionClosed | None = None

    async def collect(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                text = await ws.get_message()
                self.frames.append((trio.current_time(), json.loads(text)))
        except trio_websocket.ConnectionClosed as exc:
            self.closed = exc

    def data(self) -> list[tuple[float, int]]:
        """(arrival time, sequence number) of each notification."""
        return [(t, doc["payload"]["seq"]) for t, doc in self.frames if doc["type"] != "resync"]

    def resyncs(self) -> list[tuple[int, float, dict[str, Any]]]:
        """(position in the stream, arrival time, frame) of each resync frame."""
        return [(i, t, doc) for i, (t, doc) in enumerate(self.frames) if doc["type"] == "resync"]


@attrs.frozen
class Published:
    seq: int
    started: float
    finished: float
    receivers: int | None  # PUBLISH's answer; None when the publish failed


class Flow:
    """Numbered notifications to one user at a steady rate, carrying on through faults."""

    def __init__(self, redis_port: int, user: str, interval: float = 0.02) -> None:
        self.client = redis_publisher(redis_port)
        self.channel = f"user_noti:{user}"
        self.interval = interval
        self.published: list[Published] = []

    async def run(self) -> None:
        for seq in range(1, 1_000_000):
            started = trio.current_time()
            data = json.dumps({"type": "notification", "payload": {"seq": seq}})
            try:
                receivers = await trio.to_thread.run_sync(self.client.publish, self.channel, data)
            except (redis.RedisError, OSError):
                receivers = None
            self.published.append(Published(seq, started, trio.current_time(), receivers))
            await trio.sleep(self.interval)

    def first_started_after(self, moment: float) -> int | None:
        return next((p.seq for p in self.published if p.started >= moment), None)


@attrs.frozen
class HealthSample:
    started: float
    finished: float
    status: int
    doc: dict[str, Any]

    @property
    def circuit(self) -> str:
        return str(self.doc["circuit_breaker"]["state"])


async def get_health(port: int) -> HealthSample:
    started = trio.current_time()
    status, _, body = await http_request(port, "/health")
    return HealthSample(started, trio.current_time(), status, json.loads(body))


async def poll_health(port: int, samples: list[HealthSample]) -> None:
    while True:
        samples.append(await get_health(port))
        await trio.sleep(HEALTH_EVERY)


async def watch_active(is_active: Callable[[], bool], changes: list[tuple[float, bool]]) -> None:
    """Record every change of the subscriber's ``active`` flag, polled every 2 ms."""
    last: bool | None = None
    while True:
        now = is_active()
        if now != last:
            changes.append((trio.current_time(), now))
            last = now
        await trio.sleep(0.002)


def parse_metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@attrs.frozen
class Accounting:
    received: float
    delivered: float
    dropped: dict[str, float]
    rejected: dict[str, float]
    frames_dropped: dict[str, float]
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]]

    @property
    def balanced(self) -> bool:
        return self.received == self.delivered + sum(self.dropped.values()) + sum(
            self.rejected.values()
        )

    def gauge(self, name: str) -> float:
        return self.metrics[name][()]


def by_reason(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(labels)["reason"]: value for labels, value in samples.items()}


async def scrape(port: int) -> Accounting:
    """The message accounting, from /metrics alone (Prometheus text format)."""
    status, _, body = await http_request(port, "/metrics")
    assert status == 200
    m = parse_metrics(body.decode())
    return Accounting(
        received=m["smap_notify_messages_received_total"][()],
        delivered=m["smap_notify_messages_delivered_total"][()],
        dropped=by_reason(m.get("smap_notify_messages_dropped_total", {})),
        rejected=by_reason(m.get("smap_notify_messages_rejected_total", {})),
        frames_dropped=by_reason(m.get("smap_notify_frames_dropped_total", {})),
        metrics=m,
    )


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
    server_of: Callable[[dict[str, Any]], str | None],
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


def one_restored(caplog: pytest.LogCaptureFixture, where: str) -> tuple[str, str]:
    """The outage (seconds, as logged) and the line of the one "subscription restored",
    which names ``where``."""
    restored = [r.getMessage() for r in caplog.records if "subscription restored" in r.getMessage()]
    assert len(restored) == 1 and where in restored[0], restored
    outage = re.search(r"outage=([0-9.]+)s", restored[0])
    assert outage is not None
    return outage.group(1), restored[0]


def start_line(daemon: DaemonProcess) -> str:
    """The daemon's "starting smap-notify" log line, once written."""
    deadline = time.monotonic() + 10
    while "starting smap-notify" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return next(line for line in daemon.log().splitlines() if "starting smap-notify" in line)


HEALTH_EVERY: Final = 0.1


def redis_publisher(port: int, password: str | None = None, ca: Path | None = None) -> redis.Redis:
    """A publisher that fails fast during an outage instead of retrying for seconds;
    with ``ca``, over TLS, trusting that CA."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        ssl=ca is not None,
        ssl_ca_certs=str(ca) if ca is not None else None,
        socket_timeout=0.3,
        socket_connect_timeout=0.3,
        retry=Retry(NoBackoff(), 0),
    )


# A deadline for the topology's own failover (sentinels, cluster), not the daemon's part.
FAILOVER_WITHIN = 30.0
