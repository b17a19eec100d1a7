"""The daemon's side of systemd: sd_notify, the watchdog interval and socket activation.

Plain stdlib, no libsystemd: the protocols are a datagram of ``KEY=VALUE`` lines and a few
environment variables (sd_notify(3), sd_watchdog_enabled(3), sd_listen_fds(3)).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Final

import attrs

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START: Final = 3
LISTEN_ENV: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# PID 1 drains the notify socket promptly; the timeout only bounds a stuck manager, so a
# full queue costs the event loop at most this long instead of forever.
SEND_TIMEOUT: Final = 0.5
UNKNOWN_FD_NAME: Final = "unknown"


def notify_address(value: str | None) -> str | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None when unusable.

    A leading ``@`` names the Linux abstract namespace (a leading NUL byte).
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock: and other transports of newer systemd are not used on our hosts.
    logger.debug("unsupported NOTIFY_SOCKET ignored address=%r", value)
    return None


def format_notification(lines: tuple[str, ...], fields: Mapping[str, object]) -> bytes:
    """Encode sd_notify lines and fields as one datagram.

    Field values are flattened to one line, so a status built from an error message cannot
    inject another assignment.
    """
    out = []
    for line in lines:
        key, sep, _ = line.partition("=")
        if not sep or not key or "\n" in line:
            raise ValueError(f"not a single KEY=VALUE line: {line!r}")
        out.append(line)
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"not a notification key: {key!r}")
        text = " ".join(str(value).splitlines())
        out.append(f"{key}={text}")
    if not out:
        raise ValueError("empty notification")
    return "\n".join(out).encode("utf-8", "replace")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd reads ``MONOTONIC_USEC`` in."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify datagrams over one socket kept open; a no-op without NOTIFY_SOCKET.

    Sending never raises: systemd being unreachable must not take the daemon down. The
    first failure of a run of failures is logged at debug level.
    """

    def __init__(self, address: str | None) -> None:
        self._address = address or ""
        self._sock: socket.socket | None = None
        self._failing = False
        if address:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                logger.warning("sd_notify disabled error=%s", exc.strerror or exc)
                return
            sock.settimeout(SEND_TIMEOUT)
            self._sock = sock

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` of ``environ`` (default: the process environment)."""
        env = os.environ if environ is None else environ
        return cls(notify_address(env.get("NOTIFY_SOCKET")))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._sock is not None

    def notify(self, *lines: str, **fields: object) -> bool:
        """Send ``lines`` (``"KEY=VALUE"``) and ``fields`` as one datagram; True if sent."""
        data = format_notification(lines, fields)
        if self._sock is None:
            return False
        try:
            self._sock.sendto(data, self._address)
        except OSError as exc:
            if not self._failing:
                logger.debug(
                    "sd_notify failed address=%r error=%s",
                    self._address,
                    exc.strerror or exc,
                )
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``, with ``STATUS=`` when given."""
        return self._with_status(status, READY=1)

    def status(self, text: str) -> bool:
        """``STATUS=text``, shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: proof of liveness."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``, with ``STATUS=`` when given."""
        return self._with_status(status, STOPPING=1)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=``; send ``ready()`` when the reload ends."""
        return self._with_status(status, RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def close(self) -> None:
        """Close the socket; later notifications are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _with_status(self, status: str | None, **fields: object) -> bool:
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)


def notify(*lines: str, **fields: object) -> bool:
    """Send one notification to ``$NOTIFY_SOCKET`` over a fresh socket; False if not sent.

    For one-off messages; a daemon keeps a `Notifier`.
    """
    with Notifier.from_environ() as notifier:
        return notifier.notify(*lines, **fields)


def watchdog_interval(environ: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None if off.

    None also when ``WATCHDOG_PID`` names another process (an inherited environment).
    """
    usec_text = environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        logger.warning("WATCHDOG_USEC ignored value=%r", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        own_pid = os.getpid() if pid is None else pid
        if pid_text.strip() != str(own_pid):
            return None
    return usec / 2_000_000


@attrs.frozen
class ListenFds:
    """The file descriptors passed by socket activation, with their ``FileDescriptorName=``."""

    fds: tuple[int, ...]
    names: tuple[str, ...]


def activated(environ: Mapping[str, str], *, pid: int) -> bool:
    """Whether ``LISTEN_PID`` and ``LISTEN_FDS`` pass sockets to ``pid`` (no warnings:
    ``parse_listen_fds`` gives those)."""
    try:
        return int(environ.get("LISTEN_PID", "")) == pid and int(environ["LISTEN_FDS"]) > 0
    except (KeyError, ValueError):
        return False


def parse_listen_fds(
    environ: Mapping[str, str], *, pid: int, start_fd: int = SD_LISTEN_FDS_START
) -> ListenFds | None:
    """Read ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``; None unless they name ``pid``."""
    pid_text = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    if not pid_text or not count_text:
        return None
    try:
        listen_pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        logger.warning(
            "socket activation ignored LISTEN_PID=%r LISTEN_FDS=%r", pid_text, count_text
        )
        return None
    if listen_pid != pid:
        # sd_listen_fds(3) ignores them without a word; an operator deserves one.
        logger.warning(
            "socket activation ignored: LISTEN_PID=%d is not this process (%d);"
            " listening on WS_HOST:WS_PORT instead",
            listen_pid,
            pid,
        )
        return None
    if count <= 0:
        return None
    names_text = environ.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else []
    if names_text and len(names) != count:
        logger.warning(
            "LISTEN_FDNAMES does not match LISTEN_FDS, names ignored fds=%d names=%d",
            count,
            len(names),
        )
        names = []
    if not names:
        names = [UNKNOWN_FD_NAME] * count
    return ListenFds(fds=tuple(range(start_fd, start_fd + count)), names=tuple(names))


def listen_sockets_with_names(
    environ: MutableMapping[str, str] | None = None,
    unset: bool = True,
    *,
    start_fd: int = SD_LISTEN_FDS_START,
) -> list[tuple[str, socket.socket]]:
    """Sockets passed by socket activation, with their names; [] when not activated.

    The fds become close-on-exec. With ``unset``, the ``LISTEN_*`` variables are removed
    either way, as sd_listen_fds(3) does, so no child takes the sockets for its own.
    Raises OSError when a passed fd is not a socket.
    """
    env = os.environ if environ is None else environ
    parsed = parse_listen_fds(env, pid=os.getpid(), start_fd=start_fd)
    if unset:
        for key in LISTEN_ENV:
            env.pop(key, None)
    if parsed is None:
        return []
    result = []
    for fd, name in zip(parsed.fds, parsed.names, strict=True):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        logger.debug("socket activation fd=%d name=%s address=%s", fd, name, _describe(sock))
        result.append((name, sock))
    return result


def listen_sockets(
    environ: MutableMapping[str, str] | None = None,
    unset: bool = True,
    *,
    start_fd: int = SD_LISTEN_FDS_START,
) -> list[socket.socket]:
    """Sockets passed by socket activation (fds 3, 4, ...); [] when not activated."""
    return [sock for _, sock in listen_sockets_with_names(environ, unset, start_fd=start_fd)]


def _describe(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname())
    except OSError as exc:
        return f"? ({exc.strerror})"
