"""CHANNELS templates: parsing, matching, filters and the delivery rule. No sockets."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from smap_notify import cli
from smap_notify.channels import (
    DEFAULT,
    ChannelsError,
    Subscription,
    connection_subscriptions,
    parse_channels,
    parse_filters,
    shared_subscriptions,
    wants,
)
from smap_notify.config import ConfigError, load_config
from smap_notify.handshake import Accept, HandshakeRequest, Reject, decide
from smap_notify.hub import Hub
from smap_notify.inbox import Inbox
from smap_notify.messages import (
    JobUpdate,
    PhaseProgressPayload,
    ProjectUpdate,
    Rejected,
    Routed,
    parse_message,
)
from smap_notify.metrics import Counters
from tests.support.channels import (
    SUCCESSOR,
    TOPIC_ERA,
    sample,
)
from tests.support.daemon import DEV_ORIGIN, make_token
from tests.test_config import CheckConfig, check_config  # noqa: F401  (a fixture)
from tests.test_handshake import ws_request
from tests.test_hub import connection, register
from tests.test_messages import phase_payload

SECRET = "x" * 32


# -- parsing -----------------------------------------------------------------------------


def test_the_default_is_the_seeds_single_pattern() -> None:
    assert DEFAULT.patterns == ("user_noti:*",)
    assert str(DEFAULT) == "user_noti:{user}"
    assert DEFAULT.filter_fields == ()


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_channels_setting_is_the_default(value: str) -> None:
    assert load_config({"JWT_SECRET_KEY": SECRET, "CHANNELS": value}).channels == DEFAULT


def test_the_topic_era_subscribes_one_pattern_per_template() -> None:
    channels = parse_channels(TOPIC_ERA)
    assert channels.patterns == ("user_noti:*", "project:*", "job:*")
    assert channels.filter_fields == ("project", "job")
    assert [t.raw for t in channels.templates] == [False, True, True]
    assert str(channels) == TOPIC_ERA


def test_an_exact_broadcast_channel_is_its_own_pattern() -> None:
    channels = parse_channels("user_noti:{user},alerts:all")
    assert channels.patterns == ("user_noti:*", "alerts:all")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("user_noti:{user},,job:{job}:{user}", "template 2 is empty"),
        ("user_noti:{user},", "template 2 is empty"),
        ("user_noti:{user},user_noti:{user}", "are the same"),
        ("a:{user},a:b:{user}", "overlap: their patterns a:* and a:b:* match"),
        ("alerts:{user},alerts:all", "overlap"),
        ("p:{project}:{project}", "a field is used twice"),
        ("p:{user}:{user}", "a field is used twice"),
        ("p:{project}:{job}:{user}", "at most one field besides {user}"),
        ("{user}", "no fixed prefix"),
        ("{project}:{user}", "no fixed prefix"),
        ("p:{project}{user}", "no fixed text between them"),
        ("p:{project}x{user}", "a character ids cannot have"),
        ("p:*", "Redis pattern syntax"),
        ("p:[a]:{user}", "Redis pattern syntax"),
        ("p: {user}", "no white space"),
        ("p:{}", "field {}: a field name"),
        ("p:{9x}", "field {9x}: a field name"),
        ("p:{user", "does not enclose a field name"),
        ("p:}{user}", "does not enclose a field name"),
        ("p:{user}|json", "unknown option |json"),
    ],
)
def test_each_problem_in_a_template_is_a_configuration_error(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({"JWT_SECRET_KEY": SECRET, "CHANNELS": text})
    assert any(p.startswith("CHANNELS: ") and problem in p for p in exc.value.problems), (
        exc.value.problems
    )


def test_every_problem_is_listed_not_only_the_first() -> None:
    with pytest.raises(ChannelsError) as exc:
        parse_channels("a:{x}{user},,{user},b:*")
    assert len(exc.value.problems) == 4


def test_check_config_lists_each_problem_and_exits_78(
    check_config: CheckConfig,  # noqa: F811
) -> None:
    status, out, err = check_config(JWT_SECRET_KEY=SECRET, CHANNELS="x:{user},,{user}")
    assert status == cli.EX_CONFIG == 78
    assert out == ""
    assert "  - CHANNELS: template 2 is empty" in err
    assert "  - CHANNELS: template '{user}': no fixed prefix" in err


def test_check_config_shows_the_channels_as_written(
    check_config: CheckConfig,  # noqa: F811
) -> None:
    status, out, _ = check_config(JWT_SECRET_KEY=SECRET, CHANNELS=f" {TOPIC_ERA} ")
    assert status == 0
    assert f"CHANNELS={TOPIC_ERA}\n" in out


# -- matching ------------------------------------------------------------------------------


def test_the_default_takes_any_user_id_even_with_colons() -> None:
    assert DEFAULT.match("user_noti:a:b:c d") == (DEFAULT.templates[0], "a:b:c d", None, "")
    assert DEFAULT.match("user_noti:") == "empty_user_id"
    assert DEFAULT.match("user_noti") == "bad_channel"


@pytest.mark.parametrize(
    "channel",
    [
        "project:p1",
        "project::u1",
        "project:p1:",
        "project:p 1:u1",
        "project:p1:u1:extra",
        "project:" + "p" * 51 + ":u1",
        "project:p1:" + "u" * 51,
        "job:j.1:u1",
        "other:x",
    ],
)
def test_topic_ids_outside_the_rule_match_no_template(channel: str) -> None:
    assert parse_channels(TOPIC_ERA).match(channel) == "bad_channel"


IDS = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
    min_size=1,
    max_size=50,
)
TEMPLATES = st.sampled_from(
    [
        "project:{project}:{user}",
        "job:{job}:{user}|raw",
        "project:{project}:user:{user}",
        "u:{user}/c:{campaign}",
        "system:{event}",
        "a.{alert}.b",
    ]
)


@given(
    first=TEMPLATES,
    second=st.sampled_from(["user_noti:{user}", "x:{user}:y", "alerts:all"]),
    user=IDS,
    value=IDS,
)
def test_a_channel_built_from_a_template_routes_back_to_its_user_and_topic(
    first: str, second: str, user: str, value: str
) -> None:
    channels = parse_channels(f"{second},{first}")
    template = channels.templates[1]
    topic = template.topic
    assert topic is not None
    channel = template.build({"user": user, topic: value})
    assert channels.match(channel) == (
        template,
        user if template.has_user else None,
        topic,
        value,
    )


@given(user=st.text(min_size=1).filter(lambda u: "\x00" not in u))
def test_any_user_id_routes_back_through_a_template_without_topic(user: str) -> None:
    channels = parse_channels("x:{user}:y,project:{project}:{user}")
    match = channels.match(channels.templates[0].build({"user": user}))
    assert match == (channels.templates[0], user, None, "")


@given(user=IDS, value=st.text(min_size=1).filter(lambda v: not v.isascii() or ":" in v))
def test_a_topic_value_outside_the_rule_never_routes(user: str, value: str) -> None:
    channels = parse_channels(TOPIC_ERA)
    channel = channels.templates[1].build({"user": user, "project": value})
    assert channels.match(channel) == "bad_channel"


# -- filters and the delivery rule ------------------------------------------------------------


def test_filters_are_taken_for_known_fields_only_and_empty_is_none() -> None:
    fields = ("project", "job")
    assert parse_filters({"projectId": ["p1"], "campaignId": ["c1"]}, fields) == (
        {"project": "p1"},
        None,
    )
    assert parse_filters({"projectId": [""], "jobId": ["j1"]}, fields) == ({"job": "j1"}, None)
    assert parse_filters({"other": ["x"]}, fields) == (None, None)
    assert parse_filters({"jobId": ["j 1"]}, fields) == (None, "jobId")
    assert parse_filters({"jobId": ["j" * 51]}, fields) == (None, "jobId")


def test_a_connection_gets_a_topic_unless_it_filters_that_field_on_another_value() -> None:
    dashboard, on_p1, on_p2, on_j1 = None, {"project": "p1"}, {"project": "p2"}, {"job": "j1"}
    connections = (dashboard, on_p1, on_p2, on_j1)
    assert [wants(f, "project", "p1") for f in connections] == [True, True, False, True]
    assert [wants(f, "job", "j2") for f in connections] == [True, True, True, False]
    assert [wants(f, None, "") for f in connections] == [True] * 4


def request_to(target: str, token: str | None) -> HandshakeRequest:
    cookie = None if token is None else f"smap_auth_token={token}"
    return ws_request(origin=DEV_ORIGIN, cookie=cookie, target=target)


TOPIC_CONFIG = load_config({"JWT_SECRET_KEY": SECRET, "ENV": "dev", "CHANNELS": TOPIC_ERA})


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("projectId=p%201", "projectId"),
        ("jobId=j1&projectId=a.b", "projectId"),
        ("jobId=%E2%82%AC", "jobId"),
        ("jobId=" + "j" * 51, "jobId"),
    ],
)
def test_an_invalid_filter_is_refused_with_its_own_name(query: str, name: str) -> None:
    token = make_token(secret=SECRET)
    decision = decide(request_to(f"/ws?{query}", token), TOPIC_CONFIG, time.time())
    assert isinstance(decision, Reject)
    assert (decision.status, decision.reason) == (400, "invalid_filter")
    assert decision.body == (
        b'{"error":"invalid ' + name.encode() + b": only alphanumeric, underscore, and"
        b' hyphen allowed"}'
    )
    assert token not in decision.detail


def test_a_filter_is_checked_after_the_token() -> None:
    decision = decide(request_to("/ws?projectId=a.b", None), TOPIC_CONFIG, time.time())
    assert isinstance(decision, Reject) and decision.reason == "missing_token"


def test_filters_of_an_accepted_handshake() -> None:
    token = make_token(secret=SECRET)
    target = "/ws?projectId=p1&jobId=&campaignId=c.1&x=y"
    decision = decide(request_to(target, token), TOPIC_CONFIG, time.time())
    assert isinstance(decision, Accept) and decision.filters == {"project": "p1"}
    # The seed's scheme has no topic: no parameter is a filter there.
    seed = load_config({"JWT_SECRET_KEY": SECRET, "ENV": "dev"})
    decision = decide(request_to("/ws?projectId=a.b", token), seed, time.time())
    assert isinstance(decision, Accept) and decision.filters is None


async def test_the_hub_queues_each_message_for_the_connections_that_want_it(
    nursery: trio.Nursery,
) -> None:
    config = load_config({"JWT_SECRET_KEY": SECRET, "CHANNELS": TOPIC_ERA + ",system:{event}"})
    hub = Hub(config, Counters())
    await nursery.start(hub.serve, Inbox(2))
    dash, on_p1, on_j1, other = (
        connection("u1", 8),
        connection("u1", 8, filters={"project": "p1"}),
        connection("u1", 8, filters={"job": "j1"}),
        connection("u2", 8, filters={"event": "deploy"}),
    )
    register(hub, dash, on_p1, on_j1, other)
    for conn in (dash, on_p1, on_j1, other):
        conn.flushing = True  # no socket behind these: what is queued stays queued
    hub.route_batch(
        [
            (b"project:p1:u1", b'{"status":"PROCESSING"}'),
            (b"project:p2:u1", b'{"status":"PROCESSING"}'),
            (b"job:j2:u1", b'{"platform":"TIKTOK","status":"DONE"}'),
            (b"user_noti:u1", b'{"type":"alert","payload":1}'),
            (b"system:deploy", b'{"type":"notification"}'),
            (b"system:outage", b'{"type":"notification"}'),
            (b"project:p3:u9", b'{"status":"PROCESSING"}'),
        ]
    )
    assert [conn.queue.messages for conn in (dash, on_p1, on_j1, other)] == [6, 5, 5, 1]
    c = hub.counters
    assert (c.received, c.delivered, c.dropped["no_connection"]) == (7, 6, 1)
    assert c.by_channel == {
        "project:{project}:{user}": 3,
        "job:{job}:{user}": 1,
        "user_noti:{user}": 1,
        "system:{event}": 2,
    }
    assert c.by_type["project_update"] == 3 and c.by_type["job_update"] == 1
    assert on_p1.queue.frames[0] == b"\x81\x17" + b'{"status":"PROCESSING"}'


# -- the topic era's payloads -----------------------------------------------------------------


def test_the_topic_eras_samples_are_forwarded_unchanged_and_typed() -> None:
    channels = parse_channels(TOPIC_ERA)
    phase = sample("later_topic_project_phase.json")
    flat = sample("later_topic_job_and_project_flat.json")
    cases = [
        (phase["channel"], phase["message"], PhaseProgressPayload, "project_progress"),
        (flat["project_flat"]["channel"], flat["project_flat"]["message"], ProjectUpdate, None),
        (flat["job"]["channel"], flat["job"]["message"], JobUpdate, None),
    ]
    for channel, message, cls, label in cases:
        data = json.dumps(message, indent=1).encode()
        result = parse_message(channel, data, channels=channels)
        assert isinstance(result, Routed), result
        assert result.raw == data  # as published, white space and all
        assert isinstance(result.payload, cls)
        assert result.known and result.type == (label or result.type)


@pytest.mark.parametrize(
    ("channel", "message", "detail"),
    [
        (
            "project:p1:u1",
            {"type": "project_progress", "payload": phase_payload(status="RUNNING")},
            "status: must be one of INITIALIZING",
        ),
        (
            "project:p1:u1",
            {
                "type": "project_completed",
                "payload": phase_payload(
                    analyze={"total": 1, "done": 1.5, "errors": 0, "progress_percent": 100}
                ),
            },
            "analyze.done: must be an integer, got the number 1.5",
        ),
        ("project:p1:u1", {"status": ""}, "status: must not be empty"),
        (
            "project:p1:u1",
            {"status": "PROCESSING", "progress": {"current": 1, "total": 2}},
            "progress.percentage: is required",
        ),
        ("job:j1:u1", {"platform": 5, "status": "DONE"}, "platform: must be a string"),
        ("job:j1:u1", {"platform": "X", "status": "DONE", "batch": []}, "batch: must be"),
        ("job:j1:u1", {"platform": "X", "status": "DONE", "progress": 3}, "progress: must be"),
    ],
)
def test_invalid_topic_era_payloads_are_rejected_with_the_field(
    channel: str, message: dict[str, Any], detail: str
) -> None:
    channels = parse_channels(TOPIC_ERA)
    data = json.dumps(message)
    result = parse_message(channel, data, channels=channels)
    assert isinstance(result, Rejected) and result.reason == "invalid_payload"
    assert detail in result.detail, result.detail
    delivered = parse_message(channel, data, channels=channels, deliver_invalid=True)
    assert isinstance(delivered, Routed) and delivered.invalid is not None
    assert delivered.raw == data.encode()


def test_the_seeds_flat_progress_stays_accepted_next_to_the_phases() -> None:
    seed = sample("redis-in_user_noti_project_progress.json")
    result = parse_message(seed["channel"], json.dumps(seed["message"]))
    assert isinstance(result, Routed) and result.raw is None
    assert type(result.payload).__name__ == "ProgressPayload"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[1,2]", "not_object"),
        (b'"text"', "not_object"),
        (b"{", "invalid_json"),
        (b'{"type":5}', "invalid_type"),
        (b'{"a":"\xed\xa0\x80"}', "invalid_json"),
    ],
)
def test_a_raw_template_still_needs_a_json_object(data: bytes, reason: str) -> None:
    result = parse_message("job:j1:u1", data, channels=parse_channels(TOPIC_ERA))
    assert isinstance(result, Rejected) and result.reason == reason
    assert result.template == "job:{job}:{user}"


def test_a_raw_object_without_type_or_known_shape_is_forwarded_as_unknown() -> None:
    result = parse_message("job:j1:u1", b'{"hello":1}', channels=parse_channels(TOPIC_ERA))
    assert isinstance(result, Routed) and not result.known and result.type_label == "unknown"
    assert result.raw == b'{"hello":1}'


def test_a_template_without_raw_wraps_topic_messages_in_the_envelope() -> None:
    channels = parse_channels(SUCCESSOR)
    result = parse_message("campaign:c1:user:u1", b'{"payload":{}}', channels=channels)
    assert isinstance(result, Rejected) and result.reason == "invalid_type"
    result = parse_message("campaign:c1:user:u1", b'{"type":"alert"}', channels=channels)
    assert isinstance(result, Routed) and result.raw is None and result.user_id == "u1"


# -- the seam for per-user subscriptions ------------------------------------------------------


def test_a_connection_needs_its_users_channels_narrowed_by_its_filters() -> None:
    channels = parse_channels(TOPIC_ERA + ",system:{event},alerts:all")
    assert connection_subscriptions(channels, "u1", {"project": "p1"}) == (
        Subscription("user_noti:u1", False),
        Subscription("project:p1:u1", False),
        Subscription("job:*:u1", True),
    )
    # A user id outside the id rule is never routed from a topic template.
    assert connection_subscriptions(channels, "a:b*", None) == (
        Subscription("user_noti:a:b*", False),
    )
    assert shared_subscriptions(channels) == (
        Subscription("system:*", True),
        Subscription("alerts:all", False),
    )
