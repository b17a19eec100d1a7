"""The outage bookkeeping, with the clocks as values."""

from __future__ import annotations

from typing import Any

from smap_notify.outage import BEHIND_WITHIN, FLAP_WITHIN, REPORT_EVERY, Outage, Report, Restored

WALL = 1_700_000_000.0


def fail(outage: Outage, monotonic: float, **kw: Any) -> Report:
    args: dict[str, Any] = {
        "monotonic": monotonic,
        "wall": WALL + monotonic,
        "active": True,
        "starting": False,
        "moved": False,
        "alive_at": None,
        "behind": False,
        "kind": "ConnectionError:Error 111",
        "attempts": 0,
    }
    return outage.failed(**(args | kw))


def test_the_first_subscription_has_nothing_to_tell() -> None:
    outage = Outage()
    assert outage.subscribed(1.0, WALL + 1) is None
    assert outage.ever_subscribed


def test_redis_down_at_start_then_up_is_a_late_first_subscription() -> None:
    outage = Outage()
    assert fail(outage, 0.0, active=False, starting=True) is Report.LOST
    assert outage.subscribed(3.0, WALL + 3) == Restored(reconnected=False, outage=3.0, since=None)


def test_a_loss_is_dated_from_redis_last_reply_and_told_once_restored() -> None:
    outage = Outage()
    outage.subscribed(0.0, WALL)
    assert fail(outage, 100.0, alive_at=WALL + 95) is Report.LOST
    # Later attempts keep the first loss's time.
    assert fail(outage, 101.0, active=False, alive_at=WALL + 100, attempts=1) is Report.QUIET
    restored = outage.subscribed(102.0, WALL + 102)
    assert restored == Restored(reconnected=True, outage=7.0, since=WALL + 95)
    assert outage.lost_at is None


def test_a_cut_while_behind_dates_the_loss_from_when_the_backlog_began() -> None:
    outage = Outage()
    outage.subscribed(0.0, WALL)
    outage.handed_over(50.0, WALL + 50, behind=True)
    outage.handed_over(51.0, WALL + 51, behind=True)
    assert outage.behind_since == WALL + 50
    assert outage.was_behind(51.0 + BEHIND_WITHIN - 0.01)
    fail(outage, 52.0, alive_at=WALL + 52, behind=True)
    assert outage.lost_at == WALL + 50
    # Without the output-limit hint, the backlog says nothing of the loss.
    other = Outage()
    other.subscribed(0.0, WALL)
    other.handed_over(50.0, WALL + 50, behind=True)
    fail(other, 52.0, alive_at=WALL + 52, behind=False)
    assert other.lost_at == WALL + 52


def test_a_backlog_is_forgotten_once_delivery_kept_up_for_a_while() -> None:
    outage = Outage()
    outage.handed_over(10.0, WALL + 10, behind=True)
    outage.handed_over(10.0 + BEHIND_WITHIN, WALL + 12, behind=False)
    assert outage.behind_since == WALL + 10, "not yet BEHIND_WITHIN without a backlog"
    outage.handed_over(10.1 + BEHIND_WITHIN, WALL + 12.1, behind=False)
    assert outage.behind_since is None
    assert not outage.was_behind(10.0 + BEHIND_WITHIN)


def test_losses_soon_after_subscribing_count_as_flaps_until_one_lasts() -> None:
    outage = Outage()
    now = 0.0
    for expected in (1, 2, 3):
        outage.subscribed(now, WALL + now)
        now += FLAP_WITHIN - 1
        fail(outage, now)
        assert outage.flaps == expected
    outage.subscribed(now, WALL + now)
    fail(outage, now + FLAP_WITHIN + 1)
    assert outage.flaps == 0


def test_moving_to_another_master_is_no_flap() -> None:
    outage = Outage()
    outage.subscribed(0.0, WALL)
    fail(outage, 1.0)
    outage.subscribed(1.5, WALL + 1.5)
    fail(outage, 2.0, moved=True)
    assert outage.flaps == 0


def test_a_failed_attempt_counts_no_flap() -> None:
    outage = Outage()
    outage.subscribed(0.0, WALL)
    fail(outage, 1.0)
    assert outage.flaps == 1
    fail(outage, 1.5, active=False, attempts=1)
    assert outage.flaps == 1


def test_attempts_are_reported_now_and_then_and_when_redis_answer_changes() -> None:
    outage = Outage()
    outage.subscribed(0.0, WALL)
    assert fail(outage, 1.0) is Report.LOST
    reports = [fail(outage, 1.0 + n, active=False, attempts=n) for n in range(1, 2 * REPORT_EVERY)]
    assert [n for n, r in enumerate(reports, 1) if r is Report.STILL_DOWN] == [REPORT_EVERY]
    assert fail(outage, 99.0, active=False, attempts=61, kind="AuthenticationError:NOAUTH") is (
        Report.STILL_DOWN
    )
    assert fail(outage, 99.5, active=False, attempts=62, kind="AuthenticationError:NOAUTH") is (
        Report.QUIET
    )
