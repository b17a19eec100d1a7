"""Opening WS_HOST:WS_PORT: the dual-stack socket for ``::`` and what a failure means."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from smap_notify.config import load_config
from smap_notify.listen import listen_dual_stack, listen_error, open_listeners


async def test_the_listener_for_every_address_takes_ipv4_clients_too() -> None:
    """trio's IPv6 listeners are IPv6-only: with WS_HOST=:: IPv4 clients were refused.
    Bound to the IPv4-mapped loopback address rather than ::, which would expose the test
    on every interface; an IPv6-only socket cannot take that address at all."""
    listener = await listen_dual_stack("::ffff:127.0.0.1", 0)
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        async with client:
            server = await listener.accept()
            async with server:
                await client.send_all(b"ping")
                assert await server.receive_some(4) == b"ping"


@pytest.mark.parametrize(
    ("error", "lasting", "reason"),
    [
        (OSError(errno.EADDRINUSE, "in use"), False, "Address already in use"),
        (OSError(errno.EADDRNOTAVAIL, "n/a"), True, "Cannot assign requested address"),
        (OSError(errno.EACCES, "denied"), True, "Permission denied"),
        (socket.gaierror(socket.EAI_NONAME, "unknown"), True, "WS_HOST does not resolve"),
    ],
)
def test_listen_errors_say_why_and_whether_a_restart_may_help(
    error: OSError, lasting: bool, reason: str
) -> None:
    problem = listen_error("::1", 8081, error)
    assert str(problem) == f"cannot listen on [::1]:8081: {reason}"
    assert problem.lasting is lasting


async def test_a_loopback_listener_still_comes_from_trio() -> None:
    config = load_config({"JWT_SECRET_KEY": "x", "WS_HOST": "::1", "WS_PORT": "0"})
    listeners, inherited = await open_listeners(config, {})
    try:
        assert not inherited and len(listeners) == 1
        sock = listeners[0].socket
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
        client = await trio.open_tcp_stream("::1", sock.getsockname()[1])
        await client.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()
