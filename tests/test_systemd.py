"""sd_notify, watchdog interval and socket activation, against real sockets."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from smap_notify import systemd
from smap_notify.listen import host_port, listener_address
from smap_notify.systemd import (
    ListenFds,
    Notifier,
    format_notification,
    listen_sockets,
    listen_sockets_with_names,
    notify_address,
    parse_listen_fds,
    watchdog_interval,
)

# AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
MAX_UNIX_PATH = 100


@pytest.fixture
def receiver_path(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd, and its path."""
    directory = tmp_path
    cleanup = None
    if len(str(tmp_path / "notify")) > MAX_UNIX_PATH:
        cleanup = tempfile.TemporaryDirectory(prefix="sn-")
        directory = Path(cleanup.name)
    path = str(directory / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path
    if cleanup is not None:
        cleanup.cleanup()


@pytest.fixture
def receiver_abstract() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, and its ``@name`` form."""
    name = f"smap-notify-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notify_address_maps_at_sign_to_abstract_namespace() -> None:
    assert notify_address("@foo/bar") == "\0foo/bar"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("") is None
    assert notify_address(None) is None
    assert notify_address("vsock:2:1234") is None


def test_format_notification_flattens_multiline_field_values() -> None:
    data = format_notification(("READY=1",), {"STATUS": "redis down\nREADY=0"})
    assert data == b"READY=1\nSTATUS=redis down READY=0"


@pytest.mark.parametrize("line", ["READY", "=1", "READY=1\nSTOPPING=1"])
def test_format_notification_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError):
        format_notification((line,), {})


def test_format_notification_rejects_empty_message() -> None:
    with pytest.raises(ValueError):
        format_notification((), {})


def test_ready_sends_one_datagram_with_status_to_path_socket(
    receiver_path: tuple[socket.socket, str],
) -> None:
    sock, path = receiver_path
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.enabled
        assert notifier.ready("serving, redis subscribed")
    assert receive(sock) == ["READY=1", "STATUS=serving, redis subscribed"]


def test_every_message_reaches_abstract_socket(
    receiver_abstract: tuple[socket.socket, str],
) -> None:
    sock, name = receiver_abstract
    with Notifier.from_environ({"NOTIFY_SOCKET": name}) as notifier:
        assert notifier.status("12 connections")
        assert notifier.watchdog()
        assert notifier.stopping("draining")
        assert notifier.ready()
        assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", ERRNO=5)
    assert receive(sock) == ["STATUS=12 connections"]
    assert receive(sock) == ["WATCHDOG=1"]
    assert receive(sock) == ["STOPPING=1", "STATUS=draining"]
    assert receive(sock) == ["READY=1"]
    assert receive(sock) == ["EXTEND_TIMEOUT_USEC=5000000", "ERRNO=5"]


def test_reloading_carries_monotonic_clock_in_microseconds(
    receiver_path: tuple[socket.socket, str],
) -> None:
    sock, path = receiver_path
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier.from_environ({"NOTIFY_SOCKET": path}) as notifier:
        assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receive(sock)
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False
    notifier.close()


def test_module_notify_uses_process_environment(
    receiver_path: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver_path
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1", STATUS="up")
    assert receive(sock) == ["READY=1", "STATUS=up"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


def test_send_failure_returns_false_and_logs_once_per_outage(
    receiver_path: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver_path
    missing = path + "-gone"
    caplog.set_level(logging.DEBUG, logger="smap_notify.systemd")
    with Notifier.from_environ({"NOTIFY_SOCKET": missing}) as notifier:
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    failures = [r for r in caplog.records if "sd_notify failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG


def test_socket_creation_failure_disables_notifier(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(systemd.socket, "socket", refuse)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_closed_notifier_stops_sending(receiver_path: tuple[socket.socket, str]) -> None:
    _, path = receiver_path
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    notifier.close()
    assert not notifier.enabled
    assert notifier.watchdog() is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "4242"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_defaults_to_own_pid() -> None:
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 1.0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, ListenFds(fds=(3,), names=("unknown",))),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws:metrics"},
            ListenFds(fds=(3, 4), names=("ws", "metrics")),
        ),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ws"},
            ListenFds(fds=(3, 4), names=("unknown", "unknown")),
        ),
        ({"LISTEN_PID": "8", "LISTEN_FDS": "1"}, None),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, None),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, None),
        ({"LISTEN_FDS": "1"}, None),
        ({}, None),
    ],
)
def test_parse_listen_fds_only_for_this_pid(
    environ: dict[str, str], expected: ListenFds | None
) -> None:
    assert parse_listen_fds(environ, pid=7) == expected


def free_fd_range(count: int, start: int = 200) -> int:
    """The first of ``count`` consecutive unused descriptor numbers at or above ``start``."""
    fd = start
    while True:
        candidates = range(fd, fd + count)
        if all(_unused(n) for n in candidates):
            return fd
        fd += count


def _unused(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


@contextlib.contextmanager
def activated_sockets(count: int) -> Iterator[tuple[int, list[socket.socket]]]:
    """Listening sockets dup'ed onto consecutive inheritable fds, as systemd passes them."""
    originals = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        originals.append(sock)
    start = free_fd_range(count)
    for offset, sock in enumerate(originals):
        os.dup2(sock.fileno(), start + offset, inheritable=True)
    try:
        yield start, originals
    finally:
        for offset in range(count):
            with contextlib.suppress(OSError):
                os.close(start + offset)
        for sock in originals:
            sock.close()


def test_listen_sockets_adopts_passed_fds_and_unsets_environment() -> None:
    with activated_sockets(2) as (start, originals):
        environ = {
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDS": "2",
            "LISTEN_FDNAMES": "ws:other",
            "PATH": "/usr/bin",
        }
        named = listen_sockets_with_names(environ, start_fd=start)
        try:
            assert environ == {"PATH": "/usr/bin"}
            assert [name for name, _ in named] == ["ws", "other"]
            for (_, sock), original in zip(named, originals, strict=True):
                assert sock.fileno() in (start, start + 1)
                assert sock.family == socket.AF_INET
                assert sock.type == socket.SOCK_STREAM
                assert sock.getsockname() == original.getsockname()
                assert not os.get_inheritable(sock.fileno())
            port = named[0][1].getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = named[0][1].accept()
                conn.close()
        finally:
            for _, sock in named:
                sock.detach()  # activated_sockets closes the fds


def test_listen_sockets_for_another_pid_returns_nothing_but_unsets() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "ws"}
    assert listen_sockets(environ) == []
    assert environ == {}


def test_listen_sockets_keeps_environment_when_asked() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_sockets(environ, unset=False) == []
    assert environ == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


CHILD = textwrap.dedent(
    """
    import json, os, sys
    from smap_notify.systemd import listen_sockets_with_names
    named = listen_sockets_with_names()
    name, sock = named[0]
    conn, _ = sock.accept()
    report = {
        "count": len(named),
        "name": name,
        "fd": sock.fileno(),
        "inheritable": os.get_inheritable(sock.fileno()),
        "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    conn.sendall(json.dumps(report).encode())
    conn.close()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate (package systemd) is not installed",
)
def test_socket_activated_process_serves_on_fd_3(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    for _attempt in range(5):
        port = free_port()
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                f"--listen=127.0.0.1:{port}",
                "--fdname=ws",
                "--setenv=PYTHONPATH",
                sys.executable,
                str(script),
            ],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            if "Listening on" not in line:
                proc.wait(timeout=10)
                continue  # the port was taken meanwhile
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.settimeout(10)
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
            assert proc.wait(timeout=10) == 0, proc.stderr.read()
            break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
    else:
        pytest.fail("no free port for systemd-socket-activate after 5 attempts")
    assert json.loads(data) == {
        "count": 1,
        "name": "ws",
        "fd": 3,
        "inheritable": False,
        "left": [],
    }


def test_listen_addresses_are_written_so_that_they_read_back(tmp_path: Path) -> None:
    """A passed AF_UNIX socket was logged as '/:t' (a path's first two characters), an
    abstract one as '0:97'; an IPv6 WS_HOST without brackets."""
    path = str(tmp_path / "ws.sock")
    with socket.socket(socket.AF_UNIX) as named, socket.socket(socket.AF_UNIX) as abstract:
        named.bind(path)
        abstract.bind(b"\0smap-notify-test")
        named.listen()
        abstract.listen()
        assert listener_address(trio.SocketListener(trio.socket.from_stdlib_socket(named))) == (
            f"unix:{path}"
        )
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(abstract))
        assert listener_address(listener) == "unix:@smap-notify-test"
    with socket.socket(socket.AF_INET6) as dual, socket.socket(socket.AF_INET6) as v6:
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Bound to every address, as socket activation's [::] would be, but not listening:
        # tests listen on loopback only.
        dual.bind(("::", 0))
        v6.bind(("::1", 0))
        v6.listen()
        unlistened: Any = SimpleNamespace(socket=trio.socket.from_stdlib_socket(dual))
        assert listener_address(unlistened) == f"[::]:{dual.getsockname()[1]} (IPv6 and IPv4)"
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(v6))
        assert listener_address(listener) == f"[::1]:{v6.getsockname()[1]}"
    assert host_port("::1", 8081) == "[::1]:8081"
    assert host_port("127.0.0.1", 8081) == "127.0.0.1:8081"
    assert host_port("localhost", 8081) == "localhost:8081"
