"""The collector keeps off long-lived objects, and still frees what dies."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import trio

from smap_notify.collector import FREEZE_EVERY, freeze_survivors, run_freezer


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[Node, weakref.ref[Node]]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(a)


def tracked(obj: object) -> bool:
    """Seen by the collector's generations (a frozen object is not)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    gc.disable()
    yield
    gc.unfreeze()
    gc.enable()


def test_young_garbage_is_collected_and_the_survivors_are_frozen() -> None:
    dead, dead_ref = cycle()
    alive, _ = cycle()
    del dead
    found, _ = freeze_survivors()
    assert dead_ref() is None and found >= 2
    assert not tracked(alive), "frozen"


@pytest.mark.parametrize("generation", [1, 2])
def test_the_older_generations_are_not_walked_but_frozen(generation: int) -> None:
    old, _ = cycle()
    gc.collect(generation - 1)  # survivors of that collection move up a generation
    assert any(o is old for o in gc.get_objects(generation=generation))
    walked: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            walked.append(info["generation"])

    gc.callbacks.append(record)
    try:
        freeze_survivors()
    finally:
        gc.callbacks.remove(record)
    assert walked == [0]
    assert not tracked(old)


def test_a_frozen_object_is_freed_by_its_references() -> None:
    plain = Node()
    plain_ref = weakref.ref(plain)
    looped, looped_ref = cycle()
    freeze_survivors()
    del plain, looped
    assert plain_ref() is None, "no cycle: freed at once, frozen or not"
    # The price of freezing, which a closed connection never pays (test_chaos.py): a
    # cycle that dies frozen waits for an unfreeze.
    freeze_survivors()
    assert looped_ref() is not None
    gc.unfreeze()
    gc.collect()
    assert looped_ref() is None


async def test_the_freezer_freezes_the_survivors_every_minute(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    nursery.start_soon(run_freezer)
    await trio.sleep(1)
    alive, _ = cycle()
    dead, dead_ref = cycle()
    del dead
    await trio.sleep(FREEZE_EVERY - 2)
    assert tracked(alive) and dead_ref() is not None, "not before the minute is up"
    await trio.sleep(2)
    assert not tracked(alive)
    assert dead_ref() is None
