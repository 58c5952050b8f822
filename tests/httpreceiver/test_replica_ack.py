"""HttpReceiver with the replica acknowledgement (WAIT): 200 only once a replica confirmed, else 503."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from common.config.base import RedisServer
from common.queue import QueueSettings, ReplicaAck
from tests.httpreceiver.conftest import P1, AppUnderTest, backends_on, headers, message

pytestmark = pytest.mark.redis


def test_a_write_no_replica_confirms_gives_503_and_says_it_may_be_queued_twice(
    make_app: Callable[..., AppUnderTest], redis_client: redis.Redis
) -> None:
    # WAIT for one replica on a Redis that has none: the primary stores the message, nobody
    # confirms it, the client is told to retry -- and that the retry may be a duplicate.  The
    # Idempotency-Key is released, not recorded as done: after a failover that lost the first
    # copy the retry must queue the message again.
    server = RedisServer(hostname="127.0.0.1", port=redis_client.connection_pool.connection_kwargs["port"])
    backends = backends_on(server, QueueSettings(max_length=0), ack=ReplicaAck(1, 50))
    app = make_app({"auth-lockout": {"lockout-seconds": 0}}, backends=backends)
    hdrs = {**headers(), "Idempotency-Key": "order-17"}
    first = app.client.post("/v1/mail/send", data=message("dup1"), headers=hdrs)
    assert first.status_code == 503
    assert first.headers["Retry-After"] == "5"
    assert first.get_json()["error"] == "queue-unavailable"
    assert "no replica confirmed it in time; it may be queued twice" in first.get_json()["message"]
    assert redis_client.xlen(P1) == 1
    retry = app.client.post("/v1/mail/send", data=message("dup1"), headers=hdrs)
    assert retry.status_code == 503  # not 409 "in use": the key was released
    assert redis_client.xlen(P1) == 2
