"""An echo server on smap-notify's own WebSocket code path, for the Autobahn TestSuite.

It is ``smap_notify.server.Server`` unchanged up to the upgrade (request head reading and
parsing, ``ConnStream``, ``websocket.accept_websocket``, registration in the hub),
with two things swapped: every handshake is accepted (no origin or token: the suite sends
neither), and each client message is echoed instead of dropped.

Run alone: ``python -m tests.e2e.autobahn_server [PORT]`` serves ``ws://127.0.0.1:PORT/ws``.
"""

from __future__ import annotations

import sys
import time
from typing import Final

import trio
import trio_websocket

from smap_notify.config import Config, load_config
from smap_notify.handshake import Accept, HandshakeRequest, Reject
from smap_notify.hub import Hub
from smap_notify.metrics import Counters
from smap_notify.server import Server

# Section 9 sends single messages of up to 16 MiB.
MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024 + 1024


def echo_config(**env: str) -> Config:
    return load_config(
        {
            "JWT_SECRET_KEY": "autobahn-echo-server-secret-not-used-000",
            "WS_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_SIZE),
            "WS_MAX_CONNECTIONS_PER_USER": "10000",
            "WS_HANDSHAKE_TIMEOUT": "30s",
            **env,
        }
    )


class EchoServer(Server):
    """smap-notify's server with an accept-all handshake and an echoing connection loop."""

    def __init__(self, config: Config) -> None:
        super().__init__(config, Hub(config, Counters()), {})

    def _decide(self, request: HandshakeRequest) -> Accept | Reject:
        full = self.hub.try_reserve("autobahn")
        if full is not None:
            return Reject(full[0], full[1], b"{}")
        return Accept("autobahn", time.time() + 86400, token_in_query=False)

    async def _on_client_message(
        self, ws: trio_websocket.WebSocketConnection, message: str | bytes
    ) -> None:
        await ws.send_message(message)


async def serve_echo(
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo server on 127.0.0.1 until cancelled; started with the bound port."""
    server = EchoServer(echo_config())
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, listeners)
        task_status.started(bound[0].socket.getsockname()[1])


async def _main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_echo, port)
        print(f"echo server on ws://127.0.0.1:{bound}/ws", flush=True)


if __name__ == "__main__":
    trio.run(_main, int(sys.argv[1]) if len(sys.argv) > 1 else 9001)
