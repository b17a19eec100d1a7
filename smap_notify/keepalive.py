"""Keep-alive bookkeeping: which connections are due for a ping, a silence check or an
expired token, found without visiting the others.

Pure logic, no Trio: times are passed in. Pings go round a wheel of slots, one slot per
keep-alive tick, so that each tick pings a small slice; silence and token deadlines wait
in a heap keyed by the earliest moment either could fall due.
"""

from __future__ import annotations

import heapq
from typing import Final, Generic, Protocol, TypeVar

# The time between two ping slots: a ping interval is cut into slices this long, and the
# pongs of one slice come back together (16,000 connections, 30 s: about 53 per slice,
# a few milliseconds of work). Shorter slices cost more CPU, not less delay: at 20 ms the
# pongs of 16,000 idle connections took 11-12% of a core instead of 8.5%.
PING_SLICE: Final = 0.1


class Received(Protocol):
    last_receive: float


class KeptAlive(Protocol):
    """What the schedule reads of a connection."""

    @property
    def id(self) -> int: ...
    @property
    def stream(self) -> Received: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def close_reason(self) -> str | None: ...


C = TypeVar("C", bound=KeptAlive)


class Schedule(Generic[C]):
    """Open connections by ping slot and by next deadline.

    A heap entry is a moment before which the connection cannot fall silent for too long
    nor see its token expire; it is checked then, and pushed again if it is still fine.
    Entries of removed connections stay in the heap until their moment (at most one
    WS_PONG_WAIT away) and are skipped: they hold a connection id, not the connection.
    """

    def __init__(self) -> None:
        self._conns: dict[int, C] = {}
        self._heap: list[tuple[float, int]] = []
        self._turns = self._per_turn = 1
        self._slots: list[dict[int, C]] = [{}]
        self._next = 0  # the slot to ping next
        self._next_at = 0.0  # when
        self._tick = 1.0  # from one slot to the next

    def __len__(self) -> int:
        return len(self._conns)

    def _slot(self, cid: int) -> dict[int, C]:
        # Consecutive ids go to consecutive turns, and a turn's own connections to
        # consecutive slots within it: however many are open, each turn, and each slot of
        # a turn, holds an even share.
        turns, per_turn = self._turns, self._per_turn
        return self._slots[cid % turns * per_turn + cid // turns % per_turn]

    def add(self, conn: C, now: float, wall: float, pong_wait: float) -> None:
        """A connection just upgraded: its handshake is what last arrived from it."""
        self._conns[conn.id] = conn
        self._slot(conn.id)[conn.id] = conn
        self._push(conn, now, wall, now + pong_wait)

    def discard(self, conn: C) -> None:
        if self._conns.pop(conn.id, None) is not None:
            del self._slot(conn.id)[conn.id]

    def _push(self, conn: C, now: float, wall: float, silent_at: float) -> None:
        when = silent_at
        if not conn.close_reason:
            # The token's expiry, moved from the wall clock to the event loop's.
            when = min(when, now + conn.expires_at - wall)
        heapq.heappush(self._heap, (when, conn.id))

    def set_slots(self, turns: int, per_turn: int, tick: float) -> None:
        """Ping slots: ``turns`` * ``per_turn`` of them, ``tick`` seconds apart, so each
        connection comes once every ``turns * per_turn * tick`` seconds."""
        self._tick = tick
        turns, per_turn = max(1, turns), max(1, per_turn)
        if (turns, per_turn) == (self._turns, self._per_turn):
            return
        self._turns, self._per_turn = turns, per_turn
        self._slots = [{} for _ in range(turns * per_turn)]
        for cid, conn in self._conns.items():
            self._slot(cid)[cid] = conn
        self._next %= len(self._slots)

    def rebase(self, now: float) -> None:
        """The next slot is due now: the slots whose time passed while nothing ran are
        skipped, not pinged all at once."""
        self._next_at = now

    def pings_due(self, now: float) -> list[C]:
        """The connections whose turn to be pinged has come: those of every slot due by
        ``now`` (one, unless the caller was late), each slot once per round."""
        due: list[C] = []
        slots = self._slots
        for _ in range(len(slots)):
            if self._next_at > now:
                break
            due.extend(slots[self._next].values())
            self._next = (self._next + 1) % len(slots)
            self._next_at += self._tick
        return due

    def next_wake(self) -> float:
        """When something may be due next: the next slot that holds a connection (looked
        for at most one turn ahead), or the first deadline, whichever comes first."""
        slots = self._slots
        ahead = 0
        while ahead < self._per_turn - 1 and not slots[(self._next + ahead) % len(slots)]:
            ahead += 1
        wake = self._next_at + ahead * self._tick
        return min(wake, self._heap[0][0]) if self._heap else wake

    def due(
        self, now: float, wall: float, resumed: float, pong_wait: float
    ) -> tuple[list[C], list[C]]:
        """(silent, expired): the connections from which nothing arrived for longer than
        ``pong_wait`` (counted from ``resumed`` at the latest: the daemon's own stall is
        not the clients' silence), and the others whose token expired (``wall`` is
        past ``expires_at``) and that are not closing already. Both leave the heap: the
        caller closes them."""
        heap = self._heap
        conns = self._conns
        silent: list[C] = []
        expired: list[C] = []
        while heap and heap[0][0] < now:
            _, cid = heapq.heappop(heap)
            conn = conns.get(cid)
            if conn is None:
                continue
            quiet_since = max(conn.stream.last_receive, resumed)
            if now - quiet_since > pong_wait:
                silent.append(conn)
            elif conn.expires_at <= wall and not conn.close_reason:
                expired.append(conn)
                # Still silent too long while it closes: the close waits for the client.
                heapq.heappush(heap, (quiet_since + pong_wait, cid))
            else:
                self._push(conn, now, wall, quiet_since + pong_wait)
        return silent, expired

    def reschedule(self, now: float, wall: float, pong_wait: float) -> None:
        """Every deadline again (a new WS_PONG_WAIT)."""
        self._heap = []
        for conn in self._conns.values():
            self._push(conn, now, wall, conn.stream.last_receive + pong_wait)
