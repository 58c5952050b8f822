"""The parking stream: due events go back to the queue exactly once, never past their age limit."""

from __future__ import annotations

import time

import pytest

from backdata.parking import DUE, PARKED, PARKS, SINCE, Parking, parks
from common import redisreply
from common.queue import Entry, Queues
from common.retry import RetryPolicy

pytestmark = pytest.mark.redis


def _parking(queues: Queues) -> Parking:
    return Parking(queues, "EVENT_QUEUE", policy=RetryPolicy(base_s=1.0, cap_s=60.0))


def test_due_event_is_requeued_once_even_by_two_replicas(queues: Queues) -> None:
    a, b = _parking(queues), _parking(queues)
    entry = Entry("EVENT_QUEUE", "1-0", {b"data": b'{"event":"bounce"}', PARKS.encode(): b"2"})
    out = a.output(entry, "HTTP 400", since=100.0, not_after=time.time() + 1000, now=time.time() - 3600)
    queues.enqueue(out.queue, out.fields, limit=False)
    assert a.requeue_due() + b.requeue_due() == 1
    ((_, fields),) = redisreply.stream_rows(queues.redis.xrange("EVENT_QUEUE"))
    assert fields[b"data"] == b'{"event":"bounce"}'
    assert fields[PARKS.encode()] == b"3"
    assert fields[SINCE.encode()] == b"100.0"
    assert DUE.encode() not in fields
    assert queues.redis.xlen(PARKED) == 0


def test_not_due_event_stays_parked(queues: Queues) -> None:
    parking = _parking(queues)
    entry = Entry("EVENT_QUEUE", "1-0", {b"data": b"{}"})
    out = parking.output(entry, "HTTP 400", since=time.time(), not_after=time.time() + 1000)
    queues.enqueue(out.queue, out.fields, limit=False)
    assert parking.requeue_due() == 0
    assert parking.count() == 1
    assert parking.requeue_due(now=time.time() + 3) == 1  # base 1 s, first park: due within 1 s


def test_due_time_never_passes_the_age_limit(queues: Queues) -> None:
    parking = _parking(queues)
    entry = Entry("EVENT_QUEUE", "1-0", {b"data": b"{}", PARKS.encode(): b"30"})
    now = 1_000_000.0
    out = parking.output(entry, "x", since=now - 10, not_after=now + 5, now=now)
    assert int(out.fields[DUE]) == int((now + 5) * 1000)
    assert parks(Entry("q", "1-0", {PARKS.encode(): b"junk"})) == 0


def test_backoff_grows_and_is_capped(queues: Queues) -> None:
    parking = _parking(queues)
    assert 0.5 <= parking.delay(0) <= 1.0
    assert 4.0 <= parking.delay(3) <= 8.0
    assert 30.0 <= parking.delay(40) <= 60.0
