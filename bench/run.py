"""Run the whole smap-notify benchmark (issue 4) and print the results table.

    python bench/run.py [--quick] [--repeats N] [--scenarios idle throughput latency fanout
                        idle-latency] [--idle-servers smap-notify node-ws]
                        [--servers smap-notify asyncio-baseline] [--client native|python]
                        [--no-pin] [--write]

Starts its own ``redis-server`` on a free loopback port, then for every scenario starts
smap-notify and the asyncio baseline (``bench/asyncio_relay.py``) afresh, interleaved
A, B, A, B ... ``--repeats`` times, drives each with ``bench/loadgen.py`` (separate
processes; the native client ``bench/wsclient.c`` unless ``--client python``), and reports
the median of each figure, the ratio smap-notify / baseline and the issue's targets. Each
server runs on a CPU of its own, redis-server and the load generator on the others, unless
``--no-pin``. ``--write`` also writes the table to ``bench/RESULTS.rst``; raw figures of
every run go to ``bench/out/`` (not committed). Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402

SCENARIOS = ["idle", "throughput", "latency", "fanout"]
# Not in the default set: about 7 minutes, and it needs Node.js (issue 21).
IDLE_LATENCY = "idle-latency"
# Not in the default set either (issue 19): W instances on one port; quick about 1.5 minutes.
SCALE = "scale"
SMAP = "smap-notify"
BASE = "asyncio-baseline"
NODE = "node-ws"
NODE_SOURCE = REPO.parent / "shared" / "peers" / "node-ws"
IDLE_LEVELS = (0, 8000, 16000)
IDLE_LEVELS_QUICK = (0, 2000, 4000)
# RESULTS.rst keeps the idle-latency section between these lines across --write runs.
SECTION_START = ".. idle-latency: start"
SECTION_END = ".. idle-latency: end"
# ... and the scale section (issue 19) between these.
SCALE_START = ".. scale: start"
SCALE_END = ".. scale: end"
KEPT_SECTIONS = ((SECTION_START, SECTION_END), (SCALE_START, SCALE_END))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
    """SIGTERM the process we started, SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return f"had exited ({proc.returncode})"
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
        return f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return f"killed after {timeout:.0f}s"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Redis:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.port = free_port()
        # Without a pubsub output-buffer limit: the throughput scenario publishes faster than
        # any relay delivers, and Redis must not disconnect the subscriber for being behind.
        self.cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.cmd += ["--appendonly", "no", "--client-output-buffer-limit", "pubsub 0 0 0"]
        self.log = open(OUT / "redis.log", "wb")  # noqa: SIM115
        self.proc = self._start()
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        self.version = out.split("v=")[1].split()[0] if "v=" in out else out.strip()

    def _start(self) -> subprocess.Popen[bytes]:
        """Start redis-server; returns once it answers PING (checked every 2 ms)."""
        proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return proc
            except OSError:
                time.sleep(0.002)
        stop_pid(proc, 5)
        self.log.close()
        raise SystemExit(f"redis-server did not start:\n{tail(OUT / 'redis.log')}")

    def restart(self, down: float = 0.0) -> tuple[float, float]:
        """SIGKILL our redis-server (by PID) and start it again on the same port ``down``
        seconds later; returns (time.monotonic() of the kill, of the first PONG from the
        new one)."""
        killed = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        time.sleep(down)
        self.proc = self._start()
        return killed, time.monotonic()

    def stop(self) -> None:
        stop_pid(self.proc, 5)
        self.log.close()


class ServerFailed(Exception):
    pass


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    health_port: int | None = None  # where /health answers for this process: port if None
    cwd: Path = REPO  # ``python -m smap_notify`` runs the smap_notify package found here

    def start(self, timeout: float = 30.0, cpus: set[int] | None = None) -> None:
        """Start and wait until healthy; ``cpus``: the CPUs the server may use (all threads)."""
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=pin,  # noqa: PLW1509  # run.py starts no threads
            )
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"exited with status {self.proc.returncode} before serving; log:\n"
                    + tail(self.log)
                )
            try:
                conn = http.client.HTTPConnection(
                    "127.0.0.1", self.health_port or self.port, timeout=2
                )
                conn.request("GET", "/health")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status == 200:
                    return
                last = f"/health answered {resp.status}: {body[:200]!r}"
            except OSError as exc:
                last = f"/health: {exc}"
            time.sleep(0.1)
        status = self.stop()
        raise ServerFailed(
            f"not healthy after {timeout:.0f}s ({last}); {status}; log:\n{tail(self.log)}"
        )

    def stop(self) -> str:
        if self.proc is None:
            return "not started"
        status = stop_pid(self.proc)
        self.proc = None
        return status


def server_for(name: str, redis_port: int, tag: str) -> Server:
    port = free_port()
    env = dict(os.environ)
    env.update(
        JWT_SECRET_KEY=secrets.token_urlsafe(32),
        ENV="dev",
        WS_HOST="127.0.0.1",
        WS_PORT=str(port),
        REDIS_HOST=f"127.0.0.1:{redis_port}",
        LOGGER_LEVEL="warn",
        WS_MAX_CONNECTIONS="20000",
        WS_MAX_CONNECTIONS_PER_USER="200",
    )
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LISTEN_FDS", None)
    if name == SMAP:
        cmd = [sys.executable, "-m", "smap_notify"]
    elif name == NODE:
        cmd = ["node", str(OUT / "node-ws" / "server.js")]
    else:
        cmd = [sys.executable, str(BENCH / "asyncio_relay.py")]
    return Server(name, cmd, env, port, OUT / f"{tag}.log")


def node_ready(source: Path) -> str | None:
    """Copy the Node.js relay into bench/out/ and install its packages once; None when it
    can run, else why not."""
    if not shutil.which("node") or not shutil.which("npm"):
        return "node or npm not found"
    dest = OUT / "node-ws"
    if not (dest / "node_modules").is_dir():
        if not (source / "server.js").is_file():
            return f"no {source / 'server.js'} (--node-ws)"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("node_modules"))
        for path in [dest, *dest.iterdir()]:  # the source may be read-only
            path.chmod(path.stat().st_mode | 0o200)
        r = subprocess.run(
            ["npm", "ci", "--omit=dev"], cwd=dest, capture_output=True, text=True, timeout=600
        )
        if r.returncode:
            return "npm ci failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


def smap_importable() -> str | None:
    r = subprocess.run(
        [sys.executable, "-c", "import smap_notify.app"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or ["import failed"])[-1]


# ---------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------
def dig(run: dict[str, Any], path: str) -> float | None:
    cur: Any = run
    for part in path.split("."):
        if isinstance(cur, list):
            cur = cur[int(part)] if int(part) < len(cur) else None
        elif isinstance(cur, dict):
            cur = cur.get(part)
        else:
            return None
        if cur is None:
            return None
    return float(cur) if isinstance(cur, int | float) else None


def median_of(runs: list[dict[str, Any]], path: str, only_correct: bool = True) -> float | None:
    """Median over the runs (by default only those that passed the correctness checks)."""
    vals = [
        v
        for r in runs
        if (r.get("correct") or not only_correct) and (v := dig(r, path)) is not None
    ]
    return statistics.median(vals) if vals else None


@dataclass
class Row:
    scenario: str
    label: str
    path: str
    fmt: str
    target: str = ""
    check: Callable[[float, float | None], bool] | None = None  # (smap, baseline) -> met


ROWS = [
    Row("idle", "RSS per connection (KB)", "kb_per_conn", "{:.1f}", "<= 20", lambda a, b: a <= 20),
    Row("idle", "connects/s", "connects_per_s", "{:.0f}", ">= 1500", lambda a, b: a >= 1500),
    Row("idle", "server CPU per connect (µs)", "server_cpu_us_per_connect", "{:.0f}"),
    Row(
        "throughput",
        "server CPU per message (µs)",
        "server_cpu_us_per_msg",
        "{:.1f}",
        "<= 36",
        lambda a, b: a <= 36,
    ),
    Row(
        "throughput",
        "messages per server CPU-second",
        "msgs_per_cpu_s",
        "{:.0f}",
        ">= 2.2x baseline",
        lambda a, b: b is not None and a >= 2.2 * b,
    ),
    Row("throughput", "delivered messages/s", "delivered_per_s", "{:.0f}"),
    Row("latency", "2,000 msg/s: p50 (ms)", "runs.0.p50_ms", "{:.2f}"),
    Row("latency", "2,000 msg/s: p90 (ms)", "runs.0.p90_ms", "{:.2f}"),
    Row("latency", "2,000 msg/s: p99 (ms)", "runs.0.p99_ms", "{:.2f}", "<= 2", lambda a, b: a <= 2),
    Row("latency", "2,000 msg/s: max (ms)", "runs.0.max_ms", "{:.2f}"),
    Row(
        "latency",
        "2,000 msg/s: server CPU (% of a core)",
        "runs.0.server_cpu_pct",
        "{:.1f}",
        "<= 35",
        lambda a, b: a <= 35,
    ),
    Row("latency", "80% of max: rate (msg/s)", "runs.1.rate", "{:.0f}"),
    Row("latency", "80% of max: p50 (ms)", "runs.1.p50_ms", "{:.2f}"),
    Row("latency", "80% of max: p99 (ms)", "runs.1.p99_ms", "{:.2f}", "< 10", lambda a, b: a < 10),
    Row("latency", "80% of max: max (ms)", "runs.1.max_ms", "{:.2f}"),
    Row("latency", "80% of max: server CPU (% of a core)", "runs.1.server_cpu_pct", "{:.1f}"),
    Row("latency", "same rate for both: rate (msg/s)", "runs.2.rate", "{:.0f}"),
    Row("latency", "same rate for both: p50 (ms)", "runs.2.p50_ms", "{:.2f}"),
    Row("latency", "same rate for both: p99 (ms)", "runs.2.p99_ms", "{:.2f}"),
    Row("latency", "same rate for both: server CPU (% core)", "runs.2.server_cpu_pct", "{:.1f}"),
    Row(
        "fanout",
        "server CPU per frame (µs)",
        "server_cpu_us_per_frame",
        "{:.2f}",
        "<= 3",
        lambda a, b: a <= 3,
    ),
    Row("fanout", "delivered frames/s", "frames_per_s", "{:.0f}"),
]


def fmt(v: float | None, f: str) -> str:
    return "-" if v is None else f.format(v)


def rst_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([rule, line(header), rule, *map(line, rows), rule])


def summarize(
    results: dict[str, dict[str, list[dict[str, Any]]]],
    failures: dict[str, list[str]],
    scenarios: list[str],
) -> tuple[str, str]:
    header = ["scenario", "figure (median)", SMAP, BASE, "ratio", "target", "met"]
    rows: list[list[str]] = []
    for row in ROWS:
        if row.scenario not in scenarios:
            continue
        a = median_of(results[SMAP].get(row.scenario, []), row.path)
        b = median_of(results[BASE].get(row.scenario, []), row.path)
        ratio = "-" if a is None or not b else f"{a / b:.2f}"
        met = ""
        if row.check is not None:
            met = "-" if a is None else ("yes" if row.check(a, b) else "NO")
        label = row.label
        if row.path == "kb_per_conn":
            idle = results[SMAP].get("idle", []) + results[BASE].get("idle", [])
            n = median_of(idle, "conns", only_correct=False)
            label += f" at {n:.0f} conns" if n else ""
        rows.append([row.scenario, label, fmt(a, row.fmt), fmt(b, row.fmt), ratio, row.target, met])
    for scen in scenarios:
        cells = []
        for name in (SMAP, BASE):
            runs = results[name].get(scen, [])
            good = sum(1 for r in runs if r.get("correct"))
            cells.append(f"ok {good}/{len(runs)}" if runs else "-")
        rows.append([scen, "correct runs", *cells, "", "all", ""])
        peaks, others = [], []
        for name in (SMAP, BASE):
            runs = results[name].get(scen, [])
            peak = median_of(runs, "loadgen.max_proc_cpu_pct", only_correct=False)
            sat = sum(1 for r in runs if (r.get("loadgen") or {}).get("saturated"))
            full = sum(1 for r in runs if (r.get("loadgen") or {}).get("machine_full"))
            flags = (f" SAT x{sat}" if sat else "") + (f" FULL x{full}" if full else "")
            peaks.append("-" if peak is None else f"{peak:.0f}%{flags}")
            other = median_of(runs, "loadgen.other_cpu_pct", only_correct=False)
            others.append("-" if other is None else f"{other:.0f}%")
        rows.append([scen, "load generator: busiest process (% core)", *peaks, "", "< 90", ""])
        rows.append([scen, "other CPU on the machine (% core)", *others, "", "~0", ""])
    table = rst_table(header, rows)
    notes = []
    for name, items in failures.items():
        for item in items:
            notes.append(f"- {name}: {item}")
    return table, "\n".join(notes)


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the server's CPUs, everyone else's): the first CPU for the server, the rest for
    redis-server and the load generator, so that they do not take turns with the server
    on its core; (None, None) without ``pin`` or with a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def calibrate() -> dict[str, str]:
    """Two figures that tell machines apart, measured while nothing else of ours runs.

    The servers' costs follow them: interpreter speed (a fixed pure-Python loop) and
    what a wake-up costs (two processes taking turns over pipes; each turn wakes the
    other, usually on the other core). On virtual machines the second can be ten times
    what it is on bare metal, and every message a relay handles costs several wake-ups.
    """
    t = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i & 7
    loop_ms = (time.perf_counter() - t) * 1000
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    n = 5000
    pid = os.fork()
    if pid == 0:  # the echoing child: exits by itself after n turns
        try:
            for _ in range(n):
                os.read(r1, 1)
                os.write(w2, b"x")
        finally:
            os._exit(0)
    cpu0 = time.process_time()
    t = time.perf_counter()
    for _ in range(n):
        os.write(w1, b"x")
        os.read(r2, 1)
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return {
        "python_loop_ms": f"{loop_ms:.0f}",
        "wakeup_rt_us": f"{wall / n * 1e6:.0f}",
        "wakeup_cpu_us": f"{cpu / n * 1e6:.0f}",
    }


def steadiness(cpus: set[int] | None, seconds: float = 5.0) -> dict[str, str]:
    """How steadily the servers' CPU runs, measured on it while nothing else of ours runs.

    A fixed piece of pure-Python work (about 0.5 ms), timed in the thread's CPU time over
    and over; the median of each 100 ms window against the host's usual pace (the 10th
    percentile of the windows). On a shared host a virtual CPU can run the same work much
    slower for stretches of 0.1-2 s (other guests on the same hardware; CPU time, so being
    preempted does not count). A server near its capacity falls behind in every such
    stretch and takes a while to catch up: the latency rows at 80% of max follow it.
    """
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    windows: dict[int, list[int]] = {}
    try:
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            cpu = time.thread_time_ns()
            total = 0
            for i in range(15_000):
                total += i & 7
            windows.setdefault(int((now - start) * 10), []).append(time.thread_time_ns() - cpu)
    finally:
        os.sched_setaffinity(0, before)
    medians = sorted(statistics.median(v) for v in windows.values())
    usual = medians[len(medians) // 10]
    slow = sum(m >= 1.25 * usual for m in medians)
    return {
        "slow_windows_pct": f"{100 * slow / len(medians):.0f}",
        "slowest_x": f"{medians[-1] / usual:.2f}",
    }


def describe_steadiness(before: dict[str, str], after: dict[str, str]) -> str:
    return (
        f"{before['slow_windows_pct']}% of 100 ms windows ran 1.25 times slower or more than"
        f" usual (the slowest {before['slowest_x']} times) before the runs,"
        f" {after['slow_windows_pct']}% ({after['slowest_x']} times) after them"
    )


def machine_info(redis_version: str, calibration: dict[str, str]) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "machine": f"{platform.machine()}, Linux {platform.release()}",
        "python": platform.python_version(),
        "redis": redis_version,
        **calibration,
    }


def write_rst(info: dict[str, str], args: argparse.Namespace, table: str, notes: str) -> Path:
    mode = "quick" if args.quick else "full"
    cmd = "python bench/run.py " + " ".join(sys.argv[1:])
    lines = [
        "Benchmark results",
        "=================",
        "",
        f"Latest run of ``{cmd.strip()}`` ({mode} mode, {args.repeats} repeat(s) per server"
        " and scenario, servers interleaved A, B, A, B; medians).",
        "",
        f"- date: {info['date']}",
        f"- machine: ``nproc`` = {info['nproc']}, {info['cpu']}, {info['machine']}",
        f"- Python {info['python']}, Redis {info['redis']}",
        f"- load generator: {args.client_used} client workers and publisher",
        f"- CPUs: {args.cpus}",
        f"- calibration: a 1,000,000-step Python loop took {info['python_loop_ms']} ms; a"
        f" wake-up round trip between two processes took {info['wakeup_rt_us']} µs"
        f" ({info['wakeup_cpu_us']} µs of CPU for one of the two). Absolute figures follow"
        " these; compare runs on machines whose calibration matches.",
        f"- steadiness of the servers' CPU around the runs (a fixed piece of Python work, timed"
        f" in CPU time): {info['steadiness']}. A server near its capacity falls behind in slow"
        " stretches, which can also come during the runs, unseen: the latency rows at 80% of"
        " max follow them.",
        '- ratio = smap-notify / baseline; "met" checks smap-notify against issue 4\'s targets.',
        "- figures are medians over the runs that passed every correctness check; the load",
        "  generator rows cover all runs (SAT: a load-generator process at 90%+ of a core;",
        "  FULL: the load generator's CPUs 95%+ busy; unpinned: the machine 95%+ busy while",
        "  the server had under 90% of a core).",
        "",
        table,
        "",
    ]
    if notes:
        lines += ["Failures and notes", "------------------", "", notes, ""]
    for start_marker, end_marker in KEPT_SECTIONS:
        if kept := kept_section(start_marker, end_marker):
            lines += [kept, ""]
    profile = BENCH / "profile-notes.rst"
    if profile.exists():
        lines += [profile.read_text().rstrip(), ""]
    path = BENCH / "RESULTS.rst"
    path.write_text("\n".join(lines))
    return path


def drive(
    srv: Server, redis: Redis, scenario: Callable[..., dict[str, Any]], **kwargs: Any
) -> dict[str, Any]:
    """Run a load-generator ``scenario`` against the started ``srv``, then stop ``srv``; the
    result is marked incorrect when the load generator failed or the server died."""
    assert srv.proc is not None
    return drive_group(
        [srv],
        scenario,
        port=srv.port,
        server_pid=srv.proc.pid,
        redis_port=redis.port,
        secret=srv.env["JWT_SECRET_KEY"],
        redis_pid=redis.proc.pid,
        **kwargs,
    )


def drive_group(
    group: list[Server], scenario: Callable[..., dict[str, Any]], **kwargs: Any
) -> dict[str, Any]:
    """Run ``scenario(**kwargs)`` against the started servers of ``group``, then stop them;
    the result is marked incorrect when the load generator failed or a server died."""
    res: dict[str, Any]
    try:
        res = scenario(**kwargs)
    except Exception as exc:  # the load generator itself failed
        res = {"correct": False, "check": {"errors": {}}}
        res["failure"] = f"load generator: {type(exc).__name__}: {exc}"
    finally:
        alive = all(srv.proc is not None and srv.proc.poll() is None for srv in group)
        stops = [srv.stop() for srv in group]
    if not alive:
        res["correct"] = False
        res.setdefault("failure", f"a server died during the run ({', '.join(stops)})")
    res["server_stop"] = stops[0] if len(stops) == 1 else stops
    return res


# ---------------------------------------------------------------------------------------
# idle-latency (issue 21)
# ---------------------------------------------------------------------------------------
def run_idle_latency(
    args: argparse.Namespace,
    redis: Redis,
    server_cpus: set[int] | None,
    native: str | None,
    started: float,
) -> list[dict[str, Any]]:
    """The probe at each number of idle connections, the servers interleaved."""
    results: list[dict[str, Any]] = []
    levels = IDLE_LEVELS_QUICK if args.quick else IDLE_LEVELS
    for rep in range(args.idle_repeats):
        for idle in levels:
            for name in args.idle_servers:
                tag = f"{name}-idle{idle}-{rep}"
                srv = server_for(name, redis.port, tag)
                print(f"[{time.monotonic() - started:6.1f}s] {tag} ...", end=" ", flush=True)
                res: dict[str, Any] = {"correct": False}
                try:
                    srv.start(cpus=server_cpus)
                except ServerFailed as exc:
                    res["failure"] = f"failed to start: {exc}"
                    print("FAILED TO START")
                else:
                    res = drive(
                        srv,
                        redis,
                        functools.partial(loadgen.run_idle_latency, idle),
                        quick=args.quick,
                        workers=args.workers,
                        native=native,
                    )
                    print(
                        f"p50 {res['p50_ms']:.2f} p99 {res['p99_ms']:.2f}"
                        f" p999 {res['p999_ms']:.2f} max {res['max_ms']:.2f} ms,"
                        f" idle CPU {res['idle_cpu_pct']:.1f}%"
                        if res["correct"]
                        else f"INCORRECT ({res.get('failure') or res['check']['errors']})"
                    )
                results.append({**res, "scenario": IDLE_LATENCY, "idle": idle, "server": name})
    return results


def idle_latency_table(results: list[dict[str, Any]], servers: list[str]) -> tuple[str, str]:
    """The table (medians per server and number of idle connections) and the targets."""
    header = [
        "server",
        "idle conns",
        "p50",
        "p99",
        "p999",
        "max",
        "idle CPU",
        "CPU wait",
        "correct",
    ]
    rows = []
    p999: dict[tuple[str, int], float | None] = {}
    for name in servers:
        for idle in sorted({r["idle"] for r in results}):
            runs = [r for r in results if r["server"] == name and r["idle"] == idle]
            if not runs:
                continue
            p999[name, idle] = median_of(runs, "p999_ms")
            good = sum(1 for r in runs if r.get("correct"))
            rows.append(
                [name, f"{idle:,}"]
                + [fmt(median_of(runs, f"{q}_ms"), "{:.2f} ms") for q in ("p50", "p99", "p999")]
                + [fmt(median_of(runs, "max_ms"), "{:.2f} ms")]
                + [fmt(median_of(runs, "idle_cpu_pct"), "{:.1f}%")]
                + [fmt(median_of(runs, "server_cpu_wait_ms"), "{:.0f} ms")]
                + [f"{good}/{len(runs)}"]
            )
    most = max((r["idle"] for r in results), default=0)
    targets = []
    mine, none, node = p999.get((SMAP, most)), p999.get((SMAP, 0)), p999.get((NODE, most))
    if most and mine is not None and none:
        met = "met" if mine <= 2 * none else "NOT met"
        targets.append(
            f"- p999 with {most:,} idle within 2x of none: {mine:.2f} / {none:.2f} ms"
            f" = {mine / none:.2f}x, {met}"
        )
    if most and mine is not None and node is not None:
        met = "met" if mine <= node else "NOT met"
        targets.append(
            f"- p999 with {most:,} idle no higher than {NODE}'s: {mine:.2f} vs {node:.2f} ms, {met}"
        )
    for r in results:
        if not r.get("correct"):
            why = r.get("failure") or f"errors {r.get('check', {}).get('errors')}"
            targets.append(f"- {r['server']} with {r['idle']:,} idle: incorrect: {why}")
    return rst_table(header, rows), "\n".join(targets)


def kept_section(start_marker: str, end_marker: str) -> str:
    """The section of RESULTS.rst between these markers as it stands, markers included,
    or "" (each scenario that writes a section of its own replaces only that section)."""
    path = BENCH / "RESULTS.rst"
    text = path.read_text() if path.exists() else ""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return ""
    return text[start : end + len(end_marker)]


def put_section(section: str, start_marker: str, end_marker: str) -> Path:
    """Write ``section`` (markers included) into RESULTS.rst in place of the one between
    the same markers, else just before the profile notes (or at the end)."""
    path = BENCH / "RESULTS.rst"
    text = path.read_text()
    if kept := kept_section(start_marker, end_marker):
        text = text.replace(kept, section)
    else:
        profile = BENCH / "profile-notes.rst"
        first = profile.read_text().splitlines()[0] if profile.exists() else ""
        at = text.find(first) if first else -1
        text = text + "\n" + section + "\n" if at < 0 else text[:at] + section + "\n\n" + text[at:]
    path.write_text(text)
    return path


def write_idle_latency(
    info: dict[str, str], args: argparse.Namespace, table: str, notes: str
) -> Path:
    """Put the idle-latency results into RESULTS.rst, in place of the last ones."""
    load = os.getloadavg()
    rate = loadgen.IDLE_LATENCY_QUICK if args.quick else loadgen.IDLE_LATENCY
    body = [
        SECTION_START,
        "",
        "Latency with idle connections (issue 21)",
        "----------------------------------------",
        "",
        f"``python bench/run.py {' '.join(sys.argv[1:])}`` on {info['date']}: one probe"
        f" connection, {rate['messages']:,} messages at {rate['rate']:.0f} msg/s, while other client processes hold the idle"
        " connections (they answer pings, nothing else); idle CPU is the server's CPU over"
        " one ping interval with them all open and no message. Medians of"
        f" {args.idle_repeats} run(s) per row; load average at the end"
        f" {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; steadiness {info['steadiness']}."
        " CPU wait: how long the server was ready to run during the probe but another"
        " process had its CPU. The profile behind these figures: ``profile-notes.rst``,"
        ' "Idle connections and the tail".',
        "",
        table,
        "",
        notes,
        "",
        SECTION_END,
    ]
    return put_section("\n".join(body), SECTION_START, SECTION_END)


# ---------------------------------------------------------------------------------------
# scale (issue 19, part 6)
# ---------------------------------------------------------------------------------------
WIDTHS = (1, 2, 4)
MODES = ("pattern", "user")
# How long Redis stays down in the restarts: none (started again at once), and long
# enough for smap-notify's reconnect wait to reach its cap (0.5-1 s, from about 1.2 s).
REDIS_DOWN = (0.0, 2.0)
OWN = "-"  # the baselines' subscription mode column: their own PSUBSCRIBE


def start_group(
    width: int, mode: str, redis: Redis, tag: str, cpus: set[int] | None
) -> list[Server]:
    """``width`` smap-notify instances on one WebSocket port (``WS_REUSE_PORT``), one
    secret, each with an ``ADMIN_PORT`` of its own for its /health; started one after
    the other, each healthy (subscribed) before the next."""
    port = free_port()
    secret = secrets.token_urlsafe(32)
    group: list[Server] = []
    try:
        for i in range(width):
            srv = server_for(SMAP, redis.port, f"{tag}-{i + 1}")
            srv.port = port
            srv.health_port = free_port()
            srv.env.update(
                JWT_SECRET_KEY=secret,
                WS_PORT=str(port),
                WS_REUSE_PORT="true",
                ADMIN_HOST="127.0.0.1",
                ADMIN_PORT=str(srv.health_port),
                REDIS_SUBSCRIBE=mode,
            )
            srv.start(cpus=cpus)
            group.append(srv)
    except ServerFailed:
        for srv in group:
            srv.stop()
        raise
    return group


def scale_runs(baselines: list[str], against: str | None = None) -> list[tuple[str, str, int]]:
    """(server, mode, W) in the order of one repeat: both modes side by side at each W,
    the baselines beside W = 1, and smap-notify as of ``against`` (``smap-notify@REV``,
    pattern mode, one instance) right after this version's W = 1."""
    order = []
    for width in WIDTHS:
        order += [(SMAP, mode, width) for mode in MODES]
        if width == 1:
            order += [(f"{SMAP}@{against}", "pattern", 1)] if against else []
            order += [(name, OWN, 1) for name in baselines]
    return order


def archived(rev: str) -> Path:
    """The smap_notify package as of ``rev`` (git archive), in bench/out/; its folder."""
    dest = OUT / f"smap-notify@{rev}"
    if not (dest / "smap_notify" / "__main__.py").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "smap_notify"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_scale(
    args: argparse.Namespace,
    redis: Redis,
    server_cpus: set[int] | None,
    native: str | None,
    started: float,
    baselines: list[str],
) -> list[dict[str, Any]]:
    """The cost runs (every W, mode and baseline, interleaved, ``--repeats`` times), then
    the Redis restarts with 10,000 users in per-user mode (``--resubscribe-repeats``)."""
    results: list[dict[str, Any]] = []

    def note(tag: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {tag} ...", end=" ", flush=True)

    for rep in range(args.repeats):
        for name, mode, width in scale_runs(baselines, args.against):
            tag = f"scale-{name}-{mode if mode != OWN else 'own'}-w{width}-{rep}"
            note(tag)
            res: dict[str, Any]
            try:
                if name == SMAP:
                    group = start_group(width, mode, redis, tag, server_cpus)
                else:  # a baseline, or an earlier smap-notify alone on its port
                    group = [server_for(name.split("@")[0], redis.port, tag)]
                    if name.startswith(f"{SMAP}@"):
                        group[0].cwd = archived(args.against)
                    group[0].start(cpus=server_cpus)
            except ServerFailed as exc:
                res = {"correct": False, "failure": f"failed to start: {exc}"}
                print("FAILED TO START")
            else:
                res = drive_group(
                    group,
                    loadgen.run_scale_cost,
                    port=group[0].port,
                    server_pids=[srv.proc.pid for srv in group if srv.proc],
                    redis_port=redis.port,
                    secret=group[0].env["JWT_SECRET_KEY"],
                    pattern=mode != "user",
                    admin_ports=[srv.health_port for srv in group if srv.health_port],
                    sequential=name == SMAP and width == 1,
                    quick=args.quick,
                    workers=args.workers,
                    redis_pid=redis.proc.pid,
                    native=native,
                )
                print(
                    f"{res['server_cpu_us_per_msg']:.1f} µs/msg,"
                    f" {res['connect']['cpu_us_per_connect']:.0f} µs/connect,"
                    f" conns per instance {res['conns_per_instance'] or '-'}"
                    if res["correct"]
                    else f"INCORRECT ({res.get('failure') or res['check']['errors']})"
                )
            results.append(
                {**res, "scenario": "scale", "server": name, "mode": mode, "width": width}
            )
    for rep, down in itertools.product(range(args.resubscribe_repeats), REDIS_DOWN):
        tag = f"scale-resubscribe-down{down:g}s-{rep}"
        note(tag)
        try:
            group = start_group(1, "user", redis, tag, server_cpus)
        except ServerFailed as exc:
            res = {"correct": False, "failure": f"failed to start: {exc}"}
            print("FAILED TO START")
        else:
            srv = group[0]
            assert srv.proc is not None and srv.health_port is not None
            res = drive_group(
                group,
                loadgen.run_resubscribe,
                port=srv.port,
                server_pid=srv.proc.pid,
                admin_port=srv.health_port,
                redis_port=redis.port,
                secret=srv.env["JWT_SECRET_KEY"],
                restart=functools.partial(redis.restart, down),
                healthy_at=time.monotonic(),
                quick=args.quick,
                workers=args.workers,
                native=native,
            )
            print(
                f"all subscribed {res['subscribed_s']:.3f} s, last resync"
                f" {res['last_resync_s']:.3f} s after Redis answered"
                if res["correct"]
                else f"INCORRECT ({res.get('failure') or res['check']['errors']})"
            )
        results.append(
            {**res, "scenario": "resubscribe", "server": SMAP, "mode": "user", "width": 1}
        )
    return results


def previous_figure(scenario: str, label: str) -> float | None:
    """smap-notify's figure in the main table of RESULTS.rst (the last full run of the
    default scenarios), e.g. ("throughput", "server CPU per message (µs)")."""
    path = BENCH / "RESULTS.rst"
    text = path.read_text() if path.exists() else ""
    for line in text.split(SECTION_START)[0].splitlines():
        cells = [c for c in line.split("  ") if c.strip()]
        if len(cells) > 2 and cells[0].strip() == scenario and cells[1].strip() == label:
            try:
                return float(cells[2])
            except ValueError:
                return None
    return None


def spread(values: list[float]) -> str:
    """The runs' range around their median, in % of it: how noisy a figure was."""
    if len(values) < 2:
        return "one run"
    mid = statistics.median(values)
    return f"{min(values):.1f}-{max(values):.1f}, ±{50 * (max(values) - min(values)) / mid:.0f}%"


def scale_tables(results: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The three tables (cost per message as W grows, connects at W = 1, Redis restarts)
    and the targets, from the runs of ``run_scale``."""
    cost = [r for r in results if r.get("scenario") != "resubscribe"]
    resub = [r for r in results if r.get("scenario") == "resubscribe"]

    def runs(name: str, mode: str, width: int) -> list[dict[str, Any]]:
        return [r for r in cost if (r["server"], r["mode"], r["width"]) == (name, mode, width)]

    earlier = sorted({r["server"] for r in cost if r["server"].startswith(f"{SMAP}@")})
    kinds = (
        [(SMAP, m) for m in MODES]
        + [(n, "pattern") for n in earlier]
        + [(n, OWN) for n in (BASE, NODE) if any(r["server"] == n for r in cost)]
    )
    rows = []
    per_msg: dict[tuple[str, str, int], float | None] = {}
    for name, mode in kinds:
        for width in WIDTHS:
            rr = runs(name, mode, width)
            if not rr:
                continue
            v = per_msg[name, mode, width] = median_of(rr, "server_cpu_us_per_msg")
            one = per_msg.get((name, mode, 1))
            good = [r for r in rr if r.get("correct")]
            held = sorted(c for r in good for c in r.get("conns_per_instance") or [])
            rows.append(
                [
                    name,
                    mode,
                    str(width),
                    fmt(v, "{:.1f}"),
                    "-" if v is None or not one else f"{v / one:.2f}",
                    fmt(median_of(rr, "delivered_per_s"), "{:.0f}"),
                    f"{held[0]}-{held[-1]}" if held else "-",
                    fmt(median_of(rr, "loadgen.max_proc_cpu_pct", False), "{:.0f}%"),
                    fmt(median_of(rr, "loadgen.other_cpu_pct", False), "{:.0f}%"),
                    f"{len(good)}/{len(rr)}",
                ]
            )
    cost_table = rst_table(
        [
            "server",
            "REDIS_SUBSCRIBE",
            "W",
            "CPU/msg (µs)",
            "x W=1",
            "delivered msg/s",
            "conns per instance",
            "busiest loadgen",
            "other CPU",
            "correct",
        ],
        rows,
    )

    rows = []
    connect: dict[tuple[str, str], dict[str, float | None]] = {}
    for phase, label in (("connect", "64 at a time"), ("sequential", "one at a time")):
        for name, mode in kinds:
            rr = [r for r in runs(name, mode, 1) if phase in r]
            if not rr:
                continue
            fig = {
                k: median_of(rr, f"{phase}.{k}")
                for k in ("conns", "cpu_us_per_connect", "p50_ms", "p99_ms", "connects_per_s")
            }
            connect[phase, mode if name == SMAP else name] = fig  # name: one mode only
            rows.append(
                [
                    name,
                    mode,
                    f"{label} ({fmt(fig['conns'], '{:,.0f}')})",
                    fmt(fig["cpu_us_per_connect"], "{:.0f}"),
                    fmt(fig["p50_ms"], "{:.2f} ms"),
                    fmt(fig["p99_ms"], "{:.2f} ms"),
                    fmt(fig["connects_per_s"], "{:.0f}"),
                ]
            )
    connect_table = rst_table(
        ["server", "REDIS_SUBSCRIBE", "connects", "CPU/connect (µs)", "p50", "p99", "connects/s"],
        rows,
    )

    rows = []
    for i, r in enumerate(resub, 1):
        rows.append(
            [
                str(i),
                f"{r.get('connections', 0):,}",
                fmt(r.get("redis_down_s"), "{:.3f} s"),
                fmt(r.get("subscribed_s"), "{:.3f} s"),
                fmt(r.get("last_resync_s"), "{:.3f} s"),
                f"{r.get('resyncs', 0):,}",
                "yes" if r.get("correct") else "NO (below)",
            ]
        )
    resub_table = rst_table(
        [
            "run",
            "users",
            "kill to PONG",
            "PONG to all subscribed",
            "PONG to last resync",
            "resyncs",
            "correct",
        ],
        rows,
    )

    def p99_noise(phase: str) -> str:
        """How far apart a repeat's two modes were, and pattern mode's runs."""
        own = [dig(r, f"{phase}.p99_ms") for r in runs(SMAP, "pattern", 1)]
        other = [dig(r, f"{phase}.p99_ms") for r in runs(SMAP, "user", 1)]
        pairs = [u - p for p, u in zip(own, other, strict=False) if p is not None and u is not None]
        seen = [p for p in own if p is not None]
        if len(pairs) < 2:
            return ""
        return (
            f" (by repeat: {', '.join(f'{d:+.1f}' for d in pairs)} ms; pattern mode's own"
            f" p99 {min(seen):.1f}-{max(seen):.1f} ms over its runs)"
        )

    targets = []
    for mode, bound in (("user", "within 1.25x of W=1"), ("pattern", "about W-fold expected")):
        one, four = per_msg.get((SMAP, mode, 1)), per_msg.get((SMAP, mode, 4))
        if one and four:
            verdict = ("met" if four <= 1.25 * one else "NOT met") if mode == "user" else "shown"
            targets.append(
                f"- {mode} mode, CPU per message at W=4 {bound}: {four:.1f} / {one:.1f} µs"
                f" = {four / one:.2f}x, {verdict}"
            )
    for phase, label in (("sequential", "one at a time"), ("connect", "64 at a time")):
        pat, usr = connect.get((phase, "pattern")), connect.get((phase, "user"))
        if not pat or not usr:
            continue
        if pat["p99_ms"] is not None and usr["p99_ms"] is not None:
            extra = usr["p99_ms"] - pat["p99_ms"]
            targets.append(
                f"- handshake p99 ({label}), user mode adds at most 1 ms:"
                f" {usr['p99_ms']:.2f} - {pat['p99_ms']:.2f} = {extra:+.2f} ms,"
                f" {'met' if extra <= 1 else 'NOT met'}{p99_noise(phase)}"
            )
        if pat["cpu_us_per_connect"] and usr["cpu_us_per_connect"] is not None:
            x = usr["cpu_us_per_connect"] / pat["cpu_us_per_connect"]
            targets.append(
                f"- CPU per connect ({label}), user mode adds at most 20%:"
                f" {usr['cpu_us_per_connect']:.0f} / {pat['cpu_us_per_connect']:.0f} µs"
                f" = {x:.2f}x, {'met' if x <= 1.2 else 'NOT met'}"
            )
    if resub:
        good = [r for r in resub if r.get("correct")]
        worst = max(
            (max(r["subscribed_s"], r["last_resync_s"]) for r in good), default=float("inf")
        )
        met = len(good) == len(resub) and worst <= 2.0
        targets.append(
            f"- {resub[0]['users']:,} users subscribed again and resync sent within 2 s of"
            f" Redis answering: slowest of {len(resub)} run(s) {worst:.3f} s"
            f" ({len(good)} correct), {'met' if met else 'NOT met'}"
        )
    before = previous_figure("throughput", "server CPU per message (µs)")
    now = per_msg.get((SMAP, "pattern", 1))
    vals = [r["server_cpu_us_per_msg"] for r in runs(SMAP, "pattern", 1) if r.get("correct")]
    if before and now:
        targets.append(
            f"- pattern mode, W=1, against the main table (``throughput``, same load):"
            f" {now:.1f} against {before:.1f} µs per message = {now / before:.2f}x (this"
            f" run's repeats: {spread(vals)}); a like-for-like figure only where the"
            " calibration lines of the two runs match"
        )
    for name in earlier:
        then = per_msg.get((name, "pattern", 1))
        if now and then:
            old = [r["server_cpu_us_per_msg"] for r in runs(name, "pattern", 1) if r.get("correct")]
            if now <= then:
                verdict = "no regression"
            elif min(vals) <= max(old):
                verdict = "more, within the spread of the runs"
            else:
                verdict = "more in every run: a regression"
            targets.append(
                f"- pattern mode, W=1, against {name} on this machine, interleaved:"
                f" {now:.1f} against {then:.1f} µs per message = {now / then:.2f}x,"
                f" {verdict} (runs: {spread(vals)} against {spread(old)})"
            )
    for r in results:
        if not r.get("correct"):
            why = r.get("failure") or f"errors {r.get('check', {}).get('errors')}"
            targets.append(f"- {r['server']} {r['mode']} W={r['width']}: incorrect: {why}")
    return [cost_table, connect_table, resub_table], "\n".join(targets)


def write_scale(
    info: dict[str, str], args: argparse.Namespace, tables: list[str], targets: str
) -> Path:
    """Put the scale results into RESULTS.rst, in place of the last ones."""
    load = os.getloadavg()
    p = loadgen.SCALE_QUICK if args.quick else loadgen.SCALE
    cost, connect, resub = tables
    body = [
        SCALE_START,
        "",
        "How cost grows with instances (issue 19)",
        "----------------------------------------",
        "",
        f"``python bench/run.py {' '.join(sys.argv[1:])}`` on {info['date']}, {info['nproc']}"
        f" CPUs ({info['cpu']}); Python {info['python']}, Redis {info['redis']}; calibration:"
        f" Python loop {info['python_loop_ms']} ms, wake-up round trip {info['wakeup_rt_us']}"
        f" µs; steadiness {info['steadiness']}; load average at the end {load[0]:.2f}"
        f" {load[1]:.2f} {load[2]:.2f}. CPUs: {args.cpus}; so with W = 2 and 4 the"
        " instances share one core (W = 4 oversubscribes it: they take turns), and the"
        " total CPU per message is the figure that means something, not the rates."
        f" Medians of {args.repeats} run(s) per row, the rows of one repeat interleaved."
        " The machine is shared (other engineers' test suites may run during the"
        ' runs): "other CPU" is the CPU that processes not ours took, in % of one core.',
        "",
        f"W smap-notify instances share one WebSocket port (``WS_REUSE_PORT=true``), each"
        f" with its own ``ADMIN_PORT``; {p['users']:,} users, one connection each, spread"
        ' over the instances by the kernel ("conns per instance": the fewest and most'
        " any instance held, over the runs). **CPU/msg**: utime+stime of every instance"
        f" from ``/proc/PID/stat``, summed, over {p['messages']:,} messages published"
        " round-robin over the users as fast as Redis takes them (as in ``throughput``),"
        " divided by the messages delivered. In ``pattern`` mode every instance reads and"
        " parses every message and drops those of users it does not hold; in ``user``"
        " mode each reads only its own users'. The asyncio relay and the Node.js relay"
        " (``../shared/peers/node-ws``) subscribe with their own ``PSUBSCRIBE``.",
        "",
        cost,
        "",
        f"Connects at W = 1: the {p['users']:,} users above connect 64 at a time (the CPU per"
        " connect is the server's CPU over that phase / connections; p50/p99 from each"
        " connection's ``connect()`` to the 101, queueing included), then"
        f" {p['sequential']:,} other users one at a time (the handshake alone; in"
        " ``user`` mode it waits for Redis to confirm the user's SUBSCRIBE).",
        "",
        connect,
        "",
        "Re-subscribing after a Redis restart: one instance in ``user`` mode holds"
        f" {p['resubscribe_users']:,} users (one connection each, each proven subscribed"
        " with a message), at least 10.5 s after it first subscribed (sooner counts as a"
        " flap, which lengthens its reconnect wait); the benchmark's redis-server is"
        " killed (SIGKILL, by PID) and started again on the same port, at once or after"
        f" {max(REDIS_DOWN):g} s (by then the daemon's reconnect wait has reached its cap,"
        " 0.5-1 s: part of the figures is that wait, not the re-subscribing). From its"
        " first PONG: until the instance's ``/health`` (polled every 20 ms) shows"
        " ``subscriber.active`` and every channel, and until the last client has its"
        " ``resync`` frame (each must get exactly one; the event loop that answers"
        " ``/health`` also sends the resync frames, so the first figure can trail the"
        " second). Then one more message per user,"
        " through the new Redis, must reach every connection.",
        "",
        resub,
        "",
        "Targets (issue 19):",
        "",
        targets,
        "",
        SCALE_END,
    ]
    return put_section("\n".join(body), SCALE_START, SCALE_END)


# ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs (about 1 minute)")
    ap.add_argument("--repeats", type=int, help="runs per server and scenario (3; quick: 2)")
    ap.add_argument(
        "--scenarios",
        nargs="+",
        choices=[*SCENARIOS, IDLE_LATENCY, SCALE],
        default=SCENARIOS,
        help=f"default: {' '.join(SCENARIOS)}; {IDLE_LATENCY} and {SCALE} run only when named",
    )
    ap.add_argument(
        "--scale-baselines",
        nargs="*",
        choices=[BASE, NODE],
        default=[BASE, NODE],
        help=f"the baselines beside smap-notify at W = 1 in {SCALE}",
    )
    ap.add_argument(
        "--against",
        metavar="REV",
        help=f"{SCALE}: also smap-notify as of this git revision (pattern mode, one"
        " instance), interleaved beside W = 1: a regression check on one machine",
    )
    ap.add_argument(
        "--resubscribe-repeats",
        type=int,
        help=f"{SCALE}: Redis restarts with 10,000 users, at each down time (3; quick: 1)",
    )
    ap.add_argument(
        "--idle-servers",
        nargs="+",
        choices=[SMAP, NODE],
        default=[SMAP, NODE],
        help=f"the servers of {IDLE_LATENCY}",
    )
    ap.add_argument("--idle-repeats", type=int, default=1, help=f"runs of {IDLE_LATENCY} (1)")
    ap.add_argument("--node-ws", type=Path, default=NODE_SOURCE, help="the Node.js relay")
    ap.add_argument("--servers", nargs="+", choices=[SMAP, BASE], default=[SMAP, BASE])
    ap.add_argument("--workers", type=int, default=2, help="load-generator client processes")
    loadgen.add_client_option(ap)
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server on a CPU of its own, redis-server and the load generator on the"
        " others (default when there are two or more)",
    )
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS.rst")
    args = ap.parse_args()
    native = loadgen.choose_client(args.client)
    args.client_used = "native (bench/wsclient.c)" if native else "asyncio (loadgen.py)"
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.resubscribe_repeats is None:
        args.resubscribe_repeats = 1 if args.quick else 3
    scenarios = [s for s in SCENARIOS if s in args.scenarios]
    OUT.mkdir(exist_ok=True)
    nofile = loadgen.raise_nofile()
    if nofile < 21000 and "idle" in scenarios and not args.quick:
        print(f"note: open-file limit is {nofile}; 10,000 connections need about 10,100")

    results: dict[str, dict[str, list[dict[str, Any]]]] = {SMAP: {}, BASE: {}}
    failures: dict[str, list[str]] = {SMAP: [], BASE: []}
    broken: dict[str, str] = {}
    if SMAP in args.servers and (why := smap_importable()):
        broken[SMAP] = f"cannot import smap_notify.app: {why}"
        failures[SMAP].append(broken[SMAP])

    calibration = calibrate()
    server_cpus, other_cpus = split_cpus(args.pin)
    steady_seconds = 2.0 if args.quick else 5.0
    steady_before = steadiness(server_cpus, steady_seconds)
    if other_cpus:  # redis-server and every load-generator process inherit it
        os.sched_setaffinity(0, other_cpus)
    args.cpus = (
        f"each server pinned to CPU {min(server_cpus)}; redis-server and the load generator"
        f" to CPU {', '.join(map(str, sorted(other_cpus)))} (``--no-pin``: all share all)"
        if server_cpus and other_cpus
        else "not pinned: servers, redis-server and the load generator share every CPU"
    )
    if IDLE_LATENCY in args.scenarios and NODE in args.idle_servers:
        if why := node_ready(args.node_ws):
            print(f"note: {NODE} left out: {why}")
            args.idle_servers = [n for n in args.idle_servers if n != NODE]
    if IDLE_LATENCY in args.scenarios and SMAP in broken:
        args.idle_servers = [n for n in args.idle_servers if n != SMAP]
    scale = SCALE in args.scenarios and SMAP not in broken
    if SCALE in args.scenarios and not scale:
        print(f"note: {SCALE} left out: {broken[SMAP]}")
    if scale and native is None:
        print(f"note: {SCALE} left out: it needs the native client (handshake times, resyncs)")
        scale = False
    if scale and NODE in args.scale_baselines and (why := node_ready(args.node_ws)):
        print(f"note: {NODE} left out of {SCALE}: {why}")
        args.scale_baselines = [n for n in args.scale_baselines if n != NODE]
    scale_results: list[dict[str, Any]] = []
    idle_results: list[dict[str, Any]] = []
    redis = Redis()
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    try:
        for scen in scenarios:
            for rep in range(args.repeats):
                for name in args.servers:
                    if name in broken:
                        continue
                    tag = f"{name}-{scen}-{rep}"
                    srv = server_for(name, redis.port, tag)
                    print(f"[{time.monotonic() - started:6.1f}s] {tag} ...", end=" ", flush=True)
                    try:
                        srv.start(cpus=server_cpus)
                    except ServerFailed as exc:
                        broken[name] = f"failed to start ({scen}): {exc}"
                        failures[name].append(broken[name])
                        print("FAILED TO START")
                        continue
                    assert srv.proc is not None
                    max_rate = common_rate = None
                    if scen == "latency":
                        max_rate = median_of(results[name].get("throughput", []), "delivered_per_s")
                        maxima = [
                            median_of(results[n].get("throughput", []), "delivered_per_s")
                            for n in args.servers
                        ]
                        if len(maxima) > 1 and all(maxima):
                            common_rate = 0.8 * min(m for m in maxima if m)
                    res = drive(
                        srv,
                        redis,
                        functools.partial(loadgen.run_scenario, scen),
                        quick=args.quick,
                        workers=args.workers,
                        max_rate=max_rate,
                        common_rate=common_rate,
                        native=native,
                    )
                    results[name].setdefault(scen, []).append(res)
                    if not res["correct"]:
                        check = res.get("check", {})
                        why = res.get("failure") or f"errors {check.get('errors')}"
                        first = (check.get("error_samples") or ["-"])[0]
                        failures[name].append(
                            f"{scen} run {rep + 1}: incorrect: {why}; first: {first}"
                        )
                        print(f"INCORRECT ({res.get('failure') or res['check']['errors']})")
                    else:
                        print(brief(res))
        if IDLE_LATENCY in args.scenarios:
            idle_results = run_idle_latency(args, redis, server_cpus, native, started)
        if scale:
            scale_results = run_scale(
                args, redis, server_cpus, native, started, args.scale_baselines
            )
    finally:
        redis.stop()
    calibration["steadiness"] = describe_steadiness(
        steady_before, steadiness(server_cpus, steady_seconds)
    )
    (OUT / f"results-{stamp}.json").write_text(
        json.dumps({**results, IDLE_LATENCY: idle_results, SCALE: scale_results}, indent=1)
    )
    table, notes = summarize(results, failures, scenarios)
    info = machine_info(redis.version, calibration)
    print()
    print(f"{info['date']}  nproc={info['nproc']}  {info['cpu']}  Python {info['python']}")
    print(
        f"calibration: Python loop {info['python_loop_ms']} ms; wake-up round trip"
        f" {info['wakeup_rt_us']} µs ({info['wakeup_cpu_us']} µs CPU)"
    )
    print(f"steadiness of the servers' CPU: {info['steadiness']}")
    print(f"load generator: {args.client_used}")
    print(f"CPUs: {args.cpus}")
    if scenarios:
        print(table)
    if notes:
        print("\nFailures and notes:\n" + notes)
    print(
        f"\nraw results: {OUT / f'results-{stamp}.json'}; total {time.monotonic() - started:.0f}s"
    )
    if idle_results:
        idle_table, idle_notes = idle_latency_table(idle_results, args.idle_servers)
        print(f"\n{IDLE_LATENCY} (load average now {os.getloadavg()[0]:.2f}):\n{idle_table}")
        print(idle_notes)
    if args.write and scenarios:
        print(f"wrote {write_rst(info, args, table, notes)}")
    if args.write and idle_results:
        print(f"wrote {write_idle_latency(info, args, idle_table, idle_notes)}")
    if scale_results:
        scale_tabs, scale_targets = scale_tables(scale_results)
        print(f"\n{SCALE} (load average now {os.getloadavg()[0]:.2f}):")
        print("\n\n".join(scale_tabs))
        print(scale_targets)
        if args.write:
            print(f"wrote {write_scale(info, args, scale_tabs, scale_targets)}")
    return 0


def brief(res: dict[str, Any]) -> str:
    s = res["scenario"]
    lg = res.get("loadgen") or {}
    sat = " LOADGEN SATURATED" if lg.get("saturated") else ""
    sat += " MACHINE FULL" if lg.get("machine_full") else ""
    sat += f", other {lg['other_cpu_pct']:.0f}%" if lg.get("other_cpu_pct", 0) >= 10 else ""
    load = f"[loadgen peak {lg.get('max_proc_cpu_pct', 0):.0f}%{sat}]"
    if s == "idle":
        return f"{res['kb_per_conn']:.1f} KB/conn, {res['connects_per_s']:.0f} conn/s {load}"
    if s == "throughput":
        return (
            f"{res['server_cpu_us_per_msg']:.1f} µs/msg, {res['delivered_per_s']:.0f} msg/s {load}"
        )
    if s == "fanout":
        return (
            f"{res['server_cpu_us_per_frame']:.2f} µs/frame, {res['frames_per_s']:.0f} frames/s"
            f" {load}"
        )
    parts = [
        f"{r['rate']:.0f}/s: p99 {r.get('p99_ms', float('nan')):.2f} ms,"
        f" cpu {r['server_cpu_pct']:.0f}%"
        for r in res.get("runs", [])
    ]
    return "; ".join(parts) + f" {load}"


if __name__ == "__main__":
    sys.exit(main())
