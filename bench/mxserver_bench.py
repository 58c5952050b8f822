"""MxServer benchmark: classified messages per second over the tests/data/mx corpus.

1. classifier alone: every corpus message classified ``--rounds`` times in this process
   (pure CPU: MIME parsing, DSN/ARF/text-bounce parsing, attribution, taxonomy);
2. through SMTP: the real ``mxserver`` console script (own process) with a private
   redis-server (AOF, ``appendfsync always`` unless ``--fsync everysec``); ``--clients``
   aiosmtplib connections send ``--messages`` corpus messages (each connection reuses its
   session, as MTAs do).  Every accepted mail is durable before its 250: an event in Redis or an
   fsync'd file in the eml directory (the corpus has ~25% unclassified mail).

Only loopback is used.  Prints messages/s and the reply latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiosmtplib
import redis

from common.addressing import AddressSigner
from devtools import testing
from devtools.servers import RedisProcess, free_port, port_open, wait_until
from mxserver.classifier import Classifier

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests/data/mx"


def load_corpus() -> list[tuple[str, list[str], bytes]]:
    cases = []
    for path in sorted(CORPUS.rglob("*.eml")):
        rcpts = json.loads(path.with_name(path.stem + ".expected.json").read_text())["rcpt"]
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        cases.append((path.parent.name, rcpts, raw))
    return cases


def bench_classifier(cases: list[tuple[str, list[str], bytes]], rounds: int) -> None:
    classifier = Classifier(
        signer=AddressSigner(b"test-address-secret-0123456789abcdef"),
        return_path_domains=frozenset({testing.RETURN_PATH_DOMAIN}),
        abuse_addresses=frozenset({f"fbl@{testing.RETURN_PATH_DOMAIN}"}),
        from_domains={testing.RETURN_PATH_DOMAIN: testing.SENDER_DOMAIN},
    )
    per_group: dict[str, list[float]] = {}
    kinds: Counter[str] = Counter()
    start = time.perf_counter()
    for _ in range(rounds):
        for group, rcpts, raw in cases:
            t0 = time.perf_counter()
            result = classifier.classify(rcpts, raw, now=1)
            per_group.setdefault(group, []).append(time.perf_counter() - t0)
            kinds[result.kind] += 1
    total = time.perf_counter() - start
    n = rounds * len(cases)
    size = sum(len(raw) for _, _, raw in cases) / len(cases)
    print(f"classifier alone: {n} messages ({len(cases)} corpus messages x {rounds}, mean {size:,.0f} bytes)")
    print(f"  all                 {n / total:10,.0f} msg/s")
    for group, times in sorted(per_group.items()):
        median_us = statistics.median(times) * 1e6
        print(f"  {group:<18}  {len(times) / sum(times):10,.0f} msg/s   (median {median_us:6.0f} µs)")
    print("  outcomes: " + ", ".join(f"{k} {v // rounds}" for k, v in sorted(kinds.items())))


async def send_all(port: int, work: list[tuple[list[str], bytes]], clients: int) -> list[float]:
    latencies: list[float] = []
    queue: asyncio.Queue[tuple[list[str], bytes]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.test", timeout=30)
        await smtp.connect()
        try:
            while True:
                try:
                    rcpts, raw = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                errors, reply = await smtp.sendmail("", rcpts, raw)
                latencies.append(time.perf_counter() - t0)
                if errors or not reply.startswith("2.0.0"):
                    raise RuntimeError(f"refused: {errors} {reply}")
        finally:
            await smtp.quit()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


def bench_smtp(cases: list[tuple[str, list[str], bytes]], messages: int, clients: int, fsync: str) -> None:
    usable = [(rcpts, raw) for _, rcpts, raw in cases if not any("cccccccccc" in r or "aaaaaaaaaa" in r for r in rcpts)]
    work = [usable[i % len(usable)] for i in range(messages)]
    with tempfile.TemporaryDirectory(prefix="bench-mx-") as tmp:
        directory = Path(tmp)
        server = RedisProcess(directory / "redis", appendfsync=fsync).start()
        ports = {"mxserver": free_port(), "mxserver-metrics": free_port()}
        customer = testing.customer_config(directory, redis_port=server.port, ports=ports)
        global_path, customer_path = testing.write_configs(directory / "configs", customer)
        proc = subprocess.Popen(
            testing.service_command("mxserver", global_path, customer_path, "--log-level", "WARNING"),
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: port_open("127.0.0.1", ports["mxserver"]), 30, what="mxserver")
            start = time.perf_counter()
            latencies = asyncio.run(send_all(ports["mxserver"], work, clients))
            total = time.perf_counter() - start
            events = redis.Redis(port=server.port).xlen("EVENT_QUEUE")
            kept = len(list((directory / "eml").glob("*.eml")))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            server.stop()
    latencies.sort()
    print(
        f"through SMTP: {messages} messages, {clients} connections, redis appendfsync {fsync}, "
        f"mxserver in its own process"
    )
    print(f"  accepted            {messages / total:10,.0f} msg/s   ({events} events in Redis, {kept} files kept)")
    print(
        f"  reply latency       p50 {latencies[len(latencies) // 2] * 1000:6.1f} ms   "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="classifier passes over the corpus")
    parser.add_argument("--messages", type=int, default=3000, help="messages sent through SMTP")
    parser.add_argument("--clients", type=int, default=8, help="concurrent SMTP connections")
    parser.add_argument("--fsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--skip-smtp", action="store_true")
    args = parser.parse_args()
    cases = load_corpus()
    bench_classifier(cases, args.rounds)
    if not args.skip_smtp:
        bench_smtp(cases, args.messages, args.clients, args.fsync)


if __name__ == "__main__":
    main()
