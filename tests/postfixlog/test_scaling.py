"""Three delivery instances (postfixlog + private Postfix, real processes) on one Redis.

The StatefulSet of issue 17 on one machine: 3,000 messages spread over three instances; one is
SIGKILLed mid-flow and restarted with its directory (a pod that comes back with its volume),
another is scaled away with SIGTERM (its Postfix queue goes back to Redis).  Every message is
delivered, every recipient gets exactly one terminal event, each event comes from the instance
whose Postfix delivered the message, and the instance scaled away leaves nothing in Redis.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.events import make_event_id
from common.queue import Queues
from devtools.delivery import DeliveryInstance
from devtools.servers import RedisProcess, wait_until
from devtools.sink import Sink
from postfixlog import records
from postfixlog.logparser import parse
from postfixlog.membership import INSTANCES_KEY

from .conftest import events_of, outbound

pytestmark = [pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

INCOMING = "INCOMING-TO-POSTFIX"
MESSAGES = 3000
_RECEIVED = re.compile(rb"by (mta-\d)\.test \(Postfix\) with E?SMTP id (\w+)")


def _delivered_count(client: Any) -> int:
    return sum(1 for e in events_of(client) if e["event"] == "delivered")


def _event_source(instances: list[DeliveryInstance]) -> Callable[[dict[str, Any]], tuple[str, str]]:
    """For a delivered event: (Postfix host, queue id) of the log line it was made from."""
    sent: dict[str, tuple[str, str]] = {}
    removed: list[tuple[str, str, str]] = []
    for instance in instances:
        host = instance.myhostname.split(".")[0]
        for path in sorted((instance.directory / "pf" / "log").glob("postfix.log*")):
            for raw in path.read_text(errors="replace").splitlines():
                line = parse(raw)
                if line.queue_id is None:
                    continue
                if line.kind == "status" and line.status == "sent" and line.recipient:
                    event_id = make_event_id("postfix", line.queue_id, line.recipient, "sent", line.raw)
                    sent[event_id] = (host, line.queue_id)
                elif line.kind == "removed":
                    removed.append((host, line.queue_id, line.raw))

    def source(event: dict[str, Any]) -> tuple[str, str]:
        if event["event_id"] in sent:
            return sent[event["event_id"]]
        # "delivered" inferred from qmgr's "removed" when the status line was lost in a kill.
        for host, qid, raw in removed:
            if make_event_id("postfix", qid, event["recipient"], "removed", raw) == event["event_id"]:
                return host, qid
        raise AssertionError(f"no log line of any instance makes {event}")

    return source


@pytest.mark.timeout(420)
def test_three_instances_one_killed_one_scaled_away(
    redis_server: RedisProcess, redis_client: Any, queues: Queues, postfix_dir: Path
) -> None:
    # Each DATA answered after 50-200 ms: the instances hold mail in flight when they are stopped.
    sink = Sink(latency=(0.05, 0.2)).start()
    instances = [
        DeliveryInstance(postfix_dir, i, redis_port=redis_server.port, nexthop=f"[127.0.0.1]:{sink.port}")
        for i in range(3)
    ]
    killed, scaled_away = instances[0], instances[1]
    try:
        for instance in instances:
            instance.start()
        mails = [outbound(f"s{i:05d}", [f"rcpt{i}@dest.test"]) for i in range(MESSAGES)]
        for start in range(0, MESSAGES, 500):
            queues.enqueue_many(INCOMING, [m.to_fields() for m in mails[start : start + 500]], limit=False)

        # Scaled away while its Postfix holds mail: that mail goes back to Redis.
        wait_until(lambda: scaled_away.queued() >= 100, 120, interval_s=0.02, what="mail queued in instance 1")
        assert scaled_away.stop() == 0
        requeued = [r["msg"] for r in scaled_away.log_records() if str(r.get("msg", "")).startswith("requeue: ")]
        assert len(requeued) == 1 and not requeued[0].startswith("requeue: 0 "), requeued

        # Killed while its Postfix holds mail, and back with its directory: it resumes.
        wait_until(lambda: _delivered_count(redis_client) >= 600, 120, interval_s=0.1, what="600 deliveries")
        wait_until(lambda: killed.queued() >= 50, 120, interval_s=0.02, what="mail queued in instance 0")
        killed.kill()
        assert killed.consumer in {c["name"].decode() for c in redis_client.xinfo_consumers(INCOMING, "postfixlog")}
        killed.start()  # same directory and name: resumes its log position and pending entries

        wait_until(
            lambda: len({e["recipient"] for e in events_of(redis_client)}) >= MESSAGES,
            240,
            interval_s=0.5,
            what="a terminal event for every recipient",
        )
    finally:
        for instance in instances:
            instance.stop()
        sink.stop()

    events = events_of(redis_client)
    terminal = Counter(e["recipient"] for e in events if e["event"] in ("delivered", "bounce"))
    assert {e["event"] for e in events} == {"delivered"}
    assert len(terminal) == MESSAGES
    assert set(terminal.values()) == {1}, [r for r, n in terminal.items() if n > 1][:10]
    received = Counter(m.rcpt for m in sink.messages)
    assert set(received) == {f"rcpt{i}@dest.test" for i in range(MESSAGES)}
    # A message Postfix was sending when it was killed or stopped goes out again (the receiver
    # had it, Postfix never saw the 250): at most the deliveries in flight at that moment.
    duplicates = sum(n - 1 for n in received.values())
    assert duplicates <= 100, duplicates

    # Each delivered event was made from a line of the log of the instance whose Postfix
    # delivered that very message: its event id is derived from (queue id, recipient, the line),
    # the line names the queue id, and the sink saw the message (uuid in the subject) arrive
    # from that instance with that queue id in its Received header.
    arrived: dict[tuple[str, str], str] = {}
    for message in sink.messages:
        match = _RECEIVED.search(message.data)
        assert match is not None
        uuid = message.data.split(b"Subject: test ", 1)[1].split(b"\r\n", 1)[0].decode()
        arrived[(match.group(1).decode(), match.group(2).decode())] = uuid
    source = _event_source(instances)
    emitters: Counter[str] = Counter()
    for event in events:
        host, qid = source(event)
        assert arrived[(host, qid)] == event["uuid"], (event, host, qid)
        emitters[host] += 1
    assert set(emitters) == {"mta-0", "mta-1", "mta-2"}, emitters

    # Nothing is left: the queue is empty, every instance drained and retired itself.
    assert redis_client.xlen(INCOMING) == 0
    for instance in instances:
        assert not redis_client.exists(records.position_key(instance.name))
        assert not redis_client.keys(f"IB:postfixlog:qid:{instance.name}:*")
        assert (instance.directory / "pf" / "log" / "postfix.log.drained").exists()
    assert redis_client.zcard(INSTANCES_KEY) == 0
    assert {c["name"].decode() for c in redis_client.xinfo_consumers(INCOMING, "postfixlog")} == set()
