"""Redis messages in, envelopes out: CONTRACT sections 2, 3 and 8 ("Messages")."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from smap_notify.frames import text_frame
from smap_notify.messages import (
    KNOWN_TYPES,
    DryRunPayload,
    MessageType,
    PayloadError,
    PhaseProgress,
    PhaseProgressPayload,
    ProgressPayload,
    Rejected,
    Routed,
    _loads,
    converter,
    envelope,
    envelope_frame,
    format_timestamp,
    parse_message,
    resync_envelope,
    structure_payload,
)

# Copied from the contract (shared/spec/samples) so the tests run from any checkout.
SAMPLES = Path(__file__).resolve().parent / "samples"
USER = "8f3c2a9e-1b2d-4c5e-9f00-123456789abc"
CHANNEL = f"user_noti:{USER}"

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d)$")


def redis_in_samples() -> list[tuple[str, str, dict[str, Any]]]:
    """(id, channel, message) for every publisher sample."""
    out = []
    for path in sorted(SAMPLES.glob("redis-in_*.json")):
        doc = json.loads(path.read_text())
        if "examples" in doc:
            for n, example in enumerate(doc["examples"]):
                out.append((f"{path.stem}[{n}]", example["channel"], example["message"]))
        else:
            out.append((path.stem, doc["channel"], doc["message"]))
    return out


SAMPLE_MESSAGES = redis_in_samples()


def routed(channel: str | bytes, data: str | bytes, **kwargs: Any) -> Routed:
    result = parse_message(channel, data, **kwargs)
    assert isinstance(result, Routed), result
    return result


def rejected(channel: str | bytes, data: str | bytes, **kwargs: Any) -> Rejected:
    result = parse_message(channel, data, **kwargs)
    assert isinstance(result, Rejected), result
    assert result.reason
    assert result.detail
    return result


def progress(**overrides: Any) -> dict[str, Any]:
    payload = {
        "done": 150,
        "errors": 2,
        "progress_percent": 15,
        "project_id": "proj_xyz",
        "status": "CRAWLING",
        "total": 1000,
    }
    payload.update(overrides)
    return payload


def message(type_: str, payload: Any) -> str:
    return json.dumps({"type": type_, "payload": payload})


# -- CONTRACT section 8: the original's message tests --------------------------------------


def test_type_constants_equal_the_originals() -> None:
    assert MessageType.PROJECT_PROGRESS == "project_progress"
    assert MessageType.PROJECT_COMPLETED == "project_completed"
    assert MessageType.DRYRUN_RESULT == "dryrun_result"


def test_known_types_are_the_contract_list() -> None:
    assert KNOWN_TYPES == {
        "notification",
        "alert",
        "update",
        "ping",
        "pong",
        "project_progress",
        "project_completed",
        "dryrun_result",
    }


def test_progress_payload_survives_a_json_round_trip() -> None:
    payload = ProgressPayload("proj-123", "processing", 100, 50, 2, 50.0)
    text = json.dumps(converter.unstructure(payload))
    back = structure_payload(MessageType.PROJECT_PROGRESS, json.loads(text))
    assert back == payload
    assert back.progress_percent == 50.0
    assert attrs.asdict(back) == {
        "project_id": "proj-123",
        "status": "processing",
        "total": 100,
        "done": 50,
        "errors": 2,
        "progress_percent": 50.0,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("project_id", ""),
        ("total", -1),
        ("done", -1),
        ("errors", -1),
        ("progress_percent", 101),
        ("progress_percent", -1),
    ],
)
def test_progress_validation_rejects(field: str, value: Any) -> None:
    with pytest.raises(PayloadError) as info:
        structure_payload(MessageType.PROJECT_PROGRESS, progress(**{field: value}))
    assert info.value.field == field
    assert info.value.reason
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("percent", [0, 0.0, 15, 15.0, 99.99, 100, 100.0])
def test_progress_percent_bounds_are_inclusive(percent: float) -> None:
    typed = structure_payload(MessageType.PROJECT_PROGRESS, progress(progress_percent=percent))
    assert typed.progress_percent == percent


# -- parsing the publishers' samples -------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "msg"), [s[1:] for s in SAMPLE_MESSAGES], ids=[s[0] for s in SAMPLE_MESSAGES]
)
def test_every_publisher_sample_is_delivered_with_payload_kept(
    channel: str, msg: dict[str, Any]
) -> None:
    data = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
    result = routed(channel.encode(), data)
    assert result.user_id == channel.removeprefix("user_noti:")
    assert result.type == msg["type"]
    assert result.payload_text == json.dumps(
        msg["payload"], separators=(",", ":"), ensure_ascii=False
    )
    # Key order kept, recursively.
    assert json.dumps(json.loads(result.payload_text)) == json.dumps(msg["payload"])
    assert result.invalid is None
    assert result.known == (msg["type"] in KNOWN_TYPES)


def test_samples_cover_every_typed_payload() -> None:
    types = {msg["type"] for _, _, msg in SAMPLE_MESSAGES}
    assert {"project_progress", "project_completed", "dryrun_result", "order_created"} <= types


def test_progress_sample_is_structured_into_progress_payload() -> None:
    doc = json.loads((SAMPLES / "redis-in_user_noti_project_progress.json").read_text())
    result = routed(doc["channel"], json.dumps(doc["message"]))
    assert result.payload == ProgressPayload("proj_xyz", "CRAWLING", 1000, 150, 2, 15)


def phase_payload(**changes: Any) -> dict[str, Any]:
    doc = json.loads((SAMPLES / "later_topic_project_phase.json").read_text())
    payload: dict[str, Any] = doc["message"]["payload"]
    return payload | changes


def test_the_topic_eras_phase_progress_is_structured_with_its_phases() -> None:
    result = routed(CHANNEL, json.dumps({"type": "project_completed", "payload": phase_payload()}))
    assert result.payload == PhaseProgressPayload(
        "proj_xyz",
        "PROCESSING",
        PhaseProgress(100, 80, 2, 82.0),
        PhaseProgress(78, 45, 1, 59.0),
        70.5,
    )


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"status": "CRAWLING"}, "status", "must be one of INITIALIZING, PROCESSING"),
        ({"crawl": [1]}, "crawl", "must be an object, got a list"),
        (
            {"analyze": {"total": 1, "done": 1, "errors": 0}},
            "analyze.progress_percent",
            "is required",
        ),
        (
            {"crawl": {"total": 1, "done": -1, "errors": 0, "progress_percent": 0}},
            "crawl.done",
            "must be >= 0, got -1",
        ),
        ({"overall_progress_percent": 100.5}, "overall_progress_percent", "between 0 and 100"),
        ({"project_id": ""}, "project_id", "must not be empty"),
    ],
)
def test_phase_progress_validation_names_the_nested_field(
    changes: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(PayloadError) as exc:
        structure_payload("project_progress", phase_payload(**changes))
    assert exc.value.field == field
    assert reason in exc.value.reason


def test_a_progress_payload_with_one_phase_key_is_held_to_the_phase_shape() -> None:
    payload = {"project_id": "p", "status": "CRAWLING", "total": 1, "done": 0, "errors": 0}
    result = parse_message(
        CHANNEL, json.dumps({"type": "project_progress", "payload": payload | {"crawl": {}}})
    )
    assert isinstance(result, Rejected) and result.reason == "invalid_payload"
    assert structure_payload("project_progress", payload | {"progress_percent": 0}) == (
        ProgressPayload("p", "CRAWLING", 1, 0, 0, 0)
    )


def test_dryrun_sample_is_structured_into_dryrun_payload() -> None:
    doc = json.loads((SAMPLES / "redis-in_user_noti_dryrun_result.json").read_text())
    result = routed(doc["channel"], json.dumps(doc["message"]))
    assert isinstance(result.payload, DryRunPayload)
    assert result.payload.job_id == "550e8400-e29b-41d4-a716-446655440000"
    assert (result.payload.platform, result.payload.status) == ("tiktok", "success")
    assert result.payload.errors is None
    assert isinstance(result.payload.content, list)


def test_sample_payload_becomes_the_ws_out_frame() -> None:
    redis_in = json.loads((SAMPLES / "redis-in_user_noti_project_progress.json").read_text())
    ws_out = json.loads((SAMPLES / "ws-out_project_progress.json").read_text())["frame"]
    result = routed(redis_in["channel"], json.dumps(redis_in["message"]))
    frame = json.loads(envelope(result.type_json, result.payload_json, ws_out["timestamp"]))
    assert frame == ws_out
    assert list(frame) == list(ws_out)


@pytest.mark.parametrize(
    "number", ["15", "15.0", "0", "100", "99.5", "1e2", "12345678901234567890"]
)
def test_numbers_keep_their_value_and_kind(number: str) -> None:
    data = '{"type":"notification","payload":{"n":' + number + "}}"
    result = routed(CHANNEL, data)
    kept = json.loads(result.payload_text)["n"]
    assert kept == json.loads(number)
    assert type(kept) is type(json.loads(number))


def test_integer_15_stays_15_and_float_15_stays_15_point_0() -> None:
    as_int = routed(CHANNEL, message("project_progress", progress(progress_percent=15)))
    as_float = routed(CHANNEL, message("project_progress", progress(progress_percent=15.0)))
    assert '"progress_percent":15,' in as_int.payload_text
    assert '"progress_percent":15.0,' in as_float.payload_text


def test_payload_is_reserialised_compactly_in_original_key_order() -> None:
    data = '{ "type" : "update" ,\n "payload" : { "z" : 1 , "a" : [ 1 , 2 ] , "m" : { "y" : null , "b" : true } } }'
    assert routed(CHANNEL, data).payload_text == '{"z":1,"a":[1,2],"m":{"y":null,"b":true}}'


def test_non_ascii_text_is_kept_verbatim() -> None:
    text = "Tiến độ dự án: 15% ✅ 🚀 日本語"
    for data in (message("notification", {"title": text}), message("notification", text)):
        result = routed(CHANNEL, data.encode())
        assert text in result.payload_text
        assert "\\u" not in result.payload_text


def test_escaped_non_ascii_input_is_delivered_as_text() -> None:
    result = routed(CHANNEL, '{"type":"alert","payload":"caf\\u00e9 \\ud83d\\ude80"}')
    assert result.payload_text == '"café 🚀"'


def test_missing_payload_is_delivered_as_null() -> None:
    result = routed(CHANNEL, '{"type":"notification"}')
    assert result.payload_text == "null"


@pytest.mark.parametrize(
    "payload", [None, 0, -1.5, "text", "", [], [1, "two", None], {}, True, False]
)
def test_any_json_payload_of_an_untyped_message_is_delivered(payload: Any) -> None:
    result = routed(CHANNEL, message("notification", payload))
    assert json.loads(result.payload_text) == payload
    assert result.payload is None


def test_other_top_level_keys_are_ignored() -> None:
    data = '{"timestamp":"2020-01-01T00:00:00Z","type":"alert","payload":{"a":1},"extra":[1]}'
    result = routed(CHANNEL, data)
    assert (result.type, result.payload_text) == ("alert", '{"a":1}')


def test_bytes_and_str_inputs_give_the_same_result() -> None:
    data = message("notification", {"title": "héllo"})
    assert parse_message(CHANNEL, data) == parse_message(CHANNEL.encode(), data.encode())


# -- channels and user ids -----------------------------------------------------------------


def test_user_id_is_everything_after_the_prefix() -> None:
    assert routed("user_noti:user123", message("alert", 1)).user_id == "user123"


@pytest.mark.parametrize("user", ["tenant:42", "a:b:c", ":leading", "trailing:", "::"])
def test_user_ids_containing_colons_are_kept_whole(user: str) -> None:
    assert routed(f"user_noti:{user}", message("alert", 1)).user_id == user


def test_empty_user_id_is_rejected() -> None:
    assert rejected(b"user_noti:", message("alert", 1)).reason == "empty_user_id"


@pytest.mark.parametrize("channel", ["user_notification:1", "other:1", "", "USER_NOTI:1", "noti:1"])
def test_channel_outside_the_pattern_is_rejected(channel: str) -> None:
    result = rejected(channel, message("alert", 1))
    assert result.reason == "bad_channel"
    assert "user_noti:*" in result.detail


@pytest.mark.parametrize("channel", [b"user_noti:\xff\xfe", b"user_noti:caf\xe9"])
def test_a_channel_that_is_not_utf8_is_rejected_not_merged_into_another_user(
    channel: bytes,
) -> None:
    result = rejected(channel, '{"type":"alert","payload":1}')
    assert result.reason == "bad_channel"
    assert "not valid UTF-8" in result.detail


# -- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"{", b'{"type":"alert",}', b"\xff\xfe\x00", "{'type': 'alert'}"],
)
def test_invalid_json_is_rejected(data: bytes | str) -> None:
    result = rejected(CHANNEL, data)
    assert result.reason == "invalid_json"
    assert result.user_id == USER


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-16-be", "utf-32-le", "utf-32"])
def test_json_in_another_unicode_encoding_than_utf8_is_rejected(encoding: str) -> None:
    """RFC 8259 8.1: JSON between systems is UTF-8. json.loads(bytes) guessed UTF-16 and
    UTF-32, and such messages were delivered; the original's json.Unmarshal refused them."""
    result = rejected(CHANNEL, '{"type":"notification","payload":"x"}'.encode(encoding))
    assert result.reason == "invalid_json"
    assert result.user_id == USER


def test_a_utf8_byte_order_mark_is_skipped() -> None:
    data = b"\xef\xbb\xbf" + b'{"type":"alert","payload":{"n":123456789012345678901234}}'
    assert routed(CHANNEL, data).payload_json == b'{"n":123456789012345678901234}'


@pytest.mark.parametrize("data", ["[]", '["type","alert"]', '"alert"', "42", "null", "true"])
def test_non_object_is_rejected(data: str) -> None:
    assert rejected(CHANNEL, data).reason == "not_object"


@pytest.mark.parametrize(
    "data",
    ['{"payload":1}', '{"type":null}', '{"type":1}', '{"type":["alert"]}', '{"type":{}}'],
)
def test_type_that_is_not_a_string_is_rejected(data: str) -> None:
    assert rejected(CHANNEL, data).reason == "invalid_type"


@pytest.mark.parametrize(
    "data",
    [
        '{"type":"alert","payload":NaN}',
        '{"type":"alert","payload":Infinity}',
        '{"type":"alert","payload":-Infinity}',
        '{"type":"alert","payload":1e999}',
        '{"type":"alert","payload":{"x":[-1e999]}}',
        '{"type":NaN,"payload":1}',
    ],
)
def test_non_finite_numbers_are_rejected(data: str) -> None:
    assert rejected(CHANNEL, data).reason == "invalid_json"


def test_lone_surrogate_in_payload_is_rejected() -> None:
    assert rejected(CHANNEL, '{"type":"alert","payload":"\\ud800"}').reason == "invalid_json"
    assert rejected(CHANNEL, '{"type":"alert","payload":{"\\udfff":1}}').reason == "invalid_json"


def test_lone_surrogate_in_type_is_rejected() -> None:
    result = parse_message(CHANNEL, '{"type":"\\ud800","payload":1}')
    if isinstance(result, Routed):
        envelope(result.type_json, result.payload_json, format_timestamp()).decode("utf-8")
    assert isinstance(result, Rejected)


@pytest.mark.parametrize("where", ["message", "payload"])
def test_deeply_nested_json_is_rejected_not_raised(where: str) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    data = deep if where == "message" else '{"type":"alert","payload":' + deep + "}"
    result = parse_message(CHANNEL, data)
    assert isinstance(result, Rejected)


@pytest.mark.parametrize("depth", [200, 254, 255, 300, 800])
def test_nesting_a_publisher_could_plausibly_send_is_delivered(depth: int) -> None:
    # orjson writes at most 254 levels; deeper payloads take the standard library's path.
    deep = "[" * depth + "]" * depth
    assert routed(CHANNEL, '{"type":"alert","payload":' + deep + "}").payload_text == deep


# -- unknown types -------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["order_created", "", "PROJECT_PROGRESS", "resync", "x" * 300])
def test_unknown_type_is_delivered_unchanged_with_the_unknown_label(type_: str) -> None:
    result = routed(CHANNEL, message(type_, {"order_id": "12345", "total": 99.99}))
    assert result.type == type_
    assert result.known is False
    assert result.type_label == "unknown"
    assert result.payload_text == '{"order_id":"12345","total":99.99}'


@pytest.mark.parametrize("type_", sorted(KNOWN_TYPES))
def test_known_type_is_labelled_with_itself(type_: str) -> None:
    payload = {"job_id": "j", "platform": "tiktok", "status": "success"}
    if type_ in ("project_progress", "project_completed"):
        payload = progress()
    result = routed(CHANNEL, message(type_, payload))
    assert result.known is True
    assert result.type_label == type_


# -- typed payload validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "payload", "field"),
    [
        ("project_progress", progress(project_id=""), "project_id"),
        ("project_progress", progress(project_id=7), "project_id"),
        ("project_progress", progress(total=-1), "total"),
        ("project_progress", progress(done=1.5), "done"),
        ("project_progress", progress(errors="2"), "errors"),
        ("project_progress", progress(total=True), "total"),
        ("project_progress", progress(status=None), "status"),
        ("project_completed", progress(progress_percent=101), "progress_percent"),
        ("project_completed", progress(progress_percent="15"), "progress_percent"),
        ("project_completed", progress(progress_percent=False), "progress_percent"),
        ("project_progress", {k: v for k, v in progress().items() if k != "status"}, "status"),
        ("project_progress", [1, 2], "payload"),
        ("project_progress", None, "payload"),
        ("project_completed", "DONE", "payload"),
        ("dryrun_result", {"platform": "tiktok", "status": "success"}, "job_id"),
        ("dryrun_result", {"job_id": "", "platform": "t", "status": "s"}, "job_id"),
        ("dryrun_result", {"job_id": "j", "platform": 1, "status": "s"}, "platform"),
        (
            "dryrun_result",
            {"job_id": "j", "platform": "t", "status": "s", "content": {}},
            "content",
        ),
        ("dryrun_result", {"job_id": "j", "platform": "t", "status": "s", "errors": "x"}, "errors"),
    ],
)
def test_invalid_typed_payload_is_rejected_with_field_and_reason(
    type_: str, payload: Any, field: str
) -> None:
    result = rejected(CHANNEL, message(type_, payload))
    assert result.reason == "invalid_payload"
    assert result.detail.startswith(f"{field}: ")
    assert len(result.detail) > len(f"{field}: ")
    assert (result.user_id, result.type) == (USER, type_)


def test_missing_field_reason_says_it_is_required() -> None:
    payload = {k: v for k, v in progress().items() if k != "total"}
    assert rejected(CHANNEL, message("project_progress", payload)).detail == "total: is required"


def test_invalid_typed_payload_is_delivered_with_invalid_set_when_asked() -> None:
    data = message("project_progress", progress(progress_percent=101))
    result = routed(CHANNEL, data, deliver_invalid=True)
    assert result.invalid is not None
    assert result.invalid.field == "progress_percent"
    assert result.payload is None
    assert result.known is True
    assert json.loads(result.payload_text)["progress_percent"] == 101


def test_valid_payload_with_deliver_invalid_has_no_invalid() -> None:
    result = routed(CHANNEL, message("project_progress", progress()), deliver_invalid=True)
    assert result.invalid is None
    assert isinstance(result.payload, ProgressPayload)


def test_extra_payload_fields_are_allowed_and_delivered() -> None:
    payload = progress(eta=12.5, phase={"name": "crawl"})
    result = routed(CHANNEL, message("project_progress", payload))
    assert isinstance(result.payload, ProgressPayload)
    assert json.loads(result.payload_text) == payload


def test_dryrun_content_and_errors_may_be_null_or_absent() -> None:
    base = {"job_id": "j", "platform": "youtube", "status": "failed"}
    for extra in ({}, {"content": None, "errors": None}, {"content": [], "errors": [{"code": 1}]}):
        assert isinstance(
            routed(CHANNEL, message("dryrun_result", base | extra)).payload, DryRunPayload
        )


def test_untyped_types_have_no_structured_payload() -> None:
    assert structure_payload("notification", {"project_id": ""}) is None


# -- envelopes and timestamps --------------------------------------------------------------


def test_envelope_keys_are_type_payload_timestamp_in_order() -> None:
    ts = "2025-12-07T10:00:00.123456+00:00"
    text = envelope(b'"project_progress"', b'{"b":1,"a":2}', ts).decode("utf-8")
    frame = json.loads(text)
    assert list(frame) == ["type", "payload", "timestamp"]
    assert frame == {"type": "project_progress", "payload": {"b": 1, "a": 2}, "timestamp": ts}
    assert list(frame["payload"]) == ["b", "a"]
    assert "\n" not in text


@pytest.mark.parametrize("type_", ['quo"te', "back\\slash", "new\nline", "é🚀", "</script>"])
def test_envelope_escapes_the_type(type_: str) -> None:
    result = parse_message(CHANNEL, json.dumps({"type": type_, "payload": None}))
    assert isinstance(result, Routed)
    frame = envelope(result.type_json, result.payload_json, format_timestamp())
    assert json.loads(frame.decode("utf-8"))["type"] == type_


def test_envelope_of_every_routed_sample_is_valid_json() -> None:
    ts = format_timestamp()
    for _, channel, msg in SAMPLE_MESSAGES:
        result = routed(channel, json.dumps(msg))
        frame = json.loads(envelope(result.type_json, result.payload_json, ts))
        assert frame == {"type": msg["type"], "payload": msg["payload"], "timestamp": ts}


@pytest.mark.parametrize("size", [0, 60, 125 - 60, 200, 65_535 - 60, 70_000])
def test_envelope_frame_is_the_envelope_in_a_text_frame(size: int) -> None:
    """Headers of 2, 4 and 10 bytes: the frame's length counts every part."""
    ts = "2025-12-07T10:00:00.123456+00:00"
    payload = b'"' + b"x" * size + b'"'
    framed = envelope_frame(b'"alert"', payload, ts.encode("ascii"))
    assert framed == text_frame(envelope(b'"alert"', payload, ts))


def test_resync_envelope_is_a_resync_frame() -> None:
    ts = format_timestamp()
    frame = json.loads(resync_envelope("redis_reconnected", None, ts))
    assert frame == {
        "type": "resync",
        "payload": {"reason": "redis_reconnected", "since": None},
        "timestamp": ts,
    }


def test_format_timestamp_is_rfc3339_with_fraction_and_offset() -> None:
    before = datetime.now(UTC)
    text = format_timestamp()
    after = datetime.now(UTC)
    assert RFC3339.match(text), text
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None
    assert before <= parsed <= after


def test_format_timestamp_keeps_microseconds_even_when_zero() -> None:
    moment = datetime(2025, 12, 7, 10, 0, 0, tzinfo=UTC)
    assert format_timestamp(moment) == "2025-12-07T10:00:00.000000+00:00"


def test_format_timestamp_keeps_a_non_utc_offset() -> None:
    moment = datetime(2025, 12, 7, 17, 0, 0, 123456, tzinfo=timezone(timedelta(hours=7)))
    text = format_timestamp(moment)
    assert text == "2025-12-07T17:00:00.123456+07:00"
    assert datetime.fromisoformat(text) == moment


def test_integers_beyond_64_bits_are_kept_exactly() -> None:
    big = "123456789012345678901234567890"
    result = parse_message(
        CHANNEL, '{"type":"update","payload":{"n":' + big + ',"m":-' + big + "}}"
    )
    assert isinstance(result, Routed)
    assert result.payload_text == '{"n":' + big + ',"m":-' + big + "}"


def test_fast_and_exact_paths_agree_on_ordinary_messages() -> None:
    text = '{"type":"update","payload":{"a":1.5,"b":[true,false,null],"c":"x\\"y","d":-0.25}}'
    fast = parse_message(CHANNEL, text)
    exact = parse_message(CHANNEL, text.replace('"x', '"1234567890123456789 x'))
    assert isinstance(fast, Routed) and isinstance(exact, Routed)
    assert fast.payload_text.replace('"x', '"1234567890123456789 x') == exact.payload_text


@pytest.mark.parametrize(
    "number",
    [
        str(2**63 - 1),
        str(2**63),
        str(2**64 - 1),
        str(2**64),
        str(-(2**63)),
        str(-(2**63) - 1),
        "1" + "0" * 18,
        "9" * 19,
    ],
)
def test_integers_at_the_64_bit_edges_are_kept_exactly(number: str) -> None:
    result = parse_message(CHANNEL, '{"type":"update","payload":{"n":' + number + "}}")
    assert isinstance(result, Routed)
    assert result.payload_text == '{"n":' + number + "}"


@pytest.mark.parametrize(
    ("text", "fast"),
    [
        ('{"n":' + "9" * 18 + "}", True),  # at most 18 digits: every such integer fits
        ('{"n":' + "9" * 19 + "}", False),
        ('{"n":-' + "1" * 19 + "}", False),
        ('{"s":"' + "7" * 25 + '"}', False),  # digits in a string: exact, and harmless
        ('{"f":123456789.123456789}', True),  # 9 and 9 digits, not 19 in a row
        ('{"s":"' + "\u0661" * 30 + '"}', True),  # non-ASCII digits are not JSON numbers
    ],
)
def test_only_19_ascii_digits_in_a_row_take_the_exact_path(text: str, fast: bool) -> None:
    assert _loads(text.encode())[1] is fast


@pytest.mark.parametrize(
    "ns",
    [
        1_764_443_531_000_000_000,  # on a whole second: .000000
        1_764_443_531_999_999_999,  # the last microsecond of it, floored like datetime.now
        1_764_443_532_000_001_000,  # the next second: its text is formatted afresh
        1_764_443_531_035_344_567,  # and back: the cached second is not reused
        946_684_799_999_999_000,  # 1999-12-31T23:59:59.999999
    ],
)
def test_format_timestamp_of_now_equals_isoformat(ns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("smap_notify.messages.time.time_ns", lambda: ns)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
    assert format_timestamp() == moment.isoformat(timespec="microseconds")
