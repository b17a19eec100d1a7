"""Stop signals caught before the daemon's imports are done.

Importing Trio, PyJWT, redis-py and the rest takes about 0.3 s. A SIGTERM in that time
would kill the process without a line, a SIGHUP (a reload sent early) or a SIGUSR1 would
kill it, and a SIGINT would print a KeyboardInterrupt traceback. ``catch_early_signals``
records them instead; ``app.run`` passes the stop signals on to its own signal handling
once that is up (``take_early_signals``), so the daemon stops the usual way, and a
reload before the configuration has even been read means nothing. The same stop signal
a second time takes its default action at once.

This module imports nothing of the daemon's, so that the entry point can install it first.
"""

from __future__ import annotations

import signal
import types

_early: list[int] = []
# Signals whose default action ends the process and which the daemon has no use for: a
# stray `kill -USR1` (log rotation habits) is logged and ignored instead.
UNUSED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _record(signum: int, frame: types.FrameType | None) -> None:
    if signum in (signal.SIGTERM, signal.SIGINT) and signum in _early:
        # Asked twice: a start-up that hangs (a name lookup) must still be stoppable.
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
    _early.append(signum)


def take_early_signals() -> list[int]:
    """The signals received before the daemon's own signal handling was up: the stop
    signals and the unused ones (a SIGHUP then means nothing: no configuration was read
    yet to re-read)."""
    taken = [s for s in _early if s != signal.SIGHUP]
    _early.clear()
    return taken


def catch_early_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *UNUSED_SIGNALS):
        signal.signal(signum, _record)
