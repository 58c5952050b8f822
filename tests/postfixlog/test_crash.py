"""Crash safety: kill -9 PostfixLog while it injects; after a restart every message is delivered
exactly once and every event is emitted exactly once."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
from typing import Any

import pytest

from common.config import Config
from common.queue import Queues
from devtools import testing
from devtools.servers import wait_until
from devtools.sink import Sink

from .conftest import events_of, outbound

pytestmark = [pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

INCOMING = "INCOMING-TO-POSTFIX"


def _start(config: Config) -> subprocess.Popen[bytes]:
    env = {**os.environ, "INBOXBOOSTER_CONSUMER_NAME": "crash-test", "INBOXBOOSTER_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        testing.service_command("postfixlog", config.global_path, config.customer_path),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_mid_stream_then_restart_delivers_and_reports_exactly_once(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    ok = [f"ok{i}@dest.test" for i in range(360)]
    bounced = [f"bounce{i}@dest.test" for i in range(40)]
    # Mostly one recipient per entry, some with two (partial progress inside an entry).
    batches: list[list[str]] = [[r] for r in ok[:300]]
    batches += [[ok[i], ok[i + 1]] for i in range(300, 360, 2)]
    batches += [[r] for r in bounced]
    queues.enqueue_many(INCOMING, [outbound(f"c{i}", rcpts).to_fields() for i, rcpts in enumerate(batches)])
    total = len(batches)
    config = service_config()

    count_in_flight = redis_client.register_script(
        "local n = 0 "
        "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
        "  for _, v in ipairs(redis.call('HVALS', k)) do "
        "    if string.sub(v, 1, 2) == 't:' then n = n + 1 end "
        "  end "
        "end "
        "return n"
    )

    def in_flight() -> int:
        """Recipients sent to Postfix whose answer PostfixLog has not recorded yet (one round trip)."""
        return int(count_in_flight(args=["IB:postfixlog:progress:*"]))

    # Kill in the middle of a batch, after at least one batch was completed.  Whether a kill
    # lands while transactions are in flight is a matter of timing: retry until one does.
    for _attempt in range(6):
        waiting = redis_client.xlen(INCOMING)
        if waiting == 0:
            break
        victim = _start(config)
        try:
            wait_until(
                lambda: redis_client.xlen(INCOMING) < waiting and in_flight() > 0,  # noqa: B023 -- this attempt's
                60,
                interval_s=0.001,
                what="a batch in flight after some progress",
            )
        finally:
            victim.kill()
            victim.communicate()  # also closes its stderr pipe
        if redis_client.xlen(INCOMING) > 0 and in_flight() > 0:
            break
    assert 0 < redis_client.xlen(INCOMING) < total, "no kill landed mid-stream in 6 attempts"
    assert in_flight() > 0

    second = _start(config)
    try:
        wait_until(lambda: len(sink.messages) >= len(ok), 90, what="every message at the sink")
        wait_until(lambda: len(events_of(redis_client)) >= len(ok) + len(bounced), 60, what="every event")
        wait_until(lambda: redis_client.xlen(INCOMING) == 0, 30, what="every entry acknowledged")
    finally:
        second.send_signal(signal.SIGTERM)
        status = second.wait(90)
    stderr = second.stderr.read().decode(errors="replace") if second.stderr else ""
    assert status == 0, stderr

    copies = collections.Counter(m.rcpt for m in sink.messages)
    assert set(copies) == set(ok)
    assert [r for r, n in copies.items() if n != 1] == []
    events = events_of(redis_client)
    per_recipient = collections.Counter((e["recipient"], e["event"]) for e in events)
    assert [k for k, n in per_recipient.items() if n != 1] == []
    assert {r for r, kind in per_recipient if kind == "delivered"} == set(ok)
    assert {r for r, kind in per_recipient if kind == "bounce"} == set(bounced)
    assert len({e["event_id"] for e in events}) == len(events)
