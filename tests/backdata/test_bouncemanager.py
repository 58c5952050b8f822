"""The bounce-manager feed: anonymised, signed, retried, and never in the customer's way."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from backdata.bouncemanager import STREAM
from common.events import Event
from devtools.servers import wait_until
from devtools.webhook import Request, WebhookReceiver

pytestmark = pytest.mark.redis

SECRET = "apa"


@pytest.fixture
def manager() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def _section(manager: WebhookReceiver) -> dict[str, Any]:
    return {"bounce_manager": {"secret": SECRET, "cid": 7, "url": manager.url}}


def _query(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.path).query).items()}


def test_records_are_anonymised_and_hashed(start_backdata, bd, webhook, manager) -> None:
    events = [
        Event("delivered", "u1", recipient="one@dest.example", fd="sender.example", ip="192.0.2.1", stream_id="s1"),
        Event(
            "bounce",
            "u2",
            recipient="Two.Person@Dest.example",
            fd="sender.example",
            type="hard",
            reason="550 5.1.1 <two.person@dest.example>: user unknown",
        ),
        Event("unsubscribe", "u3"),
    ]
    sent = bd.enqueue(events)
    start_backdata(**_section(manager))
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    wait_until(lambda: len(manager.events) == 2, 10)
    by_event = {r["event"]: r for r in manager.events}
    assert by_event["delivered"] == {
        "fd": "sender.example",
        "rd": "dest.example",
        "timestamp": events[0].timestamp,
        "event": "delivered",
        "streamid": "s1",
    }
    assert by_event["bounce"]["reason"] == "550 5.1.1 <**PII**@dest.example>: user unknown"
    assert by_event["bounce"]["type"] == "hard"
    body = json.dumps(manager.events).lower()
    assert "u1" not in body and "two.person" not in body and "192.0.2.1" not in body
    for request in manager.requests:
        query = _query(request)
        assert query["cid"] == "7"
        expected = hmac.new(SECRET.encode(), f"7.{query['ts']}.".encode() + request.body, hashlib.sha256)
        assert hmac.compare_digest(query["hash"], expected.hexdigest())


def test_nothing_posted_without_delivery_or_bounce_events(start_backdata, bd, webhook, manager, redis_client) -> None:
    sent = bd.enqueue(bd.events(5, kind="unsubscribe") + bd.events(3, kind="spam-report", prefix="s"))
    start_backdata(**_section(manager))
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    wait_until(lambda: redis_client.xlen(bd.queue) == 0, 5)
    assert redis_client.xlen(STREAM) == 0
    assert manager.requests == []


def test_failing_bounce_manager_never_blocks_the_webhook(start_backdata, bd, webhook, manager, redis_client) -> None:
    manager.set_responder(lambda _: (503, {}, 0.0))
    events = bd.events(20, fd="sender.example")
    sent = bd.enqueue(events)
    running = start_backdata(**_section(manager))
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    wait_until(lambda: len(manager.requests) >= 3, 10, what="bounce-manager retries")
    assert manager.events == []
    assert redis_client.xlen(STREAM) == 20  # kept in Redis while the bounce manager is down
    more = bd.enqueue(bd.events(5, prefix="more", fd="sender.example"))
    wait_until(lambda: more <= bd.received_ids(webhook), 10)
    manager.set_responder(lambda _: (200, {}, 0.0))
    wait_until(lambda: len(manager.events) == 25, 10)
    wait_until(lambda: redis_client.xlen(STREAM) == 0, 5)
    assert running.metric("mailer_backdata_posts_total", target="bounce-manager", outcome="transient") >= 3


def test_bounce_manager_records_age_out(start_backdata, bd, webhook, manager, redis_client) -> None:
    manager.set_responder(lambda _: (500, {}, 0.0))
    sent = bd.enqueue(bd.events(3, fd="sender.example"))
    start_backdata(max_age_seconds=1, **_section(manager))
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    wait_until(lambda: redis_client.xlen(STREAM + ":dead") == 3, 10)
    assert redis_client.xlen(STREAM) == 0
