"""BackData benchmark: events/s to a local webhook, and event age from enqueue to receipt.

Starts a private redis-server (AOF, ``appendfsync always`` as in production unless ``--fsync
everysec``), a webhook endpoint (``devtools.webhook``, in this process, answering 200) and the
real ``backdata`` service as a separate process with real config files, then measures:

* throughput: ``--events`` events are queued first, then drained; events/s from the first POST
  to the last event received (goal >= 5,000 events/s);
* latency: with BackData idle, events are produced at ``--rate`` events/s for ``--seconds``;
  the age of each event from its enqueue to its arrival at the endpoint (p50, p99, max).

Events are realistic ``delivered``/``bounce`` records (~300 bytes of JSON), signed with a
webhook secret when ``--sign`` is given.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from common.events import Event, EventKind
from common.queue import Queues, QueueSettings
from devtools import testing
from devtools.servers import RedisProcess, free_port, wait_until
from devtools.webhook import Request, WebhookReceiver

QUEUE = "EVENT_QUEUE"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rate", type=int, default=2_000, help="events/s in the latency phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the latency phase")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-wait-ms", type=int, default=200)
    parser.add_argument("--fsync", choices=["always", "everysec"], default="always")
    parser.add_argument("--sign", action="store_true", help="configure a webhook secret (HMAC per POST)")
    args = parser.parse_args()
    print(
        f"backdata benchmark: {args.events} events queued then drained; then {args.rate} events/s for "
        f"{args.seconds:g}s; batch-size {args.batch_size}, batch-max-wait-ms {args.max_wait_ms}, "
        f"appendfsync {args.fsync}, {'signed' if args.sign else 'unsigned'}; one backdata process, "
        "endpoint and producer in this process, loopback"
    )
    with tempfile.TemporaryDirectory(prefix="bench-backdata-") as tmp:
        directory = Path(tmp)
        server = RedisProcess(directory / "redis", appendfsync=args.fsync).start()
        arrivals: dict[int, float] = {}

        def respond(request: Request) -> tuple[int, dict[str, str], float]:
            arrivals[request.number] = time.time()
            return 200, {}, 0.0

        endpoint = WebhookReceiver(responder=respond).start()
        try:
            run(args, directory, server, endpoint, arrivals)
        finally:
            endpoint.stop()
            server.stop()


def run(
    args: argparse.Namespace,
    directory: Path,
    server: RedisProcess,
    endpoint: WebhookReceiver,
    arrivals: dict[int, float],
) -> None:
    section = {
        "post-url": endpoint.url,
        "batch-size": args.batch_size,
        "batch-max-wait-ms": args.max_wait_ms,
        "prometheus": {"inet-interface": "127.0.0.1", "inet-port": free_port()},
    }
    if args.sign:
        section["webhook-secret"] = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    customer = testing.merge(testing.customer_config(directory, redis_port=server.port), {"backdata": section})
    gpath, cpath = testing.write_configs(directory / "configs", customer)
    queues = Queues(redis.Redis(port=server.port), QueueSettings(max_length=0))

    # Throughput: a backlog drained as fast as BackData can.
    n = args.events
    for start in range(0, n, 1000):
        queues.enqueue_many(QUEUE, [_event(i).to_fields() for i in range(start, min(start + 1000, n))])
    proc = subprocess.Popen(
        testing.service_command("backdata", gpath, cpath),
        env={**os.environ, "INBOXBOOSTER_LOG_LEVEL": "WARNING"},
    )
    try:
        wait_until(lambda: len(endpoint.requests) >= 1, 30, interval_s=0.005, what="first POST")
        first = min(arrivals.values())
        wait_until(lambda: len(endpoint.events) >= n, 600, interval_s=0.01, what=f"{n} events")
        last = max(arrivals.values())
        rate = (n - args.batch_size) / (last - first) if last > first else float("inf")
        posts = len(endpoint.requests)
        print("throughput (backlog drained):")
        print(f"  {n} events in {posts} POSTs, {last - first:.2f}s from first to last POST")
        print(f"  {rate:10,.0f} events/s  ({'meets' if rate >= 5_000 else 'below'} the 5,000 events/s goal)")

        # Latency: a steady producer below capacity.
        received_before = len(endpoint.events)
        requests_before = len(endpoint.requests)
        total = int(args.rate * args.seconds)
        producer = threading.Thread(target=_produce, args=(queues, n, total, args.rate), daemon=True)
        producer.start()
        producer.join()
        wait_until(lambda: len(endpoint.events) >= received_before + total, 120, what="latency phase")
        ages = []
        for request in endpoint.requests[requests_before:]:
            for event in json.loads(request.body):
                ages.append(arrivals[request.number] - event["bench_t"])
        ages.sort()
        print(f"latency ({args.rate} events/s for {args.seconds:g}s, {len(ages)} events):")
        print(
            f"  event age enqueue -> received: p50 {_pct(ages, 50) * 1000:.0f} ms, "
            f"p99 {_pct(ages, 99) * 1000:.0f} ms, max {ages[-1] * 1000:.0f} ms"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        print(f"backdata exited with {code} after SIGTERM")


def _event(i: int) -> Event:
    kind: EventKind = "delivered" if i % 5 else "bounce"
    return Event(
        kind,
        f"bench{i:08d}",
        recipient=f"recipient.{i}@example.com",
        stream_id="newsletter-2026-11",
        ip="192.0.2.25",
        type="hard" if kind == "bounce" else None,
        reason="(host mx.example.com[192.0.2.25] said: 550 5.1.1 user unknown)" if kind == "bounce" else None,
        status="5.1.1" if kind == "bounce" else "2.0.0",
        classification="user-unknown" if kind == "bounce" else None,
        fd="example.test",
        extra={"bench_t": time.time()},
    )


def _produce(queues: Queues, offset: int, total: int, rate: int) -> None:
    """Enqueue ``total`` events at ``rate`` per second in 10 ms steps."""
    step = max(rate // 100, 1)
    started = time.monotonic()
    sent = 0
    while sent < total:
        count = min(step, total - sent)
        queues.enqueue_many(QUEUE, [_event(offset + sent + i).to_fields() for i in range(count)])
        sent += count
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p / 100))]


if __name__ == "__main__":
    main()
