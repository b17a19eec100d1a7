"""Per-user subscriptions (REDIS_SUBSCRIBE=user): which channels the instance holds.

``SubscriptionPlan`` decides (pure: fed the time); ``Requests`` carries its decisions to
the subscriber thread, the only one that talks to the subscribed connection; and
``UserSubscriptions``, the hub's ``Presence`` in this mode, joins the two and lets a
handshake wait until Redis has confirmed what its user needs.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import trio

from .channels import Channels, Subscription, shared_subscriptions, user_subscriptions

logger = logging.getLogger(__name__)

# A connection's filters, as a hashable key: () for none.
FilterKey = tuple[tuple[str, str], ...]


def filter_key(filters: Mapping[str, str] | None) -> FilterKey:
    return tuple(sorted(filters.items())) if filters else ()


def _encodable(sub: Subscription) -> bool:
    """Redis channel names are bytes: a user id with a lone surrogate has none."""
    try:
        sub.name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SubscriptionPlan:
    """What the instance subscribes to: every connected (or connecting) user's needs, the
    broadcast templates once, and for ``grace`` seconds what is no longer needed (a
    reconnecting tab must not cost an UNSUBSCRIBE and a SUBSCRIBE).

    Pure: every change returns the subscriptions to add; ``expire`` those to drop.
    """

    def __init__(self, channels: Channels, grace: float) -> None:
        self.channels = channels
        self.grace = grace
        self._users: dict[str, Counter[FilterKey]] = {}
        self._wanted: dict[str, tuple[Subscription, ...]] = {}
        self._shared: tuple[Subscription, ...] = shared_subscriptions(channels)
        self.held: set[Subscription] = set(self._shared)  # asked of Redis
        self._releasing: dict[Subscription, float] = {}  # held, unneeded: until when
        self._deadlines: list[tuple[float, str, bool]] = []  # heap; stale entries skipped

    @property
    def users(self) -> int:
        return len(self._users)

    def wanted(self, user: str) -> tuple[Subscription, ...]:
        return self._wanted.get(user, ())

    def add(self, user: str, filters: Mapping[str, str] | None, now: float) -> list[Subscription]:
        """A connection of ``user`` is being accepted; returns what to subscribe."""
        self._users.setdefault(user, Counter())[filter_key(filters)] += 1
        return self._update(user, now)

    def remove(
        self, user: str, filters: Mapping[str, str] | None, now: float
    ) -> list[Subscription]:
        """A connection of ``user`` ended (or was never accepted); returns what to
        subscribe: the exact channels of the user's filtered tabs when the last one
        without that filter leaves (the pattern stays held for the grace meanwhile)."""
        counts = self._users.get(user)
        key = filter_key(filters)
        if counts is None or not counts[key]:
            return []
        counts[key] -= 1
        if not counts[key]:
            del counts[key]
        if not counts:
            del self._users[user]
        return self._update(user, now)

    def set_channels(self, channels: Channels, now: float) -> list[Subscription]:
        """CHANNELS changed (a reload): what every user needs now; returns what to add."""
        self.channels = channels
        old_shared, self._shared = self._shared, shared_subscriptions(channels)
        added = self._want(self._shared, old_shared, now)
        for user in list(self._users):
            added += self._update(user, now)
        return added

    def expire(self, now: float) -> list[Subscription]:
        """Drop what has been unneeded for the grace; returns what to unsubscribe."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, name, pattern = heapq.heappop(self._deadlines)
            sub = Subscription(name, pattern)
            if self._releasing.get(sub) == deadline:
                del self._releasing[sub]
                self.held.discard(sub)
                out.append(sub)
        return out

    def earliest_deadline(self) -> float | None:
        """A lower bound of ``next_deadline`` (released entries still counted), cheaper."""
        return self._deadlines[0][0] if self._deadlines else None

    def next_deadline(self) -> float | None:
        while self._deadlines:
            deadline, name, pattern = self._deadlines[0]
            if self._releasing.get(Subscription(name, pattern)) == deadline:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    def _update(self, user: str, now: float) -> list[Subscription]:
        counts = self._users.get(user)
        new: tuple[Subscription, ...] = ()
        if counts:
            new = tuple(
                s
                for s in user_subscriptions(
                    self.channels, user, (dict(key) if key else None for key in counts)
                )
                if _encodable(s)
            )
        old = self._wanted.get(user, ())
        if new:
            self._wanted[user] = new
        else:
            self._wanted.pop(user, None)
        return self._want(new, old, now)

    def _want(
        self, new: Iterable[Subscription], old: Iterable[Subscription], now: float
    ) -> list[Subscription]:
        new = tuple(new)
        added = []
        for sub in new:
            self._releasing.pop(sub, None)
            if sub not in self.held:
                self.held.add(sub)
                added.append(sub)
        kept = set(new)
        for sub in old:
            if sub not in kept and sub in self.held:
                deadline = now + self.grace
                self._releasing[sub] = deadline
                heapq.heappush(self._deadlines, (deadline, sub.name, sub.pattern))
        return added


# Channels or patterns per SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE or PUNSUBSCRIBE command.
BATCH: Final = 1000


def batches(subs: Iterable[Subscription]) -> list[tuple[str, list[str]]]:
    """Redis commands, at most BATCH names each, that (un)subscribe ``subs``: a pair of
    the command's kind (``subscribe``, ``psubscribe``) and its names."""
    channels = [s.name for s in subs if not s.pattern]
    patterns = [s.name for s in subs if s.pattern]
    return [
        (kind, names[i : i + BATCH])
        for kind, names in (("subscribe", channels), ("psubscribe", patterns))
        for i in range(0, len(names), BATCH)
    ]


class Requests:
    """The plan's decisions on their way to the subscriber thread, and Redis's
    confirmations on their way back. Shared by the event loop and the thread under a lock.

    Bounded: ``held`` and ``changes`` hold each subscription at most once (a later
    decision replaces an earlier one not yet taken), ``confirmed`` only what was asked.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held: set[Subscription] = set()  # what the instance is to hold
        self._changes: dict[Subscription, bool] = {}  # True: subscribe, False: unsubscribe
        self._confirmed: list[Subscription] = []
        self._unavailable: list[Subscription] = []
        self._lost = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._woken = False
        # Called from the thread when confirmations (or a loss) start waiting.
        self.tell: Callable[[], None] = lambda: None

    @property
    def wake_fd(self) -> int:
        """Readable once there are changes (they are in place before it is): the thread
        polls it beside Redis's socket, and empties it whenever it finds it readable."""
        return self._wake_r

    # -- the event loop's side --------------------------------------------------------

    def change(
        self,
        subscribe: Iterable[Subscription],
        unsubscribe: Iterable[Subscription],
        *,
        wake: bool = True,
    ) -> None:
        """Record decisions; ``wake``: let the thread take them now, else at ``wake()``."""
        with self._lock:
            for sub in subscribe:
                self.held.add(sub)
                self._changes[sub] = True
            for sub in unsubscribe:
                self.held.discard(sub)
                self._changes[sub] = False
        if wake:
            self.wake()

    @property
    def unwoken(self) -> bool:
        """Changes wait that the thread has not been woken for. Read without the lock:
        only the event loop adds changes, so a stale answer is at worst a ``wake()``
        that finds nothing to do."""
        return bool(self._changes) and not self._woken

    def wake(self) -> None:
        """Let the thread take the changes waiting (none: nothing happens)."""
        with self._lock:
            wake = bool(self._changes) and not self._woken
            self._woken = self._woken or wake
        if wake:
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:  # a byte is waiting already
                pass

    def take_confirmed(self) -> tuple[list[Subscription], list[Subscription], bool]:
        """What Redis confirmed since, what became unavailable (its node is down), and
        whether the whole subscription was lost meanwhile."""
        with self._lock:
            confirmed, self._confirmed = self._confirmed, []
            unavailable, self._unavailable = self._unavailable, []
            lost, self._lost = self._lost, False
        return confirmed, unavailable, lost

    # -- the subscriber thread's side -------------------------------------------------

    @property
    def pending(self) -> bool:
        """Changes are waiting (read without the lock: a stale answer waits one turn)."""
        return bool(self._changes)

    def take_changes(self) -> dict[Subscription, bool]:
        with self._lock:
            changes, self._changes = self._changes, {}
            self._woken = False
        return changes

    def snapshot(self) -> list[Subscription]:
        """Everything to hold, for a new connection to Redis; pending changes are in it."""
        with self._lock:
            self._changes = {}
            self._woken = False
            held = list(self.held)
        return held

    def confirmed(self, subs: list[Subscription]) -> None:
        """Record Redis's confirmations; the event loop is told once per take."""
        with self._lock:
            tell = self._untold()
            self._confirmed += subs
        if tell:
            self.tell()

    def unavailable(self, subs: list[Subscription]) -> None:
        """These are not held and cannot be for now (sharded: their node is down): a
        handshake must not wait for them. A later confirmation makes them held again."""
        with self._lock:
            tell = self._untold()
            self._unavailable += subs
        if tell:
            self.tell()

    def lost(self) -> None:
        """The subscription is gone: nothing confirmed holds any more."""
        with self._lock:
            tell = self._untold()
            self._confirmed = []
            self._unavailable = []
            self._lost = True
        if tell:
            self.tell()

    def _untold(self) -> bool:
        return not self._confirmed and not self._unavailable and not self._lost

    def close(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)


class UserSubscriptions:
    """The hub's ``Presence`` in user mode: subscribes what a connecting user needs, lets
    its handshake wait for Redis's confirmation; unsubscribes a grace after the last."""

    def __init__(
        self,
        channels: Channels,
        grace: float,
        requests: Requests,
        active: Callable[[], bool],
    ) -> None:
        self.plan = SubscriptionPlan(channels, grace)
        self.requests = requests
        requests.change(self.plan.held, ())
        requests.tell = self._thread_told
        self._active = active  # whether the subscription is live (the subscriber's state)
        self._confirmed: set[Subscription] = set()
        self._unavailable: set[Subscription] = set()  # not held, not to be waited for
        self._waiters: dict[Subscription, list[_Waiter]] = {}
        self._replanned = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake_at = float("inf")  # when ``serve`` looks at the plan again
        self._not_before = -float("inf")  # ... and not before: EXPIRE_EVERY after the last
        # Set while ``serve`` runs: changes then reach the thread when the event loop has
        # nothing else to do (or after HOLD), so that handshakes in flight share commands.
        self._idle_waker: _WakeWhenIdle | None = None

    def on_user_connected(
        self, user_id: str, filters: Mapping[str, str] | None = None
    ) -> trio.Event | None:
        """A connection is being accepted; the event (if any) is set once Redis has
        confirmed every subscription its user needs, or the subscription is lost."""
        added = self.plan.add(user_id, filters, trio.current_time())
        if added:
            self._change(added, ())
        # A new tab can release too: an unfiltered one replaces a filtered tab's channel
        # with the user's pattern, and the channel's grace starts.
        self._replan()
        if not self._active():
            return None  # Redis is down: accepted anyway, the resync covers the outage
        missing = {
            s
            for s in self.plan.wanted(user_id)
            if s not in self._confirmed and s not in self._unavailable
        }
        if not missing:
            return None
        waiter = _Waiter(missing)
        for sub in missing:
            self._waiters.setdefault(sub, []).append(waiter)
        return waiter.event

    def on_user_disconnected(
        self,
        user_id: str,
        has_other_connections: bool,
        filters: Mapping[str, str] | None = None,
    ) -> None:
        added = self.plan.remove(user_id, filters, trio.current_time())
        if added:
            self._change(added, ())
        self._replan()

    def set_channels(self, channels: Channels) -> None:
        """A reload changed CHANNELS: hold what the current connections need now."""
        added = self.plan.set_channels(channels, trio.current_time())
        self._change(added, ())
        self._replan()

    def _change(
        self, subscribe: Iterable[Subscription], unsubscribe: Iterable[Subscription]
    ) -> None:
        self.requests.change(subscribe, unsubscribe, wake=self._idle_waker is None)

    def _replan(self) -> None:
        """Wake ``serve`` only when the plan now releases something before it would look:
        the grace is the same for all, so a user leaving rarely moves that time."""
        earliest = self.plan.earliest_deadline()
        if earliest is not None and max(earliest, self._not_before) < self._wake_at:
            self._replanned.set()

    def count(self) -> int:
        return len(self.plan.held)

    def _thread_told(self) -> None:
        """From the subscriber thread: confirmations (or a loss) are waiting."""
        if self._token is not None:
            self._token.run_sync_soon(self._take_confirmed)

    def _take_confirmed(self) -> None:
        confirmed, unavailable, lost = self.requests.take_confirmed()
        for sub in unavailable:
            self._confirmed.discard(sub)
            self._unavailable.add(sub)
            self._release(sub)  # accepted anyway: the resync covers the outage
        if lost:
            self._confirmed.clear()
            self._unavailable.clear()
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.event.set()
            self._waiters.clear()
        held = self.plan.held
        for sub in confirmed:
            self._unavailable.discard(sub)
            # A confirmation of something released meanwhile says nothing of now.
            if sub in held:
                self._confirmed.add(sub)
            self._release(sub)

    def _release(self, sub: Subscription) -> None:
        for waiter in self._waiters.pop(sub, ()):
            waiter.missing.discard(sub)
            if not waiter.missing:
                waiter.event.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Unsubscribe what the grace has run out on, until cancelled; meanwhile changes
        reach the thread when the event loop goes idle."""
        self._token = trio.lowlevel.current_trio_token()
        waker = _WakeWhenIdle(self.requests)
        trio.lowlevel.add_instrument(waker)
        self._idle_waker = waker
        try:
            task_status.started()
            while True:
                deadline = self.plan.next_deadline()
                # Users leave one by one: their channels are let go together, at most
                # once per EXPIRE_EVERY, each within that of its grace running out.
                if deadline is not None:
                    deadline = max(deadline, self._not_before)
                self._wake_at = deadline if deadline is not None else float("inf")
                with trio.move_on_at(self._wake_at):
                    await self._replanned.wait()
                self._replanned = trio.Event()
                now = trio.current_time()
                expired = self.plan.expire(now)
                if expired:
                    self._not_before = now + EXPIRE_EVERY
                    self._confirmed.difference_update(expired)
                    self._unavailable.difference_update(expired)
                    for sub in expired:
                        self._release(sub)  # its handshakes have ended: nobody waits
                    self._change((), expired)
        finally:
            self._idle_waker = None
            with contextlib.suppress(KeyError):  # Trio removed it: it raised
                trio.lowlevel.remove_instrument(waker)
            waker.wake()  # what was recorded meanwhile is the thread's to take


# How long changes may wait for the event loop to go idle before they are handed to the
# thread anyway (a loop busy for that long).
HOLD: Final = 0.01
# How often, at most, channels whose grace ran out are let go.
EXPIRE_EVERY: Final = 1.0


class _WakeWhenIdle(trio.abc.Instrument):
    """Hands the plan's changes to the subscriber thread when the event loop is about to
    sleep: a handshake's SUBSCRIBE then waits for no other work, and the handshakes that
    reach the plan in one busy stretch share one command and one round trip, where each
    would otherwise cost both threads two wake-ups. A loop busy longer than HOLD hands them
    over anyway."""

    def __init__(self, requests: Requests) -> None:
        self.requests = requests
        self._since: float | None = None

    def before_io_wait(self, timeout: float) -> None:
        """Trio calls this before each wait for I/O, with how long it may sleep: above zero
        only when no task is runnable. (A test clock's jumps and ``wait_all_tasks_blocked``
        pass zero while idle: there HOLD applies.)"""
        if not self.requests.unwoken:
            self._since = None
            return
        if timeout > 0:  # nothing runnable: the loop is about to sleep
            self.wake()
            return
        now = time.monotonic()
        if self._since is None:
            self._since = now
        elif now - self._since >= HOLD:
            self.wake()

    def wake(self) -> None:
        """Never raises: Trio would remove an instrument that did, and every change after
        would wait for the thread's own turn (POLL_SECONDS)."""
        self._since = None
        try:
            self.requests.wake()
        except OSError:  # the pipe is closed: the daemon is stopping
            logger.debug("waking the subscriber thread failed", exc_info=True)


class _Waiter:
    def __init__(self, missing: set[Subscription]) -> None:
        self.missing = missing
        self.event = trio.Event()
