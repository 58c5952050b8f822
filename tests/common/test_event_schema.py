"""The published event schema: valid JSON Schema, one definition per event type the code knows,
and every event the code builds conforms (an undocumented field is a failure)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from common.bounces import CLASSIFICATIONS
from common.events import EVENT_KINDS, SCHEMA_PATH, Event, error_event, public
from devtools.contracts import event_problems


def test_the_schema_is_valid_and_covers_every_event_type() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]) == set(EVENT_KINDS)
    assert schema["$defs"]["bounce"]["properties"]["classification"]["enum"] == list(CLASSIFICATIONS)
    for definition in schema["$defs"].values():
        assert definition["additionalProperties"] is False
        for name, spec in definition["properties"].items():
            assert name == "event" or spec.get("description") or spec.get("$ref"), name


SAMPLES = [
    Event("delivered", "abc", recipient="a@dest.test", stream_id="s", ip="203.0.113.7", status="2.0.0"),
    Event("delivered", "abc", recipient="a@dest.test", extra={"inferred": True}),
    Event(
        "bounce",
        "abc",
        recipient="a@dest.test",
        type="hard",
        reason="550 5.1.1 user unknown",
        status="5.1.1",
        classification="user-unknown",
        suppress=True,
        ip="",
        extra={"report": "dsn", "attribution": "envelope", "verified": True, "final_recipient": "x@dest.test"},
    ),
    Event("deferred", "abc", recipient="a@dest.test", type="soft", reason="450", status="4.2.0", suppress=False),
    Event("unsubscribe", "abc", recipient="a@dest.test", extra={"source": "one-click"}),
    Event("unsubscribe", "abc", recipient="a@dest.test", extra={"source": "mailto", "reported_recipient": "b@x.test"}),
    Event(
        "spam-report",
        "abc",
        recipient="a@dest.test",
        email="a@dest.test",
        extra={"feedback_type": "abuse", "report": "arf", "user_agent": "fbl/1", "attribution": "original"},
    ),
    error_event("transformer", "X-Uuid missing"),
    Event("suppressed", "abc", recipient="a@dest.test", reason="unsubscribe", extra={"since": 1, "scope": "x.test"}),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.event)
def test_events_the_code_builds_conform(event: Event) -> None:
    assert event_problems(public(event.to_dict())) == []


def test_an_undocumented_or_wrong_field_is_a_violation() -> None:
    good = public(SAMPLES[0].to_dict())
    assert event_problems({**good, "internal_note": "x"}) == [
        "delivered (event): Additional properties are not allowed ('internal_note' was unexpected)"
    ]
    assert event_problems({**good, "timestamp": "yesterday"})[0].startswith("delivered timestamp:")
    assert event_problems({**good, "event": "opened"})[0].startswith("event type 'opened' is not one of")
    suppressed = public(SAMPLES[-1].to_dict())
    assert event_problems({**suppressed, "reason": "whim"})  # only the list's reasons
    assert event_problems({k: v for k, v in suppressed.items() if k != "since"})  # since is required
