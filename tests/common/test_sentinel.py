"""Redis with replicas and Sentinel: clients follow a failover, producers wait for a replica (DESIGN §8).

Real redis-servers and real sentinels on loopback (:class:`devtools.redisha.LocalRedisHA`: the
settings the pods get), no mocks.  Every test starts processes, so all are ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import redisacl
from common.authguard import Attempt, Checked, LoginGuard
from common.config import RedisServer
from common.config.base import AuthLockout
from common.errors import QueueUnavailableError, ReplicaAckError, TemporaryError
from common.queue import AsyncQueues, Queues, QueueSettings, ReplicaAck, connect, connect_async
from devtools import testing
from devtools.redisha import LocalRedisHA
from devtools.servers import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SETTINGS = QueueSettings(max_length=0)


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[LocalRedisHA]:
    """A primary, one replica and three sentinels."""
    cluster = LocalRedisHA(tmp_path / "ha", replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


def _server(ha: LocalRedisHA, **extra: Any) -> RedisServer:
    return RedisServer.model_validate({**ha.redis_block(), "socket-timeout": 2, **extra})


def _replica_port(ha: LocalRedisHA) -> int:
    primary = ha.primary_port()
    return next(p for p in ha.node_ports if p != primary)


def _xlen(ha: LocalRedisHA, port: int, stream: str) -> int:
    with contextlib.closing(ha.admin(port)) as client:
        return int(client.xlen(stream))


def test_clients_reach_the_primary_through_the_sentinels_and_wait_for_the_replica(ha: LocalRedisHA) -> None:
    # With sentinel configured a producer WAITs for one replica by default: when enqueue returns,
    # the replica already holds the entry -- no polling needed, that is the point.
    server = _server(ha)
    assert server.replica_acks == 1
    queues = Queues(connect(server, client_name="sync"), SETTINGS)
    assert queues.ack == ReplicaAck(1, 1000)
    ids = queues.enqueue_many("Q", [{"n": str(i)} for i in range(3)])
    assert len(ids) == 3
    assert _xlen(ha, _replica_port(ha), "Q") == 3

    async def produce() -> list[str]:
        client = connect_async(server, client_name="async")
        try:
            return await AsyncQueues(client, SETTINGS).enqueue_many("Q", [{"n": "a"}, {"n": "b"}])
        finally:
            await client.aclose()

    assert len(asyncio.run(produce())) == 2
    assert _xlen(ha, _replica_port(ha), "Q") == 5
    # Without sentinel the default stays as it was: no WAIT.
    assert RedisServer(hostname="127.0.0.1").replica_acks == 0


def test_a_replica_that_does_not_confirm_makes_a_temporary_failure_and_the_entry_stays(ha: LocalRedisHA) -> None:
    # WAIT times out: the client is told to retry (451/503), although the primary has the entry --
    # the retry is a duplicate if the primary survives, and the copy that counts if it does not.
    queues = Queues(connect(_server(ha, **{"wait-timeout-seconds": 0.3})), SETTINGS)
    replica = ha.node(_replica_port(ha))
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ReplicaAckError, match="confirmed by 0 of 1 replicas") as caught:
            queues.enqueue("Q", {"n": "1"})
        assert time.monotonic() - started >= 0.3
        assert isinstance(caught.value, QueueUnavailableError)
        assert len(caught.value.ids) == 1
        primary = ha.primary_port()
        assert primary is not None
        assert _xlen(ha, primary, "Q") == 1
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    # Once the replica answers again, writes are confirmed again.
    wait_until(lambda: _xlen(ha, replica.port, "Q") == 1, what="the replica to catch up")
    queues.enqueue("Q", {"n": "2"})


def test_a_primary_without_replica_refuses_writes(ha: LocalRedisHA) -> None:
    # min-replicas-to-write 1: with its only replica gone the primary answers NOREPLICAS, nothing
    # is written and the producer gets a temporary failure -- no mail held by one node only.
    queues = Queues(connect(_server(ha)), SETTINGS)
    primary = ha.primary_port()
    assert primary is not None
    replica = _replica_port(ha)
    ha.node(replica).stop()
    wait_until(lambda: ha.replicas_online(("127.0.0.1", primary)) == 0, what="the primary to see no replica")
    with pytest.raises(QueueUnavailableError, match="NOREPLICAS") as caught:
        queues.enqueue("Q", {"n": "1"})
    assert not isinstance(caught.value, ReplicaAckError)
    assert _xlen(ha, primary, "Q") == 0


def test_sync_and_asyncio_clients_follow_a_failover_as_their_service_user(tmp_path: Path) -> None:
    # Every node has the same ACL users, so a service logs in on whichever node is the primary;
    # the sentinels have a password of their own.  While no primary is known the clients get
    # temporary failures, never a wrong answer.
    users = testing.redis_users(("receiver",))
    password = users["receiver"]["reliable-queue"]["redis"]["password"]
    cluster = LocalRedisHA(tmp_path / "ha", replicas=2)
    cluster.users = [
        redisacl.User(
            "receiver",
            "receiver",
            hashlib.sha256(password.encode()).hexdigest(),
            redisacl.GRANTS["receiver"],
            ("IB-MAIL-QUEUE-P1", "IB:receiver:*"),
        ).line()
    ]
    with cluster:
        block = {**cluster.redis_block(), "username": "receiver", "password": password, "socket-timeout": 2}
        server = RedisServer.model_validate(block)
        queues = Queues(connect(server), SETTINGS)
        before = queues.enqueue_many("IB-MAIL-QUEUE-P1", [{"n": str(i)} for i in range(10)])
        guard = LoginGuard(queues.client, "receiver", AuthLockout())
        old = cluster.primary_port()
        assert old is not None
        cluster.kill(old)
        failures: list[TemporaryError] = []

        def succeeds() -> bool:
            try:
                queues.enqueue("IB-MAIL-QUEUE-P1", {"n": "after"})
            except TemporaryError as exc:
                failures.append(exc)
                return False
            return True

        wait_until(succeeds, timeout_s=30, interval_s=0.1, what="a write on the new primary")
        new = cluster.primary_port()
        assert new not in (None, old)
        assert failures, "the failover was seen by the client"
        assert all(isinstance(f, QueueUnavailableError) for f in failures)
        # Everything acknowledged before the failover is on the new primary.
        assert new is not None
        with contextlib.closing(cluster.admin(new)) as admin:
            rows: Any = admin.xrange("IB-MAIL-QUEUE-P1")
        found = {i.decode() for i, _ in rows}
        assert set(before) <= found
        # The login guard works against the new primary too (its Lua and keys are allowed there).
        assert guard.attempt(Attempt("203.0.113.9", "someone"), lambda: True) == Checked(True)

        async def produce() -> str:
            client = connect_async(server)
            try:
                return await AsyncQueues(client, SETTINGS).enqueue("IB-MAIL-QUEUE-P1", {"n": "async"})
            finally:
                await client.aclose()

        assert asyncio.run(produce())


#: Size of each submitted entry: large enough that a stalled replica's socket buffers fill up.
PAD = "x" * 32_000


def _replica_backlog(ha: LocalRedisHA, primary: int) -> int:
    """Bytes the primary holds in its output buffers for its replicas (not yet on their sockets)."""
    with contextlib.closing(ha.admin(primary)) as client:
        replicas: Any = client.client_list(_type="replica")
    return sum(int(r.get("omem", 0)) for r in replicas)


def _produce(queues: Queues, prefix: str, acked: list[str], stop: threading.Event) -> None:
    """A submitter that retries each message until it is acknowledged, as an MTA does."""
    n = 0
    while not stop.is_set():
        uuid = f"{prefix}-{n}"
        try:
            queues.enqueue("IB-MAIL-QUEUE-P1", {"uuid": uuid, "pad": PAD})
        except TemporaryError:
            stop.wait(0.02)
            continue
        acked.append(uuid)
        n += 1


@pytest.mark.parametrize("wait", [True, False], ids=["wait-on", "wait-off"])
def test_a_failover_under_load_loses_no_acknowledged_message_with_wait(tmp_path: Path, wait: bool) -> None:
    # Four producers submit continuously (retrying each message until it is acknowledged, as an
    # MTA does).  The replica stalls (SIGSTOP) until the primary holds writes the replica cannot
    # have received (its socket buffers are full: the primary's output buffer for it grows; with
    # WAIT, which lets no write through, a few unconfirmed ones), then the primary is SIGKILLed,
    # the replica resumes and is promoted, and the old primary comes back as a replica.  With WAIT
    # every acknowledged message is on the new primary; without it (replication is asynchronous)
    # the acknowledged entries of the stall are gone -- what WAIT is for, and proof that this test
    # can fail.
    cluster = LocalRedisHA(tmp_path / "ha", replicas=1)
    with cluster:
        server = _server(cluster, **({} if wait else {"wait-replicas": 0}))
        stop = threading.Event()
        acked: list[list[str]] = [[] for _ in range(4)]
        producers = [
            threading.Thread(target=_produce, args=(Queues(connect(server), SETTINGS), f"p{i}", acked[i], stop))
            for i in range(4)
        ]
        for thread in producers:
            thread.start()
        try:
            wait_until(lambda: sum(map(len, acked)) >= 300, timeout_s=30, what="300 acknowledged submissions")
            old = cluster.primary_port()
            assert old is not None
            replica = cluster.node(_replica_port(cluster))
            assert replica.proc is not None
            seen = _xlen(cluster, old, "IB-MAIL-QUEUE-P1")
            os.kill(replica.proc.pid, signal.SIGSTOP)
            try:
                if wait:
                    wait_until(lambda: _xlen(cluster, old, "IB-MAIL-QUEUE-P1") >= seen + 4, what="unconfirmed writes")
                else:
                    wait_until(lambda: _replica_backlog(cluster, old) >= 2_000_000, what="writes stuck on the primary")
                at_kill = sum(map(len, acked))
                cluster.kill(old)
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            cluster.wait_for_failover(old)
            cluster.restart(old)
            wait_until(lambda: sum(map(len, acked)) >= at_kill + 300, timeout_s=60, what="submissions after it")
        finally:
            stop.set()
            for thread in producers:
                thread.join(timeout=30)
        new = cluster.primary_port()
        assert new not in (None, old)
        assert new is not None
        with contextlib.closing(cluster.admin(new, timeout_s=10)) as admin:
            rows: Any = admin.xrange("IB-MAIL-QUEUE-P1")
        stored = {f[b"uuid"].decode() for _, f in rows}
        lost = [u for a in acked for u in a if u not in stored]
        if wait:
            assert lost == []
        else:
            assert lost, "without WAIT the stalled replica's missing entries were acknowledged and are lost"


def test_mailer_queue_follows_a_failover(tmp_path: Path, make_config: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # The operators' tool reaches the primary through the sentinels as the administrator.
    from common import queuectl

    with LocalRedisHA(tmp_path / "ha", replicas=1) as cluster:
        block = cluster.redis_block()
        config = make_config(
            {
                "common-config": {"redis": {"sentinel": block["sentinel"]}},
                "redis": {"reliable-queue": {"redis": {"password": block["password"]}}},
            }
        )
        argv = ["--global-config-file", str(config.global_path), "--customer-config-file", str(config.customer_path)]
        Queues(connect(config.redis_for("redis")), SETTINGS).enqueue("EVENT_QUEUE", {"event": "x"})
        assert queuectl.main([*argv, "stats"]) == 0
        assert re.search(r"EVENT_QUEUE\s+1\s", capsys.readouterr().out)
        old = cluster.primary_port()
        assert old is not None
        cluster.kill(old)
        cluster.wait_for_failover(old)
        assert queuectl.main([*argv, "stats"]) == 0
        assert re.search(r"EVENT_QUEUE\s+1\s", capsys.readouterr().out)
