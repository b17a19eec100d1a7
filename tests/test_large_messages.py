"""Large messages from outside: a daemon process, raw clients, its memory in /proc."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import pytest

from .conftest import DaemonProcess, RedisServer, make_token
from .rawclient import open_tab, read_all, status_kb, wait_settled

MB = 1 << 20
SIZE = 10 * MB
TABS = 20


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "stalled"])
def test_one_large_message_to_many_tabs_is_held_about_once(
    daemon_process: Callable[..., DaemonProcess], redis_server: RedisServer, reading: bool
) -> None:
    """10 MB to 20 tabs of one user: the frame is shared by the tabs, not copied for each
    one the socket could not take at once; what the message needed is given back once
    delivered, and what the stalled tabs held once they leave."""
    daemon = daemon_process(WS_MAX_CONNECTIONS_PER_USER=str(TABS), WS_WRITE_WAIT="60s")
    pid = daemon.proc.pid
    token = make_token("big")
    tabs: list[socket.socket] = [open_tab(daemon.port, token) for _ in range(TABS)]
    try:
        baseline = wait_settled(pid) * 1024
        message = json.dumps({"type": "bulk", "payload": "x" * SIZE})
        assert redis_server.publish("big", message) == 1
        if reading:
            read_all(tabs, SIZE)
        delivered = wait_settled(pid, seconds=2) * 1024
        peak = status_kb(pid, "VmHWM") * 1024
        # The reply, its parsed payload, the payload re-encoded and the frame, briefly;
        # a copy for each tab was 20 times the message.
        assert peak - baseline < 4 * SIZE, f"peak +{(peak - baseline) / MB:.0f} MB"
        if reading:
            assert delivered - baseline < SIZE / 2, f"kept +{(delivered - baseline) / MB:.0f} MB"
        else:
            assert delivered - baseline < 2 * SIZE, f"held +{(delivered - baseline) / MB:.0f} MB"
    finally:
        for tab in tabs:
            tab.close()
    left = wait_settled(pid, seconds=2) * 1024
    assert left - baseline < SIZE / 2, f"kept +{(left - baseline) / MB:.0f} MB after they left"
