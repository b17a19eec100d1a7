"""The sockets the daemon listens on: inherited from systemd, or bound to a host and
port (dual-stack for ``::``, shared with SO_REUSEPORT for several instances), and the
reasons a bind fails, phrased for the operator."""

from __future__ import annotations

import errno
import os
import socket
from typing import Final

import trio

from . import systemd
from .config import Config

BACKLOG: Final = 4096  # pending connections the kernel keeps for us (a reconnect storm)


class ListenError(Exception):
    """WS_HOST:WS_PORT cannot be listened on; ``lasting``: a restart will not change that."""

    def __init__(self, message: str, *, lasting: bool) -> None:
        super().__init__(message)
        self.lasting = lasting


async def open_listeners(
    config: Config, environ: dict[str, str]
) -> tuple[list[trio.SocketListener], bool]:
    """Inherited (socket-activated) listeners, else one bound to WS_HOST:WS_PORT; the
    second value says whether they were inherited."""
    try:
        inherited = systemd.listen_sockets(environ)
    except OSError as exc:
        raise ListenError(
            f"socket activation: a passed file descriptor is not a socket ({exc.strerror})",
            lasting=True,
        ) from None
    for sock in inherited:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ListenError(
                f"socket activation: fd {sock.fileno()} is not a listening stream socket;"
                " the .socket unit needs ListenStream= and Accept=no",
                lasting=True,
            )
    if inherited:
        return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in inherited], True
    host, port = config.ws_host, config.ws_port
    return await listen_tcp(host, port, "WS_HOST", reuse_port=config.ws_reuse_port), False


async def open_admin_listeners(config: Config) -> list[trio.SocketListener]:
    """The listeners of ADMIN_HOST:ADMIN_PORT (/health and /metrics only); [] when
    ADMIN_PORT is 0."""
    if not config.admin_port:
        return []
    return await listen_tcp(config.admin_host, config.admin_port, "ADMIN_HOST")


async def listen_tcp(
    host: str, port: int, setting: str, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """Listeners on ``host:port`` (``::``: IPv6 and IPv4 on one socket); a ListenError
    that names ``setting`` when they cannot be had."""
    try:
        if reuse_port:
            return await listen_shared(host, port)
        if host == "::":
            return [await listen_dual_stack(host, port)]
        return await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    except OSError as exc:
        raise listen_error(host, port, exc, setting=setting) from None


async def listen_shared(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on every address of ``host`` with SO_REUSEPORT, as trio's own listeners
    but shareable: each daemon that binds the same address and port gets a queue of its
    own, and the kernel spreads new connections over them. ``::`` takes IPv4 too."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, host != "::")
                await sock.bind(address)
                sock.listen(BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def listen_host_problem(host: str) -> str | None:
    """Why this machine could not listen on ``host`` (any port), if it could not: for
    --check-config, which must not take the daemon's own port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        return str(listen_error(host, None, exc))
    return None


def listen_error(
    host: str, port: int | None, exc: OSError, *, setting: str = "WS_HOST"
) -> ListenError:
    """Why WS_HOST:WS_PORT (or WS_HOST on any port: ``port`` None) could not be listened
    on, and whether a restart may help: an address in use may be freed by a process still
    exiting; a host name that does not resolve, an address this machine does not have, or
    a port it may not use stays so."""
    where = host if port is None else host_port(host, port)
    if isinstance(exc, socket.gaierror):
        return ListenError(f"cannot listen on {where}: {setting} does not resolve", lasting=True)
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    lasting = exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM, errno.EAFNOSUPPORT)
    return ListenError(f"cannot listen on {where}: {reason}", lasting=lasting)


async def listen_dual_stack(host: str, port: int) -> trio.SocketListener:
    """An IPv6 listener that takes IPv4 connections too (as IPv4-mapped addresses): for
    WS_HOST=::, every IPv6 and IPv4 address on one socket, as with the socket unit's
    ListenStream=8081 and the original's Go listener. trio's own IPv6 listeners are
    IPv6-only: IPv4 clients would be refused."""
    sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 0)
        await sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def listener_address(listener: trio.SocketListener) -> str:
    sock = listener.socket
    if sock.family == socket.AF_UNIX:  # socket activation can pass one
        name = sock.getsockname()
        if isinstance(name, bytes):  # abstract: a leading NUL byte, shown as @
            name = "@" + name[1:].decode(errors="replace")
        return f"unix:{name}"
    host, port = sock.getsockname()[:2]
    both = (
        sock.family == socket.AF_INET6
        and host == "::"
        and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    )
    return host_port(host, port) + (" (IPv6 and IPv4)" if both else "")


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
