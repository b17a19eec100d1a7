"""The subscription's outages, as the resync frame, the log and the backoff need them.

Pure: the subscriber thread feeds it the clocks (``monotonic`` for durations, ``wall``
for the times clients are told) and carries out what it answers.
"""

from __future__ import annotations

import enum
from typing import Final

import attrs

# A subscription lost sooner than FLAP_WITHIN after it was made is a flap (a peer that
# subscribes, then breaks the protocol; a Redis that keeps cutting us): the wait before
# the next attempt then grows with each flap instead of starting again from the backoff's
# base (every cycle costs a warning pair and a resync to every client).
FLAP_WITHIN: Final = 10.0
# A cut this soon after a full batch (a backlog in the socket) may be Redis's output limit.
BEHIND_WITHIN: Final = 2.0
# While Redis (or a shard) stays unavailable, every this many attempts is logged as a
# warning.
REPORT_EVERY: Final = 30


class Report(enum.Enum):
    """How a failed attempt is logged."""

    LOST = "lost"  # the subscription was up (or being made first): a warning
    STILL_DOWN = "still"  # a warning now and then, and when Redis's answer changes
    QUIET = "quiet"  # a debug line


@attrs.frozen
class Restored:
    """A subscription made after an outage."""

    reconnected: bool  # there was one before (else: the first, made late)
    outage: float  # seconds since the loss
    since: float | None  # wall clock of the loss, for the resync; None: the first


@attrs.define
class Outage:
    flaps: int = 0  # subscriptions in a row lost within FLAP_WITHIN
    ever_subscribed: bool = False
    subscribed_at: float | None = None  # monotonic, the last subscription
    lost_at: float | None = None  # wall clock of the loss while it lasts
    # The kinds of failure logged during this outage (see ``Report``).
    kinds: set[str] = attrs.Factory(set)
    # A backlog: when a hand-over last found the subscriber behind (monotonic), and the
    # wall clock of the first since it last kept up for BEHIND_WITHIN.
    behind_at: float | None = None
    behind_since: float | None = None

    def handed_over(self, monotonic: float, wall: float, *, behind: bool) -> None:
        """A batch went to the hub; ``behind``: more was waiting, or the hub was busy."""
        if behind:
            if self.behind_since is None:
                self.behind_since = wall
            self.behind_at = monotonic
        elif self.behind_at is not None and monotonic - self.behind_at > BEHIND_WITHIN:
            self.behind_since = None  # caught up a while ago

    def was_behind(self, monotonic: float) -> bool:
        """Whether a cut now may be Redis's output limit at work (the caller also checks
        that the last look at the socket did not find it empty)."""
        return self.behind_at is not None and monotonic - self.behind_at < BEHIND_WITHIN

    def failed(
        self,
        *,
        monotonic: float,
        wall: float,
        active: bool,
        starting: bool,
        moved: bool,
        alive_at: float | None,
        behind: bool,
        kind: str,
        attempts: int,
    ) -> Report:
        """An attempt failed, or the subscription (``active``) was lost. ``alive_at``: the
        wall clock of Redis's last reply (a wedged connection was lost when it went silent,
        not when noticed); ``behind``: the cut looks like the output limit, so what Redis
        dropped was published after the backlog began; ``moved``: the locator named
        another server, no fault of Redis's."""
        if active:
            flapped = (
                self.subscribed_at is not None
                and monotonic - self.subscribed_at < FLAP_WITHIN
                and not moved
            )
            self.flaps = self.flaps + 1 if flapped else 0
        if active or starting:
            self.kinds = {kind}
            lost = alive_at or wall
            if behind and self.behind_since is not None:
                lost = min(lost, self.behind_since)
            if self.lost_at is None:
                self.lost_at = lost
            return Report.LOST
        if attempts % REPORT_EVERY == 0 or kind not in self.kinds:
            self.kinds.add(kind)
            return Report.STILL_DOWN
        return Report.QUIET

    def subscribed(self, monotonic: float, wall: float) -> Restored | None:
        """The subscription is made; None when it was not lost before (a reconnect
        for another reason has nothing to tell)."""
        lost_at, self.lost_at = self.lost_at, None
        self.subscribed_at = monotonic
        ever, self.ever_subscribed = self.ever_subscribed, True
        if lost_at is None:
            return None
        return Restored(reconnected=ever, outage=wall - lost_at, since=lost_at if ever else None)
