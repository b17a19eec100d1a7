"""The composition root's own timing decisions (app.py), in Trio's clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from smap_notify.app import _shutdown


def app_whose_drain_takes(seconds: float, shutdown_timeout: float = 10.0) -> Any:
    async def shutdown(*, keep_backlog: bool) -> None:
        await trio.sleep(seconds)

    return SimpleNamespace(
        config=SimpleNamespace(shutdown_timeout=shutdown_timeout), shutdown=shutdown
    )


@pytest.mark.parametrize(("drain", "stopped_at"), [(1.0, 1.0), (60.0, 8.0)])
async def test_a_stop_ends_when_the_drain_does_or_at_four_fifths_of_shutdown_timeout(
    autojump_clock: trio.abc.Clock, drain: float, stopped_at: float
) -> None:
    """SIGTERM ends the process within SHUTDOWN_TIMEOUT (10 s here): the daemon stops as
    soon as the drain is done, and a drain that does not finish (a client that never
    reads) is cut at 8 s, leaving the rest for closing up."""
    started = trio.current_time()
    with trio.CancelScope() as scope:
        await _shutdown(app_whose_drain_takes(drain), scope, False)
        await trio.sleep_forever()  # until _shutdown's cancel
    assert scope.cancelled_caught
    assert trio.current_time() - started == pytest.approx(stopped_at)
