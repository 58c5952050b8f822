"""Reliable queue semantics against a real Redis (Streams + consumer groups)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from common import keys, redisreply
from common.config import RedisServer
from common.errors import QueueFullError, QueueUnavailableError
from common.queue import (
    AsyncQueues,
    Consumer,
    Entry,
    ListAppend,
    Output,
    PoolExhaustedError,
    Queues,
    QueueSettings,
    connect,
    connect_async,
    redis_errors,
)
from devtools.servers import RedisProcess, free_port, wait_until

pytestmark = pytest.mark.redis


def _read_until(consumer: Consumer, count: int, timeout_s: float = 10) -> list[Entry]:
    """Read batches until ``count`` entries arrived (reclaim happens after the idle time)."""
    got: list[Entry] = []

    def more() -> bool:
        got.extend(consumer.read())
        return len(got) >= count

    wait_until(more, timeout_s=timeout_s, what=f"{count} entries")
    return got


def _payloads(queues: Queues, stream: str) -> list[bytes]:
    return [f[b"payload"] for _, f in redisreply.stream_rows(queues.redis.xrange(stream))]


def test_enqueue_read_complete_hands_off_and_acks(queues: Queues) -> None:
    ids = queues.enqueue_many("IN", [{"payload": f"m{i}"} for i in range(5)])
    assert len(ids) == 5
    consumer = Consumer(queues, ["IN"], "g", "c1", block_ms=100)
    consumer.setup()
    batch = consumer.read()
    assert [e.fields[b"payload"] for e in batch] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert all(e.deliveries == 1 for e in batch)
    assert queues.stats("IN", "g").pending == 5
    consumer.complete([(e, [Output("OUT", {"payload": e.fields[b"payload"] + b"!"})]) for e in batch])
    stats = queues.stats("IN", "g")
    assert (stats.length, stats.pending, stats.dead) == (0, 0, 0)
    assert _payloads(queues, "OUT") == [b"m0!", b"m1!", b"m2!", b"m3!", b"m4!"]


def test_queue_limit_refuses_writes_once_reached(queues: Queues) -> None:
    # Back-pressure: the write that reaches max-queue-length is kept (it is durable); the
    # producer then refuses further writes until the queue has room again.
    small = Queues(queues.client, QueueSettings(max_length=3))
    small.enqueue_many("IN", [{"payload": "a"}, {"payload": "b"}])
    small.enqueue("IN", {"payload": "c"})
    with pytest.raises(QueueFullError, match=r"IN holds 3 entries \(limit 3\)"):
        small.enqueue_many("IN", [{"payload": "d"}, {"payload": "e"}])
    assert small.length("IN") == 3
    assert small.enqueue("IN", {"payload": "internal"}, limit=False)
    consumer = Consumer(small, ["IN"], "g", "c", block_ms=100)
    consumer.setup()
    consumer.complete([(e, []) for e in consumer.read()])
    assert small.enqueue("IN", {"payload": "d"})


@pytest.mark.slow
def test_redis_down_is_a_temporary_error() -> None:
    dead = Queues(redis.Redis(port=free_port(), socket_connect_timeout=0.5), QueueSettings())
    with pytest.raises(QueueUnavailableError, match="Redis unavailable"):
        dead.enqueue("IN", {"payload": "x"})


def test_dead_letter_keeps_entry_and_reason_and_replays(queues: Queues) -> None:
    queues.enqueue("IN", {"payload": "poison"})
    consumer = Consumer(queues, ["IN"], "g", "c1", block_ms=100)
    consumer.setup()
    [entry] = consumer.read()
    consumer.dead_letter([(entry, "cannot parse", [Output("EVENTS", {"data": "{}"})])])
    assert queues.stats("IN", "g").length == 0
    [dead] = queues.dead_letters("IN")
    assert dead.fields[b"payload"] == b"poison"
    assert dead.fields[b"dl-reason"] == b"cannot parse"
    assert dead.fields[b"dl-id"] == entry.id.encode()
    assert queues.redis.xlen("EVENTS") == 1
    assert queues.stats("IN", "g").dead == 1
    assert queues.replay_dead_letters("IN") == 1
    assert queues.redis.xlen(keys.dead_letter("IN")) == 0
    [replayed] = consumer.read()
    assert replayed.fields[b"payload"] == b"poison"
    assert set(replayed.fields) == {b"payload", b"replayed-at"}  # the dl-* metadata is gone


def test_orphaned_entries_are_claimed_with_delivery_count(queues: Queues) -> None:
    # A consumer that read and then went silent loses its entries to another after the idle time.
    queues.enqueue_many("IN", [{"payload": "a"}, {"payload": "b"}])
    dead = Consumer(queues, ["IN"], "g", "dead", block_ms=100)
    dead.setup()
    assert len(dead.read()) == 2
    alive = Consumer(queues, ["IN"], "g", "alive", block_ms=100)
    got = _read_until(alive, 2)
    assert sorted(e.fields[b"payload"] for e in got) == [b"a", b"b"]
    assert all(e.deliveries == 2 for e in got)


def test_restarted_consumer_rereads_its_own_pending_first(queues: Queues) -> None:
    queues.enqueue_many("IN", [{"payload": "a"}, {"payload": "b"}])
    first = Consumer(queues, ["IN"], "g", "worker-0", block_ms=100)
    first.setup()
    assert len(first.read()) == 2
    again = Consumer(queues, ["IN"], "g", "worker-0", block_ms=100)
    batch = again.read()
    assert [e.fields[b"payload"] for e in batch] == [b"a", b"b"]
    assert [e.deliveries for e in batch] == [2, 2]


def test_entry_delivered_too_often_is_dead_lettered(queues: Queues, queue_settings: QueueSettings) -> None:
    # A message that keeps killing its consumer stops after max-deliveries (3 here).
    queues.enqueue("IN", {"payload": "crasher"})
    for attempt in range(1, queue_settings.max_deliveries + 1):
        consumer = Consumer(queues, ["IN"], "g", "w", block_ms=100)
        consumer.setup()
        [entry] = consumer.read()
        assert entry.deliveries == attempt
    final = Consumer(queues, ["IN"], "g", "w", block_ms=100)
    assert final.read() == []
    [dead] = queues.dead_letters("IN")
    assert dead.fields[b"dl-deliveries"] == b"4"
    assert b"delivered 4 times without completing" in dead.fields[b"dl-reason"]


def test_priority_queue_first_but_default_never_starves(queues: Queues, queue_settings: QueueSettings) -> None:
    queues.enqueue_many("P0", [{"payload": f"p0-{i}"} for i in range(200)], limit=False)
    queues.enqueue_many("P1", [{"payload": f"p1-{i}"} for i in range(20)], limit=False)
    consumer = Consumer(queues, ["P0", "P1"], "g", "t", batch_size=10, block_ms=100)
    consumer.setup()
    origins = []
    for _ in range(2 * queue_settings.priority_share):
        batch = consumer.read()
        origins.append({e.queue for e in batch})
        consumer.complete([(e, []) for e in batch])
    # Most batches come from P0, yet P1 was served while P0 still had plenty waiting.
    assert sum(1 for o in origins if o == {"P0"}) >= len(origins) - 3
    assert any("P1" in o for o in origins)
    assert queues.length("P0") > 0


def test_default_queue_used_when_priority_is_empty(queues: Queues) -> None:
    queues.enqueue_many("P1", [{"payload": "x"}, {"payload": "y"}])
    consumer = Consumer(queues, ["P0", "P1"], "g", "t", block_ms=100)
    consumer.setup()
    batch = consumer.read()
    assert [e.queue for e in batch] == ["P1", "P1"]


def _xreadgroup_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xreadgroup", {}).get("calls", 0))


def test_a_consumer_keeping_up_reads_all_its_streams_in_one_call(queues: Queues) -> None:
    # Behind, the streams are read one by one in priority order; once a batch came back short
    # (every stream empty), what arrives next is read with one call, priority stream first.
    queues = Queues(queues.client, QueueSettings(priority_share=100))  # no default-first turn here
    consumer = Consumer(queues, ["P0", "P1"], "g", "t", batch_size=10, block_ms=100)
    consumer.setup()
    queues.enqueue_many("P1", [{"payload": "a"}, {"payload": "b"}])
    first = consumer.read()  # after its own leftovers (none): P0, then P1, which had too few
    assert [e.queue for e in first] == ["P1", "P1"]
    consumer.complete([(e, []) for e in first])
    queues.enqueue_many("P1", [{"payload": "c"}])
    queues.enqueue_many("P0", [{"payload": "urgent"}])
    before = _xreadgroup_calls(queues.redis)
    second = consumer.read()
    assert _xreadgroup_calls(queues.redis) - before == 1
    assert [e.fields[b"payload"] for e in second] == [b"urgent", b"c"]
    consumer.complete([(e, []) for e in second])
    # A burst while caught up: the priority stream's entries still come first, and the consumer,
    # now behind, goes back to reading stream by stream.
    queues.enqueue_many("P1", [{"payload": f"p1-{i}"} for i in range(25)], limit=False)
    queues.enqueue_many("P0", [{"payload": f"p0-{i}"} for i in range(5)], limit=False)
    before = _xreadgroup_calls(queues.redis)
    burst = consumer.read()
    assert [e.queue for e in burst] == ["P0"] * 5 + ["P1"] * 10 and _xreadgroup_calls(queues.redis) - before == 1
    consumer.complete([(e, []) for e in burst])
    queues.enqueue_many("P0", [{"payload": "next"}])
    before = _xreadgroup_calls(queues.redis)
    behind = consumer.read()
    assert [e.queue for e in behind] == ["P0"] + ["P1"] * 9 and _xreadgroup_calls(queues.redis) - before == 2


@pytest.mark.slow
def test_pool_is_sized_from_config_and_reports_exhaustion(
    redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # max-connections bounds a process's connections; a caller finding them all busy waits
    # pool-timeout-seconds, then gets a temporary failure, one warning and a counted event.
    server = RedisServer(hostname="127.0.0.1", port=redis_server.port, max_connections=2, pool_timeout_seconds=0.3)
    registry = CollectorRegistry()
    client = connect(server, client_name="pooltest", registry=registry)
    blockers = [threading.Thread(target=client.blpop, args=(["IB:test:never"], 2)) for _ in range(2)]
    for thread in blockers:
        thread.start()
    try:
        wait_until(lambda: _clients_named(redis_server, "pooltest") == 2, what="two busy connections")
        started = time.monotonic()
        with pytest.raises(PoolExhaustedError, match="all 2 busy"):
            client.ping()
        assert time.monotonic() - started >= 0.3
        with pytest.raises(QueueUnavailableError), redis_errors("enqueue"):
            client.ping()
    finally:
        for thread in blockers:
            thread.join()
    assert client.ping() is True  # the connections are free again
    assert registry.get_sample_value("mailer_pooltest_redis_pool_exhausted_total", {"client": "pooltest"}) == 2
    assert "Redis connection pool of pooltest exhausted: all 2 connections busy" in caplog.text
    assert _clients_named(redis_server, "pooltest") == 2  # never more than max-connections
    client.close()


def _clients_named(redis_server: RedisProcess, name: str) -> int:
    admin = redis.Redis(port=redis_server.port)
    try:
        clients: list[dict[str, object]] = admin.client_list()  # type: ignore[assignment]
        return sum(1 for c in clients if c.get("name") == name)
    finally:
        admin.close()


def _exec_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0))


def test_coalesced_enqueues_of_concurrent_tasks_share_one_transaction(
    redis_server: RedisProcess, redis_client: redis.Redis, queue_settings: QueueSettings
) -> None:
    server = RedisServer(hostname="127.0.0.1", port=redis_server.port)
    before = _exec_calls(redis_client)

    async def main() -> list[str]:
        client = connect_async(server)
        queues = AsyncQueues(client, queue_settings, coalesce=True)
        try:
            return await asyncio.gather(
                *(
                    queues.enqueue("Q", {"n": str(i)}, with_writes=[ListAppend(f"T{i}", [f"step {i}"], 10, 60)])
                    for i in range(10)
                )
            )
        finally:
            await client.aclose()

    ids = asyncio.run(main())
    assert _exec_calls(redis_client) - before == 1
    entries: list[Any] = redis_client.xrange("Q") or []
    assert [entry_id.decode() for entry_id, _ in entries] == ids
    assert [fields[b"n"] for _, fields in entries] == [str(i).encode() for i in range(10)]
    assert all(redis_client.lrange(f"T{i}", 0, -1) == [f"step {i}".encode()] for i in range(10))


def test_coalesced_enqueues_all_get_the_error_of_their_transaction(queue_settings: QueueSettings) -> None:
    server = RedisServer(hostname="127.0.0.1", port=free_port(), socket_timeout=1.0)

    async def main() -> list[object]:
        client = connect_async(server)
        queues = AsyncQueues(client, queue_settings, coalesce=True)
        try:
            return await asyncio.gather(*(queues.enqueue("Q", {"n": str(i)}) for i in range(3)), return_exceptions=True)
        finally:
            await client.aclose()

    results = asyncio.run(main())
    assert all(isinstance(r, QueueUnavailableError) for r in results), results
