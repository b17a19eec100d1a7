"""The keep-alive schedule: which connections are due, found without visiting the others."""

from __future__ import annotations

from collections import Counter

import attrs
import pytest

from smap_notify.keepalive import STALL_SLACK, KeepAlive, Schedule


@attrs.define
class Stream:
    """Counts how often the schedule looks at when something last arrived."""

    received: float
    reads: int = 0

    @property
    def last_receive(self) -> float:
        self.reads += 1
        return self.received


@attrs.define
class Conn:
    id: int
    stream: Stream
    expires_at: float = 10_000.0
    close_reason: str = ""
    writable: bool = True
    opened: float = 0.0


def conns(count: int, first: int = 1000) -> list[Conn]:
    return [Conn(first + i, Stream(0.0)) for i in range(count)]


def schedule(members: list[Conn], pong_wait: float = 60.0) -> Schedule[Conn]:
    s: Schedule[Conn] = Schedule()
    for conn in members:
        s.add(conn, now=0.0, wall=0.0, pong_wait=pong_wait)
    return s


def test_every_connection_comes_once_per_round_and_each_slice_holds_an_even_share() -> None:
    members = conns(16_000)
    s = schedule(members)
    s.set_slots(30, 50, 0.02)
    slices = [s.pings_due(now=i * 0.02 + 0.01) for i in range(1500)]
    assert Counter(c.id for slice_ in slices for c in slice_) == {c.id: 1 for c in members}
    assert {len(slice_) for slice_ in slices} <= {10, 11}
    # However few: 300 connections, ten in each second's turn.
    s = schedule(conns(300))
    s.set_slots(30, 50, 0.02)
    per_turn = [len(s.pings_due(now=t + 0.99)) for t in range(30)]
    assert per_turn == [10] * 30


def test_the_timer_wakes_for_slots_that_hold_connections_and_once_a_turn() -> None:
    s = schedule([])
    s.set_slots(30, 50, 0.02)
    assert s.next_wake() == pytest.approx(0.98), "nothing open: once a turn"
    (conn,) = members = conns(1, first=30 * 7 + 2)  # turn 2, its slot 7
    s = schedule(members)
    s.set_slots(30, 50, 0.02)
    assert s.next_wake() == pytest.approx(0.98)
    assert s.pings_due(now=1.99) == []
    assert s.next_wake() == pytest.approx(2.0 + 7 * 0.02)
    assert s.pings_due(now=2.15) == [conn]
    assert s.pings_due(now=31.0) == []


def test_after_a_stall_the_slots_that_passed_are_skipped_not_pinged_at_once() -> None:
    members = conns(1500)
    s = schedule(members)
    s.set_slots(30, 50, 0.02)
    assert len(s.pings_due(now=0.51)) == 26  # the slots at 0, 0.02 ... 0.5
    s.rebase(now=20.0)
    assert len(s.pings_due(now=20.0)) == 1


def test_new_slots_keep_every_connection_and_a_removed_one_is_never_pinged() -> None:
    members = conns(100)
    s = schedule(members)
    s.set_slots(30, 50, 0.02)
    s.discard(members[0])
    s.discard(members[0])  # twice: no error
    s.set_slots(7, 3, 1.0)
    seen = Counter(c.id for c in s.pings_due(now=20.5))
    assert seen == {c.id: 1 for c in members[1:]}
    assert len(s) == 99


def test_only_the_due_connections_are_looked_at() -> None:
    members = conns(1000)
    s = schedule(members)
    members[5].stream.received = -100.0  # it fell silent before it was even added
    assert s.due(now=30.0, wall=30.0, resumed=0.0, pong_wait=60.0) == ([], [])
    assert sum(c.stream.reads for c in members) == 0, "nothing is due before 60 s"
    for c in members:
        if c is not members[5]:
            c.stream.received = 50.0  # they answered their pings
    assert s.due(now=60.5, wall=60.5, resumed=0.0, pong_wait=60.0) == ([members[5]], [])
    assert [c.stream.reads for c in members] == [1] * 1000
    # The others' next look is 60 s after they last spoke, not every tick.
    assert s.due(now=100.0, wall=100.0, resumed=0.0, pong_wait=60.0) == ([], [])
    assert [c.stream.reads for c in members] == [1] * 1000
    silent, _ = s.due(now=110.5, wall=110.5, resumed=0.0, pong_wait=60.0)
    assert len(silent) == 999, "silent 60.5 s since they last spoke"


def test_silence_is_strictly_longer_than_the_pong_wait() -> None:
    (conn,) = conns(1)
    s = schedule([conn])
    assert s.due(now=60.0, wall=60.0, resumed=0.0, pong_wait=60.0) == ([], [])
    assert s.due(now=60.01, wall=60.01, resumed=0.0, pong_wait=60.0) == ([conn], [])


def test_an_expired_token_is_reported_once_on_time_by_the_wall_clock() -> None:
    members = conns(3)
    for c in members:
        c.expires_at = 2_000_000.0
    members[1].expires_at = 1_000_010.0
    s: Schedule[Conn] = Schedule()
    for c in members:
        s.add(c, now=5.0, wall=1_000_000.0, pong_wait=60.0)
    assert s.due(now=14.9, wall=1_000_009.9, resumed=0.0, pong_wait=60.0) == ([], [])
    assert s.due(now=15.1, wall=1_000_010.1, resumed=0.0, pong_wait=60.0) == ([], [members[1]])
    members[1].close_reason = "token_expired"  # what the hub does with it
    assert s.due(now=20.0, wall=1_000_015.0, resumed=0.0, pong_wait=60.0) == ([], [])
    # Still closing after a whole WS_PONG_WAIT of silence: dropped as silent.
    silent, _ = s.due(now=65.1, wall=1_000_060.1, resumed=0.0, pong_wait=60.0)
    assert members[1] in silent


def test_a_wall_clock_behind_the_event_loop_checks_the_token_again_later() -> None:
    (conn,) = conns(1)
    conn.expires_at = 100.0
    s: Schedule[Conn] = Schedule()
    s.add(conn, now=0.0, wall=90.0, pong_wait=60.0)
    conn.stream.received = 10.0
    # The event loop's clock says 10 s went by; the wall clock only 5 s.
    assert s.due(now=10.5, wall=95.5, resumed=0.0, pong_wait=60.0) == ([], [])
    assert s.due(now=15.1, wall=100.1, resumed=0.0, pong_wait=60.0) == ([], [conn])


def test_the_daemons_own_stall_is_not_the_clients_silence() -> None:
    members = conns(10)
    s = schedule(members, pong_wait=5.0)
    # Nothing ran from 1 s to 13 s: every deadline passed during the stall.
    assert s.due(now=13.0, wall=13.0, resumed=13.0, pong_wait=5.0) == ([], [])
    assert s.due(now=17.9, wall=17.9, resumed=13.0, pong_wait=5.0) == ([], [])
    silent, _ = s.due(now=18.1, wall=18.1, resumed=13.0, pong_wait=5.0)
    assert silent == members


def test_a_shorter_pong_wait_applies_to_the_deadlines_already_set() -> None:
    members = conns(2)
    s = schedule(members, pong_wait=60.0)
    members[0].stream.received = 4.0
    s.reschedule(now=5.0, wall=5.0, pong_wait=10.0)
    assert s.due(now=10.5, wall=10.5, resumed=0.0, pong_wait=10.0) == ([members[1]], [])
    assert s.due(now=14.5, wall=14.5, resumed=0.0, pong_wait=10.0) == ([members[0]], [])


def test_a_removed_connection_is_never_reported() -> None:
    members = conns(2)
    s = schedule(members)
    s.discard(members[0])
    assert s.due(now=61.0, wall=61.0, resumed=0.0, pong_wait=60.0) == ([members[1]], [])
    assert members[0].stream.reads == 0


# -- the timer's decisions, with values for clocks -----------------------------------------


def timer(members: list[Conn], interval: float = 30.0, pong_wait: float = 60.0) -> KeepAlive[Conn]:
    keepalive = KeepAlive(schedule(members, pong_wait), now=0.0, pong_wait=pong_wait)
    keepalive.plan(interval, pong_wait)
    return keepalive


def ticks_until(keepalive: KeepAlive[Conn], end: float) -> list[tuple[float, int]]:
    """Tick as the hub does, each at its wake time, until ``end``: (when, id) pinged."""
    pinged: list[tuple[float, int]] = []
    while (now := keepalive.plan(30.0, 60.0)) < end:
        pinged += [(now, conn.id) for conn in keepalive.tick(now, now, 60.0).ping]
    return pinged


def test_new_connections_are_pinged_after_a_grace_then_once_per_interval() -> None:
    members = conns(300)
    keepalive = timer(members)
    pinged = ticks_until(keepalive, 80.0)
    first = {cid: when for when, cid in reversed(pinged)}
    assert sorted(first) == [c.id for c in members]
    # Grace: half the 30 s interval; then the slot's turn, within one interval.
    assert all(15.0 < when <= 45.0 + 0.1 for when in first.values())
    times: dict[int, list[float]] = {}
    for when, cid in pinged:
        times.setdefault(cid, []).append(when)
    gaps = {round(b - a, 6) for t in times.values() for a, b in zip(t, t[1:], strict=False)}
    assert gaps == {30.0}  # then once per interval


def test_a_tick_pings_no_connection_it_drops_as_silent_nor_one_that_cannot_be_written() -> None:
    members = conns(40)
    members[0].writable = False
    keepalive = timer(members, interval=30.0, pong_wait=60.0)
    now = 0.0
    silent: list[Conn] = []
    pinged: list[Conn] = []
    while now < 61.0:
        now = keepalive.plan(30.0, 60.0)
        tick = keepalive.tick(now, now, 60.0)
        silent += tick.silent
        assert not {c.id for c in tick.silent} & {c.id for c in tick.ping}
        pinged += tick.ping
    assert {c.id for c in silent} == {c.id for c in members}  # nothing ever arrived
    assert members[0] not in pinged


def test_after_a_stall_silence_counts_from_the_end_of_it() -> None:
    members = conns(10)
    keepalive = timer(members, interval=2.0, pong_wait=5.0)
    late = keepalive.plan(2.0, 5.0) + STALL_SLACK + 12.0
    tick = keepalive.tick(late, late, 5.0)
    assert tick.silent == [] and keepalive.resumed == late


def test_expired_tokens_are_reported_by_the_wall_clock() -> None:
    members = conns(3)
    members[1].expires_at = 20.0
    keepalive = timer(members)
    keepalive.plan(30.0, 60.0)
    assert keepalive.tick(19.0, 19.0, 60.0).expired == []
    assert keepalive.tick(21.0, 100.0, 60.0).expired == [members[1]]
