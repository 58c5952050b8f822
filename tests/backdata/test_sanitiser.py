"""Bounce-manager PII sanitiser: table of real-world recipient forms (tests/data/backdata/sanitiser.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from backdata import bouncemanager
from backdata.pii import sanitise

TABLE: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "data/backdata/sanitiser.yaml").read_text(encoding="utf-8")
)


@pytest.mark.parametrize("case", TABLE, ids=[c["name"] for c in TABLE])
def test_sanitiser(case: dict[str, Any]) -> None:
    result = sanitise(case["text"], case["recipients"])
    assert result == case["expected"]
    for address in case["recipients"]:
        local = address.rpartition("@")[0].strip('"')
        if len(local) >= 4:  # shorter ones are ordinary words of the reason
            assert local.lower() not in result.lower().replace("**pii**", "")


def test_record_has_no_uuid_ip_or_local_part() -> None:
    event = {
        "event": "bounce",
        "event_id": "e1",
        "uuid": "u1",
        "timestamp": 1700000000,
        "ip": "192.0.2.1",
        "type": "hard",
        "reason": "550 <Rcpt.One@Example.com> unknown",
        "recipient": "rcpt.one@example.com",
        "stream_id": "s1",
        "fd": "sender.example",
    }
    assert bouncemanager.record(event) == {
        "fd": "sender.example",
        "rd": "example.com",
        "timestamp": 1700000000,
        "event": "bounce",
        "streamid": "s1",
        "type": "hard",
        "reason": "550 <**PII**@example.com> unknown",
    }


@pytest.mark.parametrize(
    "event",
    [
        {"event": "unsubscribe", "uuid": "u", "timestamp": 1, "fd": "a.example", "recipient": "x@y.example"},
        {"event": "delivered", "uuid": "u", "timestamp": 1, "recipient": "x@y.example"},
        {"event": "delivered", "uuid": "u", "timestamp": 1, "fd": "a.example"},
        {"event": "error", "msg": "boom", "service": "postfix", "timestamp": 1, "fd": "a.example"},
    ],
    ids=["unsubscribe", "no-from-domain", "no-recipient", "error"],
)
def test_events_without_a_record(event: dict[str, Any]) -> None:
    assert bouncemanager.record(event) is None


def test_original_rcpt_list_is_used() -> None:
    event = {"event": "delivered", "timestamp": 5, "fd": "a.example", "rcpt": ["Who@B.example"]}
    assert bouncemanager.record(event) == {"fd": "a.example", "rd": "b.example", "timestamp": 5, "event": "delivered"}
