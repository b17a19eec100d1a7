"""The bytes of the server's WebSocket frames (RFC 6455 5.2): pure, no I/O."""

from __future__ import annotations

from typing import Final

PING_FRAME: Final = b"\x89\x00"  # FIN + ping, no payload, unmasked (server side)
OPCODE_CLOSE: Final = 0x8
PROTOCOL_FAILURES: Final = frozenset({1002, 1007})  # close codes of a client's protocol error


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked server-to-client text frame."""
    return text_frame_header(len(payload)) + payload


def text_frame_header(n: int) -> bytes:
    """The header of a text frame of ``n`` payload bytes."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def text_frame_of(parts: list[bytes]) -> bytes:
    """The text frame of the payload ``parts`` make, joined in one copy: a large message
    is held as its frame, not also as the payload it was framed from."""
    return b"".join([text_frame_header(sum(map(len, parts))), *parts])


def close_frame(code: int) -> bytes:
    """A close frame with ``code`` and no reason text."""
    return b"\x88\x02" + code.to_bytes(2, "big")


def is_close_frame(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts with a close frame."""
    return bool(data) and data[0] & 0x0F == OPCODE_CLOSE
