"""A client run inside another network namespace (``nsenter -n``) by the real-systemd tests.

    python netprobe.py health PORT                    -> STATUS BODY
    python netprobe.py receive PORT TOKEN ORIGIN N    -> the first N text frames, one a line
    python netprobe.py hammer PORT SECONDS            -> JSON: requests, answered, refused,
                                                         other (and a count of each kind)

Standard library and ``websockets`` only: it runs with the host's venv and files.
"""

from __future__ import annotations

import http.client
import json
import sys
import time

from websockets.sync.client import connect


def health(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def receive(port: int, token: str, origin: str, count: int) -> list[str]:
    with connect(
        f"ws://127.0.0.1:{port}/ws",
        additional_headers={"Cookie": f"smap_auth_token={token}"},
        origin=origin,  # type: ignore[arg-type]
        open_timeout=10,
    ) as ws:
        print("open", flush=True)  # the caller may publish now
        return [str(ws.recv(timeout=20)) for _ in range(count)]


def hammer(port: int, seconds: float) -> dict[str, int]:
    """GET /health back to back for ``seconds``: how many were answered, refused, or else."""
    counts = {"requests": 0, "answered": 0, "refused": 0, "other": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        counts["requests"] += 1
        try:
            health(port)
            counts["answered"] += 1
        except ConnectionRefusedError:
            counts["refused"] += 1
        except (OSError, http.client.HTTPException) as exc:
            counts["other"] += 1
            kind = f"{type(exc).__name__}: {exc}"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def main(argv: list[str]) -> None:
    command, port = argv[0], int(argv[1])
    if command == "health":
        status, body = health(port)
        print(status, body)
    elif command == "receive":
        for frame in receive(port, argv[2], argv[3], int(argv[4])):
            print(frame, flush=True)
    elif command == "hammer":
        print(json.dumps(hammer(port, float(argv[2]))))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
