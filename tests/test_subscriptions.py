"""The per-user subscription plan (REDIS_SUBSCRIBE=user): pure logic, no Redis."""

from __future__ import annotations

import select
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from smap_notify.channels import Subscription, parse_channels
from smap_notify.subscriptions import (
    BATCH,
    EXPIRE_EVERY,
    HOLD,
    Requests,
    SubscriptionPlan,
    UserSubscriptions,
    batches,
)

TOPIC_ERA = parse_channels(
    "user_noti:{user},project:{project}:{user}|raw,job:{job}:{user}|raw,system:{event},alerts:all"
)


def ch(name: str) -> Subscription:
    return Subscription(name, False)


def pat(name: str) -> Subscription:
    return Subscription(name, True)


@asynccontextmanager
async def serving(
    channels: str = "user_noti:{user}",
) -> AsyncIterator[tuple[UserSubscriptions, Requests]]:
    """Subscriptions for ``channels`` (a 5 s grace) with their ``serve`` running, Redis up."""
    requests = Requests()
    subs = UserSubscriptions(parse_channels(channels), 5, requests, lambda: True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(subs.serve)
            yield subs, requests
            nursery.cancel_scope.cancel()
    finally:
        requests.close()


def test_the_first_connection_subscribes_the_users_channels_and_broadcasts_are_held_once() -> None:
    plan = SubscriptionPlan(TOPIC_ERA, grace=5)
    assert plan.held == {pat("system:*"), ch("alerts:all")}
    assert set(plan.add("u1", None, 0)) == {
        ch("user_noti:u1"),
        pat("project:*:u1"),
        pat("job:*:u1"),
    }
    assert plan.add("u1", None, 0) == []  # a second tab: nothing new
    assert set(plan.add("u2", {"project": "p1"}, 0)) == {
        ch("user_noti:u2"),
        ch("project:p1:u2"),
        pat("job:*:u2"),
    }


def test_a_user_holds_the_pattern_or_the_exact_channels_never_both() -> None:
    plan = SubscriptionPlan(TOPIC_ERA, grace=5)
    plan.add("u", {"project": "p1"}, 0)
    plan.add("u", {"project": "p2"}, 0)
    assert {ch("project:p1:u"), ch("project:p2:u")} <= set(plan.wanted("u"))
    assert plan.add("u", None, 1) == [pat("project:*:u")]  # a dashboard: the pattern
    wanted = set(plan.wanted("u"))
    assert pat("project:*:u") in wanted and ch("project:p1:u") not in wanted
    # The exact channels go after the grace; the pattern was added before they go.
    assert plan.next_deadline() == 6
    assert set(plan.expire(6)) == {ch("project:p1:u"), ch("project:p2:u")}
    # The dashboard leaves: back to the exact channels, asked for again.
    plan.remove("u", None, 10)
    assert set(plan.held) >= {ch("project:p1:u"), ch("project:p2:u"), pat("project:*:u")}
    assert plan.expire(15) == [pat("project:*:u")]


def test_unsubscribe_comes_a_grace_after_the_last_tab_and_not_if_a_tab_comes_back() -> None:
    plan = SubscriptionPlan(parse_channels("user_noti:{user}"), grace=5)
    plan.add("u", None, 0)
    plan.add("u", None, 0)
    plan.remove("u", None, 1)
    assert plan.next_deadline() is None  # another tab is open
    plan.remove("u", None, 2)
    assert plan.next_deadline() == 7
    assert plan.expire(6.9) == []
    assert plan.add("u", None, 6.9) == []  # reconnected within the grace: still held
    assert plan.next_deadline() is None
    assert plan.expire(100) == []
    plan.remove("u", None, 100)
    assert plan.expire(105) == [ch("user_noti:u")]
    assert plan.held == set() and plan.users == 0
    assert plan.add("u", None, 106) == [ch("user_noti:u")]


def test_removing_a_connection_never_seen_changes_nothing() -> None:
    plan = SubscriptionPlan(TOPIC_ERA, grace=5)
    plan.remove("nobody", None, 0)
    plan.add("u", None, 0)
    plan.remove("u", {"project": "p1"}, 0)
    assert plan.next_deadline() is None


def test_a_user_id_topic_templates_cannot_route_gets_only_its_plain_channel() -> None:
    plan = SubscriptionPlan(TOPIC_ERA, grace=5)
    assert plan.add("a:b*", None, 0) == [ch("user_noti:a:b*")]
    assert plan.add("bad\ud800", None, 0) == []  # no channel name in bytes: nothing


def test_a_reload_subscribes_what_the_new_templates_need_and_releases_the_rest() -> None:
    plan = SubscriptionPlan(parse_channels("user_noti:{user}"), grace=5)
    plan.add("u", {"project": "p1"}, 0)
    added = plan.set_channels(TOPIC_ERA, 1)
    assert set(added) == {ch("project:p1:u"), pat("job:*:u"), pat("system:*"), ch("alerts:all")}
    plan.set_channels(parse_channels("campaign:{campaign}:user:{user}"), 2)
    assert plan.next_deadline() == 7
    assert set(plan.expire(7)) == set(added) | {ch("user_noti:u")}
    assert plan.held == {pat("campaign:*:user:u")}


def test_commands_carry_many_names_each() -> None:
    subs = [ch(f"user_noti:{i}") for i in range(2 * BATCH + 1)] + [pat("job:*:u")]
    commands = batches(subs)
    assert [(kind, len(names)) for kind, names in commands] == [
        ("subscribe", BATCH),
        ("subscribe", BATCH),
        ("subscribe", 1),
        ("psubscribe", 1),
    ]


def test_requests_keep_the_last_decision_and_wake_the_thread_once() -> None:
    requests = Requests()
    try:
        requests.change([ch("a"), ch("b")], [])
        requests.change([], [ch("a")])
        assert requests.pending
        assert requests.take_changes() == {ch("a"): False, ch("b"): True}
        assert requests.held == {ch("b")}
        assert not requests.pending
        assert requests.snapshot() == [ch("b")]
    finally:
        requests.close()


async def test_a_handshake_waits_for_the_confirmation_and_a_loss_lets_it_go(
    autojump_clock: trio.abc.Clock,
) -> None:
    requests = Requests()
    active = True
    subs = UserSubscriptions(parse_channels("user_noti:{user}"), 5, requests, lambda: active)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(subs.serve)
            ready = subs.on_user_connected("u")
            assert ready is not None and not ready.is_set()
            requests.confirmed([ch("user_noti:u")])  # as the thread does
            await trio.testing.wait_all_tasks_blocked()
            assert ready.is_set()
            assert subs.on_user_connected("u") is None  # confirmed already
            waiting = subs.on_user_connected("v")
            assert waiting is not None
            requests.lost()
            await trio.testing.wait_all_tasks_blocked()
            assert waiting.is_set()
            active = False
            assert subs.on_user_connected("w") is None  # Redis down: accept anyway
            # The grace, on Trio's clock.
            subs.on_user_disconnected("u", True)
            subs.on_user_disconnected("u", False)
            requests.take_changes()
            await trio.sleep(4.9)
            assert not requests.pending
            await trio.sleep(0.2)
            assert requests.take_changes() == {ch("user_noti:u"): False}
            nursery.cancel_scope.cancel()
    finally:
        requests.close()


async def test_an_unavailable_channel_lets_its_handshakes_go_and_is_not_waited_for_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Sharded: the channel's master is down; other users still wait for theirs."""
    async with serving() as (subs, requests):
        down, up = subs.on_user_connected("d"), subs.on_user_connected("u")
        assert down is not None and up is not None
        requests.unavailable([ch("user_noti:d")])  # as the thread does
        await trio.testing.wait_all_tasks_blocked()
        assert down.is_set() and not up.is_set()
        assert subs.on_user_connected("d") is None  # a second tab: no wait either
        requests.confirmed([ch("user_noti:d"), ch("user_noti:u")])  # the node is back
        await trio.testing.wait_all_tasks_blocked()
        assert up.is_set()
        assert subs.on_user_connected("d") is None
        requests.unavailable([ch("user_noti:d")])
        await trio.testing.wait_all_tasks_blocked()
        subs.on_user_disconnected("d", True)
        waiting = subs.on_user_connected("d")  # held by the other tab: still no wait
        assert waiting is None


def woken(requests: Requests) -> bool:
    """The thread's wake-up descriptor is readable (a byte is waiting)."""
    return bool(select.select([requests.wake_fd], [], [], 0)[0])


async def test_handshakes_of_one_busy_stretch_share_one_wake_up_when_the_loop_goes_idle() -> None:
    async with serving() as (subs, requests):
        for user in ("a", "b", "c"):
            assert subs.on_user_connected(user) is not None
        await trio.lowlevel.checkpoint()  # runnable again at once: the loop is busy
        assert requests.unwoken and not woken(requests)
        await trio.sleep(0.001)  # nothing runnable: the loop sleeps, the thread wakes
        assert woken(requests) and not requests.unwoken
        assert requests.take_changes() == {
            ch("user_noti:a"): True,
            ch("user_noti:b"): True,
            ch("user_noti:c"): True,
        }


async def test_a_loop_that_stays_busy_hands_changes_over_after_the_hold() -> None:
    async with serving() as (subs, requests):
        subs.on_user_connected("a")
        # Always runnable, never idle, for ten holds of real time.
        end = time.monotonic() + 10 * HOLD
        while not woken(requests) and time.monotonic() < end:
            await trio.lowlevel.checkpoint()
        assert woken(requests)
        assert requests.take_changes() == {ch("user_noti:a"): True}


async def test_users_leaving_one_by_one_are_unsubscribed_together(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving() as (subs, requests):
        users = [f"u{i}" for i in range(5)]
        for user in users:
            subs.on_user_connected(user)
        requests.take_changes()
        start = trio.current_time()
        for user in users:
            subs.on_user_disconnected(user, False)
            await trio.sleep(0.1)
        await trio.sleep_until(start + 5 + 0.05)  # the first one's grace has run out
        assert requests.take_changes() == {ch("user_noti:u0"): False}
        # The others' graces end within the next EXPIRE_EVERY: let go of at once.
        await trio.sleep_until(start + 5 + EXPIRE_EVERY - 0.05)
        assert not requests.pending
        await trio.sleep(0.1)
        assert requests.take_changes() == {ch(f"user_noti:{u}"): False for u in users[1:]}


async def test_a_user_leaving_wakes_the_expiry_only_when_it_moves_the_next_expiry(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving() as (subs, requests):
        users = [f"u{i}" for i in range(4)]
        for user in users:
            subs.on_user_connected(user)
        start = trio.current_time()
        subs.on_user_disconnected("u0", False)  # nothing pending: the expiry must look
        assert subs._replanned.is_set()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.1)
        subs.on_user_disconnected("u1", False)  # due after u0's: changes nothing
        assert not subs._replanned.is_set()
        await trio.sleep_until(start + 5 + 0.05)  # u0 let go; u1 within EXPIRE_EVERY
        assert requests.take_changes()[ch("user_noti:u0")] is False
        subs.on_user_disconnected("u2", False)  # still not before u1's turn
        assert not subs._replanned.is_set()
        await trio.sleep_until(start + 5 + 0.05 + EXPIRE_EVERY + 0.01)
        assert requests.take_changes() == {ch("user_noti:u1"): False}


async def test_a_new_tab_that_releases_a_channel_lets_it_go_after_the_grace(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A dashboard tab (no filter) replaces a project page's channel with the pattern."""
    async with serving("project:{project}:{user}|raw") as (subs, requests):
        subs.on_user_connected("u", {"project": "p1"})
        subs.on_user_connected("u", None)
        assert requests.take_changes() == {ch("project:p1:u"): True, pat("project:*:u"): True}
        await trio.sleep(5 + EXPIRE_EVERY)
        assert requests.take_changes() == {ch("project:p1:u"): False}


async def test_an_instrument_trio_removed_does_not_end_serve_and_what_is_left_goes_out() -> None:
    requests = Requests()
    subs = UserSubscriptions(parse_channels("user_noti:{user}"), 5, requests, lambda: True)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(subs.serve)
            assert subs._idle_waker is not None
            trio.lowlevel.remove_instrument(subs._idle_waker)  # as Trio does when one raises
            subs.on_user_connected("a")
            assert not woken(requests)
            nursery.cancel_scope.cancel()
        # serve ended cleanly, and handed over what it had recorded.
        assert woken(requests) and requests.take_changes() == {ch("user_noti:a"): True}
    finally:
        requests.close()
