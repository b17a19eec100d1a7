"""Peak and settled RSS of the daemon for one large message to many tabs of one user.

    .venv/bin/python bench/large_message.py                    # 10 MB to 100 reading tabs
    .venv/bin/python bench/large_message.py --stalled          # tabs that never read
    .venv/bin/python bench/large_message.py --size 1 --tabs 10

Starts its own redis-server and ``python -m smap_notify`` on free loopback ports, opens
the tabs as raw WebSocket clients, publishes one message of ``--size`` MB and samples the
daemon's ``/proc/<pid>/status``: VmRSS before, VmHWM (the peak), VmRSS once every tab has
the message (or, stalled, once the daemon is idle again), and VmRSS after the tabs left.
Both processes are stopped by PID. ``--source DIR`` runs the daemon from another checkout
(``git archive`` of an older commit) to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from run import free_port, stop_pid  # noqa: E402  (bench/run.py)

from tests.support.rawclient import open_tab, read_all, status_kb, wait_settled  # noqa: E402

SECRET = "bench-secret-with-enough-bytes-for-hs256-0"
MB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=float, default=10, help="message size, MB")
    parser.add_argument("--tabs", type=int, default=100)
    parser.add_argument("--stalled", action="store_true", help="tabs that never read")
    parser.add_argument("--source", type=Path, default=REPO, help="checkout to run")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="large-message-"))
    redis_port, port = free_port(), free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on the PATH")
    redis_proc = subprocess.Popen(
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(args.source),
        "JWT_SECRET_KEY": SECRET,
        "ENV": "dev",
        "WS_HOST": "127.0.0.1",
        "WS_PORT": str(port),
        "REDIS_HOST": f"127.0.0.1:{redis_port}",
        "WS_MAX_CONNECTIONS_PER_USER": str(args.tabs),
        "LOGGER_LEVEL": "warning",
    }
    log = (workdir / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "smap_notify"], env=env, stdout=log, stderr=log, cwd=args.source
    )
    tabs: list[socket.socket] = []
    try:
        client = redis.Redis(port=redis_port)
        deadline = time.monotonic() + 20
        while not client.pubsub_numpat():
            if time.monotonic() > deadline or daemon.poll() is not None:
                sys.exit(f"daemon did not subscribe; log in {workdir}")
            time.sleep(0.05)
        token = jwt.encode({"sub": "big", "exp": int(time.time()) + 3600}, SECRET)
        tabs = [open_tab(port, token) for _ in range(args.tabs)]
        baseline = wait_settled(daemon.pid)
        size = int(args.size * MB)
        message = json.dumps({"type": "bulk", "payload": "x" * size})
        client.publish("user_noti:big", message)
        if args.stalled:
            delivered = wait_settled(daemon.pid, seconds=2)
        else:
            read_all(tabs, size)
            delivered = wait_settled(daemon.pid)
        peak = status_kb(daemon.pid, "VmHWM")
        for tab in tabs:
            tab.close()
        tabs = []
        left = wait_settled(daemon.pid, seconds=2)
        result = {
            "size_mb": args.size,
            "tabs": args.tabs,
            "stalled": args.stalled,
            "baseline_mb": round(baseline / 1024, 1),
            "peak_mb": round(peak / 1024, 1),
            "delivered_mb": round(delivered / 1024, 1),
            "after_tabs_left_mb": round(left / 1024, 1),
        }
        print(json.dumps(result))
    finally:
        for tab in tabs:
            tab.close()
        stop_pid(daemon)
        stop_pid(redis_proc)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
