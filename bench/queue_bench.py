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
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import redis

from common.queue import Consumer, Output, Queues, QueueSettings
from devtools.servers import RedisProcess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=10_240)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--fsync", choices=["always", "everysec", "both"], default="both")
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
    flowing = concurrent(port, args, queue="BENCH-FLOW")
    print(f"  enqueue                          {n / enqueue_s:10,.0f} msg/s")
    print(f"  read + hand-off to next queue    {n / handoff_s:10,.0f} msg/s")
    print(f"  read + ack                       {n / consume_s:10,.0f} msg/s")
    print(f"  enqueue, then consume + ack      {cycle:10,.0f} msg/s  (one thread, one phase after the other)")
    print(
        f"  enqueue -> consume -> ack        {flowing:10,.0f} msg/s  (producer and consumer threads at once)  "
        f"({'meets' if flowing >= 20_000 else 'below'} the 20,000 msg/s goal)"
    )


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


if __name__ == "__main__":
    main()
