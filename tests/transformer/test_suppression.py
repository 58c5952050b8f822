"""The Transformer enforces the suppression list before signing, and writes the timeline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from common import trace
from common.events import decode_event
from common.payloads import OutboundMail, SubmittedMail
from common.queue import Queues
from common.suppression import SuppressionList, SuppressionSettings
from common.trace import TraceSettings
from devtools.servers import wait_until
from tests.transformer.test_queue_path import EVENTS, OUT, P1, Running, _mail

pytestmark = pytest.mark.redis


@pytest.fixture
def running(make_config) -> Iterator[Running]:
    r = Running(make_config(service="transformer"))
    yield r
    r.stop()


def put(client: redis.Redis, scope: str, address: str, reason: str, at: float) -> None:
    SuppressionList(client, SuppressionSettings()).put(scope, address, reason, at=at)


def test_a_suppressed_recipient_gets_no_copy_and_the_customer_a_suppressed_event(
    running: Running, queues: Queues, redis_client: redis.Redis
) -> None:
    now = time.time()
    put(redis_client, "example.test", "B@dest.test", "unsubscribe", now - 3600)
    put(redis_client, "example.test", "c@dest.test", "bounce", now - 40 * 86400)  # outside enforce-days (30)
    put(redis_client, "other.test", "a@dest.test", "manual", now)  # another sending domain's list
    queues.enqueue_many(P1, [_mail("sup1", 1).to_fields(), _mail("sup2", 1).to_fields()])
    before = redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    running.thread.start()
    wait_until(lambda: redis_client.xlen(P1) == 0, timeout_s=10, what="both messages handled")
    client: Any = redis_client
    copies = [OutboundMail.from_fields(f) for _, f in client.xrange(OUT)]
    assert sorted((m.uuid, m.recipients[0]) for m in copies) == [("sup1", "a@dest.test"), ("sup2", "a@dest.test")]
    events = [decode_event(f) for _, f in client.xrange(EVENTS)]
    assert sorted(e["uuid"] for e in events) == ["sup1", "sup2"]
    first = next(e for e in events if e["uuid"] == "sup1")
    assert first["event"] == "suppressed" and first["recipient"] == "b@dest.test"
    assert (first["reason"], first["since"], first["scope"]) == ("unsubscribe", int(now - 3600), "example.test")
    assert first["stream_id"] == "stream-sup1" and first["fd"] == "example.test"
    # One read of the list for the batch, whatever its number of messages and recipients.
    assert redis_client.info("commandstats")["cmdstat_mget"]["calls"] == before + 1
    assert running.metric_labels("mailer_transformer_suppressed_total", {"reason": "unsubscribe"}) == 2
    steps = trace.read(redis_client, "sup1")
    assert [(s["stage"], s["recipient"]) for s in steps] == [("signed", "a@dest.test"), ("suppressed", "b@dest.test")]
    assert steps[0]["message_id"].startswith("<sup1.") and steps[0]["return_path"].startswith("bounce-sup1-")


def test_every_recipient_suppressed_means_no_copy_at_all(
    running: Running, queues: Queues, redis_client: redis.Redis
) -> None:
    for rcpt in ("a@dest.test", "b@dest.test"):
        put(redis_client, "example.test", rcpt, "spam-report", time.time())
    queues.enqueue(P1, _mail("sup3", 1).to_fields())
    running.thread.start()
    wait_until(lambda: redis_client.xlen(EVENTS) == 2, timeout_s=10, what="two suppressed events")
    assert redis_client.xlen(OUT) == 0 and redis_client.xlen(P1) == 0
    assert not redis_client.exists("IB:sent:sup3")  # nobody was sent to


def test_disabled_list_and_trace_change_nothing(make_config, queues: Queues, redis_client: redis.Redis) -> None:
    config = make_config(
        {"common-config": {"suppression": {"enabled": False}, "trace": {"enabled": False}}}, service="transformer"
    )
    assert not TraceSettings.from_config(config).enabled
    put(redis_client, "example.test", "a@dest.test", "manual", time.time())
    r = Running(config)
    try:
        queues.enqueue(P1, SubmittedMail(_mail("sup4", 1).raw, "sup4", 1, "smtp", 1.0).to_fields())
        r.thread.start()
        wait_until(lambda: redis_client.xlen(OUT) == 2, timeout_s=10, what="both copies")
        assert trace.read(redis_client, "sup4") == []
    finally:
        r.stop()
