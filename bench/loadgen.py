"""Load generator for the smap-notify benchmark (issue 4).

The load generator never runs in the server's process. ``run_scenario`` (called by
``bench/run.py``, or this file's command line) forks:

- W client workers (default 2), each one asyncio loop holding its share of the WebSocket
  connections. The client is hand-rolled on ``asyncio.Protocol``: the HTTP upgrade is one
  write, server frames are parsed in place (no per-frame task, future or copy), control frames
  are answered. ``websockets`` as a client costs several times more CPU per frame and would
  become the bottleneck first;
- one publisher speaking RESP on a plain blocking socket: pipelined ``PUBLISH`` batches as
  fast as Redis answers, or a fixed rate paced with ``time.sleep``.

Correctness is checked on every frame of every run: each text frame must be exactly one JSON
document (``json.loads`` fails on ``{..}\\n{..}``), an object whose keys are ``type``,
``payload``, ``timestamp`` in that order, with an RFC 3339 timestamp, for the right user, and
with the next sequence number of that user (so: in order, no loss, no duplicates); at the end
every connection must have received exactly the messages published to its user. Frames that
are byte-for-byte equal (one message fanned out to many connections in one worker) are parsed
once and the parse result reused: same bytes, same verdict.

Cost accounting: server CPU is utime+stime of the server PID from ``/proc/PID/stat``, RSS is
``VmRSS`` from ``/proc/PID/status``. The CPU of every load-generator process (workers,
publisher, coordinator) is read the same way over the measured phase; a process above 90% of
one core is reported as saturated; a machine above 95% busy while the server got less than
90% of a core as full, with the CPU that none of the benchmark's processes used.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import functools
import hashlib
import http.client
import json
import mmap
import multiprocessing as mp
import os
import re
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
NPROC = os.cpu_count() or 1
KEYS = ["type", "payload", "timestamp"]
try:  # the daemon's own dependency; keeps the clients' parsing cost low
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(?:Z|[+-]\d\d:\d\d)")
ORIGIN = "http://127.0.0.1:3000"
COOKIE = "smap_auth_token"
WS_KEY = base64.b64encode(b"smap-notify:benc").decode()
WS_ACCEPT = base64.b64encode(
    hashlib.sha1((WS_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
).decode()
# The payload of every published message: ~150 bytes published, ~200-byte frames delivered.
PAD = b"x" * 80
SATURATED_PROC_PCT = 90.0
SATURATED_MACHINE_PCT = 95.0


def user_id(u: int) -> str:
    return f"bench-user-{u:05d}"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_wait_s(pid: int) -> float:
    """How long the threads of a process were ready to run but waited for a CPU (the
    scheduler's run-queue delay, ``/proc/PID/task/*/schedstat``), in seconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended, or no schedstats
            continue
    return total / 1e9


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def machine_ticks(cpus: Collection[int] | None = None) -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, or of the CPUs ``cpus``."""
    wanted = {"cpu"} if cpus is None else {f"cpu{c}" for c in cpus}
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                vals = [int(v) for v in fields]
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                busy += sum(vals[:8]) - idle
                total += sum(vals[:8])
    return busy, total


def side_cpus() -> frozenset[int] | None:
    """The CPUs this process may use, when that is not all of them (``run.py`` pins the
    server to a CPU of its own, redis-server and the load generator to the others)."""
    mine = os.sched_getaffinity(0)
    return frozenset(mine) if len(mine) < (os.cpu_count() or len(mine)) else None


@dataclass
class Snapshot:
    wall: float
    server_cpu: float
    procs: dict[str, float]
    machine: tuple[int, int]
    side: tuple[int, int] | None  # the load generator's CPUs, when pinned


@dataclass
class Probe:
    """Takes CPU snapshots of the server and of every load-generator process. The
    server's CPU is the sum over ``server_pid`` and ``more_servers`` (several instances
    of one server on one port count as one server)."""

    server_pid: int
    procs: dict[str, int] = field(default_factory=dict)
    side: frozenset[int] | None = field(default_factory=side_cpus)
    more_servers: tuple[int, ...] = ()

    def snap(self) -> Snapshot:
        return Snapshot(
            time.monotonic(),
            sum(proc_cpu_s(pid) for pid in (self.server_pid, *self.more_servers)),
            {name: proc_cpu_s(pid) for name, pid in self.procs.items()},
            machine_ticks(),
            None if self.side is None else machine_ticks(self.side),
        )

    @staticmethod
    def delta(a: Snapshot, b: Snapshot) -> dict[str, Any]:
        """CPU over a phase. The load generator counts as saturated when one of its
        processes used 90% of a core or more; the machine as full when it was 95% busy
        while the server got less than 90% of a core (then the server was starved, by us
        or by something else: see other_cpu_pct). With the server on a CPU of its own,
        full means: the CPUs of the load generator and redis-server were 95% busy."""
        wall = max(b.wall - a.wall, 1e-9)
        procs = {n: round(100 * (b.procs[n] - a.procs[n]) / wall, 1) for n in a.procs}
        redis = procs.pop("redis", None)

        def busy_pct(t0: tuple[int, int], t1: tuple[int, int]) -> float:
            return round(100 * (t1[0] - t0[0]) / max(t1[1] - t0[1], 1), 1)

        machine = busy_pct(a.machine, b.machine)
        side = busy_pct(a.side, b.side) if a.side and b.side else None
        peak = max(procs.values(), default=0.0)
        server_pct = 100 * (b.server_cpu - a.server_cpu) / wall
        ours = server_pct + sum(procs.values()) + (redis or 0.0)
        return {
            "wall_s": wall,
            "server_cpu_s": b.server_cpu - a.server_cpu,
            "loadgen": {
                "proc_cpu_pct": procs,
                "total_cpu_pct": round(sum(procs.values()), 1),
                "max_proc_cpu_pct": peak,
                "redis_cpu_pct": redis,
                "machine_busy_pct": machine,
                # CPU (in % of one core) that neither the server, the load generator nor
                # redis-server used: other programs on the machine, unattributed softirq.
                "other_cpu_pct": round(max(0.0, machine * NPROC - ours), 1),
                "saturated": peak >= SATURATED_PROC_PCT,
                "loadgen_cpus_busy_pct": side,
                "machine_full": (
                    side >= SATURATED_MACHINE_PCT
                    if side is not None
                    else machine >= SATURATED_MACHINE_PCT and server_pct < SATURATED_PROC_PCT
                ),
            },
        }


# ---------------------------------------------------------------------------------------
# client worker
# ---------------------------------------------------------------------------------------
class Errors:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.samples: list[str] = []

    def add(self, kind: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.samples) < 8:
            self.samples.append(f"{kind}: {detail}"[:300])


def tokens(secret: str, users: Sequence[int]) -> list[tuple[int, str]]:
    """A JWT cookie value per user, valid for six hours."""
    import jwt  # only the client workers need PyJWT

    now = int(time.time())
    out = []
    for u in users:
        claims = {"sub": user_id(u), "email": f"{user_id(u)}@bench.invalid", "iat": now}
        claims["exp"] = now + 6 * 3600
        out.append((u, jwt.encode(claims, secret, algorithm="HS256")))
    return out


class WSClient(asyncio.Protocol):
    """One WebSocket client connection; server frames parsed straight from the socket data."""

    def __init__(self, worker: Worker, uidx: int, request: bytes) -> None:
        self.w = worker
        self.uidx = uidx
        self.request = request
        self.next_seq = 0
        self.buf = b""
        self.open = False
        self.done = False
        self.tr: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tr = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        elif not self.done:
            self.w.errors.add("connection lost", f"user {self.uidx}: {exc}")
        self.open = False

    def _fail_handshake(self, why: str) -> None:
        self.done = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        assert self.tr is not None
        self.tr.abort()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload[:125]))
        assert self.tr is not None
        self.tr.write(bytes((0x80 | opcode, 0x80 | len(body))) + mask + body)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            data = self.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                if len(data) > 8192:
                    self._fail_handshake("oversized handshake response")
                return
            head = data[:end].decode("latin-1")
            status = head.split("\r\n", 1)[0]
            if not status.startswith("HTTP/1.1 101"):
                self._fail_handshake(f"upgrade refused: {status!r}")
                return
            if WS_ACCEPT.lower() not in head.lower():
                self._fail_handshake("bad Sec-WebSocket-Accept")
                return
            self.open = True
            self.buf = b""
            self.opened.set_result(None)
            data = data[end + 4 :]
            if not data:
                return
        elif self.buf:
            data = self.buf + data
        w = self.w
        n = len(data)
        pos = 0
        frames = 0
        now = time.monotonic_ns()
        cache = w.cache
        lat = w.lat
        loads = _loads
        while n - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1]
            if ln & 0x80:
                w.errors.add("masked server frame")
                ln &= 0x7F
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + ln
            if end > n:
                break
            pos = end
            if b0 != 0x81:  # anything but a final, uncompressed text frame
                self._control(b0, data[start:end])
                continue
            frames += 1
            payload = data[start:end]
            r = cache.get(payload) if cache is not None else None
            if r is None:
                try:
                    doc = loads(payload)
                except ValueError as exc:
                    w.errors.add(
                        "frame is not exactly one JSON document", f"{exc}: {payload[:120]!r}"
                    )
                    continue
                if type(doc) is not dict or list(doc) != KEYS:
                    w.errors.add("bad envelope keys", repr(payload[:120]))
                    continue
                ts = doc["timestamp"]
                p = doc["payload"]
                if doc["type"] != "notification" or type(ts) is not str or not TS_RE.fullmatch(ts):
                    w.errors.add("bad type or timestamp", repr(payload[:120]))
                    continue
                try:
                    r = (p["u"], p["seq"], p["ts"])
                except (KeyError, TypeError):
                    w.errors.add("payload not kept", repr(payload[:120]))
                    continue
                if cache is not None:
                    if len(cache) > 50_000:
                        cache.clear()
                    cache[payload] = r
            if r[0] != self.uidx:
                w.errors.add("misrouted", f"user {self.uidx} got message for {r[0]}")
                continue
            if r[1] != self.next_seq:
                w.errors.add(
                    "out of order, lost or duplicated",
                    f"user {self.uidx}: expected seq {self.next_seq}, got {r[1]}",
                )
            self.next_seq = r[1] + 1
            if lat is not None:
                lat.append(now - r[2])
        self.buf = data[pos:] if pos < n else b""
        if frames:
            w.received += frames
            w.counts[w.idx] = w.received
            w.last_ns[w.idx] = now

    def _control(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if b0 & 0x80 and opcode == 0x9:
            self._send_frame(0xA, payload)
        elif b0 & 0x80 and opcode == 0xA:
            pass
        elif b0 & 0x80 and opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if not self.done:
                self.w.errors.add("server closed connection", f"user {self.uidx}: code {code}")
            self._send_frame(0x8, payload[:2])
            self.done = True
            assert self.tr is not None
            self.tr.close()
        else:
            self.w.errors.add(
                "not one final text frame per message", f"header byte {b0:#x} (fragment/rsv/binary)"
            )


class Worker:
    def __init__(
        self,
        idx: int,
        port: int,
        secret: str,
        users: Sequence[int],
        conns_per_user: int,
        pipe: Any,
        counts: Any,
        last_ns: Any,
        dedupe: bool,
    ) -> None:
        self.idx = idx
        self.port = port
        self.secret = secret
        self.users = list(users)
        self.conns_per_user = conns_per_user
        self.pipe = pipe
        self.counts = counts
        self.last_ns = last_ns
        self.errors = Errors()
        self.received = 0
        self.cache: dict[bytes, tuple[int, int, int]] | None = {} if dedupe else None
        self.lat: array.array[int] | None = None
        self.clients: list[WSClient] = []

    def requests(self) -> list[tuple[int, bytes]]:
        out = []
        for u, token in tokens(self.secret, self.users):
            req = (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
                f"Sec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}\r\n"
                f"Cookie: {COOKIE}={token}\r\n\r\n"
            ).encode()
            out.extend((u, req) for _ in range(self.conns_per_user))
        return out

    async def connect_all(self, concurrency: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        todo = iter(self.requests())
        failed = 0

        async def one_by_one() -> None:
            nonlocal failed
            for u, req in todo:
                client = WSClient(self, u, req)
                try:
                    await loop.create_connection(lambda c=client: c, "127.0.0.1", self.port)
                    await asyncio.wait_for(client.opened, 30)
                except (OSError, TimeoutError) as exc:
                    failed += 1
                    self.errors.add("connect failed", f"{type(exc).__name__}: {exc}")
                    if client.tr is not None:
                        client.tr.abort()
                    continue
                self.clients.append(client)

        t0 = time.monotonic()
        await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
        return {"start": t0, "end": time.monotonic(), "ok": len(self.clients), "failed": failed}

    def finish(self, published: int, n_users: int) -> dict[str, Any]:
        missing_conns = 0
        for c in self.clients:
            expected = published // n_users + (1 if c.uidx < published % n_users else 0)
            if c.next_seq != expected:
                missing_conns += 1
                self.errors.add(
                    "wrong count at end", f"user {c.uidx}: got up to {c.next_seq}, want {expected}"
                )
            c.done = True
            if c.tr is not None:
                c.tr.close()
        return {
            "received": self.received,
            "conns": len(self.clients),
            "wrong_count_conns": missing_conns,
            "errors": self.errors.counts,
            "error_samples": self.errors.samples,
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop.add_reader(self.pipe.fileno(), lambda: inbox.put_nowait(self.pipe.recv()))
        self.pipe.send(("ready",))
        while True:
            cmd = await inbox.get()
            if cmd[0] == "connect":
                self.pipe.send(("connected", await self.connect_all(cmd[1])))
            elif cmd[0] == "latency":
                taken, self.lat = self.lat, (array.array("q") if cmd[1] else None)
                self.pipe.send(("latency", taken.tobytes() if taken is not None else b""))
            elif cmd[0] == "finish":
                result = self.finish(cmd[1], cmd[2])
                await asyncio.sleep(0.2)  # let the FINs go out
                self.pipe.send(("result", result))
                return


def worker_main(*args: Any) -> None:
    raise_nofile()
    asyncio.run(Worker(*args).run())


# ---------------------------------------------------------------------------------------
# native client worker (bench/wsclient.c)
# ---------------------------------------------------------------------------------------
NATIVE_SOURCE = Path(__file__).resolve().parent / "wsclient.c"
NATIVE_BINARY = Path(__file__).resolve().parent / "out" / "wsclient"


def build_native() -> tuple[str | None, str]:
    """Compile bench/wsclient.c (once, into bench/out/); (path or None, what happened)."""
    if NATIVE_BINARY.exists() and NATIVE_BINARY.stat().st_mtime >= NATIVE_SOURCE.stat().st_mtime:
        return str(NATIVE_BINARY), "built earlier"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) on the PATH"
    NATIVE_BINARY.parent.mkdir(exist_ok=True)
    tmp = NATIVE_BINARY.with_suffix(".tmp")
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(tmp), str(NATIVE_SOURCE)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None, f"{cc} failed: {proc.stderr.strip()[-500:]}"
    tmp.replace(NATIVE_BINARY)
    return str(NATIVE_BINARY), f"built with {cc}"


def add_client_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--client",
        choices=["native", "python"],
        default="native",
        help="client workers and publisher: bench/wsclient.c, built with cc (default), or"
        " asyncio and Python",
    )


def choose_client(choice: str) -> str | None:
    """The native client's path for ``--client native`` when it builds, else None: the
    Python load generator (saying why on stderr)."""
    if choice != "native":
        return None
    native, how = build_native()
    if native is None:
        print(
            f"note: native client unavailable ({how}); the asyncio client is used", file=sys.stderr
        )
    return native


class NativeProcess:
    """A wsclient process (client worker or publisher) behind the same send/poll/recv
    calls as the pipe of a forked worker or publisher."""

    def __init__(self, binary: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [binary, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.fd = self.proc.stdout.fileno()
        self.pid = self.proc.pid
        self.buf = b""

    def send(self, msg: tuple[Any, ...]) -> None:
        words = [str(int(x)) if isinstance(x, bool | int) else str(x) for x in msg]
        self.stdin.write((" ".join(words) + "\n").encode())

    def _fill(self, timeout: float | None) -> bool:
        if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
            return False
        data = os.read(self.fd, 1 << 20)
        if not data:
            raise EOFError(f"wsclient exited with {self.proc.wait()}")
        self.buf += data
        return True

    def poll(self, timeout: float) -> bool:
        return b"\n" in self.buf or self._fill(timeout)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill(None)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[Any, ...]:
        while b"\n" not in self.buf:
            self._fill(None)
        line = self._take(self.buf.index(b"\n") + 1).decode()
        tag, _, rest = line.rstrip("\n").partition(" ")
        if tag == "connected":
            start, end, ok, failed = rest.split()
            res = {"start": float(start), "end": float(end), "ok": int(ok), "failed": int(failed)}
            return (tag, res)
        if tag in ("latency", "handshakes"):
            return (tag, self._take(int(rest)))
        if tag == "resyncs":
            count, last_ns = rest.split()
            return (tag, (int(count), int(last_ns)))
        if tag in ("result", "burst", "rate"):
            return (tag, json.loads(rest))
        if tag == "wait_sub":
            return (tag, rest == "1")
        return (tag,)

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------------------------------
# publisher
# ---------------------------------------------------------------------------------------
class Publisher:
    """RESP over a blocking socket. Message i goes to user i % U with sequence i // U."""

    HEAD = b"*3\r\n$7\r\nPUBLISH\r\n"

    def __init__(
        self, redis_port: int, n_users: int, conns_per_user: int, pipe: Any, counts: Any
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", redis_port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.n_users = n_users
        self.conns_per_user = conns_per_user
        self.pipe = pipe
        self.counts = counts
        self.chans = []
        for u in range(n_users):
            ch = b"user_noti:" + user_id(u).encode()
            self.chans.append(b"$%d\r\n%s\r\n" % (len(ch), ch))
        self.i = 0
        self.pending = 0
        self.zero = 0
        self.errors = 0
        self.rbuf = bytearray()

    def command(self, *args: bytes) -> bytes:
        out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        self.sock.sendall(out)
        data = self.sock.recv(65536)
        return data

    def batch(self, n: int, ts: int) -> bytes:
        parts = []
        head, chans, nu, pad = self.HEAD, self.chans, self.n_users, PAD
        for i in range(self.i, self.i + n):
            u = i % nu
            msg = b'{"type":"notification","payload":{"u":%d,"seq":%d,"ts":%d,"pad":"%s"}}' % (
                u,
                i // nu,
                ts,
                pad,
            )
            parts.append(b"%s%s$%d\r\n%s\r\n" % (head, chans[u], len(msg), msg))
        self.i += n
        self.pending += n
        return b"".join(parts)

    def read_replies(self, block: bool) -> None:
        while self.pending > 0:
            try:
                data = self.sock.recv(262144, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("redis closed the connection")
            self.rbuf += data
            cut = self.rbuf.rfind(b"\r\n") + 2
            if cut < 2:
                continue
            chunk = bytes(self.rbuf[:cut])
            del self.rbuf[:cut]
            self.pending -= chunk.count(b"\r\n")
            self.zero += chunk.count(b":0\r\n")
            self.errors += chunk.count(b"-")

    def delivered_msgs(self) -> int:
        return sum(self.counts) // self.conns_per_user

    def wait_subscriber(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.command(b"PUBSUB", b"NUMPAT") not in (b":0\r\n",):
                return True
            time.sleep(0.05)
        return False

    def burst(self, n: int, window_per_user: int) -> dict[str, Any]:
        """Publish n messages as fast as Redis takes them (pipelined batches), keeping at
        most window_per_user undelivered messages per user in flight."""
        window = window_per_user * self.n_users
        t0 = time.monotonic_ns()
        end = self.i + n
        waited = 0
        while self.i < end:
            room = window - (self.i - self.delivered_msgs())
            if room <= 0:
                waited += 1
                time.sleep(0.0005)
                continue
            k = min(room, 1000, end - self.i)
            self.sock.sendall(self.batch(k, time.monotonic_ns()))
            self.read_replies(block=True)
        return {
            "t_start_ns": t0,
            "t_end_ns": time.monotonic_ns(),
            "sent": n,
            "window_waits": waited,
        }

    def rate(self, rate: float, duration: float) -> dict[str, Any]:
        """Publish at a fixed rate, each message stamped just before its write."""
        total = max(1, int(rate * duration))
        t0 = time.monotonic()
        sent = 0
        max_lag = 0.0
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - t0) * rate) + 1) - sent
            if due <= 0:
                time.sleep(max(0.0, t0 + sent / rate - now))
                continue
            max_lag = max(max_lag, now - (t0 + (sent + due - 1) / rate))
            k = min(due, 500)
            self.sock.sendall(self.batch(k, time.monotonic_ns()))
            sent += k
            self.read_replies(block=False)
        t1 = time.monotonic()
        self.read_replies(block=True)
        return {
            "sent": total,
            "rate_achieved": total / max(t1 - t0, 1e-9),
            "publisher_max_lag_ms": round(max_lag * 1000, 3),
        }

    def serve(self) -> None:
        self.pipe.send(("ready",))
        while True:
            cmd = self.pipe.recv()
            if cmd[0] == "wait_sub":
                self.pipe.send(("wait_sub", self.wait_subscriber(cmd[1])))
            elif cmd[0] == "burst":
                res = self.burst(cmd[1], cmd[2])
                res.update(zero_receivers=self.zero, redis_errors=self.errors, published=self.i)
                self.pipe.send(("burst", res))
            elif cmd[0] == "rate":
                res = self.rate(cmd[1], cmd[2])
                res.update(zero_receivers=self.zero, redis_errors=self.errors, published=self.i)
                self.pipe.send(("rate", res))
            elif cmd[0] == "stop":
                self.sock.close()
                return


def publisher_main(*args: Any) -> None:
    Publisher(*args).serve()


# ---------------------------------------------------------------------------------------
# coordinator
# ---------------------------------------------------------------------------------------
QUICK = {
    "idle": {"conns": 2000},
    "throughput": {"messages": 40_000},
    "latency": {"duration": 3.0},
    "fanout": {"messages": 2_000},
}
FULL = {
    "idle": {"conns": 10_000},
    "throughput": {"messages": 200_000},
    "latency": {"duration": 10.0},
    "fanout": {"messages": 5_000},
}


def percentiles(ns: array.array[int]) -> dict[str, float]:
    if not ns:
        return {}
    s = sorted(ns)
    n = len(s)

    def at(q: float) -> float:
        return round(s[min(n - 1, int(q * n))] / 1e6, 3)

    return {
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": round(s[-1] / 1e6, 3),
        "mean_ms": round(statistics.fmean(s) / 1e6, 3),
        "samples": n,
    }


class Harness:
    """Forks the workers and the publisher; talks to them over pipes."""

    def __init__(
        self,
        *,
        port: int,
        server_pid: int,
        redis_port: int,
        secret: str,
        n_users: int,
        conns_per_user: int,
        workers: int,
        redis_pid: int | None = None,
        native: str | None = None,
        first_user: int = 0,
        more_servers: Sequence[int] = (),
    ) -> None:
        """``first_user``: the users are ``first_user`` .. ``first_user + n_users - 1`` (a
        second harness beside another holds users of its own). ``more_servers``: the PIDs
        of further instances sharing the port, whose CPU counts as the server's."""
        ctx = mp.get_context("fork")
        self.n_users = n_users
        self.conns_per_user = conns_per_user
        workers = max(1, min(workers, n_users))
        self.probe = Probe(
            server_pid, {"coordinator": os.getpid()}, more_servers=tuple(more_servers)
        )
        if redis_pid:
            self.probe.procs["redis"] = redis_pid
        self.server_pid = server_pid
        self.procs: list[Any] = []
        self.pipes: list[Any] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="smap-bench-")
        # Frames received per worker, then each worker's last frame time (monotonic ns):
        # shared memory the workers write and the coordinator and publisher read.
        counts_file = os.path.join(self.tmp.name, "counts")
        with open(counts_file, "wb") as f:
            f.write(bytes(16 * workers))
        with open(counts_file, "r+b") as f:
            self.shm = mmap.mmap(f.fileno(), 16 * workers)
        self.counts = memoryview(self.shm)[: 8 * workers].cast("q")
        self.last_ns = memoryview(self.shm)[8 * workers :].cast("q")
        if native is not None:
            for w in range(workers):
                path = os.path.join(self.tmp.name, f"tokens-{w}")
                with open(path, "w") as f:
                    users = range(first_user + w, first_user + n_users, workers)
                    for u, token in tokens(secret, users):
                        f.write(f"{u} {token}\n" * conns_per_user)
                nw = NativeProcess(native, port, path, counts_file, w)
                self.pipes.append(nw)
                self.probe.procs[f"client{w}"] = nw.pid
        dedupe = conns_per_user > 1
        for w in range(workers if native is None else 0):
            mine, theirs = ctx.Pipe()
            users = range(first_user + w, first_user + n_users, workers)
            p = ctx.Process(
                target=worker_main,
                args=(
                    w,
                    port,
                    secret,
                    users,
                    conns_per_user,
                    theirs,
                    self.counts,
                    self.last_ns,
                    dedupe,
                ),
                name=f"loadgen-worker-{w}",
                daemon=True,
            )
            p.start()
            self.procs.append(p)
            self.pipes.append(mine)
            self.probe.procs[f"client{w}"] = p.pid
        self.publisher: Any = None
        self.pub: Any
        if native is not None:
            self.pub = NativeProcess(
                native, "--publish", redis_port, n_users, conns_per_user, counts_file
            )
            self.probe.procs["publisher"] = self.pub.pid
        else:
            mine, theirs = ctx.Pipe()
            self.publisher = ctx.Process(
                target=publisher_main,
                args=(redis_port, n_users, conns_per_user, theirs, self.counts),
                name="loadgen-publisher",
                daemon=True,
            )
            self.publisher.start()
            self.pub = mine
            self.probe.procs["publisher"] = self.publisher.pid
        for pipe in [*self.pipes, self.pub]:
            self.expect(pipe, "ready", 60)
        self.published = 0

    @staticmethod
    def expect(pipe: Any, tag: str, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise TimeoutError(f"load generator process did not answer {tag!r} in {timeout}s")
        msg = pipe.recv()
        if msg[0] != tag:
            raise RuntimeError(f"expected {tag!r}, got {msg!r}")
        return msg[1] if len(msg) > 1 else None

    def wait_subscriber(self) -> None:
        self.pub.send(("wait_sub", 15.0))
        if not self.expect(self.pub, "wait_sub", 30):
            raise RuntimeError("no PSUBSCRIBE on redis: the server is not subscribed")

    def connect(self, concurrency: int) -> dict[str, Any]:
        per = max(1, concurrency // len(self.pipes))
        for pipe in self.pipes:
            pipe.send(("connect", per))
        res = [self.expect(pipe, "connected", 900) for pipe in self.pipes]
        ok = sum(r["ok"] for r in res)
        wall = max(r["end"] for r in res) - min(r["start"] for r in res)
        return {"ok": ok, "failed": sum(r["failed"] for r in res), "wall_s": wall}

    def delivered(self) -> int:
        return sum(self.counts)

    def wait_delivered(self, frames: int, stall: float = 10.0) -> bool:
        last, since = -1, time.monotonic()
        while True:
            got = sum(self.counts)
            if got >= frames:
                return True
            now = time.monotonic()
            if got != last:
                last, since = got, now
            elif now - since > stall:
                return False
            time.sleep(0.002)

    def burst(self, n: int, window_per_user: int) -> dict[str, Any]:
        self.pub.send(("burst", n, window_per_user))
        res = self.expect(self.pub, "burst", 1800)
        self.published = res["published"]
        return res

    def rate(self, rate: float, duration: float) -> dict[str, Any]:
        self.pub.send(("rate", rate, duration))
        res = self.expect(self.pub, "rate", duration * 10 + 60)
        self.published = res["published"]
        return res

    def latency(self, record: bool) -> array.array[int]:
        out: array.array[int] = array.array("q")
        for pipe in self.pipes:
            pipe.send(("latency", record))
        for pipe in self.pipes:
            out.frombytes(self.expect(pipe, "latency", 60))
        return out

    def handshakes(self) -> array.array[int]:
        """Each connection's handshake time (ns, connect() to the 101) since the last call;
        native client workers only."""
        out: array.array[int] = array.array("q")
        for pipe in self.native_pipes():
            pipe.send(("handshakes",))
        for pipe in self.native_pipes():
            out.frombytes(self.expect(pipe, "handshakes", 60))
        return out

    def resyncs(self, expect: bool) -> tuple[int, int]:
        """(connections that received their ``resync`` frame, monotonic ns of the last);
        ``expect``: from now on a resync frame is expected, not an error. Native only."""
        pipes = self.native_pipes()
        for pipe in pipes:
            pipe.send(("resyncs", expect))
        got = [self.expect(pipe, "resyncs", 60) for pipe in pipes]
        return sum(g[0] for g in got), max(g[1] for g in got)

    def native_pipes(self) -> list[NativeProcess]:
        if not all(isinstance(p, NativeProcess) for p in self.pipes):
            raise RuntimeError("handshake times and resyncs need the native client (cc)")
        return list(self.pipes)

    def expected_frames(self) -> int:
        return self.published * self.conns_per_user

    def finish(self) -> dict[str, Any]:
        for pipe in self.pipes:
            pipe.send(("finish", self.published, self.n_users))
        results = [self.expect(pipe, "result", 120) for pipe in self.pipes]
        errors: dict[str, int] = {}
        samples: list[str] = []
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            samples.extend(r["error_samples"])
        return {
            "frames_received": sum(r["received"] for r in results),
            "frames_expected": self.expected_frames(),
            "errors": errors,
            "error_samples": samples[:8],
        }

    def close(self) -> None:
        try:
            self.pub.send(("stop",))
        except OSError:
            pass
        for p in [*self.procs, *([self.publisher] if self.publisher else [])]:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in [*self.pipes, self.pub]:
            if isinstance(pipe, NativeProcess):
                pipe.close()
        self.counts.release()
        self.last_ns.release()
        self.shm.close()
        self.tmp.cleanup()


def run_scenario(
    scenario: str,
    *,
    port: int,
    server_pid: int,
    redis_port: int,
    secret: str,
    quick: bool = False,
    workers: int = 2,
    conns: int | None = None,
    messages: int | None = None,
    duration: float | None = None,
    max_rate: float | None = None,
    common_rate: float | None = None,
    concurrency: int = 64,
    redis_pid: int | None = None,
    native: str | None = None,
) -> dict[str, Any]:
    """Run one scenario against a running server; returns a dict of figures. ``native``:
    the compiled wsclient to use for the client workers (else asyncio workers)."""
    raise_nofile()
    params = dict((QUICK if quick else FULL)[scenario])
    if conns:
        params["conns"] = conns
    if messages:
        params["messages"] = messages
    if duration:
        params["duration"] = duration
    if scenario == "idle":
        n_users, per_user = params["conns"], 1
    elif scenario in ("throughput", "latency"):
        n_users, per_user = 1000, 1
    elif scenario == "fanout":
        n_users, per_user = 10, 100
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    n_conns = n_users * per_user
    out: dict[str, Any] = {"scenario": scenario, "conns": n_conns, "users": n_users}
    h = Harness(
        port=port,
        server_pid=server_pid,
        redis_port=redis_port,
        secret=secret,
        n_users=n_users,
        conns_per_user=per_user,
        workers=workers,
        redis_pid=redis_pid,
        native=native,
    )
    out["client"] = "native" if native else "python"
    ok = True
    try:
        h.wait_subscriber()
        # idle: RSS before/after N connections, and the connect rate
        time.sleep(0.3)
        rss0 = proc_rss_kb(server_pid)
        s0 = h.probe.snap()
        con = h.connect(concurrency)
        s1 = h.probe.snap()
        if scenario == "idle":
            time.sleep(1.0)
            rss1 = proc_rss_kb(server_pid)
            d = Probe.delta(s0, s1)
            out.update(
                connects_per_s=round(con["ok"] / max(con["wall_s"], 1e-9), 1),
                connect_wall_s=round(con["wall_s"], 3),
                server_cpu_us_per_connect=round(1e6 * d["server_cpu_s"] / max(con["ok"], 1), 1),
                rss_before_kb=rss0,
                rss_after_kb=rss1,
                kb_per_conn=round((rss1 - rss0) / max(con["ok"], 1), 2),
                loadgen=d["loadgen"],
            )
        out["connected"] = con["ok"]
        out["connect_failed"] = con["failed"]
        if con["failed"]:
            ok = False
            raise RuntimeError(f"{con['failed']} of {n_conns} connections failed")
        # warm-up (and, for idle, the delivery check): one message for every user
        pub = h.burst(n_users, 1)
        if not h.wait_delivered(h.expected_frames()):
            ok = False
            raise RuntimeError(
                f"warm-up: {h.delivered()} of {h.expected_frames()} frames arrived "
                f"(redis saw {pub['zero_receivers']} messages without subscriber)"
            )
        if scenario == "throughput":
            n = params["messages"]
            a = h.probe.snap()
            pub = h.burst(n, 200)
            done = h.wait_delivered(h.expected_frames())
            b = h.probe.snap()
            ok &= done
            d = Probe.delta(a, b)
            t_end = max(h.last_ns)
            secs = max((t_end - pub["t_start_ns"]) / 1e9, 1e-9)
            cpu = d["server_cpu_s"]
            out.update(
                messages=n,
                publish_s=round((pub["t_end_ns"] - pub["t_start_ns"]) / 1e9, 3),
                delivered_per_s=round(n / secs, 1),
                server_cpu_us_per_msg=round(1e6 * cpu / n, 2),
                msgs_per_cpu_s=round(n / max(cpu, 1e-9), 1),
                server_cpu_pct=round(100 * cpu / d["wall_s"], 1),
                loadgen=d["loadgen"],
            )
        elif scenario == "fanout":
            n = params["messages"]
            frames = n * per_user
            a = h.probe.snap()
            pub = h.burst(n, 100)
            done = h.wait_delivered(h.expected_frames())
            b = h.probe.snap()
            ok &= done
            d = Probe.delta(a, b)
            secs = max((max(h.last_ns) - pub["t_start_ns"]) / 1e9, 1e-9)
            out.update(
                messages=n,
                frames=frames,
                frames_per_s=round(frames / secs, 1),
                server_cpu_us_per_frame=round(1e6 * d["server_cpu_s"] / frames, 3),
                server_cpu_pct=round(100 * d["server_cpu_s"] / d["wall_s"], 1),
                loadgen=d["loadgen"],
            )
        elif scenario == "latency":
            runs = []
            rates = [2000.0] + ([round(0.8 * max_rate, 1)] if max_rate else [])
            # The same rate for every server (80% of the slower one's maximum): like for like.
            rates += [round(common_rate, 1)] if common_rate else []
            for rate in rates:
                h.latency(True)
                a = h.probe.snap()
                pub = h.rate(rate, params["duration"])
                done = h.wait_delivered(h.expected_frames())
                b = h.probe.snap()
                ok &= done
                d = Probe.delta(a, b)
                lat = h.latency(False)
                runs.append(
                    {
                        "rate": rate,
                        "rate_achieved": round(pub["rate_achieved"], 1),
                        "publisher_max_lag_ms": pub["publisher_max_lag_ms"],
                        **percentiles(lat),
                        "server_cpu_pct": round(100 * d["server_cpu_s"] / d["wall_s"], 1),
                        "loadgen": d["loadgen"],
                    }
                )
            out["runs"] = runs
            out["loadgen"] = max((r["loadgen"] for r in runs), key=lambda x: x["max_proc_cpu_pct"])
    except Exception as exc:
        ok = False
        out["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            check = h.finish()
        except Exception as exc:  # a worker that died cannot report
            check = {"errors": {"load generator failed": 1}, "error_samples": [repr(exc)]}
        h.close()
    out["check"] = check
    out["correct"] = bool(ok and not check["errors"] and "failure" not in out)
    return out


class Checked:
    """One measured run: ``with Checked(out) as run:`` around it records an exception as
    its failure; at the end every harness in ``run.harnesses`` checks and closes its
    connections, and ``out["correct"]`` says whether the run and the checks all passed
    (``run.ok`` is cleared by a phase that did not complete)."""

    def __init__(self, out: dict[str, Any]) -> None:
        self.out = out
        self.ok = True
        self.harnesses: list[Harness] = []

    def __enter__(self) -> Checked:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        failed = isinstance(exc, Exception)
        if failed:
            self.out["failure"] = f"{type(exc).__name__}: {exc}"
        errors: dict[str, int] = {}
        samples: list[str] = []
        for h in self.harnesses:
            try:
                check = h.finish()
            except Exception as err:  # a worker that died cannot report
                check = {"errors": {"load generator failed": 1}, "error_samples": [repr(err)]}
            h.close()
            for k, v in check["errors"].items():
                errors[k] = errors.get(k, 0) + v
            samples += check["error_samples"]
        self.out["check"] = {"errors": errors, "error_samples": samples[:8]}
        self.out["correct"] = bool(
            self.ok and not failed and not errors and "failure" not in self.out
        )
        return failed


IDLE_LATENCY = {"rate": 200.0, "messages": 3000, "settle_s": 16.0, "idle_cpu_s": 30.0}
IDLE_LATENCY_QUICK = {"rate": 200.0, "messages": 1000, "settle_s": 16.0, "idle_cpu_s": 10.0}


def run_idle_latency(
    idle: int,
    *,
    port: int,
    server_pid: int,
    redis_port: int,
    secret: str,
    quick: bool = False,
    workers: int = 2,
    concurrency: int = 64,
    redis_pid: int | None = None,
    native: str | None = None,
) -> dict[str, Any]:
    """One probe connection's latency at 200 msg/s while other client processes hold
    ``idle`` connections that answer pings and nothing else; and the server's CPU with
    them all open and no message (issue 21).

    The probe connects first, then the idle ones; the settle time outlasts a server's
    grace before the first ping of a new connection (smap-notify: 15 s by default), so
    the idle CPU and the probe see pings at their steady rate."""
    raise_nofile()
    p = IDLE_LATENCY_QUICK if quick else IDLE_LATENCY
    out: dict[str, Any] = {"scenario": "idle-latency", "idle": idle, "rate": p["rate"]}
    harness = functools.partial(
        Harness, port=port, server_pid=server_pid, redis_port=redis_port, secret=secret
    )
    with Checked(out) as run:
        probe = harness(n_users=1, conns_per_user=1, workers=1, redis_pid=redis_pid, native=native)
        run.harnesses.append(probe)
        probe.wait_subscriber()
        if probe.connect(1)["failed"]:
            raise RuntimeError("the probe connection failed")
        if idle:
            # Users 1..idle: never the probe's user 0, so no probe message reaches them.
            held = harness(
                n_users=idle,
                conns_per_user=1,
                workers=workers,
                native=native,
                first_user=1,
            )
            run.harnesses.append(held)
            con = held.connect(concurrency)
            out["connected"] = con["ok"]
            out["connects_per_s"] = round(con["ok"] / max(con["wall_s"], 1e-9), 1)
            if con["failed"]:
                raise RuntimeError(f"{con['failed']} of {idle} idle connections failed")
            for name, pid in held.probe.procs.items():
                if name.startswith("client"):
                    probe.probe.procs[f"idle-{name}"] = pid
        time.sleep(p["settle_s"])
        a = probe.probe.snap()
        time.sleep(p["idle_cpu_s"])
        b = probe.probe.snap()
        d = Probe.delta(a, b)
        out["idle_cpu_pct"] = round(100 * d["server_cpu_s"] / d["wall_s"], 2)
        out["rss_kb"] = proc_rss_kb(server_pid)
        probe.burst(1, 1)  # warm-up
        if not probe.wait_delivered(probe.expected_frames()):
            raise RuntimeError("warm-up: the probe's message did not arrive")
        probe.latency(True)
        a = probe.probe.snap()
        waited = proc_cpu_wait_s(server_pid)
        pub = probe.rate(p["rate"], p["messages"] / p["rate"])
        run.ok &= probe.wait_delivered(probe.expected_frames())
        b = probe.probe.snap()
        d = Probe.delta(a, b)
        out.update(
            percentiles(probe.latency(False)),
            # Time the server was ready but another process had its CPU: a shared
            # machine's share of the tail.
            server_cpu_wait_ms=round(1000 * (proc_cpu_wait_s(server_pid) - waited), 1),
            rate_achieved=round(pub["rate_achieved"], 1),
            publisher_max_lag_ms=pub["publisher_max_lag_ms"],
            server_cpu_pct=round(100 * d["server_cpu_s"] / d["wall_s"], 1),
            loadgen=d["loadgen"],
        )
    return out


# ---------------------------------------------------------------------------------------
# scale (issue 19): W instances on one port
# ---------------------------------------------------------------------------------------
SCALE = {"users": 1000, "messages": 200_000, "sequential": 1000, "resubscribe_users": 10_000}
SCALE_QUICK = {"users": 1000, "messages": 40_000, "sequential": 1000, "resubscribe_users": 10_000}
# A subscription lost sooner than this after it was made counts as a flap in smap-notify's
# subscriber (FLAP_WITHIN), which then waits longer before reconnecting; a Redis restart
# in production comes long after the subscription, so the benchmark's does too.
SETTLED_S = 10.5


def http_json(port: int, path: str = "/health") -> dict[str, Any]:
    """GET a JSON document from a loopback port (any status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        doc: dict[str, Any] = json.loads(conn.getresponse().read())
        return doc
    finally:
        conn.close()


def connect_figures(h: Harness, concurrency: int) -> dict[str, Any]:
    """Open ``h``'s connections ``concurrency`` at a time: the server's CPU per connect,
    the connect rate and the handshake times (connect() to the 101)."""
    a = h.probe.snap()
    con = h.connect(concurrency)
    b = h.probe.snap()
    if con["failed"]:
        raise RuntimeError(f"{con['failed']} of {con['ok'] + con['failed']} connections failed")
    d = Probe.delta(a, b)
    return {
        "conns": con["ok"],
        "concurrency": concurrency,
        "cpu_us_per_connect": round(1e6 * d["server_cpu_s"] / max(con["ok"], 1), 1),
        "connects_per_s": round(con["ok"] / max(con["wall_s"], 1e-9), 1),
        **percentiles(h.handshakes()),
    }


def run_scale_cost(
    *,
    port: int,
    server_pids: Sequence[int],
    redis_port: int,
    secret: str,
    pattern: bool,
    admin_ports: Sequence[int] = (),
    sequential: bool = False,
    quick: bool = False,
    workers: int = 2,
    concurrency: int = 64,
    redis_pid: int | None = None,
    native: str | None = None,
) -> dict[str, Any]:
    """The server's CPU per delivered message, all its instances (``server_pids``, sharing
    ``port``) summed, as in ``throughput``; its CPU per connect and handshake times while
    the users connect ``concurrency`` at a time; with ``sequential``, also one at a time
    (further users, who get no message). ``pattern``: the server subscribes with
    PSUBSCRIBE (wait for it); ``admin_ports``: each instance's own /health, to count the
    connections each one holds."""
    raise_nofile()
    p = SCALE_QUICK if quick else SCALE
    n_users = p["users"]
    out: dict[str, Any] = {"scenario": "scale", "instances": len(server_pids), "users": n_users}
    harness = functools.partial(
        Harness,
        port=port,
        server_pid=server_pids[0],
        more_servers=server_pids[1:],
        redis_port=redis_port,
        secret=secret,
        native=native,
    )
    with Checked(out) as run:
        h = harness(n_users=n_users, conns_per_user=1, workers=workers, redis_pid=redis_pid)
        run.harnesses.append(h)
        h.native_pipes()
        if pattern:
            h.wait_subscriber()
        time.sleep(0.3)
        out["connect"] = connect_figures(h, concurrency)
        out["conns_per_instance"] = [
            http_json(a)["websocket"]["active_connections"] for a in admin_ports
        ]
        pub = h.burst(n_users, 1)  # warm-up, and every user's subscription proven
        if not h.wait_delivered(h.expected_frames()):
            raise RuntimeError(
                f"warm-up: {h.delivered()} of {h.expected_frames()} frames arrived "
                f"(redis saw {pub['zero_receivers']} messages without subscriber)"
            )
        n = p["messages"]
        a = h.probe.snap()
        pub = h.burst(n, 200)
        run.ok &= h.wait_delivered(h.expected_frames())
        b = h.probe.snap()
        d = Probe.delta(a, b)
        secs = max((max(h.last_ns) - pub["t_start_ns"]) / 1e9, 1e-9)
        out.update(
            messages=n,
            delivered_per_s=round(n / secs, 1),
            server_cpu_us_per_msg=round(1e6 * d["server_cpu_s"] / n, 2),
            server_cpu_pct=round(100 * d["server_cpu_s"] / d["wall_s"], 1),
            zero_receivers=pub["zero_receivers"],
            loadgen=d["loadgen"],
        )
        if sequential:
            one = harness(n_users=p["sequential"], conns_per_user=1, workers=1, first_user=n_users)
            run.harnesses.append(one)
            out["sequential"] = connect_figures(one, 1)
    return out


def run_resubscribe(
    *,
    port: int,
    server_pid: int,
    admin_port: int,
    redis_port: int,
    secret: str,
    restart: Callable[[], tuple[float, float]],
    healthy_at: float,
    quick: bool = False,
    workers: int = 2,
    concurrency: int = 64,
    native: str | None = None,
) -> dict[str, Any]:
    """How long a per-user-mode instance takes to subscribe every user again after a
    Redis restart: N users connect, each gets a message; ``restart()`` kills Redis and
    starts it again, returning (killed, answered PING) in time.monotonic(); then, from
    the PING's answer, until the instance's /health (``admin_port``) shows every channel
    subscribed, and until the last connection has its ``resync`` frame. Then one more
    message per user proves every subscription live. ``healthy_at``: when the instance
    first subscribed (time.monotonic())."""
    raise_nofile()
    n = (SCALE_QUICK if quick else SCALE)["resubscribe_users"]
    out: dict[str, Any] = {"scenario": "resubscribe", "users": n}
    # No redis_pid for the probe: the restarted Redis has another.
    h = Harness(
        port=port,
        server_pid=server_pid,
        redis_port=redis_port,
        secret=secret,
        n_users=n,
        conns_per_user=1,
        workers=workers,
        native=native,
    )
    with Checked(out) as run:
        run.harnesses.append(h)
        h.native_pipes()
        con = h.connect(concurrency)
        if con["failed"]:
            raise RuntimeError(f"{con['failed']} of {n} connections failed")
        h.burst(n, 1)
        if not h.wait_delivered(h.expected_frames()):
            raise RuntimeError(f"warm-up: {h.delivered()} of {h.expected_frames()} frames")
        out["channels_before"] = http_json(admin_port)["subscriber"]["channels"]
        time.sleep(max(0.0, healthy_at + SETTLED_S - time.monotonic()))
        h.resyncs(True)
        killed, answered = restart()
        subscribed = None
        count = last_ns = 0
        while time.monotonic() < answered + 60:
            if subscribed is None:
                try:
                    sub = http_json(admin_port)["subscriber"]
                except (OSError, ValueError):
                    sub = {}
                if sub.get("active") and sub.get("channels", 0) >= n:
                    subscribed = time.monotonic()
            count, last_ns = h.resyncs(True)
            if subscribed is not None and count >= con["ok"]:
                break
            time.sleep(0.02)
        out.update(
            connections=con["ok"],
            redis_down_s=round(answered - killed, 3),
            subscribed_s=None if subscribed is None else round(subscribed - answered, 3),
            resyncs=count,
            last_resync_s=round(last_ns / 1e9 - answered, 3) if count else None,
        )
        if subscribed is None or count < con["ok"]:
            raise RuntimeError(
                f"within 60 s: subscribed {subscribed is not None}, resyncs {count} of {con['ok']}"
            )
        # Message 1 for every user, from a new connection to the new Redis.
        pub = Publisher(redis_port, n, 1, None, h.counts)
        pub.i = n
        pub.burst(n, 1)
        pub.sock.close()
        h.published = 2 * n
        run.ok &= h.wait_delivered(h.expected_frames())
        out["zero_receivers_after"] = pub.zero
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=["idle", "throughput", "latency", "fanout"])
    ap.add_argument("--port", type=int, required=True, help="server WebSocket port (loopback)")
    ap.add_argument("--server-pid", type=int, required=True, help="PID to measure")
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--redis-pid", type=int, help="also report redis-server's CPU")
    ap.add_argument("--secret", required=True, help="the server's JWT_SECRET_KEY")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conns", type=int)
    ap.add_argument("--messages", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--max-rate", type=float, help="latency: also run at 80%% of this rate")
    ap.add_argument("--common-rate", type=float, help="latency: also run at this rate")
    add_client_option(ap)
    a = ap.parse_args(argv)
    native = choose_client(a.client)
    res = run_scenario(
        a.scenario,
        port=a.port,
        server_pid=a.server_pid,
        redis_port=a.redis_port,
        secret=a.secret,
        quick=a.quick,
        workers=a.workers,
        conns=a.conns,
        messages=a.messages,
        duration=a.duration,
        max_rate=a.max_rate,
        common_rate=a.common_rate,
        redis_pid=a.redis_pid,
        native=native,
    )
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0 if res["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
