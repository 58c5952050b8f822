"""BackData against a real HTTP endpoint on loopback and a real Redis: nothing accepted is lost."""

from __future__ import annotations

import json
import time

import pytest

from backdata.parking import PARKED
from common.events import Event
from devtools.servers import free_port, wait_until
from devtools.webhook import DROP, Request, WebhookReceiver

pytestmark = pytest.mark.redis


def _status(code: int, delay: float = 0.0, headers: dict[str, str] | None = None):
    def respond(_: Request) -> tuple[int, dict[str, str], float]:
        return code, dict(headers or {}), delay

    return respond


@pytest.mark.slow
def test_every_failure_mode_then_recovery_loses_nothing(start_backdata, bd, event_queues) -> None:
    # Endpoint down, dropping connections, 500, 400 for everything, timing out, then healthy:
    # every event arrives at least once and the queue ends empty, nothing parked or dead.
    port = free_port()
    sent = bd.enqueue(bd.events(30))
    running = start_backdata(post_url=f"http://127.0.0.1:{port}/events", batch_size=10, timeout_seconds=0.3)
    wait_until(lambda: running.metric("failed_pushed_events_total") >= 20, 10, what="connection failures")
    assert event_queues.stats(bd.queue, "backdata").pending == 10  # one batch held, the rest waits

    with WebhookReceiver(port=port, responder=_status(DROP)) as endpoint:
        phases = [_status(DROP), _status(500), _status(400), _status(200, delay=1.0), _status(503)]
        for responder in phases:
            before = len(endpoint.requests)
            endpoint.set_responder(responder)
            wait_until(lambda b=before: len(endpoint.requests) >= b + 3, 15, what="retries")  # type: ignore[misc]
        assert event_queues.stats(bd.queue, "backdata").waiting >= 10  # never read while failing
        endpoint.set_responder(_status(200))
        wait_until(lambda: sent <= bd.received_ids(endpoint), 20, what="every event")
        wait_until(lambda: event_queues.length(bd.queue) == 0 and event_queues.length(PARKED) == 0, 10)
    stats = event_queues.stats(bd.queue, "backdata")
    assert (stats.length, stats.pending, stats.dead) == (0, 0, 0)
    assert running.metric("successfully_pushed_events_total") >= 30
    running.stop()


def test_batches_are_batch_size(start_backdata, bd, webhook) -> None:
    sent = bd.enqueue(bd.events(120))
    start_backdata(batch_size=50)
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    assert bd.batch_sizes(webhook) == [50, 50, 20]
    assert len(bd.received_ids(webhook)) == 120


@pytest.mark.slow
def test_max_wait_fills_a_batch(start_backdata, bd, webhook, event_queues) -> None:
    # The first event is read, then BackData waits (up to batch-max-wait-ms) for more.
    start_backdata(batch_max_wait_ms=1500, batch_size=10)
    first = bd.enqueue(bd.events(1, prefix="a"))
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").pending == 1, 5, what="first read")
    second = bd.enqueue(bd.events(1, prefix="b"))
    wait_until(lambda: (first | second) <= bd.received_ids(webhook), 10)
    assert bd.batch_sizes(webhook) == [2]


def test_max_wait_bounds_the_delay_of_a_lone_event(start_backdata, bd, webhook) -> None:
    start_backdata(batch_max_wait_ms=400, batch_size=10)
    started = time.monotonic()
    sent = bd.enqueue(bd.events(1))
    wait_until(lambda: sent <= bd.received_ids(webhook), 5)
    elapsed = time.monotonic() - started
    assert 0.35 <= elapsed < 3.0
    assert bd.batch_sizes(webhook) == [1]


@pytest.mark.slow
def test_retry_after_is_honoured(start_backdata, bd, webhook) -> None:
    arrivals: list[float] = []

    def respond(_: Request) -> tuple[int, dict[str, str], float]:
        arrivals.append(time.monotonic())
        return (429, {"Retry-After": "2"}, 0.0) if len(arrivals) == 1 else (200, {}, 0.0)

    webhook.set_responder(respond)
    sent = bd.enqueue(bd.events(3))
    start_backdata()  # max-backoff 0.05 s: only Retry-After can explain a 2 s wait
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    assert arrivals[1] - arrivals[0] >= 1.9


def test_webhook_id_is_stable_across_retries(start_backdata, bd, webhook) -> None:
    statuses = iter([500, 502, 200])
    webhook.set_responder(lambda _: (next(statuses, 200), {}, 0.0))
    sent = bd.enqueue(bd.events(4))
    start_backdata()
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    ids = {r.headers["webhook-id"] for r in webhook.requests}
    assert len(webhook.requests) == 3
    assert len(ids) == 1
    assert ids.pop().startswith("msg_")


@pytest.mark.slow
def test_one_refused_event_is_isolated_and_the_rest_flow(start_backdata, bd, webhook, event_queues) -> None:
    # The endpoint refuses any body with the poison event: the batch is split, the other
    # events are delivered, the poison one is parked and retried on its own while new events flow.
    webhook.set_responder(lambda r: (400 if b"poison" in r.body else 200, {}, 0.0))
    good = bd.enqueue(bd.events(19))
    bd.enqueue([Event("bounce", "poison", reason="refused by the endpoint")])
    running = start_backdata(batch_size=20)
    wait_until(lambda: good <= bd.received_ids(webhook), 10)
    wait_until(lambda: running.metric("mailer_backdata_parked_events_total") >= 2, 10, what="re-parked")
    later = bd.enqueue(bd.events(15, prefix="later"))
    wait_until(lambda: later <= bd.received_ids(webhook), 10)
    assert all(e["uuid"] != "poison" for e in webhook.events)
    assert event_queues.stats(bd.queue, "backdata").dead == 0


@pytest.mark.slow
def test_refused_event_ages_out_alone(start_backdata, bd, webhook, event_queues) -> None:
    webhook.set_responder(lambda r: (422 if b"poison" in r.body else 200, {}, 0.0))
    good = bd.enqueue(bd.events(9))
    bd.enqueue([Event("bounce", "poison")])
    running = start_backdata(max_age_seconds=1)
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").dead == 1, 10, what="dead letter")
    assert good <= bd.received_ids(webhook)
    (dead,) = event_queues.dead_letters(bd.queue)
    assert json.loads(dead.fields[b"data"])["uuid"] == "poison"
    assert b"max-age-seconds=1" in dead.fields[b"dl-reason"]
    assert b"HTTP 422" in dead.fields[b"dl-reason"]
    assert running.metric("mailer_backdata_dead_lettered_events_total", reason="max-age") == 1
    assert event_queues.length(PARKED) == 0


@pytest.mark.slow
def test_endpoint_refusing_everything_blocks_but_peels(start_backdata, bd, webhook, event_queues) -> None:
    # 404 for every body: the batch waits like a transient failure (nothing new is read),
    # one event per round is parked, and recovery delivers everything.
    webhook.set_responder(_status(404))
    sent = bd.enqueue(bd.events(25))
    running = start_backdata(batch_size=5)
    wait_until(lambda: running.metric("mailer_backdata_parked_events_total") >= 3, 10, what="peeling")
    stats = event_queues.stats(bd.queue, "backdata")
    assert stats.pending <= 5
    webhook.set_responder(_status(200))
    wait_until(lambda: sent <= bd.received_ids(webhook), 15)
    wait_until(lambda: event_queues.length(bd.queue) + event_queues.length(PARKED) == 0, 10)


def test_malformed_entries_are_dead_lettered_without_poisoning_the_batch(
    start_backdata, bd, webhook, event_queues
) -> None:
    good = bd.enqueue(bd.events(3))
    event_queues.enqueue_many(
        bd.queue,
        [
            {"data": b"not json"},
            {"data": b'{"uuid": "x"}'},
            {"other": b"field"},
            {"data": json.dumps({"event": "clicked", "uuid": "c1", "event_id": "e-unknown"})},
        ],
        limit=False,
    )
    running = start_backdata()
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").dead == 3, 10)
    wait_until(lambda: (good | {"e-unknown"}) <= bd.received_ids(webhook), 10)
    reasons = sorted(e.fields[b"dl-reason"].decode() for e in event_queues.dead_letters(bd.queue))
    assert any("not JSON" in r for r in reasons)
    assert any("'event' field" in r for r in reasons)
    assert any("no 'data' field" in r for r in reasons)
    assert running.metric("malformed_events_total") == 4  # 3 unreadable + 1 unknown type (forwarded)
    assert running.metric("delivered_events_total") == 3
    assert running.metric("mailer_backdata_dead_lettered_events_total", reason="malformed") == 3


def test_internal_fields_are_stripped_and_event_ids_kept(start_backdata, bd, webhook, event_queues) -> None:
    event = Event("bounce", "u1", recipient="a@example.com", fd="example.test", extra={"rcpt": ["a@example.com"]})
    sent = bd.enqueue([event])
    event_queues.enqueue(bd.queue, {"data": json.dumps({"event": "unsubscribe", "uuid": "u2"})}, limit=False)
    statuses = iter([500])
    webhook.set_responder(lambda _: (next(statuses, 200), {}, 0.0))
    start_backdata()
    wait_until(lambda: len(webhook.events) == 2, 10)
    by_uuid = {e["uuid"]: e for e in webhook.events}
    assert by_uuid["u1"]["event_id"] in sent
    assert "fd" not in by_uuid["u1"] and "rcpt" not in by_uuid["u1"]
    # An event that arrived without event_id gets a stable one: the same in the failed first
    # POST and in the accepted retry.
    first = {e["uuid"]: e["event_id"] for e in json.loads(webhook.requests[0].body)}
    assert first["u2"] == by_uuid["u2"]["event_id"]


def test_number_of_events_currently_posting_is_updated(start_backdata, bd, webhook) -> None:
    webhook.set_responder(_status(200, delay=0.8))
    sent = bd.enqueue(bd.events(7))
    running = start_backdata()
    wait_until(lambda: running.metric("number_of_events_currently_posting") == 7, 5)
    wait_until(lambda: sent <= bd.received_ids(webhook), 5)
    wait_until(lambda: running.metric("number_of_events_currently_posting") == 0, 5)
    assert running.metric("mailer_backdata_event_age_seconds_count") == 7


def test_backlog_metrics_read_redis(start_backdata, bd, webhook, event_queues) -> None:
    webhook.set_responder(_status(500))
    bd.enqueue(bd.events(12))
    running = start_backdata(batch_size=5)
    wait_until(lambda: running.metric("mailer_backdata_backlog_events", state="pending") == 5, 5)
    assert running.metric("mailer_backdata_backlog_events", state="waiting") == 7
    assert running.metric("mailer_backdata_dead_letter_events") == 0


def test_sigterm_equivalent_leaves_undelivered_events_pending(start_backdata, bd, webhook, event_queues) -> None:
    # Stopping during retries acknowledges nothing that was not delivered.
    webhook.set_responder(_status(500))
    bd.enqueue(bd.events(8))
    running = start_backdata(batch_size=5)
    wait_until(lambda: len(webhook.requests) >= 2, 5)
    running.stop()
    stats = event_queues.stats(bd.queue, "backdata")
    assert (stats.length, stats.pending, stats.dead) == (8, 5, 0)
