"""Redis messages in, WebSocket envelopes out: parsing, typed payloads, validation."""

from __future__ import annotations

import enum
import json
import time
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import cattrs
import orjson
from attrs import validators as v

from .channels import DEFAULT, Channels, Match, Template
from .frames import text_frame_header

UNKNOWN_TYPE_LABEL: Final = "unknown"
_BOM: Final = b"\xef\xbb\xbf"
# 19 or more digits in a row may be an integer beyond 64 bits: parse those exactly. Found
# by mapping every digit to "0" and everything else to " ", then looking for 19 zeros: a
# quarter of what re.search(rb"\d{19}") costs on a 160-byte message (0.9 µs against 4.3).
_DIGITS_AS_ZEROS: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS: Final = b"0" * 19


class MessageType(enum.StrEnum):
    NOTIFICATION = "notification"
    ALERT = "alert"
    UPDATE = "update"
    PING = "ping"
    PONG = "pong"
    PROJECT_PROGRESS = "project_progress"
    PROJECT_COMPLETED = "project_completed"
    DRYRUN_RESULT = "dryrun_result"
    # Sent by smap-notify itself after a Redis outage; never read from Redis.
    RESYNC = "resync"


KNOWN_TYPES: Final = frozenset(t.value for t in MessageType if t is not MessageType.RESYNC)


class RawShape(enum.StrEnum):
    """Metric labels of the topic era's objects without ``type`` (``|raw`` templates)."""

    PROJECT_UPDATE = "project_update"
    JOB_UPDATE = "job_update"


PHASE_STATUSES: Final = ("INITIALIZING", "PROCESSING", "DONE", "COMPLETED", "FAILED", "PAUSED")


class _FieldError(ValueError):
    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.field_name = field_name


def _strict(kind: type | tuple[type, ...]) -> Any:
    """Like instance_of, but a JSON true/false is not a number."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _FieldError(
                attribute.name, f"must be {_kind_name(kind)}, got {_json_kind(value)}"
            )

    return check


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list"}
    if isinstance(kind, tuple):
        return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kind))
    return names.get(kind, kind.__name__)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _non_empty(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise _FieldError(attribute.name, "must not be empty")


def _not_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise _FieldError(attribute.name, f"must be >= 0, got {value!r}")


def _percent(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= 100:
        raise _FieldError(attribute.name, f"must be between 0 and 100, got {value!r}")


_COUNT: Final = [_strict(int), _not_negative]


@attrs.frozen
class ProgressPayload:
    """Payload of ``project_progress`` and ``project_completed`` (project-srv)."""

    project_id: str = attrs.field(validator=[_strict(str), _non_empty])
    status: str = attrs.field(validator=_strict(str))
    total: int = attrs.field(validator=_COUNT)
    done: int = attrs.field(validator=_COUNT)
    errors: int = attrs.field(validator=_COUNT)
    progress_percent: float = attrs.field(validator=[_strict((int, float)), _percent])


@attrs.frozen
class DryRunPayload:
    """Payload of ``dryrun_result`` (project-srv's dry-run callback)."""

    job_id: str = attrs.field(validator=[_strict(str), _non_empty])
    platform: str = attrs.field(validator=_strict(str))
    status: str = attrs.field(validator=_strict(str))
    content: list[Any] | None = attrs.field(default=None, validator=v.optional(_strict(list)))
    errors: list[Any] | None = attrs.field(default=None, validator=v.optional(_strict(list)))


def _status_of(statuses: tuple[str, ...]) -> Any:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in statuses:
            raise _FieldError(
                attribute.name, f"must be one of {', '.join(statuses)}, got {value!r:.40}"
            )

    return check


_PERCENT: Final = [_strict((int, float)), _percent]


@attrs.frozen
class PhaseProgress:
    """One phase (``crawl``, ``analyze``) of the topic era's project progress."""

    total: int = attrs.field(validator=_COUNT)
    done: int = attrs.field(validator=_COUNT)
    errors: int = attrs.field(validator=_COUNT)
    progress_percent: float = attrs.field(validator=_PERCENT)


@attrs.frozen
class PhaseProgressPayload:
    """Payload of ``project_progress`` / ``project_completed`` with phases (topic era)."""

    project_id: str = attrs.field(validator=[_strict(str), _non_empty])
    status: str = attrs.field(validator=[_strict(str), _status_of(PHASE_STATUSES)])
    crawl: PhaseProgress
    analyze: PhaseProgress
    overall_progress_percent: float = attrs.field(validator=_PERCENT)


# A progress payload with any of these keys is the phase-based one.
PHASE_KEYS: Final = frozenset({"crawl", "analyze", "overall_progress_percent"})


@attrs.frozen
class UpdateProgress:
    """``progress`` of the topic era's flat project and job updates."""

    current: int = attrs.field(validator=_COUNT)
    total: int = attrs.field(validator=_COUNT)
    percentage: float = attrs.field(validator=_PERCENT)
    eta: float | None = attrs.field(
        default=None, validator=v.optional([_strict((int, float)), _not_negative])
    )
    errors: list[Any] | None = attrs.field(default=None, validator=v.optional(_strict(list)))


@attrs.frozen
class ProjectUpdate:
    """The topic era's flat project update: ``{status, progress}``, no ``type``."""

    status: str = attrs.field(validator=[_strict(str), _non_empty])
    progress: UpdateProgress | None = None


@attrs.frozen
class JobUpdate:
    """The topic era's job update: ``{platform, status, batch, progress}``, no ``type``."""

    platform: str = attrs.field(validator=[_strict(str), _non_empty])
    status: str = attrs.field(validator=[_strict(str), _non_empty])
    batch: dict[str, Any] | None = attrs.field(default=None, validator=v.optional(_strict(dict)))
    progress: UpdateProgress | None = None


PAYLOAD_CLASSES: Final[dict[str, type]] = {
    MessageType.PROJECT_PROGRESS: ProgressPayload,
    MessageType.PROJECT_COMPLETED: ProgressPayload,
    MessageType.DRYRUN_RESULT: DryRunPayload,
    RawShape.PROJECT_UPDATE: ProjectUpdate,
    RawShape.JOB_UPDATE: JobUpdate,
}

# Values are already JSON-typed; validators, not coercion, decide what is acceptable.
converter: Final = cattrs.Converter()
for _kind in (int, float, str):
    converter.register_structure_hook(_kind, lambda value, _t: value)
converter.register_structure_hook_func(
    lambda t: t in (list[Any] | None, dict[str, Any] | None, float | None),
    lambda value, _t: value,
)


def _object_first(cls: type) -> None:
    """Check that a nested object is one before its fields are."""
    hook = converter.get_structure_hook(cls)

    def structure(value: Any, t: type) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"must be an object, got {_json_kind(value)}")
        return hook(value, t)

    converter.register_structure_hook(cls, structure)


for _nested in (PhaseProgress, UpdateProgress):
    _object_first(_nested)


class PayloadError(ValueError):
    """A typed payload failed validation; ``field`` names the first bad field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def structure_payload(message_type: str, payload: Any) -> Any:
    """Validate a typed payload, returning its attrs instance (None for untyped types).

    Raises PayloadError with the first bad field and the reason.
    """
    cls = PAYLOAD_CLASSES.get(message_type)
    if cls is None:
        return None
    if not isinstance(payload, dict):
        raise PayloadError("payload", f"must be an object, got {_json_kind(payload)}")
    if cls is ProgressPayload and not PHASE_KEYS.isdisjoint(payload):
        cls = PhaseProgressPayload
    try:
        return converter.structure(payload, cls)
    except cattrs.ClassValidationError as exc:
        field, reason = _first_error(exc)
    except _FieldError as exc:
        field, reason = exc.field_name, str(exc)
    raise PayloadError(field, reason)


def _first_error(exc: cattrs.ClassValidationError) -> tuple[str, str]:
    """The first bad field (a dotted path into nested objects) and why."""
    for sub in exc.exceptions:
        notes = getattr(sub, "__notes__", [])
        name = next((n.name for n in notes if hasattr(n, "name")), None)
        if isinstance(sub, cattrs.ClassValidationError):
            inner, reason = _first_error(sub)
            return (f"{name}.{inner}" if name else inner), reason
        name = getattr(sub, "field_name", None) or name or "payload"
        if isinstance(sub, KeyError):
            return name, "is required"
        if isinstance(sub, _FieldError) and notes:
            # Raised by a nested object's own validator: its field, under this one.
            outer = next((n.name for n in notes if hasattr(n, "name")), None)
            if outer and outer != name:
                return f"{outer}.{name}", str(sub)
        return name, str(sub)
    return "payload", str(exc)


@attrs.define
class Routed:
    """A message accepted for delivery to ``user_id`` (None: a broadcast to everyone).

    Not frozen: a frozen attrs class sets each field through ``object.__setattr__``, which
    made creating one (once per message) three times as costly: 1.8 µs against 0.6.
    """

    user_id: str | None
    template: Template  # the one the channel matched
    type: str
    type_json: bytes
    payload_json: bytes
    known: bool
    payload: Any = None
    invalid: PayloadError | None = None
    topic: str | None = None  # the template's topic field, if it has one
    value: str = ""  # the topic's value in the channel
    raw: bytes | None = None  # the frame's text as published (a |raw template)

    @property
    def payload_text(self) -> str:
        return self.payload_json.decode("utf-8")

    @property
    def type_label(self) -> str:
        """Metric label: the type if known, else one shared label (bounded cardinality)."""
        return self.type if self.known else UNKNOWN_TYPE_LABEL


@attrs.frozen
class Rejected:
    """A message that is not delivered, with the reason (a metric label) and details."""

    reason: str
    detail: str
    user_id: str | None = ""
    type: str = ""
    template: str = ""  # the channel's template, once the channel matched one


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(data: bytes | str) -> tuple[Any, bool]:
    """Parse JSON; the second value says whether orjson (the fast path) parsed it.

    orjson turns integers beyond 64 bits into floats and cannot keep every input; those
    inputs, and everything orjson refuses, take the standard library's exact path.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _LONG_DIGITS not in raw.translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            pass
    if isinstance(data, bytes):
        # JSON between systems is UTF-8 (RFC 8259 8.1); given bytes, json.loads would also
        # guess UTF-16 and UTF-32, which the original's json.Unmarshal refused. A UTF-8
        # byte-order mark is skipped, as the RFC allows.
        data = data.decode("utf-8-sig", "surrogatepass")
    return json.loads(data, parse_constant=_no_constants), False


def _dumps(value: Any, fast: bool) -> bytes:
    """Compact JSON with key order, numbers and non-ASCII text kept."""
    if fast:
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            # orjson reads 1,024 levels of nesting but writes only 254: deeper values
            # take the standard library's path (which stops near 1,000: RecursionError).
            pass
    # Values parsed by the standard library may hold inf (from 1e999), huge integers or
    # lone surrogates, which orjson would write as null or refuse.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )


def parse_message(
    channel: bytes | str,
    data: bytes | str,
    *,
    deliver_invalid: bool = False,
    channels: Channels = DEFAULT,
) -> Routed | Rejected:
    """Decide what to do with one Pub/Sub message: route it, or reject it."""
    if isinstance(channel, bytes):
        try:
            channel = channel.decode("utf-8")
        except UnicodeDecodeError:
            # Decoded with replacement characters, different channels would name one user.
            return Rejected("bad_channel", f"channel {channel[:100]!r} is not valid UTF-8")
    match = channels.match(channel)
    if isinstance(match, str):
        if match == "empty_user_id":
            return Rejected(match, f"channel {channel[:100]!r} has no user id")
        return Rejected(
            match, f"channel {channel[:100]!r} matches none of {','.join(channels.patterns)}"
        )
    template, user_id, topic, value = match
    try:
        message, fast = _loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return Rejected("invalid_json", f"not JSON: {exc}", user_id, template=template.text)
    except RecursionError:
        return Rejected("invalid_json", "JSON nested too deeply", user_id, template=template.text)
    if not isinstance(message, dict):
        return Rejected(
            "not_object",
            f"message is {_json_kind(message)}, not an object",
            user_id,
            template=template.text,
        )
    if template.raw:
        return _parse_raw(match, data, message, fast, deliver_invalid)
    message_type = message.get("type")
    if not isinstance(message_type, str):
        return Rejected(
            "invalid_type",
            f"type is {_json_kind(message_type)}, not a string",
            user_id,
            template=template.text,
        )
    payload = message.get("payload")
    try:
        type_json = _dumps(message_type, fast)
    except UnicodeEncodeError:
        return Rejected(
            "invalid_type", "type is not valid UTF-8 text", user_id, template=template.text
        )
    try:
        payload_json = _dumps(payload, fast)
    except (ValueError, UnicodeEncodeError) as exc:
        # e.g. a lone surrogate (\ud800): it parses, but cannot be sent as UTF-8 text.
        return Rejected(
            "invalid_json", f"payload cannot be re-encoded: {exc}", user_id, template=template.text
        )
    except RecursionError:
        return Rejected(
            "invalid_json", "payload nested too deeply", user_id, template=template.text
        )
    known = message_type in KNOWN_TYPES
    try:
        typed = structure_payload(message_type, payload) if known else None
    except PayloadError as exc:
        if not deliver_invalid:
            return Rejected("invalid_payload", str(exc), user_id, message_type, template.text)
        return Routed(
            user_id, template, message_type, type_json, payload_json, True, None, exc, topic, value
        )
    return Routed(
        user_id, template, message_type, type_json, payload_json, known, typed, None, topic, value
    )


def _parse_raw(
    match: Match,
    data: bytes | str,
    message: dict[str, Any],
    fast: bool,
    deliver_invalid: bool,
) -> Routed | Rejected:
    """A message on a |raw template: the published object is the frame, unchanged. With a
    ``type`` it is validated like an enveloped message's payload; without one the topic
    era's flat shapes are recognised by their keys."""
    template, user_id, topic, value = match
    label = template.text
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(_BOM):  # not part of the JSON text (RFC 8259 8.1)
        data = data[len(_BOM) :]
    if not fast:
        try:
            data.decode("utf-8")  # a text frame must be UTF-8; surrogates are not
        except UnicodeDecodeError as exc:
            return Rejected("invalid_json", f"not UTF-8 text: {exc}", user_id, template=label)
    message_type = message.get("type")
    payload: Any = message
    if message_type is None:
        message_type = _raw_shape(message)
    elif isinstance(message_type, str):
        payload = message.get("payload")
    else:
        return Rejected(
            "invalid_type",
            f"type is {_json_kind(message_type)}, not a string",
            user_id,
            template=label,
        )
    known = message_type in KNOWN_TYPES or message_type in _RAW_SHAPES
    try:
        typed = structure_payload(message_type, payload) if known else None
    except PayloadError as exc:
        if not deliver_invalid:
            return Rejected("invalid_payload", str(exc), user_id, message_type, label)
        return Routed(
            user_id, template, message_type, b"", b"", True, None, exc, topic, value, data
        )
    return Routed(user_id, template, message_type, b"", b"", known, typed, None, topic, value, data)


_RAW_SHAPES: Final = frozenset(RawShape)


def _raw_shape(message: dict[str, Any]) -> str:
    """The flat shape of an object without ``type``: a job update names its platform."""
    if "platform" in message:
        return RawShape.JOB_UPDATE.value
    if "status" in message:
        return RawShape.PROJECT_UPDATE.value
    return UNKNOWN_TYPE_LABEL


# The current second, and its RFC 3339 text up to the fraction: see format_timestamp.
_second_text: tuple[int, str] = (-1, "")


def format_timestamp(moment: datetime | None = None) -> str:
    """RFC 3339 with microseconds and a UTC offset; without ``moment``: now, in UTC.

    Now is formatted like ``datetime.now(UTC).isoformat(timespec="microseconds")``, with
    the date and time to the second formatted once a second: 1.4 µs instead of 4.2, once
    per batch of messages.
    """
    if moment is not None:
        return moment.isoformat(timespec="microseconds")
    global _second_text
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cached, text = _second_text
    if second != cached:
        text = datetime.fromtimestamp(second, UTC).replace(tzinfo=None).isoformat() + "."
        _second_text = (second, text)
    return f"{text}{ns // 1000:06d}+00:00"


def envelope(type_json: bytes, payload_json: bytes, timestamp: str) -> bytes:
    """The outbound frame text (UTF-8): type, payload, timestamp, in that key order."""
    return b"".join(
        (
            b'{"type":',
            type_json,
            b',"payload":',
            payload_json,
            b',"timestamp":"',
            timestamp.encode("ascii"),
            b'"}',
        )
    )


_ENVELOPE_FIXED: Final = len(b'{"type":,"payload":,"timestamp":""}')


def envelope_frame(type_json: bytes, payload_json: bytes, timestamp: bytes) -> bytes:
    """``envelope``'s text framed, in one copy (a large payload is then held once, as its
    frame); ``timestamp`` already ASCII, as encoded once per batch."""
    n = _ENVELOPE_FIXED + len(type_json) + len(payload_json) + len(timestamp)
    return b"".join(
        (
            text_frame_header(n),
            b'{"type":',
            type_json,
            b',"payload":',
            payload_json,
            b',"timestamp":"',
            timestamp,
            b'"}',
        )
    )


def resync_envelope(
    reason: str, since: str | None, timestamp: str, dropped: int | None = None
) -> bytes:
    fields: dict[str, Any] = {"reason": reason, "since": since}
    if dropped is not None:
        fields["dropped"] = dropped
    return envelope(orjson.dumps(MessageType.RESYNC.value), orjson.dumps(fields), timestamp)
