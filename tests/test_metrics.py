"""Counters exposed to Prometheus on scrape, and the original's JSON stats document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from smap_notify.connection import CloseReason
from smap_notify.handshake import Rejection
from smap_notify.hub import Dropped
from smap_notify.metrics import Counters, Gauges, make_registry, render, stats_document

# Copied from the contract (shared/spec/samples) so the tests run from any checkout.
SAMPLES = Path(__file__).resolve().parent / "samples"


def gauges(
    connections: int = 4,
    users: int = 2,
    active: bool = True,
    circuit: str = "closed",
    draining: bool = False,
) -> Gauges:
    return Gauges(
        connections=lambda: connections,
        users=lambda: users,
        subscriber_active=lambda: active,
        circuit_state=lambda: circuit,
        draining=lambda: draining,
    )


def busy_counters() -> Counters:
    c = Counters(received=20, delivered=9, frames_sent=14, resyncs_sent=1, redis_reconnects=2)
    c.by_type.update({"project_progress": 6, "notification": 2, "unknown": 3})
    c.dropped.update({"no_connection": 4, "queue_full": 1})
    c.rejected.update({"invalid_json": 3, "invalid_payload": 2, "empty_user_id": 1})
    c.frames_dropped.update({"queue_full": 2, "closed": 1})
    c.handshakes_accepted = 7
    c.handshake_rejections.update({"missing_token": 2, "origin_not_allowed": 1})
    c.connections_closed.update({"client_closed": 3})
    return c


def samples(
    text: str, parser: Any = text_string_to_metric_families
) -> dict[tuple[str, frozenset[Any]], float]:
    out = {}
    for family in parser(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(table: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return table[(name, frozenset(labels.items()))]


def scrape(counters: Counters, g: Gauges, accept: str | None = None) -> tuple[str, str]:
    body, content_type = render(make_registry(counters, g), accept)
    return body.decode(), content_type


# -- Prometheus exposition -----------------------------------------------------------------


def test_messages_by_type_is_exposed_with_a_type_label() -> None:
    text, _ = scrape(busy_counters(), gauges())
    table = samples(text)
    assert value(table, "websocket_messages_by_type_total", type="project_progress") == 6
    assert value(table, "websocket_messages_by_type_total", type="notification") == 2
    assert value(table, "websocket_messages_by_type_total", type="unknown") == 3
    assert 'websocket_messages_by_type_total{type="project_progress"} 6.0' in text


def test_message_outcome_counters_are_exposed() -> None:
    table = samples(scrape(busy_counters(), gauges())[0])
    assert value(table, "smap_notify_messages_received_total") == 20
    assert value(table, "smap_notify_messages_delivered_total") == 9
    assert value(table, "smap_notify_messages_dropped_total", reason="no_connection") == 4
    assert value(table, "smap_notify_messages_dropped_total", reason="queue_full") == 1
    assert value(table, "smap_notify_messages_rejected_total", reason="invalid_json") == 3
    assert value(table, "smap_notify_messages_rejected_total", reason="invalid_payload") == 2
    assert value(table, "smap_notify_frames_sent_total") == 14
    assert value(table, "smap_notify_frames_dropped_total", reason="closed") == 1
    assert value(table, "smap_notify_resyncs_sent_total") == 1
    assert value(table, "smap_notify_redis_reconnects_total") == 2


def test_handshake_and_connection_counters_are_exposed() -> None:
    table = samples(scrape(busy_counters(), gauges())[0])
    assert value(table, "smap_notify_handshakes_accepted_total") == 7
    assert value(table, "smap_notify_handshake_rejections_total", reason="missing_token") == 2
    assert value(table, "smap_notify_connections_closed_total", reason="client_closed") == 3


def test_counter_families_have_the_counter_type() -> None:
    families = {
        f.name: f for f in text_string_to_metric_families(scrape(busy_counters(), gauges())[0])
    }
    assert families["websocket_messages_by_type"].type == "counter"
    assert families["smap_notify_messages_received"].type == "counter"
    assert families["websocket_active_connections"].type == "gauge"
    assert all(f.documentation for f in families.values())


@pytest.mark.parametrize("circuit", ["closed", "open", "half_open"])
def test_gauges_are_read_at_scrape_time(circuit: str) -> None:
    g = gauges(connections=150, users=75, active=False, circuit=circuit, draining=True)
    table = samples(scrape(Counters(), g)[0])
    assert value(table, "websocket_active_connections") == 150
    assert value(table, "websocket_active_users") == 75
    assert value(table, "smap_notify_subscriber_active") == 0
    assert value(table, "smap_notify_draining") == 1
    for state in ("closed", "open", "half_open"):
        expected = 1 if state == circuit else 0
        assert value(table, "smap_notify_redis_circuit_state", state=state) == expected


def test_scrape_reflects_counters_changed_after_registration() -> None:
    counters = Counters()
    registry = make_registry(counters, gauges())
    before = samples(render(registry, None)[0].decode())
    counters.received += 5
    counters.by_type["alert"] += 5
    after = samples(render(registry, None)[0].decode())
    assert value(before, "smap_notify_messages_received_total") == 0
    assert value(after, "smap_notify_messages_received_total") == 5
    assert value(after, "websocket_messages_by_type_total", type="alert") == 5


def test_empty_counters_render_zero_and_no_labelled_samples() -> None:
    table = samples(scrape(Counters(), gauges())[0])
    assert value(table, "smap_notify_messages_received_total") == 0
    assert not [key for key in table if key[0] == "websocket_messages_by_type_total"]


def test_plain_accept_gets_the_text_format() -> None:
    for accept in (None, "", "*/*", "text/plain"):
        text, content_type = scrape(busy_counters(), gauges(), accept)
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "# EOF" not in text


def test_openmetrics_accept_gets_openmetrics() -> None:
    accept = "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    text, content_type = scrape(busy_counters(), gauges(), accept)
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    table = samples(text, openmetrics_families)
    assert value(table, "websocket_messages_by_type_total", type="project_progress") == 6


# -- the accounting invariant --------------------------------------------------------------


def test_accounted_sums_delivered_dropped_and_rejected() -> None:
    counters = busy_counters()
    assert counters.accounted() == 9 + (4 + 1) + (3 + 2 + 1)
    assert counters.accounted() == counters.received
    assert Counters().accounted() == 0


def test_accounted_ignores_frames_and_types() -> None:
    counters = Counters(delivered=1, frames_sent=100)
    counters.by_type["alert"] += 50
    counters.frames_dropped["queue_full"] += 10
    assert counters.accounted() == 1


def test_counters_instances_do_not_share_tallies() -> None:
    a, b = Counters(), Counters()
    a.dropped["x"] += 1
    assert b.dropped == {}


# -- the original's JSON document (/stats) -------------------------------------------------


def key_shape(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: key_shape(v) for k, v in doc.items()}
    return type(doc).__name__ if not isinstance(doc, int | float) else "number"


def test_stats_document_has_the_originals_shape() -> None:
    original = json.loads((SAMPLES / "http_metrics_response.json").read_text())["response"]
    doc = stats_document(busy_counters(), gauges(), "2025-12-07T17:00:00.000000+07:00", 10.7)
    assert key_shape(doc) == key_shape(original)
    assert list(doc) == list(original)
    json.dumps(doc)


def test_stats_document_values() -> None:
    doc = stats_document(busy_counters(), gauges(connections=1, users=1), "ts", 10.7)
    assert doc == {
        "service": "websocket-service",
        "timestamp": "ts",
        "uptime_seconds": 10,
        "connections": {"active": 1, "total_unique_users": 1},
        "messages": {"received_from_redis": 20, "sent_to_clients": 14, "failed": 3},
    }


def test_the_reason_enums_are_the_documented_metric_labels() -> None:
    """The labels are a contract (README.rst, GET /metrics): an enum member's value is the
    label, so renaming a member changes nothing and changing a value is seen here."""
    readme = (Path(__file__).parent.parent / "README.rst").read_text()
    # Never counted (closed_before_head), or a fallback no client has been seen to reach.
    undocumented = {Rejection.CLOSED_BEFORE_HEAD, CloseReason.CLOSED}
    labels = [*CloseReason, *Rejection, *Dropped]
    assert [
        label for label in labels if label not in undocumented and f"``{label}``" not in readme
    ] == []
