"""Large messages from outside: a daemon process, raw clients, its memory in /proc."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest

from tests.support.daemon import DaemonProcess, make_token
from tests.support.rawclient import open_tab, read_all, status_kb, wait_settled
from tests.support.redis import RedisServer

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


def test_a_slow_but_steady_reader_gets_a_message_that_takes_several_write_waits(
    daemon_process: Callable[..., DaemonProcess], redis_server: RedisServer
) -> None:
    """A raw client with a 16 KB receive buffer reading 12 KB every 20 ms: 3 MB takes it
    about 5 s, five times WS_WRITE_WAIT (1 s). Its socket takes something every 20 ms, so
    it keeps the connection and gets the whole message; the whole frame had to go out
    within one WS_WRITE_WAIT and the client was cut off (1006) partway."""
    daemon = daemon_process(WS_WRITE_WAIT="1s")
    tab = open_tab(daemon.port, make_token("slow"), rcvbuf=16 * 1024)
    size = 3 * MB
    payload = "y" * size
    try:
        assert redis_server.publish("slow", {"type": "bulk", "payload": payload}) == 1
        received = bytearray()
        header = 10  # FIN + text, 127, 8 length bytes
        while len(received) < header or len(received) < header + length(received):
            time.sleep(0.02)  # the client's pace, not a wait for the daemon
            chunk = tab.recv(12 * 1024)
            assert chunk, f"closed after {len(received)} bytes"
            received += chunk
        document = json.loads(received[header:])
        assert (document["type"], document["payload"]) == ("bulk", payload)
    finally:
        tab.close()


def length(frame: bytes | bytearray) -> int:
    """The payload length of a server frame with a 64-bit length (RFC 6455 5.2)."""
    assert frame[:2] == b"\x81\x7f"
    return int.from_bytes(frame[2:10], "big")
