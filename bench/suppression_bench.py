"""Suppression list benchmark: Redis memory per entry, feeding and checking rates, on real Redis.

1. ``--entries`` entries (default 100,000) are fed as BackData feeds them (the Lua script, in
   pipelines of 500), half of them unsubscribes, a quarter bounces, a quarter spam reports;
   memory per entry = growth of Redis' ``used_memory`` / entries (keys, values and TTLs included).
2. The Transformer's check: batches of 64 messages x 5 recipients (320 lookups x the enforced
   reasons, one MGET per batch), a tenth of them suppressed; lookups/s and ms per batch.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import redis

from common.suppression import SuppressionList, SuppressionSettings
from devtools.servers import RedisProcess


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-suppression-") as tmp:
        server = RedisProcess(Path(tmp)).start()
        try:
            run(redis.Redis(host="127.0.0.1", port=server.port), args)
        finally:
            server.stop()


def run(client: redis.Redis, args: argparse.Namespace) -> None:
    lst = SuppressionList(client, SuppressionSettings())
    reasons = ["unsubscribe", "unsubscribe", "bounce", "spam-report"]
    now = int(time.time())
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    started = time.perf_counter()
    for start in range(0, args.entries, 500):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 500, args.entries)):
            lst.feed(
                pipe,
                scope="example.com",
                address=f"recipient.{i}@mail{i % 97}.example.net",
                reason=reasons[i % 4],
                at=now - i % 86400,
                event_id=f"{i:032x}",
                uuid=f"msg{i:012d}",
                once_for_s=4 * 86400,
            )
        pipe.execute()
    fed_s = time.perf_counter() - started
    markers = sum(1 for _ in client.scan_iter(match="IB:suppr-fed:*", count=5000))
    after = int(client.info("memory")["used_memory"])
    sample = [k for k in client.scan_iter(match="IB:suppr:*", count=1000)][:1000]
    entry_bytes = sum(int(client.memory_usage(k, samples=0) or 0) for k in sample) / len(sample)
    marker_sample = [k for k in client.scan_iter(match="IB:suppr-fed:*", count=1000)][:1000]
    marker_bytes = sum(int(client.memory_usage(k, samples=0) or 0) for k in marker_sample) / len(marker_sample)
    say(f"suppression list on real Redis: {args.entries:,} entries ({markers:,} fed markers, TTL 4 days)")
    say(f"  feeding (BackData's Lua script, pipelines of 500)   {args.entries / fed_s:10,.0f} entries/s")
    say(f"  used_memory growth per entry (entry + fed marker)   {(after - before) / args.entries:10,.0f} bytes")
    say(f"  MEMORY USAGE of one entry key                       {entry_bytes:10,.0f} bytes")
    say(f"  MEMORY USAGE of one fed marker (expires)            {marker_bytes:10,.0f} bytes")
    say(f"  -> 1 million entries: about {entry_bytes * 1e6 / 2**20:,.0f} MiB (+ markers while they live)")

    rng = random.Random(7)
    durations = []
    hits = 0
    for _ in range(args.batches):
        pairs = []
        for _ in range(64 * 5):
            i = rng.randrange(args.entries * 10)  # a tenth of them are on the list
            pairs.append(("example.com", f"recipient.{i}@mail{i % 97}.example.net"))
        t0 = time.perf_counter()
        hits += len(lst.check(pairs))
        durations.append(time.perf_counter() - t0)
    durations.sort()
    total = sum(durations)
    lookups = args.batches * 64 * 5
    say("  check (Transformer): one MGET per batch of 64 messages x 5 recipients x 4 reasons")
    say(
        f"    {lookups / total:10,.0f} recipients/s, p50 {durations[len(durations) // 2] * 1000:.2f} ms, "
        f"p99 {durations[int(len(durations) * 0.99)] * 1000:.2f} ms per batch ({hits:,} suppressed)"
    )


if __name__ == "__main__":
    main()
