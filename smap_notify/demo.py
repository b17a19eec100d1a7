"""``smap-notify-demo``: run the daemon locally and watch what it delivers.

Uses the Redis at REDIS_HOST (default localhost:6379) when one answers, else starts a
throwaway ``redis-server`` on a free loopback port. Runs the daemon with ENV=dev and a
generated secret, prints a ready token and a ``redis-cli PUBLISH`` line, and prints every
frame a demo WebSocket client receives. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Final

import jwt
import redis
import trio
import trio_websocket
from redis.backoff import NoBackoff
from redis.retry import Retry

DEMO_USER: Final = "demo-user"
DEMO_ORIGIN: Final = "http://localhost:3000"
DEFAULT_PORT: Final = 8081
CONNECT_TIMEOUT: Final = 10.0
NO_RETRY: Final = Retry(NoBackoff(), 0)


class DemoError(Exception):
    """Why the demo cannot run; printed as it is."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(host: str, port: int) -> bool:
    # Asked once: redis-py's default retries with backoff kept a user without Redis
    # waiting 3.4 s before the demo started its own.
    client = redis.Redis(
        host=host, port=port, socket_timeout=1, socket_connect_timeout=1, retry=NO_RETRY
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _answers(port: int) -> bool:
    """Something listens on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def choose_port(requested: str | None, default: int = DEFAULT_PORT) -> tuple[int, str]:
    """The port for the demo's daemon, and a line to print about it ("" if none).

    A port someone else listens on would take the demo's connections (and its daemon
    would exit): an explicit WS_PORT in use is an error, the default gives way to a free
    port.
    """
    if requested:
        port = int(requested)
        if _answers(port):
            raise DemoError(
                f"WS_PORT={port} is in use on 127.0.0.1 (another smap-notify?); "
                "choose another WS_PORT, or leave it unset"
            )
        return port, ""
    if not _answers(default):
        return default, ""
    port = _free_port()
    return port, f"* Port {default} is in use, so the demo listens on {port}"


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> bool:
    """Until ``proc`` serves /health on ``port`` (a connection alone could be anyone's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            body = conn.getresponse().read()
            conn.close()
            if b'"websocket"' in body:
                return proc.poll() is None
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    return False


def main() -> int:
    # What the demo started, and whether it shares the terminal's process group (and so
    # gets Ctrl-C itself).
    started: list[tuple[subprocess.Popen[bytes], bool]] = []
    ctrl_c: list[bool] = []  # set when Ctrl-C (SIGINT to the group) ended the demo
    # Until the demo watches for them itself: SIGTERM and SIGHUP stop it like Ctrl-C
    # (their default action would leave the daemon and the Redis running).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_early)
    try:
        return _run(started, ctrl_c)
    except DemoError as exc:
        print(f"smap-notify-demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ctrl_c.append(True)
        return 0
    except _StoppedEarly:
        return 0
    finally:
        # A second stop signal must not cut the clean-up short and leave processes.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        for proc, in_group in reversed(started):
            _stop(proc, signalled=in_group and bool(ctrl_c))


class _StoppedEarly(Exception):
    """SIGTERM or SIGHUP before the demo watched for signals."""


def _stop_early(signum: int, _frame: object) -> None:
    raise _StoppedEarly(signum)


def _stop(proc: subprocess.Popen[bytes], *, signalled: bool) -> None:
    """Stop a process the demo started. The daemon got Ctrl-C with the demo (same
    process group): it is left to finish its own drain, since a second signal would cut
    it short (and one arriving as it exits meets the default handler)."""
    if signalled:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run(started: list[tuple[subprocess.Popen[bytes], bool]], ctrl_c: list[bool]) -> int:
    redis_host = os.environ.get("REDIS_HOST", "localhost:6379")
    host, _, port_text = redis_host.rpartition(":")
    if not _redis_answers(host, int(port_text)):
        binary = shutil.which("redis-server")
        if binary is None:
            print(
                f"No Redis answers at {redis_host} and redis-server is not installed.\n"
                "Install it (Debian/Ubuntu: sudo apt-get install redis-server) or set "
                "REDIS_HOST=host:port.",
                file=sys.stderr,
            )
            return 1
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            # Out of the terminal's foreground group: Ctrl-C reaches the daemon, and this
            # Redis is stopped after it (main's finally), so that the daemon's last words
            # are not "redis subscription lost".
            process_group=0,
        )
        started.append((proc, False))
        host, redis_host = "127.0.0.1", f"127.0.0.1:{port}"
        while not _redis_answers(host, port):
            if proc.poll() is not None:
                print("redis-server failed to start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print(f"* No Redis answered, so a throwaway redis-server runs on {redis_host}", flush=True)
    else:
        print(f"* Using the Redis at {redis_host}", flush=True)

    secret = os.environ.get("JWT_SECRET_KEY") or secrets.token_urlsafe(32)
    ws_port, note = choose_port(os.environ.get("WS_PORT"))
    if note:
        print(note, flush=True)
    env = dict(
        os.environ,
        JWT_SECRET_KEY=secret,
        ENV=os.environ.get("ENV", "dev"),
        WS_HOST=os.environ.get("WS_HOST", "127.0.0.1"),
        WS_PORT=str(ws_port),
        REDIS_HOST=redis_host,
    )
    daemon = subprocess.Popen([sys.executable, "-m", "smap_notify"], env=env)
    started.append((daemon, True))
    if not _wait_ready(ws_port, daemon):
        print(f"smap-notify did not start (exit status {daemon.poll()})", file=sys.stderr)
        return 1
    token = jwt.encode(
        {"sub": DEMO_USER, "email": "demo@example.com", "exp": int(time.time()) + 86400},
        secret,
        algorithm="HS256",
    )
    redis_cli = f"redis-cli -h {host} -p {redis_host.rpartition(':')[2]}"
    banner = f"""
* smap-notify is running: ws://127.0.0.1:{ws_port}/ws   health: http://127.0.0.1:{ws_port}/health
* A token for user {DEMO_USER} (valid 24 h):
    {token}
* Publish a notification from another terminal:
    {redis_cli} PUBLISH user_noti:{DEMO_USER} '{{"type":"notification","payload":{{"title":"Hello","body":"It works"}}}}'
* Connect your own client with the cookie smap_auth_token=<token> (or ?token=<token>)
  and an Origin header such as {DEMO_ORIGIN}.
* A demo client is connected as {DEMO_USER}; what it receives is printed below. Ctrl-C stops.
"""
    if trio.run(_watch, ws_port, token, banner) == signal.SIGINT:
        ctrl_c.append(True)
    return 0


async def _watch(port: int, token: str, banner: str) -> int:
    """Print the banner, then frames until SIGTERM, SIGINT or SIGHUP (the terminal closed:
    the daemon takes its SIGHUP as a reload, and would stay with the throwaway Redis);
    returns which."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        print(banner, flush=True)  # once the signals are ours: the user may act on it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_print_frames, port, token)
            async for signum in signals:
                nursery.cancel_scope.cancel()
                return signum
    return 0


async def _print_frames(port: int, token: str) -> None:
    headers = [(b"Origin", DEMO_ORIGIN.encode()), (b"Cookie", f"smap_auth_token={token}".encode())]
    while True:
        try:
            async with trio_websocket.open_websocket(
                "127.0.0.1",
                port,
                "/ws",
                use_ssl=False,
                extra_headers=headers,
                connect_timeout=CONNECT_TIMEOUT,
            ) as ws:
                while True:
                    print("<<<", await ws.get_message(), flush=True)
        except (trio_websocket.ConnectionClosed, trio_websocket.HandshakeError, OSError) as exc:
            # Said after the pause: on Ctrl-C the daemon may close the connection before
            # the demo itself stops, and the demo then stops during the pause, quietly.
            await trio.sleep(1)
            print(f"(demo client was disconnected: {exc}; reconnecting)", flush=True)
