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
frozen; a closed connection leaves none (``tests/chaos/test_redis_faults.py`` holds it
to that, frozen or not).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Final

# How often, at most, the survivors are frozen.
FREEZE_EVERY: Final = 60.0
THRESHOLDS: Final = (50_000, 20, 20)


def freeze_start_up() -> None:
    """Start-up objects live forever: keep them out of the collector's way, and freeze
    what survives later collections too."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    gc.callbacks.append(Freezer())


class Freezer:
    """A ``gc.callbacks`` hook: when a collection ends, at most once per ``every``
    seconds, freeze every object left.

    Right after a collection the generations it walked hold only survivors, so freezing
    then takes no walk of its own (``gc.freeze`` moves lists). A collection started for
    the purpose would be a pause of its own: a young one forced every minute took 126 ms
    during the probe beside 8,000 idle connections, where the daemon otherwise ran none.
    With no collection there is nothing to make cheaper, and nothing is frozen."""

    def __init__(self, every: float = FREEZE_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.clock = clock
        self.last = -math.inf

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase != "stop":
            return
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        # Nothing else here: this runs inside whatever allocation set the collection
        # off, in any thread, and a lock taken here (logging's) could deadlock.
        gc.freeze()
