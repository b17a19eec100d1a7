"""Which request heads may be read at once: a budget from the open-files limit, and the
oldest slow heads closed to make room for a new one. Pure: fed the limit and the times."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import Final

# Descriptors the daemon needs besides its WebSockets: listeners, Redis, the health
# check, the log, the event loop's own, connections still in their handshake.
FD_HEADROOM: Final = 64


# Request heads being read at once, at most (a slowloris holds many): past this, or past
# what the open-files limit leaves beside the open WebSockets, a new connection closes the
# oldest head that has taken HEAD_CROWDED_AFTER already. A browser sends its head at once.
MAX_PENDING_HEADS: Final = 1024
MIN_PENDING_HEADS: Final = 16
HEAD_CROWDED_AFTER: Final = 1.0


def head_cap(soft_limit: int, websockets: int) -> int:
    """How many request heads may be read at once: what the open-files limit leaves
    beside the open WebSockets, between MIN_PENDING_HEADS and MAX_PENDING_HEADS."""
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_PENDING_HEADS
    room = soft_limit - FD_HEADROOM - websockets
    return max(MIN_PENDING_HEADS, min(MAX_PENDING_HEADS, room))


def heads_to_close(since: Sequence[float], now: float, cap: int) -> tuple[int, bool]:
    """For a new request head, with heads being read since ``since`` (oldest first):
    how many of the oldest to close, and whether the new one then has room. Only heads
    older than HEAD_CROWDED_AFTER are closed: a browser sends its head at once."""
    close = 0
    while close < len(since) and len(since) - close >= cap:
        if now - since[close] < HEAD_CROWDED_AFTER:
            return close, False
        close += 1
    return close, True
