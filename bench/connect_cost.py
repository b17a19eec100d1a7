"""What a new user's connection costs the daemon, per thread, in pattern and in user mode.

    python bench/connect_cost.py [--n 1500] [--concurrency 1 64] [--repeats 3]
                                 [--modes pattern user] [--against REV] [--no-pin]

Starts its own ``redis-server`` on a free loopback port; for every repeat and concurrency
starts smap-notify afresh in each mode (interleaved, the order reversed every other
repeat), opens ``--n`` WebSocket connections, each from a new user, ``--concurrency``
handshakes in flight, and holds them open until the phase ends (so no unsubscribe falls
into it). Reports, per connect, the CPU of the
daemon's event-loop thread and of its other threads (``/proc/PID/task/*/stat``), their
context switches (``/proc/PID/task/*/status``), and the handshake's p50 and p99 (connect
to the 101's last byte). The daemon runs on a CPU of its own, this client on the others,
unless ``--no-pin``. ``--against REV`` adds smap-notify as of a git revision (both modes).
Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402
import run  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, tuple[float, int, int]]:
    """Per thread: CPU seconds, voluntary and involuntary context switches."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        switches = dict(
            line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line
        )
        out[int(tid)] = (
            cpu,
            int(switches["voluntary_ctxt_switches"]),
            int(switches["nonvoluntary_ctxt_switches"]),
        )
    return out


def subscribe_commands(port: int) -> float:
    """The daemon's count of SUBSCRIBE commands sent, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("smap_notify_redis_subscribe_commands"):
                return float(line.split()[-1])
    return 0.0


def phase(
    srv: run.Server, redis: run.Redis, native: str, n: int, concurrency: int, first_user: int
) -> dict[str, float]:
    """``n`` new users connect, ``concurrency`` at a time (the native client)."""
    assert srv.proc is not None
    pid = srv.proc.pid
    h = loadgen.Harness(
        port=srv.port,
        server_pid=pid,
        redis_port=redis.port,
        secret=srv.env["JWT_SECRET_KEY"],
        n_users=n,
        conns_per_user=1,
        workers=1 if concurrency == 1 else 2,
        native=native,
        first_user=first_user,
    )
    try:
        h.native_pipes()
        time.sleep(0.3)
        commands = subscribe_commands(srv.port)
        before = threads(pid)
        started = time.monotonic()
        con = h.connect(concurrency)
        wall = time.monotonic() - started
        after = threads(pid)
        commands = subscribe_commands(srv.port) - commands
        times = loadgen.percentiles(h.handshakes())
    finally:
        h.close()
    if con["failed"]:
        raise RuntimeError(f"{con['failed']} connections failed")
    main = [after[pid][i] - before[pid][i] for i in range(3)]
    rest = [
        sum(after[t][i] - before.get(t, (0, 0, 0))[i] for t in after if t != pid) for i in range(3)
    ]
    return {
        "loop_us": main[0] / n * 1e6,
        "other_us": rest[0] / n * 1e6,
        "total_us": (main[0] + rest[0]) / n * 1e6,
        "switches": (main[1] + main[2] + rest[1] + rest[2]) / n,
        "involuntary": (main[2] + rest[2]) / n,
        "subscribes": commands / n,
        "busy_pct": 100 * (main[0] + rest[0]) / wall,
        "connects_per_s": n / wall,
        "p50_ms": times["p50_ms"],
        "p99_ms": times["p99_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["pattern", "user"])
    ap.add_argument("--against", help="also smap-notify as of this git revision")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    run.OUT.mkdir(exist_ok=True)
    loadgen.raise_nofile()
    server_cpus, client_cpus = run.split_cpus(not args.no_pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    versions = [("", None)] + (
        [(f"@{args.against}", run.archived(args.against))] if args.against else []
    )
    native, how = loadgen.build_native()
    if native is None:
        raise SystemExit(f"the native client is needed: {how}")
    redis = run.Redis()
    results: dict[str, list[dict[str, float]]] = {}
    user = 0
    try:
        for rep in range(args.repeats):
            for conc in args.concurrency:
                # Odd repeats run the modes in reverse: a run's place in the pair (the
                # one after a fresh start of Redis's state, say) must not favour a mode.
                modes = args.modes if rep % 2 == 0 else args.modes[::-1]
                for mode in modes:
                    for suffix, cwd in versions:
                        srv = run.server_for(
                            run.SMAP, redis.port, f"connect-{mode}{suffix}-{conc}-{rep}"
                        )
                        srv.env["REDIS_SUBSCRIBE"] = mode
                        srv.env["WS_MAX_CONNECTIONS"] = str(args.n + 1000)
                        if cwd is not None:
                            srv.cwd = cwd
                        srv.start(cpus=server_cpus)
                        try:
                            res = phase(srv, redis, native, args.n, conc, user)
                        finally:
                            srv.stop()
                        user += args.n
                        label = f"{mode}{suffix} x{conc}"
                        results.setdefault(label, []).append(res)
                        print(f"{label:>20} rep {rep}: {figures(res)}", flush=True)
    finally:
        redis.stop()
    print_medians(results)


def figures(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in res.items())


def print_medians(results: dict[str, list[dict[str, float]]]) -> None:
    """Each label's median of every figure over its runs."""
    print("\nmedians:")
    for label, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{label:>20} {figures(med)}")


if __name__ == "__main__":
    main()
