"""Self-check of the load generator's correctness checks (no server, no timing).

    python bench/selfcheck.py

Feeds hand-made server frames to ``loadgen.WSClient`` and asserts that each contract
violation the benchmark claims to catch is caught, and that good frames pass, also when
split at every byte.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402

TS = "2026-01-01T00:00:00.123+00:00"


def frame(payload: bytes, b0: int = 0x81) -> bytes:
    n = len(payload)
    head = bytes([b0, n]) if n < 126 else bytes([b0, 126]) + n.to_bytes(2, "big")
    return head + payload


def doc(
    u: int, seq: int, order: tuple[str, ...] = ("type", "payload", "timestamp"), ts: str = TS
) -> bytes:
    d = {"type": "notification", "payload": {"u": u, "seq": seq, "ts": 0}, "timestamp": ts}
    return json.dumps({k: d[k] for k in order}, separators=(",", ":")).encode()


class FakeTransport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def feed(chunks: list[bytes], dedupe: bool = False) -> tuple[int, dict[str, int]]:
    w = loadgen.Worker(0, 1, "s", [0], 1, None, [0], [0], dedupe)
    c = loadgen.WSClient(w, 0, b"")
    c.tr = FakeTransport()  # type: ignore[assignment]
    c.open = True
    c.opened.set_result(None)
    for chunk in chunks:
        c.data_received(chunk)
    return c.next_seq, w.errors.counts


async def main() -> None:
    good = frame(doc(0, 0)) + frame(doc(0, 1)) + frame(doc(0, 2))
    assert await feed([good]) == (3, {})
    assert await feed([good[i : i + 1] for i in range(len(good))]) == (3, {})
    cases = {
        "frame is not exactly one JSON document": [frame(doc(0, 0) + b"\n" + doc(0, 1))],
        "bad envelope keys": [frame(doc(0, 0, ("payload", "type", "timestamp")))],
        "out of order, lost or duplicated": [frame(doc(0, 0)) + frame(doc(0, 2))],
        "misrouted": [frame(doc(1, 0))],
        "not one final text frame per message": [frame(doc(0, 0), 0x82)],
        "bad type or timestamp": [frame(doc(0, 0, ts="2026-01-01T00:00:00+00:00"))],
    }
    for kind, chunks in cases.items():
        _, errors = await feed(chunks)
        assert kind in errors, (kind, errors)
    _, errors = await feed([frame(doc(0, 0)) + frame(doc(0, 0))], dedupe=True)
    assert "out of order, lost or duplicated" in errors, errors
    print("load generator checks: ok")


if __name__ == "__main__":
    asyncio.run(main())
