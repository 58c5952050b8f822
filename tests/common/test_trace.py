"""The per-message timeline: bounded, expiring, ordered, written with the queue's transactions."""

from __future__ import annotations

import json

import pytest
import redis

from common import keys, trace
from common.queue import Queues
from common.trace import TraceSettings

pytestmark = pytest.mark.redis


def test_entries_are_appended_bounded_and_expire(redis_client: redis.Redis) -> None:
    settings = TraceSettings(True, ttl_s=3600, max_entries=10)
    pipe = redis_client.pipeline(transaction=True)
    for i in range(15):
        trace.add_to(pipe, settings, "abc", trace.entry("attempt", at=1000 + i, recipient="a@b.test", n=i, reply=None))
    pipe.execute()
    entries = trace.read(redis_client, "abc")
    assert [e["n"] for e in entries] == list(range(5, 15))  # the newest 10
    assert "reply" not in entries[0]
    assert 3590 < redis_client.ttl(keys.trace("abc")) <= 3600


def test_entries_come_back_in_time_order_with_readable_times(redis_client: redis.Redis) -> None:
    settings = TraceSettings()
    redis_client.rpush(keys.trace("u1"), trace.entry("signed", at=2000.5), trace.entry("accepted", at=1999.25), b"junk")
    out = trace.timeline("u1", trace.read(redis_client, "u1"), settings)
    assert [e["stage"] for e in out["entries"]] == ["accepted", "signed"]
    assert out["entries"][0]["time"] == "1970-01-01T00:33:19.250Z"
    assert out["retention_days"] == 7
    assert "accepted" in trace.format_line(out["entries"][0])


def test_long_texts_are_cut_and_disabled_tracing_writes_nothing(queues: Queues, redis_client: redis.Redis) -> None:
    assert trace.append(trace.DISABLED, "u2", trace.entry("x")) == []
    assert trace.append(TraceSettings(), None, trace.entry("x")) == []
    step = trace.entry("attempt", reply="x" * 2000)
    assert len(json.loads(step)["reply"]) == trace.MAX_TEXT
    # A door writes its entry in the MULTI/EXEC of the XADD.
    queues.enqueue("Q", {"a": "b"}, with_writes=trace.append(TraceSettings(), "u2", step))
    assert redis_client.xlen("Q") == 1 and redis_client.llen(keys.trace("u2")) == 1
