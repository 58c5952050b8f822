"""Delivery instances coming and going leave nothing behind in Redis (real Redis)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from devtools.servers import wait_until
from postfixlog import records
from postfixlog.membership import INSTANCES_KEY, Membership

pytestmark = [pytest.mark.redis]

STREAM = "INCOMING-TO-POSTFIX"
GROUP = "postfixlog"


def _membership(client: Any, name: str, *, stale_s: float = 0.3, ttl_s: int = 3600) -> Membership:
    return Membership(client, name=name, stream=STREAM, group=GROUP, state_ttl_s=ttl_s, stale_consumer_s=stale_s)


def _consumers(client: Any) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in client.xinfo_consumers(STREAM, GROUP)}


def _read(client: Any, consumer: str, count: int) -> list[bytes]:
    reply = client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)
    return [entry_id for _, rows in reply for entry_id, _ in rows]


@pytest.fixture
def stream(redis_client: Any) -> Any:
    redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for i in range(3):
        redis_client.xadd(STREAM, {"n": str(i)})
    return redis_client


def test_sweep_removes_idle_consumers_that_own_nothing(stream: Any) -> None:
    # gone-1 read and completed its entry; gone-2 died holding one (the others must claim it
    # first); me is the sweeping instance itself.  Only gone-1 goes.
    done = _read(stream, "gone-1", 1)
    stream.xack(STREAM, GROUP, *done)
    stream.xdel(STREAM, *done)
    _read(stream, "gone-2", 1)
    _read(stream, "me", 1)
    sweeper = _membership(stream, "me")
    assert sweeper.sweep() == []  # not idle long enough yet
    wait_until(lambda: sweeper.sweep() == ["gone-1"], 5, interval_s=0.1, what="gone-1 swept")
    assert _consumers(stream) == {"gone-2": 1, "me": 1}
    # Once another instance claimed gone-2's entry, gone-2 is swept too.
    stream.xautoclaim(STREAM, GROUP, "me", 0, count=10)
    wait_until(lambda: sweeper.sweep() == ["gone-2"], 5, interval_s=0.1, what="gone-2 swept")
    assert _consumers(stream) == {"me": 2}


def test_sweep_forgets_instances_not_seen_for_the_state_lifetime(redis_client: Any) -> None:
    now = time.time()
    _membership(redis_client, "old", ttl_s=3600).heartbeat(now - 7200)
    recent = _membership(redis_client, "recent", ttl_s=3600)
    recent.heartbeat(now)
    recent.sweep(now)  # no stream at all: the registry is still cleaned
    assert set(recent.instances()) == {"recent"}


def test_heartbeat_keeps_the_position_alive(redis_client: Any) -> None:
    redis_client.set(records.position_key("me"), "1:2:abc", ex=5)
    _membership(redis_client, "me", ttl_s=3600).heartbeat()
    assert redis_client.ttl(records.position_key("me")) > 3000
    assert redis_client.zscore(INSTANCES_KEY, "me") is not None


def test_retire_forgets_a_drained_instance(stream: Any) -> None:
    done = _read(stream, "me", 2)
    stream.xack(STREAM, GROUP, *done)
    stream.xdel(STREAM, *done)
    me = _membership(stream, "me")
    me.heartbeat()
    stream.set(records.position_key("me"), "1:2:abc")
    assert me.retire() is True
    assert "me" not in _consumers(stream)
    assert not stream.exists(records.position_key("me"))
    assert me.instances() == {}


def test_retire_keeps_a_consumer_that_still_owns_entries(stream: Any) -> None:
    # Entries given back at shutdown stay pending on the consumer until another claims them:
    # deleting the consumer would drop them from the group for good.
    _read(stream, "me", 1)
    assert _membership(stream, "me").retire() is False
    assert _consumers(stream) == {"me": 1}
