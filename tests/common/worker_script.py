"""A worker process for the crash and signal tests (run as a script, killed by the tests).

Modes:
  handoff  -- copy each entry of IN to OUT (atomic hand-off); optional per-batch delay
  hang     -- read one batch, report it on stdout, then hang (to be SIGKILLed mid-batch)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import redis

from common import logs
from common.lifecycle import Stopper
from common.queue import Consumer, Entry, Output, Queues, QueueSettings
from common.worker import EntryHandler, Worker


class CopyHandler(EntryHandler):
    def __init__(self, out: str, delay: float) -> None:
        self.out = out
        self.delay = delay
        self.first = True

    def handle(self, entry: Entry) -> Sequence[Output]:
        if self.first:
            sys.stdout.write("processing\n")
            sys.stdout.flush()
            self.first = False
        time.sleep(self.delay)
        return [Output(self.out, {"payload": entry.fields[b"payload"]})]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["handoff", "hang"], required=True)
    p.add_argument("--name", default="w1")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--max-deliveries", type=int, default=3)
    args = p.parse_args()
    logs.setup("test-worker", "WARNING")
    settings = QueueSettings(max_length=0, max_deliveries=args.max_deliveries, claim_idle_ms=500, batch_size=args.batch)
    queues = Queues(redis.Redis(port=args.port), settings)
    consumer = Consumer(queues, ["IN"], "g", args.name, block_ms=200)
    if args.mode == "hang":
        consumer.setup()
        batch = consumer.read()
        sys.stdout.write(f"read {len(batch)}\n")
        sys.stdout.flush()
        time.sleep(3600)
        return 1
    stopper = Stopper().install()
    Worker(consumer, CopyHandler("OUT", args.delay), stopper).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
