"""What systemd is told while the daemon runs: ``STATUS=`` when it changes, ``READY=1``
with it, and ``WATCHDOG=1`` while the event loop runs and the subscriber thread lives.

``status_text`` and ``status_wake`` are pure; ``StatusReporter`` carries them out through
``systemd.Notifier``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from .systemd import Notifier

STATUS_TICK: Final = 1.0  # how often the STATUS= line is brought up to date


def status_text(
    *,
    subscribed: bool,
    redis_state: str,
    draining: bool,
    out_of_descriptors: bool,
    connections: int,
    users: int,
) -> str:
    """The ``STATUS=`` line (``systemctl status`` shows it)."""
    redis = "subscribed" if subscribed else "redis " + redis_state
    short = "out of file descriptors, refusing new connections; " if out_of_descriptors else ""
    return (
        f"{'draining; ' if draining else ''}{short}{redis}; "
        f"{connections} connections, {users} users"
    )


def status_wake(now: float, next_ping: float | None) -> float:
    """When the status loop next runs: in a second, or at the next watchdog ping if that
    comes sooner. A ping that is due but was held back (the subscriber thread is not
    alive) is looked at again in a second."""
    if next_ping is not None and now < next_ping:
        return min(now + STATUS_TICK, next_ping)
    return now + STATUS_TICK


class StatusReporter:
    def __init__(
        self,
        notifier: Notifier,
        text: Callable[[], str],
        alive: Callable[[], bool],
        watchdog_interval: float | None,
    ) -> None:
        self.notifier = notifier
        self._text = text  # the status now
        self._alive = alive  # whether the subscriber thread still turns
        self._interval = watchdog_interval
        self._said: str | None = None  # what STATUS= last said; None until READY=1

    def ready(self) -> None:
        """READY=1 with the current status, which ``run`` then need not repeat."""
        self._said = self._text()
        self.notifier.ready(self._said)

    async def run(self) -> None:
        """STATUS= when it changes (checked every STATUS_TICK), and WATCHDOG=1 every
        watchdog interval while the subscriber thread is alive, until cancelled."""
        interval = self._interval
        next_ping = trio.current_time()
        while True:
            status = self._text()
            # Before READY=1 the status goes out with it (``ready``), not ahead of it.
            if self._said is not None and status != self._said:
                self._said = status
                self.notifier.status(status)
            now = trio.current_time()
            if interval is not None and now >= next_ping and self._alive():
                self.notifier.watchdog()
                next_ping = now + interval
            await trio.sleep_until(status_wake(now, next_ping if interval is not None else None))
