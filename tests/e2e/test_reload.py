"""``--config FILE`` and SIGHUP reloads, on the real daemon process.

A reload is complete when the daemon answers ``RELOADING=1`` with ``READY=1`` on its
notify socket; each test then checks the new behaviour on real connections, and that a
connection opened before the reload is still open and still receives.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from tests.support.channels import TOPIC_ERA
from tests.support.daemon import (
    SECRET,
    DaemonProcess,
    can_connect,
    http_request,
    make_token,
    wait_until,
)
from tests.support.notify import NotifyReceiver, is_
from tests.support.redis import RedisServer, free_port
from tests.support.ws import (
    active_connections,
    open_ws,
    publish,
    receive_json,
    upgrade_status,
    wait_connections,
    ws_headers,
)

NEW_SECRET = "rotated-secret-with-enough-bytes-for-hs256-111"
APP_ORIGIN = "https://app.example.com"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "smap-notify.env"


@pytest.fixture
def start(
    daemon_process: Callable[..., DaemonProcess],
    notify_socket: NotifyReceiver,
    config_file: Path,
) -> Callable[..., Any]:
    """Write the config file, start the daemon with ``--config`` and wait for READY=1."""

    async def start_with(text: str, **env: str) -> DaemonProcess:
        await trio.Path(config_file).write_text(text)
        daemon = daemon_process(
            wait_ready=False,
            args=("--config", str(config_file)),
            NOTIFY_SOCKET=notify_socket.path,
            **env,
        )
        await notify_socket.expect(is_("READY"))
        return daemon

    return start_with


@pytest.fixture
def reload(notify_socket: NotifyReceiver, config_file: Path) -> Callable[..., Any]:
    """Rewrite the config file, send SIGHUP, wait for RELOADING=1 then READY=1."""

    async def reload_with(daemon: DaemonProcess, text: str | bytes | None) -> None:
        if text is None:
            await trio.Path(config_file).unlink()
        elif isinstance(text, bytes):
            await trio.Path(config_file).write_bytes(text)
        else:
            await trio.Path(config_file).write_text(text)
        daemon.proc.send_signal(signal.SIGHUP)
        await notify_socket.expect(is_("RELOADING"))
        await notify_socket.expect(is_("READY"))
        assert daemon.proc.poll() is None

    return reload_with


async def still_receives(
    redis: RedisServer, ws: trio_websocket.WebSocketConnection, user: str, label: str
) -> None:
    """The connection survived: a message published now reaches it."""
    await publish(redis, user, {"type": "notification", "payload": label})
    assert (await receive_json(ws))["payload"] == label


async def test_config_file_values_win_over_the_environment(
    start: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    file_port = free_port()
    daemon = await start(f"JWT_SECRET_KEY={NEW_SECRET}\nWS_PORT={file_port}\n")
    # The environment said SECRET and daemon.port; the file said otherwise.
    await wait_until(lambda: can_connect(file_port))
    assert not can_connect(daemon.port)
    assert await upgrade_status(file_port, token=make_token("alice", secret=NEW_SECRET)) == 101
    assert await upgrade_status(file_port, token=make_token("alice", secret=SECRET)) == 401


async def test_reload_applies_a_log_level_the_environment_also_set(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    # LOGGER_LEVEL=info comes from the environment (as from an EnvironmentFile at start);
    # a reload that sets it in the file must win.
    daemon = await start("# nothing yet\n", LOGGER_LEVEL="info")
    first = await open_ws(nursery, daemon.port, "alice")
    await wait_connections(daemon.port, 1)
    assert "connection opened" not in daemon.log()  # a debug line

    await reload(daemon, "LOGGER_LEVEL=debug\n")
    await open_ws(nursery, daemon.port, "bob")
    await wait_until(lambda: "connection opened" in daemon.log())
    assert "configuration reloaded changed=LOGGER_LEVEL" in daemon.log()
    await still_receives(redis_server, first, "alice", "after reload")


async def test_reload_applies_env_and_allowed_origins(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start("ENV=dev\n")
    first = await open_ws(nursery, daemon.port, "alice")
    assert await upgrade_status(daemon.port, "bob", origin=APP_ORIGIN) == 403

    await reload(daemon, f"ENV=production\nALLOWED_ORIGINS={APP_ORIGIN}\n")
    assert await upgrade_status(daemon.port, "bob") == 403  # localhost: dev only
    assert await upgrade_status(daemon.port, "bob", origin=APP_ORIGIN) == 101
    assert await upgrade_status(daemon.port, "bob", origin="https://smap.tantai.dev") == 403
    await still_receives(redis_server, first, "alice", "after reload")


async def test_reload_rotates_the_jwt_secret_accepting_the_previous_one_meanwhile(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    old_token = make_token("alice", secret=SECRET)
    new_token = make_token("alice", secret=NEW_SECRET)
    daemon = await start(f"JWT_SECRET_KEY={SECRET}\n")
    first = await open_ws(nursery, daemon.port, "alice", token=old_token)
    assert await upgrade_status(daemon.port, token=new_token) == 401

    await reload(daemon, f"JWT_SECRET_KEY={NEW_SECRET}\nJWT_PREVIOUS_SECRET_KEY={SECRET}\n")
    assert await upgrade_status(daemon.port, token=new_token) == 101
    assert await upgrade_status(daemon.port, token=old_token) == 101

    await reload(daemon, f"JWT_SECRET_KEY={NEW_SECRET}\n")
    assert await upgrade_status(daemon.port, token=new_token) == 101
    assert await upgrade_status(daemon.port, token=old_token) == 401
    await still_receives(redis_server, first, "alice", "after rotation")
    log = daemon.log()
    assert SECRET not in log and NEW_SECRET not in log


async def test_reload_applies_connection_limits_without_dropping_open_connections(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start("")
    tabs = [await open_ws(nursery, daemon.port, "alice") for _ in range(2)]
    await wait_connections(daemon.port, 2)

    await reload(daemon, "WS_MAX_CONNECTIONS_PER_USER=1\nWS_MAX_CONNECTIONS=3\n")
    assert await upgrade_status(daemon.port, "alice") == 429
    await wait_connections(daemon.port, 2)
    await publish(redis_server, "alice", {"type": "notification", "payload": "both tabs"})
    for tab in tabs:
        assert (await receive_json(tab))["payload"] == "both tabs"
    extra = await open_ws(nursery, daemon.port, "bob")  # 3 of 3
    await wait_connections(daemon.port, 3)
    assert await upgrade_status(daemon.port, "carol") == 503
    await extra.aclose()
    await wait_connections(daemon.port, 2)

    await reload(daemon, "WS_MAX_CONNECTIONS_PER_USER=3\n")
    assert await upgrade_status(daemon.port, "alice") == 101


async def test_reload_logs_that_a_changed_port_needs_a_restart(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start("")
    first = await open_ws(nursery, daemon.port, "alice")
    other_port = free_port()
    changed = f"WS_PORT={other_port}\nREDIS_DB=3\nLOGGER_LEVEL=warn\n"
    await reload(daemon, changed)
    warning = [line for line in daemon.log().splitlines() if "need a restart" in line]
    assert len(warning) == 1 and "WARNING" in warning[0]
    assert "WS_PORT" in warning[0] and "REDIS_DB" in warning[0]
    assert "LOGGER_LEVEL" not in warning[0], "the level did change live"
    assert can_connect(daemon.port)
    assert not can_connect(other_port)
    await still_receives(redis_server, first, "alice", "same port")
    # The running daemon keeps its old values: the same file asks for the restart again.
    await reload(daemon, changed)
    again = [line for line in daemon.log().splitlines() if "need a restart" in line]
    assert len(again) == 2 and "WS_PORT" in again[1] and "REDIS_DB" in again[1]


async def test_start_and_reload_warn_about_an_origin_no_browser_sends(
    start: Any, reload: Any, nursery: trio.Nursery
) -> None:
    daemon = await start(f"ENV=production\nALLOWED_ORIGINS={APP_ORIGIN}/\n")
    warning = f"WARNING smap_notify: ALLOWED_ORIGINS: '{APP_ORIGIN}/' never equals"
    assert warning in daemon.log()
    assert await upgrade_status(daemon.port, "alice", origin=APP_ORIGIN) == 403
    await reload(daemon, f"ENV=production\nALLOWED_ORIGINS={APP_ORIGIN}\n")
    assert await upgrade_status(daemon.port, "alice", origin=APP_ORIGIN) == 101
    await reload(daemon, f"ENV=production\nALLOWED_ORIGINS={APP_ORIGIN}:443\n")
    assert f"WARNING smap_notify.app: ALLOWED_ORIGINS: '{APP_ORIGIN}:443' never" in daemon.log()


async def test_invalid_file_on_reload_keeps_the_running_configuration_and_logs_every_problem(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start(f"JWT_SECRET_KEY={SECRET}\n")
    first = await open_ws(nursery, daemon.port, "alice")
    await reload(
        daemon,
        f"JWT_SECRET_KEY={NEW_SECRET}\nWS_PORT=eighty\nLOGGER_LEVEL=loud\nWS_PING_INTERVAL=soon\n",
    )
    rejected = [line for line in daemon.log().splitlines() if "reload rejected" in line]
    for name in ("WS_PORT", "LOGGER_LEVEL", "WS_PING_INTERVAL"):
        assert [line for line in rejected if name in line], f"{name} problem not logged"
    # Nothing of the file applied, not even its valid secret.
    assert await upgrade_status(daemon.port, token=make_token("bob", secret=SECRET)) == 101
    assert await upgrade_status(daemon.port, token=make_token("bob", secret=NEW_SECRET)) == 401
    await still_receives(redis_server, first, "alice", "still running")


async def test_reload_logs_malformed_lines_and_bad_values_together(
    start: Any, reload: Any, redis_server: RedisServer
) -> None:
    daemon = await start("")
    await reload(daemon, "this line has no equals sign\nWS_PORT=eighty\n")
    rejected = [line for line in daemon.log().splitlines() if "reload rejected" in line]
    assert [line for line in rejected if "expected KEY=VALUE" in line]
    assert [line for line in rejected if "WS_PORT" in line]


async def test_missing_file_on_reload_keeps_the_running_configuration(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start("LOGGER_LEVEL=info\n")
    first = await open_ws(nursery, daemon.port, "alice")
    await reload(daemon, None)
    assert "cannot read config file" in daemon.log()
    assert await upgrade_status(daemon.port, "bob") == 101
    await still_receives(redis_server, first, "alice", "still running")


async def test_a_file_that_is_not_utf8_on_reload_keeps_the_daemon_running(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    # An editor's slip: a Latin-1 comment. systemd skips comments; the daemon must not die.
    daemon = await start(f"JWT_SECRET_KEY={SECRET}\n")
    first = await open_ws(nursery, daemon.port, "alice")
    await reload(daemon, f"# caf\xe9\nJWT_SECRET_KEY={NEW_SECRET}\n".encode("latin-1"))
    rejected = [line for line in daemon.log().splitlines() if "reload rejected" in line]
    assert [line for line in rejected if ":1: not UTF-8 text (byte 0xe9)" in line], rejected
    assert await upgrade_status(daemon.port, token=make_token("bob", secret=SECRET)) == 101
    await still_receives(redis_server, first, "alice", "still running")


async def subscribed_patterns(redis: RedisServer) -> int:
    def numpat() -> int:
        with redis.client() as client:
            return int(client.execute_command("PUBSUB", "NUMPAT"))

    return await trio.to_thread.run_sync(numpat)


async def wait_patterns(redis: RedisServer, count: int) -> None:
    with trio.fail_after(10):
        while await subscribed_patterns(redis) != count:
            await trio.sleep(0.02)


async def test_reload_changes_channels_and_resubscribes_without_dropping_connections(
    start: Any, reload: Any, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    daemon = await start("")
    first = await open_ws(nursery, daemon.port, "alice")
    await wait_patterns(redis_server, 1)
    update = '{"status":"PROCESSING"}'
    assert await trio.to_thread.run_sync(redis_server.publish_to, "project:p1:alice", update) == 0

    await reload(daemon, f"CHANNELS={TOPIC_ERA}\n")
    await wait_patterns(redis_server, 3)
    _, _, body = await http_request(daemon.port, "/health")
    assert json.loads(body)["subscriber"]["pattern"] == "user_noti:*,project:*,job:*"
    filtered = await trio_websocket.connect_websocket(
        nursery,
        "127.0.0.1",
        daemon.port,
        "/ws?projectId=p2",
        use_ssl=False,
        extra_headers=ws_headers(make_token("alice")),
    )
    await wait_connections(daemon.port, 2)
    for project in ("p1", "p2"):
        await trio.to_thread.run_sync(
            redis_server.publish_to, f"project:{project}:alice", f'{{"status":"{project}"}}'
        )
    with trio.fail_after(10):
        assert await first.get_message() == '{"status":"p1"}'
        assert await first.get_message() == '{"status":"p2"}'
        assert await filtered.get_message() == '{"status":"p2"}'
    await still_receives(redis_server, first, "alice", "user_noti kept")

    await reload(daemon, "CHANNELS=job:{job}:{user}|raw\n")
    await wait_patterns(redis_server, 1)
    assert await publish(redis_server, "alice", {"type": "alert"}) == 0
    await trio.to_thread.run_sync(
        redis_server.publish_to, "job:j1:alice", '{"platform":"X","status":"DONE"}'
    )
    assert await receive_json(first) == {"platform": "X", "status": "DONE"}
    assert await active_connections(daemon.port) == 2
    log = daemon.log()
    assert "configuration reloaded changed=CHANNELS" in log
    changes = [line for line in log.splitlines() if "redis subscription changed" in line]
    assert changes[0].endswith(
        "pattern=user_noti:*,project:*,job:* added=project:*,job:* removed=-"
    )
    assert changes[1].endswith("pattern=job:* added=- removed=user_noti:*,project:*")
