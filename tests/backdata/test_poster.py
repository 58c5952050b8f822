"""What an HTTP answer means for a batch; Retry-After parsing; where an event's age starts."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from backdata.delivery import WebhookHandler
from backdata.poster import MAX_RETRY_AFTER_S, Poster, classify, parse_retry_after
from common.queue import Entry
from devtools.servers import free_port


@pytest.mark.parametrize(
    ("status", "ok", "transient"),
    [
        (200, True, False),
        (202, True, False),
        (204, True, False),
        (301, False, True),
        (302, False, True),
        (400, False, False),
        (401, False, False),
        (404, False, False),
        (408, False, True),
        (413, False, False),
        (422, False, False),
        (429, False, True),
        (500, False, True),
        (502, False, True),
        (503, False, True),
        (504, False, True),
    ],
)
def test_classify(status: int, ok: bool, transient: bool) -> None:
    result = classify(status, {}, "")
    assert (result.ok, result.transient) == (ok, transient)
    assert result.status == status


def test_reason_carries_a_short_body_snippet() -> None:
    result = classify(400, {}, "bad\n  request " + "x" * 1000)
    assert result.reason.startswith("HTTP 400: bad request xxx")
    assert len(result.reason) < 230


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("999999", MAX_RETRY_AFTER_S),
        ("soon", None),
        ("nan", None),
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(30, abs=1)


def test_connection_refused_is_transient() -> None:
    result = Poster(f"http://127.0.0.1:{free_port()}/x", timeout_s=1).post(b"[]", "msg_x")
    assert (result.ok, result.transient) == (False, True)
    assert result.reason.startswith("connection failed")


def _entry(entry_ms: int, **fields: bytes) -> Entry:
    return Entry("EVENT_QUEUE", f"{entry_ms}-0", {k.encode().replace(b"_", b"-"): v for k, v in fields.items()})


@pytest.mark.parametrize(
    ("entry_ms", "event", "fields", "since"),
    [
        (1_000_000, {"timestamp": 900}, {}, 900.0),  # the event's own timestamp
        (1_000_000, {"timestamp": 5000}, {}, 1000.0),  # never after it was queued (clock skew)
        (1_000_000, {}, {}, 1000.0),  # no timestamp: when it was queued
        (1_000_000, {"timestamp": "x"}, {}, 1000.0),
        (1_000_000, {"timestamp": True}, {}, 1000.0),
        (9_000_000, {"timestamp": 900}, {"replayed_at": b"8000.5"}, 8000.5),  # replay restarts the clock
        (9_000_000, {"timestamp": 900}, {"bd_since": b"850"}, 850.0),  # parked: kept
        (9_000_000, {"timestamp": 900}, {"bd_since": b"850", "replayed_at": b"8000"}, 8000.0),
    ],
)
def test_age_counts_from(entry_ms: int, event: dict[str, Any], fields: dict[str, bytes], since: float) -> None:
    assert WebhookHandler._since(_entry(entry_ms, **fields), event) == since
