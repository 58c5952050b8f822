"""BackData feeds the suppression list from events, before (and whatever) the webhook answers,
and writes every webhook answer into the message's timeline."""

from __future__ import annotations

import pytest
import redis

from common import trace
from common.events import Event
from common.suppression import SuppressionList, SuppressionSettings
from devtools.servers import wait_until
from devtools.webhook import WebhookReceiver

pytestmark = pytest.mark.redis


def _list(client: redis.Redis) -> SuppressionList:
    return SuppressionList(client, SuppressionSettings())


def test_suppressing_events_feed_the_list_even_while_the_webhook_is_down(
    start_backdata, bd, webhook: WebhookReceiver, redis_client: redis.Redis
) -> None:
    webhook.set_responder(lambda _: (503, {}, 0.0))
    bd.enqueue(
        [
            Event("bounce", "m1", recipient="Dead@dest.test", fd="example.test", type="hard", suppress=True),
            Event("bounce", "m2", recipient="busy@dest.test", fd="example.test", type="hard", suppress=False),
            Event("spam-report", "m3", recipient="angry@dest.test", email="angry@dest.test", fd="example.test"),
            Event("unsubscribe", "m4", recipient="gone@dest.test", fd="example.test", extra={"source": "one-click"}),
            Event("delivered", "m5", recipient="fine@dest.test", fd="example.test"),
        ]
    )
    running = start_backdata()
    lst = _list(redis_client)
    wait_until(lambda: len(lst.get("example.test", "gone@dest.test")) == 1, timeout_s=10, what="the list fed")
    assert [e.reason for e in lst.get("example.test", "dead@dest.test")] == ["bounce"]
    assert [e.reason for e in lst.get("example.test", "angry@dest.test")] == ["spam-report"]
    assert lst.get("example.test", "busy@dest.test") == [] and lst.get("example.test", "fine@dest.test") == []
    assert webhook.events == []  # nothing delivered yet: the list did not wait for the webhook
    # The customer deletes an entry; the same event, retried, does not bring it back.
    assert lst.delete("example.test", "gone@dest.test") == 1
    webhook.set_responder(lambda _: (200, {}, 0.0))
    wait_until(lambda: len(webhook.events) == 5, timeout_s=20, what="all five events delivered")
    assert lst.get("example.test", "gone@dest.test") == []
    assert running.metric("mailer_backdata_suppression_entries_fed_total", reason="bounce") == 1
    # The timeline's "delivered" step is written with the ack, just after the webhook answered.
    wait_until(
        lambda: [s["outcome"] for s in trace.read(redis_client, "m4") if s["stage"] == "webhook"][-1:] == ["delivered"],
        timeout_s=10,
        what="the delivery in the timeline",
    )
    steps = trace.read(redis_client, "m4")
    assert steps[0]["stage"] == "listed"
    assert any(s["outcome"] == "retrying" and "503" in s["answer"] for s in steps if s["stage"] == "webhook")


def test_an_event_without_its_from_domain_is_scoped_by_the_sent_record(
    start_backdata, bd, webhook: WebhookReceiver, redis_client: redis.Redis
) -> None:
    redis_client.hset("IB:sent:m6", mapping={"who@dest.test": "spring\x1fexample.test"})
    bd.enqueue([Event("unsubscribe", "m6", recipient="who@dest.test")])
    start_backdata()
    wait_until(lambda: len(webhook.events) == 1, timeout_s=10, what="event delivered")
    assert [e.reason for e in _list(redis_client).get("example.test", "who@dest.test")] == ["unsubscribe"]


def test_rejected_events_are_parked_and_the_timeline_says_so(
    start_backdata, bd, webhook: WebhookReceiver, redis_client: redis.Redis
) -> None:
    webhook.set_responder(lambda _: (400, {}, 0.0))
    bd.enqueue([Event("delivered", "m7", recipient="x@dest.test")])
    start_backdata()
    wait_until(
        lambda: any(s.get("outcome") == "parked" for s in trace.read(redis_client, "m7")),
        timeout_s=10,
        what="parked in the timeline",
    )
    (step,) = [s for s in trace.read(redis_client, "m7") if s.get("outcome") == "parked"]
    assert step["answer"].startswith("HTTP 400") and step["event"] == "delivered"
