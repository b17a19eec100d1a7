"""REDIS_USE_TLS=true against a real redis-server that speaks only TLS.

The subscriber reads the subscribed connection's socket itself (``resp.Replies``),
with a separate branch for TLS that reads through the SSL object, one record of up to
16 KB at a time. These tests run that branch end to end, with messages spread over many
records, and show what an operator sees when the server's certificate is not trusted.

The daemon verifies Redis's certificate against the system's trusted CAs, which
OpenSSL lets ``SSL_CERT_FILE`` replace: that is how these tests trust their own CA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import redis
import trio
import trustme

from smap_notify.config import load_config
from smap_notify.redis_client import make_client
from tests.support.daemon import Daemon, http_request, wait_until
from tests.support.redis import RedisServer, TlsFiles

DETECT_AND_RECOVER: Final = 10.0


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return TlsFiles.issue(tmp_path)


@pytest.fixture
def redis_server(tmp_path: Path, tls_files: TlsFiles) -> Iterator[RedisServer]:
    """Overrides conftest's: ``start_daemon`` then points the daemon at this one."""
    with RedisServer(tmp_path, tls=tls_files) as server:
        yield server


@pytest.fixture
def trusted_ca(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon trusts the test CA (OpenSSL reads ``SSL_CERT_FILE``)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))


def burst(server: RedisServer, user: str, count: int) -> list[str]:
    """Publish ``count`` messages of mixed sizes (up to 40 KB, several TLS records) in
    one pipeline; returns their payloads' ``pad`` values in order."""
    pads = ["x" * (1 + (i * 7919) % 40_000) for i in range(count)]
    with server.client() as client:
        pipe = client.pipeline(transaction=False)
        for i, pad in enumerate(pads):
            pipe.publish(f"user_noti:{user}", json.dumps({"type": "alert", "payload": [i, pad]}))
        assert pipe.execute() == [1] * count
    return pads


@pytest.mark.usefixtures("trusted_ca")
async def test_messages_and_health_go_over_tls_with_the_ca_trusted(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon: Daemon = await start_daemon(
        REDIS_USE_TLS="true", WS_SEND_BUFFER="1000", WS_SEND_BUFFER_BYTES="67108864"
    )
    ws = await daemon.connect("alice", nursery=nursery, max_message_size=1 << 20)
    await daemon.wait_connections(1)

    # The burst outruns delivery; Redis must not cut the subscriber at its default
    # pubsub output limit meanwhile (that case has its own test in test_chaos.py).
    with redis_server.client() as admin:
        admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    # Moderate on purpose: Redis 7.0 itself, writing to a TLS client under load, now and
    # then fails a retried SSL_write ("SSL routines::bad length" in its verbose log; fixed
    # in Valkey, valkey-io/valkey#1135) and drops the subscriber. 600 such messages hit
    # that about once in 30 runs; the daemon then reconnects and resyncs, as for any cut.
    pads = await trio.to_thread.run_sync(burst, redis_server, "alice", 200)
    with trio.fail_after(30):
        for i, pad in enumerate(pads):
            frame = json.loads(await ws.get_message())
            assert frame["type"] == "alert"
            assert frame["payload"] == [i, pad], f"frame {i} is not message {i}"

    status, _, body = await http_request(daemon.port, "/health")
    doc = json.loads(body)
    assert status == 200, doc
    assert doc["redis"]["status"] == "connected"
    assert doc["subscriber"]["state"] == "subscribed"


@pytest.mark.usefixtures("trusted_ca")
def test_fresh_tls_connections_are_not_taken_for_dirty_ones(redis_server: RedisServer) -> None:
    """TLS 1.3 session tickets arrive just after the handshake; redis-py's hiredis parser
    took the readable socket for unread replies and failed 2-4% of connects with
    "Connection not ready" (the subscriber's and the health check's alike)."""
    environ = {
        "JWT_SECRET_KEY": "s" * 32,
        "REDIS_HOST": f"127.0.0.1:{redis_server.port}",
        "REDIS_USE_TLS": "true",
    }
    config = load_config(environ)
    failures = []
    for _ in range(1000):
        client = make_client(config)
        try:
            client.ping()
        except redis.RedisError as exc:
            failures.append(repr(exc))
        finally:
            client.close()
    assert not failures, f"{len(failures)} of 1000 connects failed, first: {failures[0]}"


async def test_an_untrusted_certificate_is_reported_not_fatal(
    start_daemon: Any,
    redis_server: RedisServer,
    tls_files: TlsFiles,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A CA file that does not hold the one that signed Redis's certificate.
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    daemon: Daemon = await start_daemon(wait_subscribed=False, REDIS_USE_TLS="true")
    subscriber = daemon.app.subscriber
    await wait_until(
        lambda: (
            subscriber.state == "retrying" and "CERTIFICATE_VERIFY_FAILED" in subscriber.last_error
        )
    )

    status, _, body = await http_request(daemon.port, "/health")
    doc = json.loads(body)
    assert status == 503, doc
    assert "CERTIFICATE_VERIFY_FAILED" in doc["subscriber"]["last_error"]

    # Still serving: a client connects, and is told to resync once Redis is trusted.
    ws = await daemon.connect("alice", nursery=nursery)
    await daemon.wait_connections(1)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    await daemon.wait_subscribed()
    with trio.fail_after(10):
        frame = json.loads(await ws.get_message())
    assert frame["type"] == "resync"


def wait_for_hand_over(daemon: Daemon, since: object) -> object:
    """Wait, without yielding to the event loop, until the subscriber thread hands over
    another batch (it stamps ``last_message_at`` first); returns the new stamp."""
    deadline = time.monotonic() + 10
    while (stamp := daemon.app.subscriber.last_message_at) == since:
        assert time.monotonic() < deadline, "the subscriber thread handed nothing over"
        time.sleep(0.001)
    return stamp


@pytest.mark.usefixtures("trusted_ca")
async def test_messages_read_with_the_close_are_delivered_before_the_resync(
    start_daemon: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """Invariant: what the subscriber read is delivered, even when the same read ran into
    the connection's close (over TLS the reader reads on, record by record, up to it).
    The event loop is stalled on purpose: the thread queues two batches, holds a third,
    and the rest waits in its socket, followed by the close."""
    daemon: Daemon = await start_daemon(REDIS_USE_TLS="true")
    ws = await daemon.connect("alice", nursery=nursery)
    await daemon.wait_connections(1)
    with redis_server.client() as publisher:
        publisher.ping()

        def publish(seq: int) -> None:
            publisher.publish("user_noti:alice", json.dumps({"type": "alert", "payload": seq}))

        # From here to the end of the block, this thread (the event loop's) never yields.
        stamp = daemon.app.subscriber.last_message_at
        for seq in range(3):  # two batches queued, the third held: no credit left
            publish(seq)
            stamp = wait_for_hand_over(daemon, stamp)
        for seq in range(3, 23):
            publish(seq)
        assert publisher.client_kill_filter(_type="pubsub") == 1

    with trio.fail_after(DETECT_AND_RECOVER):
        frames = [json.loads(await ws.get_message()) for _ in range(24)]
    assert [f["payload"] for f in frames[:23]] == list(range(23))
    assert frames[23]["type"] == "resync"
