"""The cyclic garbage collector, kept off the objects that live long.

An open connection holds about a hundred objects the collector tracks. Objects that
survive two young collections land in the oldest generation, and a full collection walks
all of it: with 16,000 connections open, over a second during which no message moves
(measured on a loaded 2-core VM; ``bench/profile-notes.rst``). CPython runs one whenever
the objects added to the oldest generation since the last one reach a quarter of those
there, which connections coming and going bring about. Frozen (``gc.freeze``), the
survivors are out of every collection, so the oldest generation stays small.

Freezing does not keep anything alive: frozen objects are freed by their reference
counts like any other. What it gives up is the collection of reference cycles that die
frozen; a closed connection leaves none (``tests/test_chaos.py`` holds it to that, frozen
or not).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Final

import trio

logger = logging.getLogger(__name__)

# How often the survivors are frozen: what a minute of connects and messages left.
FREEZE_EVERY: Final = 60.0
THRESHOLDS: Final = (50_000, 20, 20)


def freeze_start_up() -> None:
    """Start-up objects live forever: keep them out of the collector's way."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def freeze_survivors() -> tuple[int, float]:
    """Collect the youngest generation, then freeze every object left; (unreachable
    objects found, seconds taken).

    The youngest generation holds at most what was allocated since its last collection
    (the first threshold bounds it). The older two are frozen without a walk: right after
    a ramp of connections they hold all of them, and collecting them first would be the
    very walk that freezing spares (gen 1 at 8,000 connections: 528 ms). A cycle that
    died there after surviving a young collection is frozen with the rest."""
    start = time.perf_counter()
    found = gc.collect(0)
    gc.freeze()
    return found, time.perf_counter() - start


async def run_freezer(*, every: float = FREEZE_EVERY) -> None:
    """Freeze the survivors every ``every`` seconds, until cancelled."""
    while True:
        await trio.sleep(every)
        found, took = freeze_survivors()
        logger.debug(
            "survivors frozen unreachable=%d frozen=%d took=%.1fms",
            found,
            gc.get_freeze_count(),
            took * 1000,
        )
