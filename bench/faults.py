"""Redis faults against a running daemon: how soon each is detected and how soon delivery
recovers, against the contract's targets (detected within 5 s, delivery back within 2 s
of Redis answering again).

    .venv/bin/python bench/faults.py                        # every fault, 5 times, ~5 min
    .venv/bin/python bench/faults.py --faults pause_resume --repeats 10
    .venv/bin/python bench/faults.py --write                # also write bench/RESULTS.rst

Starts its own redis-server on a free loopback port and ``python -m smap_notify`` against
it; one WebSocket client receives numbered notifications published every 10 ms while the
fault happens, each fault in a subscription that has lasted longer than FLAP_WITHIN (10 s;
``--gap``): a subscription lost sooner is a flap, and the wait before the next attempt
grows with each one, up to FLAP_CAP (5 s), on purpose. /health and /metrics are polled
every 20 ms. Per run:

- detected (503): fault -> the first /health answer 503 with the subscriber inactive;
- detected (inactive): fault -> the first /metrics with ``smap_notify_subscriber_active 0``;
- subscribed: Redis answering again -> the first /metrics with the subscriber active;
- delivered: Redis answering again -> the first notification published after that moment
  arriving at the client (so it includes up to one publishing interval).

"Subscribed" is the first /metrics with the subscriber active and its reconnect count up
(for ``down_at_start``, active at all). Each figure ends when the answer that showed it
arrived, so it errs long by up to the polling interval plus the request.

The faults, each outage held for 1 s after both detections were seen: ``kill_restart``
(SIGKILL, then a new redis-server on the same port), ``pause_resume`` (SIGSTOP, then
SIGCONT), ``cut_connection`` (CLIENT KILL of the daemon's subscription: Redis never stops
answering, so "back" is when the kill returned, and a poll may not see it down),
``down_at_start`` (a new daemon starts without Redis; detection counts from the client's
connection). Every process started here is stopped by its PID. Raw figures and the
daemon's log go to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import attrs
import trio

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
from run import stop_pid  # noqa: E402  (bench/run.py)

from smap_notify.outage import FLAP_WITHIN  # noqa: E402
from tests.support.daemon import (  # noqa: E402
    DaemonProcess,
    daemon_env,
    http_request,
    wait_for_port,
)
from tests.support.observe import Flow, Inbox  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402
from tests.support.ws import open_ws  # noqa: E402

FAULTS: Final = ("kill_restart", "pause_resume", "cut_connection", "down_at_start")
DETECT_TARGET: Final = 5.0  # the contract: a dead or wedged subscription noticed within
RECOVER_TARGET: Final = 2.0  # the contract: delivery back within, once Redis answers
POLL_EVERY: Final = 0.02
PUBLISH_EVERY: Final = 0.01
HOLD: Final = 1.0  # how long an outage lasts after it was detected
GIVE_UP: Final = 30.0  # a run that takes longer than this fails
OUT: Final = BENCH / "out"
SECTION_START: Final = ".. redis-faults: start"
SECTION_END: Final = ".. redis-faults: end"
ACTIVE = re.compile(rb"^smap_notify_subscriber_active (\S+)$", re.MULTILINE)
RECONNECTS = re.compile(rb"^smap_notify_redis_reconnects_total (\S+)$", re.MULTILINE)


@attrs.define
class Watch:
    """What the daemon said over time: (answer arrived, 503 with the subscriber inactive)
    from /health and (answer arrived, subscriber active, reconnects so far) from /metrics."""

    port: int
    health: list[tuple[float, bool]] = attrs.Factory(list)
    active: list[tuple[float, bool, int]] = attrs.Factory(list)

    async def poll_health(self) -> None:
        while True:
            try:
                status, _, body = await http_request(self.port, "/health")
                down = status == 503 and not json.loads(body)["subscriber"]["active"]
                self.health.append((trio.current_time(), down))
            except (OSError, trio.BrokenResourceError):
                pass
            await trio.sleep(POLL_EVERY)

    async def poll_metrics(self) -> None:
        while True:
            try:
                _, _, body = await http_request(self.port, "/metrics")
                active, reconnects = ACTIVE.search(body), RECONNECTS.search(body)
                if active and reconnects:
                    self.active.append(
                        (
                            trio.current_time(),
                            float(active.group(1)) == 1,
                            int(float(reconnects.group(1))),
                        )
                    )
            except (OSError, trio.BrokenResourceError):
                pass
            await trio.sleep(POLL_EVERY)

    def first_health_down(self, since: float) -> float | None:
        return next((t for t, down in self.health if down and t >= since), None)

    def first_active(self, since: float, value: bool) -> float | None:
        return next((t for t, active, _ in self.active if active == value and t >= since), None)

    def reconnects(self) -> int:
        return self.active[-1][2] if self.active else 0

    def first_resubscribed(self, since: float, reconnects: int) -> float | None:
        """When the subscriber was seen subscribed again: active, with more reconnects
        than ``reconnects`` (a first subscription is not a reconnect)."""
        return next(
            (
                t
                for t, active, n in self.active
                if active and t >= since and (n > reconnects or n == reconnects == 0)
            ),
            None,
        )


def start_daemon(redis_server: RedisServer, name: str, **settings: str) -> DaemonProcess:
    """``python -m smap_notify`` against ``redis_server``, its log in bench/out/NAME.log."""
    env = daemon_env(redis_server, **settings)
    log_path = OUT / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smap_notify"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    port = int(env["WS_PORT"])
    try:
        wait_for_port(port, proc)
    except RuntimeError:
        proc.kill()
        proc.wait(10)
        raise
    return DaemonProcess(proc, port, log_path)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(GIVE_UP):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise TimeoutError(f"{what}: not within {GIVE_UP:.0f} s")


def ping(redis_server: RedisServer) -> None:
    while True:
        try:
            with redis_server.client() as client:
                client.ping()
            return
        except Exception:
            time.sleep(0.005)


async def one_run(fault: str, redis_server: RedisServer, daemon: DaemonProcess) -> dict[str, float]:
    """One fault while notifications flow; the figures of the run, in seconds."""
    inbox = Inbox()
    watch = Watch(daemon.port)
    flow = Flow(redis_server.port, "bench", interval=PUBLISH_EVERY)
    async with trio.open_nursery() as tasks:
        ws = await open_ws(tasks, daemon.port, "bench")
        tasks.start_soon(inbox.collect, ws)
        tasks.start_soon(watch.poll_health)
        tasks.start_soon(watch.poll_metrics)
        if fault == "down_at_start":
            t_fault = trio.current_time()  # the daemon is listening, Redis is not there
            reconnects = 0
        else:
            tasks.start_soon(flow.run)
            await wait_for(lambda: len(inbox.data()) >= 20, "delivery before the fault")
            await wait_for(lambda: bool(watch.active), "/metrics")
            reconnects = watch.reconnects()
            t_fault = trio.current_time()
            if fault == "kill_restart":
                await trio.to_thread.run_sync(redis_server.kill)
            elif fault == "pause_resume":
                redis_server.pause()
            else:
                with redis_server.client() as client:
                    killed = await trio.to_thread.run_sync(
                        lambda: client.client_kill_filter(_type="pubsub")
                    )
                if killed != 1:
                    raise RuntimeError(f"CLIENT KILL cut {killed} subscriptions, not 1")
        if fault == "cut_connection":
            t_back = trio.current_time()
        else:
            await wait_for(
                lambda: (
                    watch.first_health_down(t_fault) is not None
                    and watch.first_active(t_fault, False) is not None
                ),
                "detection",
            )
            await trio.sleep(HOLD)
            if fault == "pause_resume":
                redis_server.resume()
                await trio.to_thread.run_sync(ping, redis_server)
            else:
                await trio.to_thread.run_sync(redis_server.start)  # returns once PING answers
            t_back = trio.current_time()
            if fault == "down_at_start":
                tasks.start_soon(flow.run)

        def delivered_after_back() -> float | None:
            first = flow.first_started_after(t_back)
            if first is None:
                return None
            return next((t for t, seq in inbox.data() if seq >= first), None)

        await wait_for(
            lambda: watch.first_resubscribed(t_back, reconnects) is not None, "subscribed"
        )
        await wait_for(lambda: delivered_after_back() is not None, "delivery")
        await wait_for(
            lambda: any(not down and t > t_back for t, down in watch.health), "/health not down"
        )
        tasks.cancel_scope.cancel()
    seqs = [seq for _, seq in inbox.data()]
    if seqs != sorted(set(seqs)):
        raise RuntimeError("notifications out of order or twice")
    subscribed = watch.first_resubscribed(t_back, reconnects)
    delivered = delivered_after_back()
    assert subscribed is not None and delivered is not None
    figures = {"subscribed": subscribed - t_back, "delivered": delivered - t_back}
    # A cut connection may be back before a poll saw it down: then there is no figure.
    if (down := watch.first_health_down(t_fault)) is not None and down <= subscribed:
        figures["detected_503"] = down - t_fault
    if (inactive := watch.first_active(t_fault, False)) is not None and inactive <= subscribed:
        figures["detected_inactive"] = inactive - t_fault
    return figures


async def run_fault(fault: str, repeats: int, gap: float, workdir: Path) -> list[dict[str, float]]:
    runs: list[dict[str, float]] = []
    redis_server = RedisServer(workdir)
    try:
        if fault == "down_at_start":
            for n in range(repeats):
                daemon = await trio.to_thread.run_sync(
                    start_daemon, redis_server, f"faults-{fault}-{n}"
                )
                try:
                    runs.append(await one_run(fault, redis_server, daemon))
                finally:
                    stop_pid(daemon.proc)
                    redis_server.kill()
                print(f"  {fault} {n + 1}/{repeats}: {fmt_run(runs[-1])}", flush=True)
            return runs
        redis_server.start()
        daemon = await trio.to_thread.run_sync(start_daemon, redis_server, f"faults-{fault}")
        try:
            for n in range(repeats):
                await trio.sleep(gap)  # the subscription has lasted this long
                runs.append(await one_run(fault, redis_server, daemon))
                print(f"  {fault} {n + 1}/{repeats}: {fmt_run(runs[-1])}", flush=True)
        finally:
            stop_pid(daemon.proc)
    finally:
        redis_server.kill()
    return runs


def fmt_run(run: dict[str, float]) -> str:
    return " ".join(f"{k}={v * 1000:.0f}ms" for k, v in sorted(run.items()))


FIGURES: Final = (
    ("detected_503", "fault -> /health 503", DETECT_TARGET),
    ("detected_inactive", "fault -> subscriber inactive", DETECT_TARGET),
    ("subscribed", "Redis back -> subscribed again", RECOVER_TARGET),
    ("delivered", "Redis back -> first new message", RECOVER_TARGET),
)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:,.0f} ms"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    rows: list[tuple[str, ...]] = [("fault", "figure", "runs", "p50", "max", "target", "met")]
    for fault, runs in results.items():
        for key, label, target in FIGURES:
            values = [run[key] for run in runs if key in run]
            if not values:
                rows.append((fault, label, f"0/{len(runs)}", "-", "-", f"{target:g} s", "-"))
                continue
            met = "yes" if max(values) <= target else "NO"
            rows.append(
                (
                    fault,
                    label,
                    f"{len(values)}/{len(runs)}",
                    ms(statistics.median(values)),
                    ms(max(values)),
                    f"{target:g} s",
                    met,
                )
            )
    return rst_table(rows)


def rst_table(rows: list[tuple[str, ...]]) -> str:
    """A simple RST table; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths, strict=True)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows[1:]]
    lines.append(rule)
    return "\n".join(line.rstrip() for line in lines)


def write_section(text: str, start_marker: str, end_marker: str) -> Path:
    """Put ``text`` (a section from ``start_marker`` to ``end_marker``) into RESULTS.rst
    in place of the last one, or at its end."""
    path = BENCH / "RESULTS.rst"
    old = path.read_text()
    start, end = old.find(start_marker), old.find(end_marker)
    if 0 <= start < end:
        new = old[:start] + text + old[end + len(end_marker) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)
    return path


def shown_command(script: str) -> str:
    """This run's command line for RESULTS.rst, without the --conditions sentence (the
    section gives it)."""
    argv = list(sys.argv[1:])
    if "--conditions" in argv:
        at = argv.index("--conditions")
        del argv[at : at + 2]
    argv = [a for a in argv if not a.startswith("--conditions=")]
    return " ".join(["python", f"bench/{script}", *map(shlex.quote, argv)])


def section(args: argparse.Namespace, when: str, table_text: str) -> str:
    load = os.getloadavg()
    command = shown_command("faults.py")
    return "\n".join(
        [
            SECTION_START,
            "",
            "Redis faults: detection and recovery",
            "------------------------------------",
            "",
            f"``{command}`` on {when}: {args.repeats} run(s) of each fault against"
            f" ``python -m smap_notify`` and its own redis-server, one client receiving a"
            f" notification every {PUBLISH_EVERY * 1000:.0f} ms; /health and /metrics polled"
            f" every {POLL_EVERY * 1000:.0f} ms; {args.gap:g} s of steady subscription before"
            f" each fault (``bench/README.rst`` says what each figure covers). {os.cpu_count()} CPUs, nothing pinned; load average at the end"
            f" {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. {args.conditions}",
            "",
            table_text,
            "",
            SECTION_END,
        ]
    )


async def main_async(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="faults-") as workdir:
        for fault in args.faults:
            print(f"{fault}: {args.repeats} run(s)", flush=True)
            results[fault] = await run_fault(fault, args.repeats, args.gap, Path(workdir))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--gap",
        type=float,
        default=FLAP_WITHIN + 1,
        help="seconds between a recovery and the next fault (default: enough that the"
        " next loss is not a flap, whose reconnect waits longer on purpose)",
    )
    parser.add_argument("--write", action="store_true", help="write bench/RESULTS.rst")
    parser.add_argument(
        "--conditions", default="", help="a sentence on the machine, for RESULTS.rst"
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = trio.run(main_async, args)
    raw = OUT / f"faults-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    raw.write_text(json.dumps({"when": when, "results": results}, indent=1))
    table_text = table(results)
    print(table_text)
    print(f"raw figures: {raw.relative_to(REPO)}")
    if args.write:
        print(
            f"written: {write_section(section(args, when, table_text), SECTION_START, SECTION_END).relative_to(REPO)}"
        )


if __name__ == "__main__":
    main()
