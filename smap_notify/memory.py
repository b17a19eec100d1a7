"""Giving the memory of large messages back to the system once they are delivered."""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import Final

# Messages, frames and replies of at least this many bytes ask for a trim when freed.
LARGE: Final = 1 << 20


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Trimmer:
    """Hands the allocator's free memory back after large buffers were freed.

    glibc keeps what a 10 MB message needed (its reply, parse buffers and frame, in the
    main and the subscriber thread's arenas) for later allocations; a garbage collection
    frees nothing more. ``malloc_trim`` returns the free pages: one call, at most once per
    ``trim_if_wanted`` and only after a large buffer, costs about a millisecond.
    """

    def __init__(self) -> None:
        self.wanted = False
        self._trim = _malloc_trim()

    def want(self) -> None:
        """A large buffer is or will soon be freed. Safe to call from a finalizer."""
        self.wanted = True

    def track(self, frame: bytes) -> memoryview:
        """``frame`` as a view that asks for a trim once nothing holds it any more."""
        view = memoryview(frame)
        weakref.finalize(view, self.want)
        return view

    def trim_if_wanted(self) -> None:
        if not self.wanted:
            return
        self.wanted = False
        if self._trim is not None:
            self._trim(0)
