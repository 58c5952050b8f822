"""Queue benchmark: enqueue -> consume -> complete (hand-off + ack) with 10 KB entries.

Starts a private redis-server (AOF, ``appendfsync always`` unless ``--fsync everysec``) on a
free loopback port, then measures in one process:

* enqueue: batches of ``--batch`` entries (one Lua call each);
* consume: read a batch (XREADGROUP) and complete it (MULTI: XACK + XDEL, no outputs);
* hand-off: read a batch and complete it with one output entry each into a second queue.

Runs with ``appendfsync always`` (the production default: every write fsync'd before Redis
answers) and ``everysec``, and prints messages/s for each phase, and for enqueue -> consume ->
ack with a producer thread and a consumer thread of one process running at once (how the
queue is used).  Goal: >= 20,000 msg/s.

Next to it, in the same run and on the same server, a raw Redis baseline does the same work
with plain redis-py and none of ``common.queue``: a producer thread XADDs batches of
``--batch`` entries in one pipeline, a consumer thread reads them with XREADGROUP (``COUNT
--batch``) and acknowledges each batch with XACK + XDEL in one pipeline (the queue deletes what
it acknowledges, so the baseline does too).  It runs twice: with plain pipelines and with
MULTI/EXEC pipelines (under ``appendfsync always`` Redis fsyncs once per event-loop turn; a
plain pipeline of 10 KB XADDs arrives in 16 KB reads, so probably a command or two per turn and
fsync, while a transaction is applied at EXEC, in one turn: measured about 2x apart here).
The three take turns for ``--rounds`` rounds; the ratio printed is the queue's median over the
faster raw variant's median (goal >= 0.8x raw Redis).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from common.queue import Consumer, Output, Queues, QueueSettings
from devtools.servers import RedisProcess

#: Upper bound of one flowing phase (a stuck producer must not hang the benchmark).
DEADLINE_S = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--fsync", choices=["always", "everysec", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3, help="turns of queue vs raw Redis (flowing phase)")
    args = parser.parse_args()
    print(
        f"queue benchmark: {args.messages} messages of {args.size} bytes, batches of {args.batch}, "
        "one process, redis-server with AOF on this machine's disk"
    )
    modes = ["always", "everysec"] if args.fsync == "both" else [args.fsync]
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
            server = RedisProcess(Path(tmp), appendfsync=mode).start()
            try:
                run(server.port, mode, args)
            finally:
                server.stop()


def run(port: int, fsync: str, args: argparse.Namespace) -> None:
    client = redis.Redis(port=port)
    settings = QueueSettings(max_length=0, batch_size=args.batch)
    queues = Queues(client, settings)
    body = b"x" * args.size
    n, batch = args.messages, args.batch
    print(f"appendfsync {fsync}:")

    start = time.perf_counter()
    for i in range(0, n, batch):
        queues.enqueue_many("BENCH-IN", [{"raw": body, "uuid": str(j)} for j in range(i, min(i + batch, n))])
    enqueue_s = time.perf_counter() - start

    consumer = Consumer(queues, ["BENCH-IN"], "bench", "c1", block_ms=100)
    consumer.setup()
    start = time.perf_counter()
    handed = 0
    while handed < n:
        entries = consumer.read()
        consumer.complete([(e, [Output("BENCH-OUT", {"raw": e.fields[b"raw"]})]) for e in entries])
        handed += len(entries)
    handoff_s = time.perf_counter() - start

    sink = Consumer(queues, ["BENCH-OUT"], "bench", "c2", block_ms=100)
    sink.setup()
    start = time.perf_counter()
    consumed = 0
    while consumed < n:
        entries = sink.read()
        sink.complete([(e, []) for e in entries])
        consumed += len(entries)
    consume_s = time.perf_counter() - start

    cycle = n / (enqueue_s + consume_s)
    flows: list[float] = []
    pipelined: list[float] = []
    multi: list[float] = []
    contenders = [(flows, concurrent), (pipelined, raw_pipelined), (multi, raw_multi)]
    for round_ in range(1, args.rounds + 1):
        for rates, measure in contenders if round_ % 2 else contenders[::-1]:
            rates.append(measure(port, args, f"BENCH-FLOW-{round_}-{measure.__name__}"))
            client.delete(f"BENCH-FLOW-{round_}-{measure.__name__}")
        print(
            f"  round {round_}: queue {flows[-1]:8,.0f} msg/s, raw redis-py pipelines {pipelined[-1]:8,.0f} msg/s, "
            f"raw redis-py MULTI pipelines {multi[-1]:8,.0f} msg/s"
        )
    flowing = statistics.median(flows)
    raw = max(statistics.median(pipelined), statistics.median(multi))
    paired = statistics.median(f / max(a, b) for f, a, b in zip(flows, pipelined, multi, strict=True))
    print(f"  enqueue                          {n / enqueue_s:10,.0f} msg/s")
    print(f"  read + hand-off to next queue    {n / handoff_s:10,.0f} msg/s")
    print(f"  read + ack                       {n / consume_s:10,.0f} msg/s")
    print(f"  enqueue, then consume + ack      {cycle:10,.0f} msg/s  (one thread, one phase after the other)")
    print(
        f"  enqueue -> consume -> ack        {flowing:10,.0f} msg/s  (producer and consumer threads at once)  "
        f"({'meets' if flowing >= 20_000 else 'below'} the 20,000 msg/s goal)"
    )
    raw_plain = statistics.median(pipelined)
    print(f"  raw Redis, plain pipelines       {raw_plain:10,.0f} msg/s  (XADD / XREADGROUP / XACK+XDEL)")
    print(f"  raw Redis, MULTI pipelines       {statistics.median(multi):10,.0f} msg/s  (the same in MULTI/EXEC)")
    print(
        f"  queue / raw Redis (the faster)   {flowing / raw:10.2f}x  (medians of {args.rounds} rounds, "
        f"{'meets' if flowing / raw >= 0.8 else 'below'} the 0.8x goal)"
    )
    print(f"  the rounds' own ratios, median   {paired:10.2f}x  (queue / the faster raw variant of the same round)")


def concurrent(port: int, args: argparse.Namespace, queue: str) -> float:
    """A producer thread and a consumer thread of one process, both running: messages/s end to end."""
    settings = QueueSettings(max_length=0, batch_size=args.batch)
    producer = Queues(redis.Redis(port=port), settings)
    consumer = Consumer(Queues(redis.Redis(port=port), settings), [queue], "bench", "flow", block_ms=100)
    consumer.setup()
    body = b"x" * args.size
    n: int = args.messages
    batch: int = args.batch

    def produce() -> None:
        for i in range(0, n, batch):
            producer.enqueue_many(queue, [{"raw": body, "uuid": str(j)} for j in range(i, min(i + batch, n))])

    start = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    consumed = 0
    while consumed < n:
        entries = consumer.read()
        consumer.complete([(e, []) for e in entries])
        consumed += len(entries)
    thread.join()
    elapsed: float = time.perf_counter() - start
    return n / elapsed


def raw_pipelined(port: int, args: argparse.Namespace, queue: str) -> float:
    """Raw redis-py, plain pipelines (``transaction=False``)."""
    return raw_concurrent(port, args, queue, transaction=False)


def raw_multi(port: int, args: argparse.Namespace, queue: str) -> float:
    """Raw redis-py, MULTI/EXEC pipelines: one fsync per batch under ``appendfsync always``."""
    return raw_concurrent(port, args, queue, transaction=True)


def raw_concurrent(port: int, args: argparse.Namespace, queue: str, *, transaction: bool) -> float:
    """The same flow with plain redis-py: pipelined XADD, XREADGROUP, pipelined XACK + XDEL."""
    producer, reader = redis.Redis(port=port), redis.Redis(port=port)
    reader.xgroup_create(queue, "bench", id="0", mkstream=True)
    body = b"x" * args.size
    n: int = args.messages
    batch: int = args.batch

    def produce() -> None:
        for i in range(0, n, batch):
            pipe = producer.pipeline(transaction=transaction)
            for j in range(i, min(i + batch, n)):
                pipe.xadd(queue, {"raw": body, "uuid": str(j)})
            pipe.execute()

    start = time.perf_counter()
    thread = threading.Thread(target=produce)
    thread.start()
    consumed, deadline = 0, time.monotonic() + DEADLINE_S
    while consumed < n and time.monotonic() < deadline:
        reply: Any = reader.xreadgroup("bench", "raw", {queue: ">"}, count=batch, block=100)
        ids = [entry_id for _, rows in reply for entry_id, _ in rows]
        if ids:
            pipe = reader.pipeline(transaction=transaction)
            pipe.xack(queue, "bench", *ids)
            pipe.xdel(queue, *ids)
            pipe.execute()
        consumed += len(ids)
    thread.join(DEADLINE_S)
    elapsed: float = time.perf_counter() - start
    if consumed < n:
        raise TimeoutError(f"raw Redis flow: {consumed} of {n} messages within {DEADLINE_S} s")
    producer.close()
    reader.close()
    return n / elapsed


if __name__ == "__main__":
    main()
