"""Configuration of Redis with Sentinel and of the replica acknowledgement (WAIT): keys, defaults, errors."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from common import redisacl, redisha
from common.config import RedisServer
from common.config.base import SentinelSettings, split_address
from common.config.redismodule import RedisSection
from common.errors import ConfigError
from common.queue import NO_REPLICA_ACK, ReplicaAck, connect, replica_ack

SENTINEL = {"master-name": "mailer", "addresses": ["redis-sentinel-0.redis-sentinel:26379", "redis-sentinel-1"]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis-0.redis-nodes:6380", ("redis-0.redis-nodes", 6380)),
        ("10.0.0.7", ("10.0.0.7", 26379)),
        ("[::1]:26380", ("::1", 26380)),
        ("::1", ("::1", 26379)),
    ],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert split_address(text, 26379) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:port", "host:70000", "a b:1", "[::1]x"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError, match=r"host:port|1-65535"):
        split_address(text, 26379)


def test_old_files_keep_working_without_wait() -> None:
    # Without sentinel nothing changes: hostname/port, no WAIT, no replica acknowledgement.
    server = RedisServer.model_validate({"hostname": "redis", "port": 6379})
    assert server.sentinel is None
    assert server.replica_acks == 0
    assert ReplicaAck.of(server) == NO_REPLICA_ACK
    assert replica_ack(connect(server)) == NO_REPLICA_ACK


def test_sentinel_turns_wait_on_by_default_and_it_can_be_tuned_or_turned_off() -> None:
    on = RedisServer.model_validate({"sentinel": SENTINEL})
    assert on.replica_acks == 1
    assert replica_ack(connect(on)) == ReplicaAck(1, 1000)
    tuned = RedisServer.model_validate({"sentinel": SENTINEL, "wait-replicas": 2, "wait-timeout-seconds": 0.25})
    assert ReplicaAck.of(tuned) == ReplicaAck(2, 250)
    off = RedisServer.model_validate({"sentinel": SENTINEL, "wait-replicas": 0})
    assert off.replica_acks == 0
    assert SentinelSettings.model_validate(SENTINEL).hosts() == [
        ("redis-sentinel-0.redis-sentinel", 26379),
        ("redis-sentinel-1", 26379),
    ]


def test_a_service_block_inherits_the_sentinels_and_sets_its_user(make_config: Any) -> None:
    config = make_config(
        {
            "common-config": {"redis": {"sentinel": SENTINEL, "password": "x" * 16}},
            "receiver": {"reliable-queue": {"redis": {"username": "receiver", "password": "y" * 20}}},
        }
    )
    server = config.redis_for("receiver")
    assert server.sentinel is not None
    assert server.sentinel.master_name == "mailer"
    assert server.username == "receiver"
    assert server.replica_acks == 1


@pytest.mark.parametrize(
    ("redis", "message"),
    [
        ({"sentinel": {"master-name": "m", "addresses": []}}, "common-config.redis.sentinel.addresses"),
        ({"sentinel": {"master-name": "m", "addresses": ["a:b"]}}, "the port must be a number"),
        ({"sentinel": {"addresses": ["a"]}}, "common-config.redis.sentinel.master-name: required key is missing"),
        ({"sentinel": {**SENTINEL, "password": "short"}}, "sentinel.password: 5 characters; at least 16"),
        ({"sentinel": SENTINEL, "password": "short"}, "(the sentinels)"),
        ({"wait-replicas": -1}, "common-config.redis.wait-replicas"),
        ({"sentinel": {**SENTINEL, "bogus": 1}}, "common-config.redis.sentinel.bogus: unknown key"),
    ],
)
def test_sentinel_mistakes_are_refused_with_their_key(make_config: Any, redis: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config({"common-config": {"redis": redis}})
    assert message in str(caught.value)


def test_replication_section_and_what_the_nodes_and_sentinels_are_started_with() -> None:
    section = RedisSection.model_validate(
        {
            "replication": {
                "nodes": ["redis-0.redis-nodes:6379", "redis-1.redis-nodes"],
                "replication-password": 'r "pw"',
                "sentinel-password": "s-pw",
            },
            "sentinel": {"quorum": 2},
        }
    )
    replication = section.replication
    assert replication is not None
    assert replication.hosts()[1] == ("redis-1.redis-nodes", 6379)
    primary, me = ("redis-0.redis-nodes", 6379), ("redis-1.redis-nodes", 6379)
    replica = redisha.node_settings(replication, me=me, primary=primary)
    assert replica["replicaof"] == "redis-0.redis-nodes 6379"
    assert replica["min-replicas-to-write"] == "1"
    assert replica["masteruser"] == "replication"
    assert replica["masterauth"] == '"r \\"pw\\""'
    assert replica["replica-announce-ip"] == "redis-1.redis-nodes"
    assert "replicaof" not in redisha.node_settings(replication, me=primary, primary=primary)
    users = redisha.internal_user_lines(replication)
    assert users[0].startswith("user replication reset on #") and users[0].endswith("-@all +psync +replconf +ping")
    assert "&__sentinel__:hello" in users[1] and "+config|rewrite" in users[1] and "+slaveof" in users[1]
    assert "pw" not in " ".join(users)  # hashes only
    assert section.sentinel is not None
    client = SentinelSettings.model_validate({**SENTINEL, "password": "sentinels-password"})
    lines = redisha.sentinel_lines(
        client, section.sentinel, replication, me=("redis-sentinel-0", 26379), primary=primary, myid="a" * 40
    )
    assert "sentinel monitor mailer redis-0.redis-nodes 6379 2" in lines
    assert lines.index("sentinel resolve-hostnames yes") < lines.index(
        "sentinel monitor mailer redis-0.redis-nodes 6379 2"
    )
    assert 'requirepass "sentinels-password"' in lines
    assert "sentinel auth-user mailer sentinel" in lines
    assert redisha.sentinel_id("redis-sentinel-0") == redisha.sentinel_id("redis-sentinel-0")
    assert len(redisha.sentinel_id("x")) == 40
    with pytest.raises(ValueError, match="at least 2"):
        RedisSection.model_validate(
            {"replication": {"nodes": ["a"], "replication-password": "x", "sentinel-password": "y"}}
        )


@pytest.mark.redis
def test_the_autoscaler_user_reads_queue_statistics_and_nothing_else(make_config: Any, redis_client: Any) -> None:
    # KEDA's triggers log in as redis.autoscaler: XINFO GROUPS / XPENDING / XLEN on the four queues.
    config = make_config({"redis": {"autoscaler": {"password": "k" * 24}}})
    (line,) = [u.line() for u in redisacl.users(config) if u.service == "autoscaler"]
    redis_client.execute_command("ACL", "SETUSER", *line.split()[1:])
    redis_client.xgroup_create("IB-MAIL-QUEUE-P1", "transformer", id="0", mkstream=True)
    keda = redis.Redis(port=redis_client.connection_pool.connection_kwargs["port"], username="keda", password="k" * 24)
    try:
        assert keda.xinfo_groups("IB-MAIL-QUEUE-P1")[0]["lag"] == 0
        assert keda.xpending("IB-MAIL-QUEUE-P1", "transformer")["pending"] == 0
        assert keda.xlen("EVENT_QUEUE") == 0
        for refused in (lambda: keda.xadd("EVENT_QUEUE", {"a": "1"}), lambda: keda.xlen("IB:sent:x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
    finally:
        keda.close()
        redis_client.execute_command("ACL", "DELUSER", "keda")
    with pytest.raises(ConfigError, match="already the user of receiver"):
        redisacl.users(
            make_config(
                {
                    "redis": {"autoscaler": {"username": "receiver", "password": "k" * 24}},
                    "receiver": {"reliable-queue": {"redis": {"username": "receiver", "password": "r" * 20}}},
                }
            )
        )
