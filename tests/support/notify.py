"""A stand-in for systemd's notification socket: receives what the daemon sends with
sd_notify (READY=1, STATUS=, WATCHDOG=1, ...) and waits for a matching message."""

from __future__ import annotations

import contextlib
import re
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio
import trio.testing

from smap_notify.systemd import Notifier

# AF_UNIX socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
MAX_UNIX_PATH = 100


MARK = "X_TEST_MARK"


Notification = dict[str, str]


def parse_notification(data: bytes) -> Notification:
    fields: Notification = {}
    for line in data.decode().split("\n"):
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


def is_(key: str, value: str = "1") -> Callable[[Notification], bool]:
    return lambda n: n.get(key) == value


class NotifyReceiver:
    """A bound AF_UNIX datagram socket, read by a thread so the sender never waits.

    Linux queues only ``net.unix.max_dgram_qlen`` (often 10) datagrams: a reader that
    stalls would block the daemon's ``sendto``, so reading must not depend on this
    test's event loop. Datagrams keep their order, so a marker sent by the test between
    two moments separates what the daemon sent before and after.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[Notification] = []
        self._cursor = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, name="notify-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(parse_notification(data))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def mark(self, label: str) -> None:
        """Queue a marker behind everything the daemon has sent so far."""
        with Notifier(self.path) as notifier:
            assert notifier.notify(f"{MARK}={label}")

    def snapshot(self) -> list[Notification]:
        with self._lock:
            return list(self.messages)

    def between(self, first: str, last: str) -> list[Notification]:
        """What arrived after marker ``first`` and before marker ``last``."""
        messages = self.snapshot()
        start = messages.index({MARK: first})
        end = messages.index({MARK: last})
        return messages[start + 1 : end]

    async def expect(
        self, predicate: Callable[[Notification], bool], timeout: float = 20.0
    ) -> Notification:
        """The next notification that satisfies ``predicate``, after the last one returned."""
        with trio.fail_after(timeout):
            while True:
                with self._lock:
                    pending = self.messages[self._cursor :]
                for offset, message in enumerate(pending):
                    if predicate(message):
                        self._cursor += offset + 1
                        return message
                await trio.sleep(0.01)

    async def expect_status(
        self,
        redis_state: str | None = None,
        connections: int | None = None,
        timeout: float = 20.0,
    ) -> Notification:
        """The daemon's status as of the last notification returned, if it matches, else
        the next status that does.

        The status a test waits for may have come before, or with, the notification it
        waited for first: READY=1 carries a STATUS= line, and a status reported a moment
        before READY=1 is not repeated after it.
        """
        predicate = has_status(redis_state, connections)
        with self._lock:
            announced = [m for m in self.messages[: self._cursor] if is_status(m)]
        if announced and predicate(announced[-1]):
            return announced[-1]
        return await self.expect(predicate, timeout)

    async def count(
        self, predicate: Callable[[Notification], bool], n: int, timeout: float = 20.0
    ) -> None:
        for _ in range(n):
            await self.expect(predicate, timeout)


@contextlib.contextmanager
def open_notify_receiver(tmp_path: Path) -> Iterator[NotifyReceiver]:
    """A receiver bound in ``tmp_path``, or in a shorter temporary directory if need be."""
    directory = tmp_path
    cleanup = None
    if len(str(tmp_path / "notify")) > MAX_UNIX_PATH:
        cleanup = tempfile.TemporaryDirectory(prefix="sn-")
        directory = Path(cleanup.name)
    receiver = NotifyReceiver(str(directory / "notify"))
    try:
        yield receiver
    finally:
        receiver.close()
        if cleanup is not None:
            cleanup.cleanup()


STATUS_TEXT = re.compile(r"^(subscribed|redis \w+); (\d+) connections, (\d+) users$")


def status_fields(n: Notification) -> tuple[str, int, int]:
    m = STATUS_TEXT.match(n["STATUS"])
    assert m is not None, f"unexpected STATUS={n['STATUS']!r}"
    return m.group(1), int(m.group(2)), int(m.group(3))


def is_status(n: Notification) -> bool:
    return "STATUS" in n and n.get("STOPPING") != "1"


def has_status(redis_state: str | None = None, connections: int | None = None) -> Any:
    def check(n: Notification) -> bool:
        if not is_status(n):
            return False
        state, conns, _ = status_fields(n)
        return (redis_state is None or state == redis_state) and (
            connections is None or conns == connections
        )

    return check
