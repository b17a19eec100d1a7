"""Self-check of the load generator's correctness checks (no server, no timing).

    python bench/selfcheck.py

Feeds hand-made server frames to ``loadgen.WSClient`` and asserts that each contract
violation the benchmark claims to catch is caught, and that good frames pass, also when
split at every byte. Then feeds the same bytes, and a set of malformed JSON documents, to
the native client's checks (``bench/wsclient.c --check``) and asserts the same verdicts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
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


def native(binary: str, cases: list[list[bytes]]) -> list[tuple[int, dict[str, int]]]:
    """The native client's verdicts: (next sequence number, error counts) per case."""
    text = "".join("".join(chunk.hex() + "\n" for chunk in case) + "\n" for case in cases)
    out = subprocess.run(
        [binary, "--check"], input=text, capture_output=True, text=True, check=True
    ).stdout
    verdicts = []
    for line in out.splitlines():
        seq, errors = line.split(" ", 1)
        verdicts.append((int(seq), json.loads(errors)))
    return verdicts


# Envelopes that are not one valid JSON document, each as one text frame.
BAD_JSON = [
    b'{"type":"notification"',
    b'{"type":"notification",}',
    b'{"type":"notification" "payload":1}',
    b"{'type':'notification'}",
    b'{"type":"noti\x01fication"}',
    b'{"type":"\\x"}',
    b'{"type":"\\ud800"}',
    b'{"type":"\\udc00x"}',
    b'{"type":"\xed\xa0\x80"}',
    b'{"type":"\xc0\xaf"}',
    b'{"type":"\xff"}',
    b'{"type":01}',
    b'{"type":1.}',
    b'{"type":-}',
    b'{"type":1e}',
    b'{"type":tru}',
    b'{"type":[1,2,]}',
    b'{"type":NaN}',
    b"",
    b" ",
    b"{}{}",
    b'{"a":1} x',
]
# Valid JSON documents that are not the envelope.
BAD_ENVELOPE = [
    b"[]",
    b'"notification"',
    b"{}",
    b'{"type":"notification","payload":{"u":0,"seq":0,"ts":0}}',
    b'{"timestamp":"2026-01-01T00:00:00.1Z","type":"notification","payload":{}}',
]


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
    print("load generator checks (asyncio client): ok")

    # The native client must reach the same verdicts on the same bytes.
    binary, how = loadgen.build_native()
    if binary is None:
        print(f"load generator checks (native client): skipped, cannot build it ({how})")
        return
    same = [[good], [good[i : i + 1] for i in range(len(good))], *cases.values()]
    same += [[frame(d)] for d in BAD_JSON + BAD_ENVELOPE]
    same += [[frame(b" " + doc(0, 0) + b"\r\n")]]  # whitespace around one document is fine
    expected = [await feed(case) for case in same]
    got = native(binary, same)
    for case, want, have in zip(same, expected, got, strict=True):
        assert want == have, (case, want, have)
    assert all(errors for _, errors in expected[len(cases) + 2 : -1]), "each bad one caught"
    # Stricter than a dict: a repeated key is not the envelope.
    twice = doc(0, 0)[:-1] + b',"type":"notification"}'
    assert native(binary, [[frame(twice)]]) == [(0, {"bad envelope keys": 1})]
    print("load generator checks (native client): ok")


if __name__ == "__main__":
    asyncio.run(main())
