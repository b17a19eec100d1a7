"""What one per-user SUBSCRIBE round trip costs in process, against the floor of the design.

    python bench/subscribe_roundtrip.py [--n 5000] [--concurrency 1 16] [--repeats 3]
                                        [--no-pin]

Starts its own ``redis-server`` on a free loopback port, pins itself to one CPU (the
daemon's situation in ``bench/run.py``) unless ``--no-pin``, and measures CPU per new
user, in this process, no WebSocket:

``daemon``
    the daemon's own pieces, as ``App.create`` wires them for ``REDIS_SUBSCRIBE=user``:
    ``UserSubscriptions`` (with its ``serve`` task), ``Requests`` and the subscriber
    thread; each of ``--concurrency`` tasks calls ``on_user_connected`` for a new user and
    waits for Redis's confirmation, as a handshake does.
``floor``
    the least a thread round trip can be on this stack: the event loop writes a byte on a
    pipe, a thread polling it writes ``SUBSCRIBE`` on a plain socket, reads the reply
    and hands it back with ``run_sync_soon``; one at a time.
``work alone``, ``work + daemon``
    one user at a time amid handshake-like Python work (600 µs before, 150 after, then a
    0.2 ms pause in which the loop idles, as between a client's handshakes), without and
    with the daemon's round trip: what the round trip costs inside a handshake.

Prints CPU per user (process, and the event-loop thread alone) and SUBSCRIBE commands per
user. Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import threading
import time
from pathlib import Path

import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import run  # noqa: E402
from connect_cost import figures, print_medians  # noqa: E402

from smap_notify.app import App  # noqa: E402
from smap_notify.config import load_config  # noqa: E402
from smap_notify.hub import Inbox  # noqa: E402


def python_work(us: float) -> None:
    """About ``us`` µs of CPU of the kind a handshake does (small dicts and JSON)."""
    end = time.thread_time() + us / 1e6
    x = 0
    while time.thread_time() < end:
        json.dumps({"a": str(x), "b": [x, x + 1], "c": {"d": x}})
        x += 1


async def daemon(
    redis_port: int, n: int, concurrency: int, among: bool = False, subscribe: bool = True
) -> dict[str, float]:
    """``among``: one at a time, each user between 600 and 150 µs of other Python work and
    followed by a 0.2 ms pause (the loop idles, as between a client's handshakes);
    ``subscribe=False``: the same without the subscription (a turn of the loop instead)."""
    config = load_config(
        {
            "REDIS_HOST": f"127.0.0.1:{redis_port}",
            "REDIS_SUBSCRIBE": "user",
            "JWT_SECRET_KEY": "bench-" + "x" * 40,
            "ENV": "dev",
            "LOGGER_LEVEL": "warn",
        }
    )
    app = App.create(config)
    subs = app.user_subscriptions
    assert subs is not None
    inbox = Inbox(64)  # type: ignore[var-annotated]
    users = iter(range(10**9))
    tag = os.urandom(4).hex()  # users new to Redis too, whatever ran before

    async def lane(count: int) -> None:
        for _ in range(count):
            if among:
                python_work(600)
            if subscribe:
                ready = subs.on_user_connected(f"rt-{tag}-{next(users)}")
                if ready is not None:
                    await ready.wait()
            else:
                await trio.lowlevel.checkpoint()
            if among:
                python_work(150)
                await trio.sleep(0.0002)

    async with trio.open_nursery() as nursery:
        await nursery.start(app.hub.serve, inbox)
        await nursery.start(subs.serve)
        await nursery.start(app._subscriber(inbox))
        with trio.fail_after(10):
            while not app.subscriber.active:
                await trio.sleep(0.01)
        async with trio.open_nursery() as warm:  # first-use costs not counted
            for _ in range(8):
                warm.start_soon(lane, 20)
        commands = app.counters.redis_subscribe_commands
        cpu, loop = time.process_time(), time.thread_time()
        async with trio.open_nursery() as lanes:
            for _ in range(concurrency):
                lanes.start_soon(lane, n // concurrency)
        cpu, loop = time.process_time() - cpu, time.thread_time() - loop
        commands = app.counters.redis_subscribe_commands - commands
        nursery.cancel_scope.cancel()
    done = n // concurrency * concurrency
    return {
        "cpu_us": 1e6 * cpu / done,
        "loop_us": 1e6 * loop / done,
        "subscribes": commands / done,
    }


async def floor(redis_port: int, n: int) -> dict[str, float]:
    token = trio.lowlevel.current_trio_token()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    sock = socket.create_connection(("127.0.0.1", redis_port))
    waiting: list[trio.Event] = []

    def confirmed() -> None:
        waiting.pop().set()

    def thread() -> None:
        poll = select.poll()
        poll.register(wake_r, select.POLLIN)
        poll.register(sock.fileno(), select.POLLIN)
        sent = 0
        while True:
            for fd, _ in poll.poll(1000):
                if fd == wake_r:
                    if os.read(wake_r, 64) == b"q":
                        return
                    sent += 1
                    name = f"rt-floor-{sent}".encode()
                    sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(name), name))
                else:
                    sock.recv(65536)
                    token.run_sync_soon(confirmed)

    worker = threading.Thread(target=thread)
    worker.start()
    try:
        cpu, loop = time.process_time(), time.thread_time()
        for _ in range(n):
            event = trio.Event()
            waiting.append(event)
            os.write(wake_w, b"!")
            await event.wait()
        cpu, loop = time.process_time() - cpu, time.thread_time() - loop
    finally:
        os.write(wake_w, b"q")
        worker.join()
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
    return {"cpu_us": 1e6 * cpu / n, "loop_us": 1e6 * loop / n, "subscribes": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    run.OUT.mkdir(exist_ok=True)
    server_cpus, others = run.split_cpus(not args.no_pin)
    if others:
        os.sched_setaffinity(0, others)  # redis-server inherits the other CPUs
    redis = run.Redis()
    if server_cpus:
        os.sched_setaffinity(0, server_cpus)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for rep in range(args.repeats):
            cases = [("floor, one at a time", lambda: floor(redis.port, args.n))]
            cases += [
                (f"daemon, {c} at a time", lambda c=c: daemon(redis.port, args.n, c))
                for c in args.concurrency
            ]
            cases += [
                ("work alone", lambda: daemon(redis.port, args.n // 2, 1, True, False)),
                ("work + daemon", lambda: daemon(redis.port, args.n // 2, 1, True)),
            ]
            for label, case in cases:
                res = trio.run(case)
                results.setdefault(label, []).append(res)
                print(f"{label:>20} rep {rep}: {figures(res)}", flush=True)
    finally:
        redis.stop()
    print_medians(results)


if __name__ == "__main__":
    main()
