"""A local Redis that survives losing a node: one primary, replicas and three sentinels on loopback.

The tests and ``bench/chaos --failover`` run it; every node and sentinel gets the settings the
pods get (:mod:`common.redisha`): the same ACL users on every node, ``min-replicas-to-write``,
the replication and sentinel users, sentinels with a password of their own.  A node that is
restarted asks the sentinels for the primary first and starts as its replica -- what
``redis-sidecar server`` does in a pod.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.sentinel
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import redisha
from common.config.base import SentinelSettings
from common.config.redismodule import RedisBind, Replication, SentinelProcess
from devtools.servers import LOOPBACK, RedisProcess, free_port, wait_until
from devtools.servers import SentinelProcess as SentinelServer

MASTER_NAME = "mailer"
#: A node or sentinel that does not answer is reported at once.
_NO_RETRY = Retry(NoBackoff(), 0)


@dataclass
class LocalRedisHA:
    """``replicas`` + 1 data nodes and ``sentinels`` sentinels in ``directory``."""

    directory: Path
    replicas: int = 1
    sentinels: int = 3
    #: ACL ``user`` lines of the services (:func:`common.redisacl.user_lines`), on every node.
    users: list[str] = field(default_factory=list)
    appendfsync: str = "always"
    min_replicas_to_write: int = 1
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    sentinel_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    nodes: list[RedisProcess] = field(default_factory=list)
    watchers: list[SentinelServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node_ports = [free_port() for _ in range(self.replicas + 1)]
        self.sentinel_ports = [free_port() for _ in range(self.sentinels)]
        self.replication = Replication(
            nodes=[f"{LOOPBACK}:{p}" for p in self.node_ports],
            min_replicas_to_write=self.min_replicas_to_write,
            replication_password=SecretStr(secrets.token_urlsafe(18)),
            sentinel_password=SecretStr(secrets.token_urlsafe(18)),
        )
        self.client_sentinel = SentinelSettings(
            master_name=MASTER_NAME,
            addresses=[f"{LOOPBACK}:{p}" for p in self.sentinel_ports],
            password=SecretStr(self.sentinel_password),
            socket_timeout=0.5,
        )

    # -- what the services are configured with -------------------------------------------------

    def redis_block(self) -> dict[str, Any]:
        """``common-config.redis`` of a customer file using this Redis (admin password included)."""
        return {
            "hostname": LOOPBACK,
            "password": self.admin_password,
            "sentinel": {
                "master-name": MASTER_NAME,
                "addresses": list(self.client_sentinel.addresses),
                "password": self.sentinel_password,
                "socket-timeout": 0.5,
            },
        }

    # -- running ---------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> LocalRedisHA:
        """Node 0 as the primary, the others as its replicas, then the sentinels; wait until all see each other."""
        primary = (LOOPBACK, self.node_ports[0])
        self.nodes = [self._node(i, primary) for i in range(len(self.node_ports))]
        for node in self.nodes:
            node.start()
        wait_until(lambda: self.replicas_online(primary) >= self.replicas, timeout_s, what="replicas in sync")
        self.watchers = [self._sentinel(i, primary) for i in range(self.sentinels)]
        for watcher in self.watchers:
            watcher.start()
        wait_until(self._sentinels_agree, timeout_s, interval_s=0.1, what="sentinels to find each other")
        return self

    def _node(self, index: int, primary: tuple[str, int]) -> RedisProcess:
        me = (LOOPBACK, self.node_ports[index])
        settings = redisha.node_settings(self.replication, me=me, primary=primary)
        return RedisProcess(
            self.directory / f"node{index}",
            me[1],
            appendfsync=self.appendfsync,
            password=self.admin_password,
            users=[*self.users, *redisha.internal_user_lines(self.replication)],
            conf_lines=[f"{k} {v}" for k, v in settings.items()],
        )

    def _sentinel(self, index: int, primary: tuple[str, int]) -> SentinelServer:
        port = self.sentinel_ports[index]
        process = SentinelProcess(
            bind=RedisBind(inet_interface=LOOPBACK, inet_port=port),
            quorum=max(self.sentinels // 2 + 1, 1),
            down_after_milliseconds=self.down_after_ms,
            failover_timeout_milliseconds=self.failover_timeout_ms,
            data_directory=self.directory / f"sentinel{index}",
        )
        lines = redisha.sentinel_lines(
            self.client_sentinel,
            process,
            self.replication,
            me=(LOOPBACK, port),
            primary=primary,
            myid=redisha.sentinel_id(f"local-{index}-{port}"),
        )
        return SentinelServer(process.data_directory, port, lines, password=self.sentinel_password)

    def admin(self, port: int, timeout_s: float = 1.0) -> redis.Redis:
        """An administrator's client of the node on ``port``."""
        return redis.Redis(LOOPBACK, port, password=self.admin_password, socket_timeout=timeout_s, retry=_NO_RETRY)

    def replicas_online(self, primary: tuple[str, int]) -> int:
        """Replicas the node ``primary`` counts as connected and online (0 when it does not answer)."""
        try:
            with contextlib.closing(self.admin(primary[1])) as client:
                info = client.info("replication")
        except redis.exceptions.RedisError:
            return 0
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )

    def _sentinels_agree(self) -> bool:
        for watcher in self.watchers:
            try:
                with contextlib.closing(self._ask(watcher.port)) as client:
                    state: Any = client.sentinel_master(MASTER_NAME)
            except redis.exceptions.RedisError:
                return False
            if int(state["num-other-sentinels"]) < self.sentinels - 1 or int(state["num-slaves"]) < self.replicas:
                return False
        return True

    def _ask(self, port: int) -> redis.Redis:
        return redis.Redis(LOOPBACK, port, password=self.sentinel_password, socket_timeout=0.5, retry=_NO_RETRY)

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels name it now (None when none answers)."""
        for port in self.sentinel_ports:
            try:
                with contextlib.closing(self._ask(port)) as client:
                    found: Any = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.exceptions.RedisError:
                continue
            if found:
                return int(found[1])
        return None

    def node(self, port: int) -> RedisProcess:
        """The data node on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL the data node on ``port`` (a node lost with its machine)."""
        self.node(port).kill()

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again as what the sentinels say it is (the launcher's rule)."""
        index = self.node_ports.index(port)
        primary_port = self.primary_port() or self.node_ports[0]
        fresh = self._node(index, (LOOPBACK, primary_port))
        self.nodes[index] = fresh
        fresh.start()

    def discovered_primary_port(self) -> int | None:
        """The primary's port as a client finds it, or None while no sentinel gives one.

        That is redis-py's discovery: the first sentinel whose view of the primary is current
        (not down).
        """
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            [(LOOPBACK, port) for port in self.sentinel_ports],
            sentinel_kwargs={"password": self.sentinel_password, "socket_timeout": 0.5, "retry": _NO_RETRY},
        )
        try:
            _, port = sentinel.discover_master(MASTER_NAME)  # type: ignore[no-untyped-call]
        except redis.exceptions.RedisError:
            return None
        finally:
            for client in sentinel.sentinels:
                client.close()
        return int(port)

    def wait_for_failover(self, old_port: int, timeout_s: float = 30.0) -> float:
        """Seconds until the sentinels name a primary other than ``old_port`` and clients find it.

        A sentinel that has promoted a replica answers at once; the others still describe the old
        primary as down for a moment, and a client asking one of them finds no primary.  Both must
        be over before a client is sure to reach the new primary.
        """
        started = time.monotonic()
        wait_until(
            lambda: (
                self.primary_port() not in (None, old_port) and self.discovered_primary_port() not in (None, old_port)
            ),
            timeout_s,
            interval_s=0.05,
            what="a new primary that clients find",
        )
        return time.monotonic() - started

    def stop(self) -> None:
        """Sentinels first (no failover while the nodes stop), then the nodes."""
        for watcher in self.watchers:
            watcher.stop()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalRedisHA:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
