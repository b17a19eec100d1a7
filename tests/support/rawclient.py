"""Raw, blocking WebSocket clients and a process's memory, for tests and bench scripts
that need a client's every byte under their control (how much it reads, and when)."""

from __future__ import annotations

import base64
import os
import selectors
import socket
import time
from pathlib import Path


def status_kb(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in KB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_tab(port: int, token: str, rcvbuf: int = 0) -> socket.socket:
    """A raw WebSocket client with ``token``, upgraded (the 101 read), blocking."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://localhost:3000\r\nCookie: smap_auth_token={token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # one byte at a time: nothing after the head is consumed
        if not chunk:
            raise RuntimeError(f"closed during the handshake: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"not upgraded: {head[:200]!r}")
    return sock


def read_all(tabs: list[socket.socket], size: int, timeout: float = 120) -> None:
    """Read until every tab has ``size`` bytes, or fail."""
    got = dict.fromkeys(tabs, 0)
    with selectors.DefaultSelector() as sel:
        for tab in tabs:
            sel.register(tab, selectors.EVENT_READ, tab)
        deadline = time.monotonic() + timeout
        while any(n < size for n in got.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"tabs still short: {sorted(got.values())[:5]}")
            for key, _ in sel.select(1):
                tab = key.data
                data = tab.recv(1 << 20)
                if not data:
                    raise RuntimeError("a tab was closed")
                got[tab] += len(data)


def wait_settled(pid: int, seconds: float = 1.0, timeout: float = 30) -> int:
    """VmRSS once it has not moved by more than 1 MB for ``seconds``."""
    deadline = time.monotonic() + timeout
    last = status_kb(pid, "VmRSS")
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = status_kb(pid, "VmRSS")
        if abs(now - last) > 1024:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return now
    return status_kb(pid, "VmRSS")
