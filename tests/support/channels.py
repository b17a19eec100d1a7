"""CHANNELS configurations and published samples shared by the channel tests (unit,
end-to-end, per-user mode): the topic era's and the successor's templates, the samples
in ``tests/samples``, and reading a socket's frames up to a marker message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from tests.test_config import CheckConfig, check_config  # noqa: F401  (a fixture)

TOPIC_ERA = "user_noti:{user},project:{project}:{user}|raw,job:{job}:{user}|raw"


SUCCESSOR = (
    "project:{project}:user:{user},campaign:{campaign}:user:{user},"
    "alert:{alert}:user:{user},system:{event}"
)


SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def sample(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / name).read_text())


MARKER = {"type": "notification", "payload": "end"}


async def frames_until_marker(ws: trio_websocket.WebSocketConnection) -> list[str]:
    """Every frame up to the marker (which every connection of the user gets last)."""
    frames = []
    with trio.fail_after(10):
        while True:
            frame = await ws.get_message()
            assert isinstance(frame, str)
            if json.loads(frame).get("payload") == "end":
                return frames
            frames.append(frame)
