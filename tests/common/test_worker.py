"""The worker loop: crashes lose nothing, hand-off is atomic, SIGTERM finishes the batch."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from common import redisreply
from common.errors import PermanentError, TemporaryError
from common.lifecycle import Stopper
from common.queue import Consumer, Entry, Output, Queues
from common.retry import RetryPolicy
from common.worker import EntryHandler, Worker
from devtools.servers import RedisProcess, wait_until

pytestmark = pytest.mark.redis


def _read_until(consumer: Consumer, count: int, timeout_s: float = 10) -> list[Entry]:
    """Read batches until ``count`` entries arrived (reclaim happens after the idle time)."""
    got: list[Entry] = []

    def more() -> bool:
        got.extend(consumer.read())
        return len(got) >= count

    wait_until(more, timeout_s=timeout_s, what=f"{count} entries")
    return got


SCRIPT = Path(__file__).with_name("worker_script.py")


def _spawn(redis_server: RedisProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port", str(redis_server.port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=10)


@pytest.mark.slow
def test_sigkill_mid_batch_loses_nothing(queues: Queues, redis_server: RedisProcess) -> None:
    # A consumer killed with SIGKILL while holding a batch: another consumer gets every
    # entry, each with delivery count 2.
    queues.enqueue_many("IN", [{"payload": f"m{i}"} for i in range(10)])
    proc = _spawn(redis_server, "--mode", "hang", "--name", "victim")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "read 10"
    _kill(proc)
    assert queues.stats("IN", "g").pending == 10
    survivor = Consumer(queues, ["IN"], "g", "survivor", block_ms=100)
    got = _read_until(survivor, 10)
    assert sorted(e.fields[b"payload"] for e in got) == sorted(f"m{i}".encode() for i in range(10))
    assert {e.deliveries for e in got} == {2}


@pytest.mark.slow
def test_handoff_is_atomic_under_repeated_sigkill(queues: Queues, redis_server: RedisProcess) -> None:
    # Kill the copying worker at random moments until IN is drained: every entry ends up in
    # OUT exactly once (never in both queues, never in neither).
    total = 300
    queues.enqueue_many("IN", [{"payload": f"m{i:04d}"} for i in range(total)])
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 30
    while queues.redis.xlen("IN") and time.monotonic() < deadline:
        proc = _spawn(
            redis_server,
            "--mode",
            "handoff",
            "--name",
            "copier",
            "--delay",
            "0.003",
            "--batch",
            "7",
            "--max-deliveries",
            "1000",
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # it has started handling a batch
        time.sleep(rng.uniform(0.0, 0.15))  # let it work a random amount, then kill it
        _kill(proc)
        kills += 1
    assert kills >= 3
    if queues.redis.xlen("IN"):
        proc = _spawn(redis_server, "--mode", "handoff", "--name", "copier")
        wait_until(lambda: queues.redis.xlen("IN") == 0, timeout_s=20, what="drain")
        proc.terminate()
        proc.communicate(timeout=10)
    out = [f[b"payload"] for _, f in redisreply.stream_rows(queues.redis.xrange("OUT"))]
    assert sorted(out) == sorted(f"m{i:04d}".encode() for i in range(total))
    assert len(out) == len(set(out)), "an entry was handed off twice"
    stats = queues.stats("IN", "g")
    assert (stats.pending, stats.dead) == (0, 0)


@pytest.mark.slow
def test_sigterm_finishes_and_acks_batch_then_exits_zero(queues: Queues, redis_server: RedisProcess) -> None:
    queues.enqueue_many("IN", [{"payload": f"m{i}"} for i in range(10)])
    proc = _spawn(redis_server, "--mode", "handoff", "--delay", "0.1", "--batch", "10")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "processing"
    proc.send_signal(signal.SIGTERM)  # mid-batch: 10 entries x 0.1 s
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert queues.redis.xlen("OUT") == 10
    stats = queues.stats("IN", "g")
    assert (stats.length, stats.pending) == (0, 0)


class _Scripted(EntryHandler):
    """Fails by the payload: temp-N fails temporarily N times, perm always, bug raises."""

    def __init__(self) -> None:
        self.calls: dict[bytes, int] = {}

    def handle(self, entry: Entry) -> Sequence[Output]:
        payload = entry.fields[b"payload"]
        n = self.calls[payload] = self.calls.get(payload, 0) + 1
        if payload.startswith(b"temp-") and n <= int(payload[5:]):
            raise TemporaryError("dependency down")
        if payload == b"perm":
            raise PermanentError("never valid")
        if payload == b"bug":
            raise ZeroDivisionError("oops")
        return [Output("OUT", {"payload": payload})]

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Output]:
        return [Output("EVENTS", {"data": reason})]


def _run_worker(queues: Queues, handler: EntryHandler, until) -> Stopper:
    stopper = Stopper()
    consumer = Consumer(queues, ["IN"], "g", "w", block_ms=50)
    worker = Worker(consumer, handler, stopper, policy=RetryPolicy(base_s=0.01, cap_s=0.05))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_until(until, timeout_s=10, what="worker progress")
    finally:
        stopper.stop()
        thread.join(5)
    assert not thread.is_alive()
    return stopper


def test_temporary_permanent_and_unexpected_errors(queues: Queues) -> None:
    # Temporary errors retry without using the delivery budget (5 failures > max 3), permanent
    # ones dead-letter at once, bugs retry and then dead-letter with an error output.
    queues.enqueue_many("IN", [{"payload": p} for p in ("temp-5", "perm", "bug", "ok")])
    handler = _Scripted()
    _run_worker(queues, handler, lambda: queues.redis.xlen("OUT") == 2 and queues.redis.xlen("IN:dead") == 2)
    assert sorted(f[b"payload"] for _, f in redisreply.stream_rows(queues.redis.xrange("OUT"))) == [b"ok", b"temp-5"]
    dead = {e.fields[b"payload"]: e.fields for e in queues.dead_letters("IN")}
    assert dead[b"perm"][b"dl-reason"] == b"never valid"
    assert dead[b"bug"][b"dl-reason"].startswith(b"failed 3 times; last error: ZeroDivisionError: oops")
    assert handler.calls[b"bug"] == 3
    assert handler.calls[b"temp-5"] == 6
    assert queues.redis.xlen("EVENTS") == 2


class _AlwaysDown(EntryHandler):
    def __init__(self) -> None:
        self.calls = 0

    def handle(self, entry: Entry) -> Sequence[Output]:
        self.calls += 1
        raise TemporaryError("webhook down")


def test_graceful_stop_during_retry_does_not_count_a_delivery(queues: Queues) -> None:
    # Stopping while waiting to retry is not a crash: after a restart the entry comes back
    # with the same delivery count, so long outages with restarts never dead-letter it.
    queues.enqueue("IN", {"payload": "event"})
    for _ in range(4):  # more restarts than max-deliveries (3)
        handler = _AlwaysDown()
        _run_worker(queues, handler, lambda h=handler: h.calls >= 2)
    again = Consumer(queues, ["IN"], "g", "w", block_ms=50)
    [entry] = again.read()
    assert entry.deliveries == 1  # graceful stops gave their deliveries back
    assert queues.redis.xlen("IN:dead") == 0
