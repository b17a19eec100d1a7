"""The daemon under a stand-in systemd: sd_notify, watchdog, socket activation, journald.

Each test binds its own ``NOTIFY_SOCKET`` (an AF_UNIX datagram socket) and runs the daemon
as a real process (or in this event loop where the test must block the loop or the
subscriber thread), against a real redis-server and real WebSocket clients on loopback.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from smap_notify import resp
from smap_notify.app import SUBSCRIBER_STALE, App
from tests.support.daemon import (
    REPO,
    DaemonFactory,
    Spawned,
    can_connect,
    daemon_env,
    listening_socket,
    make_token,
    wait_exit,
    wait_until,
)
from tests.support.notify import (
    MARK,
    NotifyReceiver,
    is_,
    is_status,
    status_fields,
)
from tests.support.redis import RedisServer, free_port
from tests.support.ws import (
    open_ws,
    publish,
    receive_json,
    wait_connections,
    ws_headers,
)

# -- readiness and status -----------------------------------------------------------------


async def test_ready_comes_once_the_port_accepts_and_says_how_redis_is(
    daemon_process: Any, notify_socket: NotifyReceiver
) -> None:
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    ready = await notify_socket.expect(is_("READY"))
    # One attempt, no retry: READY=1 means the port already accepts.
    assert can_connect(daemon.port)
    assert "STATUS" in ready, "READY=1 carries a STATUS= line"
    state, connections, users = status_fields(ready)
    assert state in ("subscribed", "redis starting", "redis retrying")
    assert (connections, users) == (0, 0)
    await notify_socket.expect_status("subscribed")
    assert [m for m in notify_socket.snapshot() if m.get("READY")] == [ready], "READY=1 once"


async def test_ready_says_redis_is_retried_when_it_is_down_and_status_follows(
    daemon_process: Any, notify_socket: NotifyReceiver, redis_server: RedisServer
) -> None:
    redis_server.kill()
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    ready = await notify_socket.expect(is_("READY"))
    assert can_connect(daemon.port), "serving without Redis"
    assert status_fields(ready)[0] != "subscribed"
    await notify_socket.expect_status("redis retrying")
    redis_server.start()
    await notify_socket.expect_status("subscribed")


async def test_status_follows_the_connection_count(
    daemon_process: Any, notify_socket: NotifyReceiver, nursery: trio.Nursery
) -> None:
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    await notify_socket.expect(is_("READY"))
    await notify_socket.expect_status("subscribed", connections=0)
    ws = await open_ws(nursery, daemon.port, "alice")
    update = await notify_socket.expect_status(connections=1)
    assert status_fields(update) == ("subscribed", 1, 1)
    await ws.aclose()
    await notify_socket.expect_status(connections=0)
    # STATUS= only when it changes; READY=1 counts as saying it.
    said = [m["STATUS"] for m in notify_socket.snapshot() if is_status(m)]
    assert all(a != b for a, b in itertools.pairwise(said)), said


# -- watchdog -----------------------------------------------------------------------------


async def test_watchdog_pings_periodically_when_watchdog_usec_is_set(
    daemon_process: Any, notify_socket: NotifyReceiver
) -> None:
    daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="1000000")
    await notify_socket.expect(is_("READY"))
    # Half of WATCHDOG_USEC is 0.5 s; a run of pings, not one, shows they are periodic.
    await notify_socket.count(is_("WATCHDOG"), 5)


async def test_watchdog_pings_when_watchdog_pid_names_the_daemon(
    spawn: Callable[..., Spawned], notify_socket: NotifyReceiver, redis_server: RedisServer
) -> None:
    env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="1000000")
    spawn(env, watchdog_pid_self=True)
    await notify_socket.expect(is_("READY"))
    await notify_socket.count(is_("WATCHDOG"), 3)


async def test_no_watchdog_when_watchdog_pid_names_another_process(
    spawn: Callable[..., Spawned], notify_socket: NotifyReceiver, redis_server: RedisServer
) -> None:
    # An environment inherited from a watched parent: the pings are not ours to send.
    env = daemon_env(
        redis_server,
        NOTIFY_SOCKET=notify_socket.path,
        WATCHDOG_USEC="400000",
        WATCHDOG_PID=str(os.getpid()),
    )
    daemon = spawn(env)
    await notify_socket.expect(is_("READY"))
    await notify_socket.expect_status("subscribed")
    await trio.sleep(2.0)  # ten watchdog intervals: the silence itself is what is tested
    assert daemon.stop() == 0
    await notify_socket.expect(is_("STOPPING"))
    assert not [m for m in notify_socket.snapshot() if "WATCHDOG" in m]


async def start_in_process(start_daemon: DaemonFactory, notify_socket: NotifyReceiver) -> App:
    """The daemon in this event loop, with a notify socket and a 0.2 s watchdog interval."""
    daemon = await start_daemon(
        wait_subscribed=False, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="400000"
    )
    return daemon.app


def block_the_event_loop(seconds: float) -> None:
    """What a CPU-bound or blocking call in a task does to every other task."""
    time.sleep(seconds)


async def test_no_watchdog_while_the_event_loop_is_blocked(
    start_daemon: DaemonFactory, notify_socket: NotifyReceiver
) -> None:
    await start_in_process(start_daemon, notify_socket)
    await notify_socket.count(is_("WATCHDOG"), 3)
    notify_socket.mark("blocked")
    block_the_event_loop(2.0)  # ten watchdog intervals
    notify_socket.mark("unblocked")
    await notify_socket.expect(is_(MARK, "unblocked"))
    await notify_socket.expect(is_("WATCHDOG"))  # and the pings resume
    during = notify_socket.between("blocked", "unblocked")
    assert not [m for m in during if "WATCHDOG" in m]


async def test_no_watchdog_while_the_subscriber_thread_hangs(
    start_daemon: DaemonFactory,
    notify_socket: NotifyReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hang = threading.Event()
    hung = threading.Event()
    release = threading.Event()

    original = resp.Replies.wait

    def wait(self: Any, seconds: float) -> bool:
        """Blocks while ``hang`` is set: no heartbeat, no progress."""
        if hang.is_set():
            hung.set()
            while not release.is_set():
                trio.from_thread.check_cancelled()
                time.sleep(0.02)
        return original(self, seconds)

    monkeypatch.setattr(resp.Replies, "wait", wait)
    app = await start_in_process(start_daemon, notify_socket)

    await wait_until(lambda: app.subscriber.active)
    await notify_socket.count(is_("WATCHDOG"), 3)
    hang.set()
    await wait_until(hung.is_set)
    # The daemon gives a silent thread SUBSCRIBER_STALE seconds before it counts as hung.
    await wait_until(
        lambda: time.monotonic() - app.subscriber.heartbeat > SUBSCRIBER_STALE + 0.5,
        timeout=SUBSCRIBER_STALE + 10,
    )
    notify_socket.mark("hung")
    await trio.sleep(2.0)  # ten watchdog intervals: the silence itself is what is tested
    notify_socket.mark("released")
    hang.clear()
    release.set()
    await notify_socket.expect(is_(MARK, "released"))
    await notify_socket.expect(is_("WATCHDOG"))  # and the pings resume
    during = notify_socket.between("hung", "released")
    assert not [m for m in during if "WATCHDOG" in m]


async def test_watchdog_keeps_pinging_through_a_redis_outage(
    daemon_process: Any, notify_socket: NotifyReceiver, redis_server: RedisServer
) -> None:
    # A Redis outage is not a daemon failure: a restart would only make every browser
    # reconnect. The subscriber thread keeps retrying, alive, so the pings go on.
    daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="400000")
    await notify_socket.expect_status("subscribed")
    redis_server.pause()  # a wedged Redis: connections open, nothing answers
    try:
        await notify_socket.expect_status("redis retrying")
        # Past the point where a thread without heartbeats would count as hung.
        await trio.sleep(SUBSCRIBER_STALE + 1)
        notify_socket.mark("long outage")
        await notify_socket.expect(is_(MARK, "long outage"))
        await notify_socket.expect(is_("WATCHDOG"), timeout=5)
    finally:
        redis_server.resume()
    await notify_socket.expect_status("subscribed")


# The daemon with a subscriber thread that dies of an unexpected error.
CRASHING_SUBSCRIBER = """
import sys
from smap_notify import entry, subscriber

def crash(self, pubsub):
    raise RuntimeError("simulated subscriber bug")

subscriber._Worker._listen = crash
sys.exit(entry.main())
"""


async def test_a_dead_subscriber_thread_ends_the_pings_and_the_process_with_70(
    spawn: Callable[..., Spawned], notify_socket: NotifyReceiver, redis_server: RedisServer
) -> None:
    env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="400000")
    daemon = spawn(env, program=CRASHING_SUBSCRIBER)
    # 70 (EX_SOFTWARE) is a failure: Restart=on-failure brings up a fresh process.
    assert await wait_exit(daemon.proc) == 70
    assert "simulated subscriber bug" in daemon.log()
    assert not [m for m in notify_socket.snapshot() if m.get("STOPPING")]


# -- reload and stop ----------------------------------------------------------------------


async def test_sighup_sends_reloading_with_monotonic_usec_then_ready(
    daemon_process: Any, notify_socket: NotifyReceiver
) -> None:
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    await notify_socket.expect(is_("READY"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = await notify_socket.expect(is_("RELOADING"))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    ready = await notify_socket.expect(is_("READY"))
    assert "STATUS" in ready
    assert daemon.proc.poll() is None
    assert can_connect(daemon.port)


async def test_sigusr1_and_sigusr2_are_logged_and_ignored(
    daemon_process: Any, notify_socket: NotifyReceiver, nursery: trio.Nursery
) -> None:
    # Their default action ended the process without a line; systemd then restarted it.
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    await notify_socket.expect(is_("READY"))
    ws = await open_ws(nursery, daemon.port)
    await wait_connections(daemon.port, 1)
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        daemon.proc.send_signal(signum)
        name = signal.Signals(signum).name
        await wait_until(lambda name=name: f"received {name}" in daemon.log())
    assert daemon.proc.poll() is None
    assert "which smap-notify has no use for: ignored" in daemon.log()
    await wait_connections(daemon.port, 1)
    assert ws.closed is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_stop_signal_sends_stopping_and_exits_0(
    daemon_process: Any,
    notify_socket: NotifyReceiver,
    nursery: trio.Nursery,
    signum: signal.Signals,
) -> None:
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    await notify_socket.expect(is_("READY"))
    ws = await open_ws(nursery, daemon.port)
    await wait_connections(daemon.port, 1)
    daemon.proc.send_signal(signum)
    await notify_socket.expect(is_("STOPPING"))
    assert await wait_exit(daemon.proc) == 0
    # Dropped without a close frame, so SMAP's web UI reconnects (it does on !wasClean).
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await ws.get_message()
    reason = closed.value.reason
    assert reason is not None and reason.code == 1006


async def test_status_keeps_saying_draining_while_connections_are_closed(
    daemon_process: Any, notify_socket: NotifyReceiver, nursery: trio.Nursery
) -> None:
    daemon = daemon_process(
        wait_ready=False, NOTIFY_SOCKET=notify_socket.path, SHUTDOWN_TIMEOUT="5s"
    )
    await notify_socket.expect(is_("READY"))
    for n in range(20):
        await open_ws(nursery, daemon.port, f"user{n}")
    await wait_connections(daemon.port, 20)
    daemon.proc.send_signal(signal.SIGTERM)
    stopping = await notify_socket.expect(is_("STOPPING"))
    assert "draining" in stopping["STATUS"]
    # `systemctl status` during the stop shows the last STATUS=: it should say why the
    # connection count is falling.
    update = await notify_socket.expect(lambda n: "STATUS" in n and "STOPPING" not in n)
    assert await wait_exit(daemon.proc) == 0
    assert "draining" in update["STATUS"], update


# -- socket activation --------------------------------------------------------------------


async def test_socket_activated_daemon_serves_websockets_on_fd_3(
    spawn: Callable[..., Spawned],
    notify_socket: NotifyReceiver,
    redis_server: RedisServer,
    nursery: trio.Nursery,
) -> None:
    with listening_socket() as listener:
        port = listener.getsockname()[1]
        not_bound = free_port()
        env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path, WS_PORT=str(not_bound))
        daemon = spawn(env, listen_sock=listener)
        await notify_socket.expect(is_("READY"))
        await notify_socket.expect_status("subscribed")
        ws = await open_ws(nursery, port, "alice")
        await wait_connections(port, 1)
        assert await publish(redis_server, "alice", {"type": "alert", "payload": 1}) == 1
        assert (await receive_json(ws))["payload"] == 1
        assert f"listening on 127.0.0.1:{port}" in daemon.log()
        assert not can_connect(not_bound), "WS_PORT is not bound when a socket is passed"
        assert daemon.stop() == 0


async def test_reload_under_socket_activation_asks_no_restart_for_ws_port(
    spawn: Callable[..., Spawned],
    notify_socket: NotifyReceiver,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    # WS_HOST and WS_PORT are not used there: a restart would change nothing.
    config_file = tmp_path / "smap-notify.env"
    config_file.write_text("")
    with listening_socket() as listener:
        env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path)
        daemon = spawn(env, args=("--config", str(config_file)), listen_sock=listener)
        await notify_socket.expect(is_("READY"))
        config_file.write_text(f"WS_PORT={free_port()}\n")
        daemon.proc.send_signal(signal.SIGHUP)
        await notify_socket.expect(is_("RELOADING"))
        await notify_socket.expect(is_("READY"))
        log = daemon.log()
        assert "need a restart" not in log
        assert "reload: WS_PORT not used: listening on the sockets systemd passed" in log
        assert daemon.stop() == 0


async def test_restart_on_a_held_socket_refuses_no_connection(
    spawn: Callable[..., Spawned],
    notify_socket: NotifyReceiver,
    redis_server: RedisServer,
    nursery: trio.Nursery,
) -> None:
    with listening_socket() as listener:
        port = listener.getsockname()[1]
        env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path)
        first = spawn(env, listen_sock=listener)
        await notify_socket.expect(is_("READY"))
        ws = await open_ws(nursery, port, "alice")
        await wait_connections(port, 1)
        assert first.stop() == 0
        with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed):
            await ws.get_message()

        # No daemon runs now. The kernel completes the TCP handshake into the held
        # socket's backlog: the client is not refused, it waits.
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        upgraded: list[trio_websocket.WebSocketConnection] = []

        async def handshake() -> None:
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, "127.0.0.1", "/ws", extra_headers=ws_headers(make_token("bob"))
            )
            upgraded.append(ws)

        nursery.start_soon(handshake)
        # The request is sent and the client waits for an answer that does not come yet.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert not upgraded

        second = spawn(env, listen_sock=listener)
        await notify_socket.expect(is_("READY"))
        await wait_until(lambda: bool(upgraded), timeout=20)
        await wait_connections(port, 1)
        await notify_socket.expect_status("subscribed")
        assert await publish(redis_server, "bob", {"type": "alert", "payload": "again"}) == 1
        assert (await receive_json(upgraded[0]))["payload"] == "again"
        assert second.stop() == 0


@pytest.mark.parametrize("kind", ["udp", "not-listening"])
async def test_a_passed_socket_that_cannot_serve_is_one_line_and_78(
    spawn: Callable[..., Spawned], redis_server: RedisServer, kind: str
) -> None:
    """Accept=yes or ListenDatagram= in the .socket unit: a lasting configuration mistake,
    so 78 (no restart loop) and one line saying what to change, not a traceback."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    with sock:
        sock.bind(("127.0.0.1", 0))
        daemon = spawn(daemon_env(redis_server), listen_sock=sock)
        assert await wait_exit(daemon.proc) == 78
    log = daemon.log()
    assert "is not a listening stream socket; the .socket unit needs ListenStream=" in log
    assert "Traceback" not in log


async def test_a_listen_pid_for_another_process_is_said_not_ignored(
    daemon_process: Any,
) -> None:
    daemon = daemon_process(LISTEN_PID="1", LISTEN_FDS="1")
    assert can_connect(daemon.port)
    assert daemon.stop() == 0
    log = daemon.log()
    assert "socket activation ignored: LISTEN_PID=1 is not this process" in log
    assert f"listen=127.0.0.1:{daemon.port}" in log


# -- journald -----------------------------------------------------------------------------


async def test_journal_stream_lines_carry_priorities_and_no_timestamp(
    spawn: Callable[..., Spawned], notify_socket: NotifyReceiver, redis_server: RedisServer
) -> None:
    env = daemon_env(redis_server, NOTIFY_SOCKET=notify_socket.path)
    daemon = spawn(env, journal=True)
    await notify_socket.expect(is_("READY"))
    await notify_socket.expect_status("subscribed")
    await publish(redis_server, "alice", {"type": "brand_new_type", "payload": None})
    await wait_until(lambda: "unknown message type" in daemon.log())
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    assert lines
    for line in lines:
        assert re.match(r"<[0-7]>", line), f"no priority prefix: {line!r}"
        assert not re.search(r"\d\d:\d\d:\d\d", line), f"journald stamps time itself: {line!r}"
    assert any(line.startswith("<6>") and "listening on" in line for line in lines)
    assert any(line.startswith("<4>") and "unknown message type" in line for line in lines)


async def test_configuration_errors_reach_the_journal_with_their_priority(
    spawn: Callable[..., Spawned], redis_server: RedisServer
) -> None:
    env = daemon_env(redis_server, WS_PORT="99999")
    del env["JWT_SECRET_KEY"]
    daemon = spawn(env, journal=True)
    assert await wait_exit(daemon.proc) == 78
    lines = daemon.log().splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith("<3>smap_notify: invalid configuration: ") for line in lines)
    assert any("JWT_SECRET_KEY is required" in line for line in lines)
    assert any("WS_PORT" in line for line in lines)


async def test_check_config_warnings_reach_the_journal_with_their_priority(
    spawn: Callable[..., Spawned], redis_server: RedisServer
) -> None:
    # As ExecStartPre=: the configuration listing on stdout, the warnings on stderr.
    env = daemon_env(redis_server, JWT_SECRET_KEY="short", ALLOWED_ORIGINS="https://app.example/")
    daemon = spawn(env, args=("--check-config",), journal=True)
    assert await wait_exit(daemon.proc) == 0
    warnings = [line for line in daemon.log().splitlines() if "warning:" in line]
    assert len(warnings) == 2, daemon.log()
    assert all(line.startswith("<4>smap-notify: warning: ") for line in warnings), warnings


async def test_without_journal_stream_lines_carry_a_timestamp_and_level(
    daemon_process: Any, notify_socket: NotifyReceiver
) -> None:
    daemon = daemon_process(wait_ready=False, NOTIFY_SOCKET=notify_socket.path)
    await notify_socket.expect(is_("READY"))
    assert daemon.stop() == 0
    listening = [line for line in daemon.log().splitlines() if "listening on" in line]
    assert len(listening) == 1
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00 INFO ", listening[0])


# -- exit statuses --------------------------------------------------------------------------


def run_cli(redis: RedisServer, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smap_notify", *args],
        env=daemon_env(redis, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_invalid_configuration_exits_78_listing_every_problem(redis_server: RedisServer) -> None:
    result = run_cli(
        redis_server,
        JWT_SECRET_KEY="",
        WS_PORT="eighty",
        LOGGER_LEVEL="loud",
        WS_PING_INTERVAL="soon",
    )
    assert result.returncode == 78
    assert result.stdout == ""
    for name in ("JWT_SECRET_KEY", "WS_PORT", "LOGGER_LEVEL", "WS_PING_INTERVAL"):
        assert name in result.stderr


def test_check_config_exits_0_with_secrets_masked(redis_server: RedisServer) -> None:
    result = run_cli(
        redis_server,
        "--check-config",
        JWT_SECRET_KEY="a-very-secret-signing-key-0123456789",
        JWT_PREVIOUS_SECRET_KEY="the-previous-signing-key-0123456789",
        REDIS_PASSWORD="hunter2-redis-password",
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for secret in ("a-very-secret", "the-previous", "hunter2"):
        assert secret not in output
    values = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert values["JWT_SECRET_KEY"] == "***"
    assert values["JWT_PREVIOUS_SECRET_KEY"] == "***"
    assert values["REDIS_PASSWORD"] == "***"
    assert values["ENV"] == "dev"


async def test_port_in_use_fails_without_ever_reporting_ready(
    daemon_process: Any, notify_socket: NotifyReceiver
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        daemon = daemon_process(
            wait_ready=False, NOTIFY_SOCKET=notify_socket.path, WS_PORT=str(port)
        )
        status = await wait_exit(daemon.proc)
    assert status not in (0, 78)
    assert not [m for m in notify_socket.snapshot() if m.get("READY")]
