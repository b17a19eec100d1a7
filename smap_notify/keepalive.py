"""Keep-alive decisions: which connections are due for a ping, a silence check or an
expired token, found without visiting the others, and when to look next.

Pure logic, no Trio: times are passed in. Pings go round a wheel of slots, one slot per
keep-alive tick, so that each tick pings a small slice; silence and token deadlines wait
in a heap keyed by the earliest moment either could fall due.
"""

from __future__ import annotations

import heapq
import math
from typing import Final, Generic, Protocol, TypeVar

import attrs

# The time between two ping slots: a ping interval is cut into slices this long, and the
# pongs of one slice come back together, a few milliseconds of work even at 16,000
# connections. Shorter slices cost more CPU (more wake-ups), not less delay.
PING_SLICE: Final = 0.1
# A tick this much late: the event loop itself did not run (the process stopped, the VM
# paused, a long block).
STALL_SLACK: Final = 1.0


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


class Pinged(KeptAlive, Protocol):
    """What the keep-alive timer reads of a connection besides the schedule's part."""

    @property
    def writable(self) -> bool: ...
    @property
    def opened(self) -> float: ...


P = TypeVar("P", bound=Pinged)


@attrs.frozen
class Tick(Generic[P]):
    """What one keep-alive tick does: close the silent, close the expired, ping."""

    silent: list[P]
    expired: list[P]
    ping: list[P]


class KeepAlive(Generic[P]):
    """The keep-alive timer's decisions: when to wake, and what is due then.

    Pings are spread over the interval: each tick pings one slot of connections, every
    connection once per interval, so that pongs come back a few at a time and never as
    one storm behind which every message waits. A new connection waits out a grace first
    (half the interval, less when WS_PONG_WAIT leaves less room), as it would with a
    timer of its own: short-lived clients are not pinged at all, and a client's own close
    frame is not crossed by a ping.
    """

    def __init__(self, schedule: Schedule[P], now: float, pong_wait: float) -> None:
        self.schedule = schedule
        self.wake = now
        # Silence counts from here at the earliest: the daemon's own stall is not the
        # clients' silence.
        self.resumed = now
        self.pong_wait = pong_wait
        self._interval = 1.0
        self._tick = 1.0
        schedule.rebase(now)

    def plan(self, interval: float, pong_wait: float) -> float:
        """Lay out the ping slots for ``interval``; the moment to wake for the next tick.

        A turn is the connections pinged in one second (less with short intervals), cut
        into slots of at most PING_SLICE, one after the other; the timer wakes for the
        slots that hold a connection, and at least once a turn."""
        turn = min(1.0, interval / 2, pong_wait / 4)
        slices = math.ceil(turn / PING_SLICE)
        # Rounded down: each connection's ping comes at least once per interval.
        self._tick = turn / slices
        self._interval = interval
        self.schedule.set_slots(int(interval / turn), slices, self._tick)
        return self.wake

    def tick(self, now: float, wall: float, pong_wait: float) -> Tick[P]:
        """What is due at ``now`` (``wall`` on the wall clock, for token expiry), with
        WS_PONG_WAIT ``pong_wait``; sets ``wake`` for the next tick."""
        schedule = self.schedule
        if now - self.wake > STALL_SLACK:
            # What the clients sent meanwhile waits unread, and most of them have not
            # been pinged since: each gets its ping and a whole pong wait to answer it.
            self.resumed = now
            schedule.rebase(now)
        if pong_wait != self.pong_wait:
            self.pong_wait = pong_wait
            schedule.reschedule(now, wall, pong_wait)
        interval = self._interval
        # A silent client's first ping comes within grace + interval < pong_wait.
        grace = min(interval, pong_wait - interval) / 2
        silent, expired = schedule.due(now, wall, self.resumed, pong_wait)
        dropped = {conn.id for conn in silent}
        ping = [
            conn
            for conn in schedule.pings_due(now)
            if conn.writable and conn.id not in dropped and now - conn.opened > grace
        ]
        self.wake = max(schedule.next_wake(), now + self._tick)
        return Tick(silent, expired, ping)
