"""Delivery to a connected client while hostile clients hammer the daemon: the delay they
add, how soon new clients get through, and when slowloris connections are cut.

    .venv/bin/python bench/hostile.py               # 3 rounds, ~1 min
    .venv/bin/python bench/hostile.py --rounds 5 --write

Starts its own redis-server and ``python -m smap_notify`` (WS_HANDSHAKE_TIMEOUT=1.5s,
HTTP_MAX_HEADER_SIZE=4096, WS_MAX_CONNECTIONS_PER_USER=2) on free loopback ports and
stops them by PID. A reader receives a notification published every 20 ms throughout.
Each round is 3 s quiet, then an attack: 20 slowloris connections sending one byte of
their request head a second, and once they are all open 10 oversized heads (431), 10
upgrades over the per-user cap (429) and 10 new clients, each connecting and then
receiving a message of its own (published every 50 ms until one arrives). Reported: the
reader's latency (publish started -> frame arrived) in the quiet phases and during the
attacks (from the first slowloris until the last is cut), a new client's time from
connecting to its first message, and each slowloris connection's life.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import trio

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
from faults import (  # noqa: E402  (bench/faults.py)
    OUT,
    ms,
    rst_table,
    shown_command,
    start_daemon,
    write_section,
)
from run import stop_pid  # noqa: E402  (bench/run.py)

from tests.support.observe import Flow, Inbox  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402
from tests.support.ws import open_ws, slowloris, upgrade_head  # noqa: E402

HANDSHAKE_TIMEOUT: Final = 1.5
QUIET: Final = 3.0
SLOWLORIS: Final = 20
OTHERS: Final = 10
SECTION_START: Final = ".. hostile-clients: start"
SECTION_END: Final = ".. hostile-clients: end"


async def refused(port: int, extra: str, user: str, statuses: list[int]) -> None:
    """An upgrade the daemon must refuse; its status goes to ``statuses``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(upgrade_head(port, user, extra=extra))
    data = b""
    with trio.fail_after(30):
        while b"\r\n" not in data and (chunk := await stream.receive_some()):
            data += chunk
    await stream.aclose()
    statuses.append(int(data.split()[1]))


async def timed_slowloris(
    port: int, lives: list[float], opened: list[None], all_open: trio.Event
) -> None:
    """A slowloris connection; how long it lived."""
    started: list[float] = []

    def connected() -> None:
        started.append(trio.current_time())
        opened.append(None)
        if len(opened) == SLOWLORIS:
            all_open.set()

    await slowloris(port, "reader", connected)
    lives.append(trio.current_time() - started[0])


async def new_client(port: int, redis_server: RedisServer, user: str, took: list[float]) -> None:
    """Connect and wait for a message of one's own; from connecting to the message."""
    t0 = trio.current_time()
    message = json.dumps({"type": "notification", "payload": {"seq": 0}})
    async with trio.open_nursery() as own:
        ws = await open_ws(own, port, user)
        with trio.fail_after(30):
            while True:
                await trio.to_thread.run_sync(redis_server.publish_to, f"user_noti:{user}", message)
                with trio.move_on_after(0.05):
                    await ws.get_message()
                    break
        took.append(trio.current_time() - t0)
        await ws.aclose()


async def attack(port: int, redis_server: RedisServer, figures: dict[str, list[float]]) -> None:
    statuses: list[int] = []
    opened: list[None] = []
    all_open = trio.Event()
    pad = "X-Pad: " + "b" * 8000 + "\r\n"
    async with trio.open_nursery() as hostile:
        for _ in range(SLOWLORIS):
            hostile.start_soon(timed_slowloris, port, figures["slowloris"], opened, all_open)
        await all_open.wait()
        for i in range(OTHERS):
            hostile.start_soon(refused, port, pad, "x", statuses)
            hostile.start_soon(refused, port, "", "greedy", statuses)
            hostile.start_soon(new_client, port, redis_server, f"new{i}", figures["new_client"])
    if sorted(statuses) != [429] * OTHERS + [431] * OTHERS:
        raise RuntimeError(f"refused with {sorted(statuses)}")


async def measure(rounds: int, workdir: Path) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"quiet": [], "attack": [], "slowloris": [], "new_client": []}
    with RedisServer(workdir) as redis_server:
        daemon = await trio.to_thread.run_sync(
            lambda: start_daemon(
                redis_server,
                "hostile",
                WS_HANDSHAKE_TIMEOUT=f"{HANDSHAKE_TIMEOUT}s",
                HTTP_MAX_HEADER_SIZE="4096",
                WS_MAX_CONNECTIONS_PER_USER="2",
            )
        )
        try:
            inbox = Inbox()
            flow = Flow(redis_server.port, "reader")
            phases: list[tuple[str, float, float]] = []
            async with trio.open_nursery() as tasks:
                reader = await open_ws(tasks, daemon.port, "reader")
                for _ in range(2):
                    await open_ws(tasks, daemon.port, "greedy")  # at its cap
                tasks.start_soon(inbox.collect, reader)
                tasks.start_soon(flow.run)
                for n in range(rounds):
                    t0 = trio.current_time()
                    await trio.sleep(QUIET)
                    phases.append(("quiet", t0, trio.current_time()))
                    t0 = trio.current_time()
                    await attack(daemon.port, redis_server, figures)
                    phases.append(("attack", t0, trio.current_time()))
                    print(f"  round {n + 1}/{rounds} done", flush=True)
                last = flow.published[-1].seq
                with trio.fail_after(30):
                    while not inbox.data() or inbox.data()[-1][1] < last:
                        await trio.sleep(0.01)
                tasks.cancel_scope.cancel()
        finally:
            stop_pid(daemon.proc)
    seqs = [seq for _, seq in inbox.data()]
    if seqs != list(range(1, len(seqs) + 1)):
        raise RuntimeError("the reader missed notifications or got them out of order")
    started = {p.seq: p.started for p in flow.published}
    for arrived, seq in inbox.data():
        phase = next((name for name, t0, t1 in phases if t0 <= started[seq] < t1), None)
        if phase is not None:
            figures[phase].append(arrived - started[seq])
    return figures


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(figures: dict[str, list[float]]) -> str:
    labels = {
        "quiet": "reader's latency, quiet",
        "attack": "reader's latency, under attack",
        "new_client": "new client: connect -> first message",
        "slowloris": f"slowloris life (handshake timeout {HANDSHAKE_TIMEOUT:g} s)",
    }
    rows: list[tuple[str, ...]] = [("figure", "count", "p50", "p99", "max")]
    for key, label in labels.items():
        values = figures[key]
        rows.append(
            (
                label,
                f"{len(values):,}",
                ms(statistics.median(values)),
                ms(quantile(values, 0.99)),
                ms(max(values)),
            )
        )
    return rst_table(rows)


def section(args: argparse.Namespace, when: str, table_text: str) -> str:
    command = shown_command("hostile.py")
    return "\n".join(
        [
            SECTION_START,
            "",
            "Hostile clients: delivery to the others",
            "---------------------------------------",
            "",
            f"``{command}`` on {when}: {args.rounds} rounds of 3 s quiet, then an attack"
            ' (``bench/README.rst``, "Hostile clients"). Bounds to compare with: 250 ms'
            " for each of the reader's notifications, 1 s for a new client's first message."
            f" {args.conditions}",
            "",
            table_text,
            "",
            SECTION_END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.rst")
    parser.add_argument(
        "--conditions", default="", help="a sentence on the machine, for RESULTS.rst"
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="hostile-") as workdir:
        figures = trio.run(measure, args.rounds, Path(workdir))
    raw = OUT / f"hostile-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    raw.write_text(json.dumps({"when": when, "figures": figures}, indent=1))
    table_text = table(figures)
    print(table_text)
    print(f"raw figures: {raw.relative_to(REPO)}")
    if args.write:
        path = write_section(section(args, when, table_text), SECTION_START, SECTION_END)
        print(f"written: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
