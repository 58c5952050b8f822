"""The per-message timeline: bounded, expiring, ordered, written with the queue's transactions."""

from __future__ import annotations

import json

import pytest
import redis

from common import keys, trace
from common.queue import HashWrite, ListAppend, Output, Queues, write_all
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


def test_the_records_of_a_batch_are_one_command_with_each_key_s_own_bounds(redis_client: redis.Redis) -> None:
    # Trace steps and hash records (e.g. the Transformer's sent records) of a whole hand-off go
    # to Redis as one script call; each key keeps its own bounds, and a record larger than what
    # Lua can unpack at once is written whole.
    redis_client.rpush("L1", "old-1", "old-2", "old-3")
    many = {f"r{i}@dest.test": f"v{i}" for i in range(1_500)}
    before = redis_client.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)
    pipe = redis_client.pipeline(transaction=True)
    write_all(
        pipe,
        [
            ListAppend("L1", ["a", "b"], 4, 100),
            Output("S", {"k": "v"}),
            HashWrite("H1", many, 300),
            ListAppend("L2", [], 10, 100),  # nothing to append: the list is not created
            HashWrite("H2", {}, 300),  # nor the hash
            ListAppend("L3", [str(i) for i in range(2_500)], 2_400, 2_000),
            ListAppend("L1", ["c"], 4, 100),
        ],
    )
    pipe.execute()
    assert redis_client.info("commandstats")["cmdstat_eval"]["calls"] - before == 1
    assert redis_client.lrange("L1", 0, -1) == [b"old-3", b"a", b"b", b"c"]  # the newest 4, in order
    assert redis_client.lrange("L3", 0, -1) == [str(i).encode() for i in range(100, 2_500)]
    assert redis_client.hgetall("H1") == {k.encode(): v.encode() for k, v in many.items()}
    assert not redis_client.exists("L2") and not redis_client.exists("H2")
    assert 90 < redis_client.ttl("L1") <= 100 and 1990 < redis_client.ttl("L3") <= 2000
    assert 290 < redis_client.ttl("H1") <= 300
    assert redis_client.xlen("S") == 1
    # A lone record is written as plain commands (cheaper for Redis than a script call).
    pipe = redis_client.pipeline(transaction=True)
    write_all(pipe, [Output("S", {"k": "v"}), ListAppend("L4", ["x"], 4, 100)])
    pipe.execute()
    assert redis_client.info("commandstats")["cmdstat_eval"]["calls"] - before == 1
    assert redis_client.lrange("L4", 0, -1) == [b"x"] and 90 < redis_client.ttl("L4") <= 100
