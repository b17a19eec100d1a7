"""The subscriber-to-hub link: a real worker thread against a real Trio event loop."""

from __future__ import annotations

import threading

import pytest
import trio

from smap_notify.inbox import Inbox


async def test_the_thread_waits_for_a_credit_once_the_channel_is_full() -> None:
    inbox: Inbox[str] = Inbox(2)
    waited = threading.Event()
    done = threading.Event()

    def subscriber() -> None:
        inbox.put_from_thread("a", waited.set)
        inbox.put_from_thread("b", waited.set)
        inbox.put_from_thread("c", waited.set)  # no credit left until the hub gives one
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, subscriber)
        assert await inbox.receive.receive() == "a"
        assert await inbox.receive.receive() == "b"
        # Received but not yet dealt with: both credits are still out, so "c" waits.
        assert await trio.to_thread.run_sync(waited.wait, 10.0), "the third did not wait"
        assert not done.is_set()
        with pytest.raises(trio.WouldBlock):
            inbox.receive.receive_nowait()
        inbox.taken()
        assert await inbox.receive.receive() == "c"
        assert await trio.to_thread.run_sync(done.wait, 10.0)


async def test_a_hand_over_after_the_hub_is_gone_returns_its_credit() -> None:
    inbox: Inbox[str] = Inbox(1)
    await inbox.receive.aclose()
    waits = []

    def waiting() -> None:
        waits.append(1)
        assert len(waits) < 20, "the credit never came back"

    def subscriber() -> None:
        for item in "xyz":  # with one credit, each needs the one the last gave back
            inbox.put_from_thread(item, waiting)

    await trio.to_thread.run_sync(subscriber)
