"""The process entry point: stop signals are caught (``signals``) before the daemon's
own modules are imported, which takes about 0.3 s; then the command line runs."""

from __future__ import annotations

import contextlib
import os
import sys

from .signals import catch_early_signals


def main() -> int:
    catch_early_signals()
    from .cli import main as cli_main

    status = cli_main()
    _flush_or_drop_output()
    return status


def _flush_or_drop_output() -> None:
    """Flush stdout and stderr; when their reader has gone (journald restarted, a closed
    pipe), drop what is left, or Python's own flush at exit turns the status into 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
