"""The collector keeps off long-lived objects, and still frees what dies."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from smap_notify.collector import Freezer


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


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def freezer() -> Iterator[tuple[Freezer, Clock, list[int]]]:
    """A Freezer hooked to the collector, its clock, and the generations walked."""
    clock = Clock()
    hook = Freezer(60.0, clock)
    walked: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            walked.append(info["generation"])

    gc.disable()
    gc.callbacks.extend([record, hook])
    yield hook, clock, walked
    gc.callbacks.remove(record)
    gc.callbacks.remove(hook)
    gc.unfreeze()
    gc.enable()


def test_survivors_are_frozen_when_a_collection_ends_without_a_walk_of_its_own(
    freezer: tuple[Freezer, Clock, list[int]],
) -> None:
    _, _, walked = freezer
    alive, _ = cycle()
    dead, dead_ref = cycle()
    del dead
    gc.collect(0)
    assert dead_ref() is None, "collected by the collection itself"
    assert not tracked(alive), "frozen"
    assert walked == [0], "no collection of the freezer's own"


def test_at_most_one_freeze_a_minute(freezer: tuple[Freezer, Clock, list[int]]) -> None:
    _, clock, _ = freezer
    gc.collect(0)
    later, _ = cycle()
    clock.now += 59
    gc.collect(0)
    assert tracked(later)
    clock.now += 1
    gc.collect(0)
    assert not tracked(later)


def test_a_frozen_object_is_freed_by_its_references(
    freezer: tuple[Freezer, Clock, list[int]],
) -> None:
    plain = Node()
    plain_ref = weakref.ref(plain)
    looped, looped_ref = cycle()
    gc.collect(0)
    del plain, looped
    assert plain_ref() is None, "no cycle: freed at once, frozen or not"
    # The price of freezing, which a closed connection never pays (test_chaos.py): a
    # cycle that dies frozen waits for an unfreeze.
    assert looped_ref() is not None
    gc.unfreeze()
    gc.collect()
    assert looped_ref() is None
