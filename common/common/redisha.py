"""Redis that survives losing its node: the settings of data nodes and sentinels (DESIGN §8).

In the ``deploy/ha`` layout several Redis data nodes hold the queues -- one primary, the others
its replicas -- and three Redis Sentinels watch them: when the primary stops answering, the
sentinels agree it is down, promote a replica and tell the clients (:mod:`common.queue` asks them)
where the primary is now.  This module renders what every node and sentinel is started with, from
the ``redis`` section (``replication``, ``sentinel``) and ``common-config.redis.sentinel``; the
Redis launcher (``redis-sidecar server`` / ``redis-sidecar sentinel``) and the local stack
(:mod:`devtools.stack`, ``bench/chaos --failover``) both use it, so what the tests run is what the
pods run.

Data nodes: every node gets the same ACL users (:mod:`common.redisacl`, so a service logs in on
whichever node is primary) plus two of its own:

=============  =====================================================================
user           may
=============  =====================================================================
replication    what a replica needs from its primary (PSYNC, REPLCONF, PING)
sentinel       what a sentinel needs from a data node (the Redis ACL documentation's
               list: INFO, ROLE, REPLICAOF/SLAVEOF, CONFIG REWRITE, CLIENT, PUBLISH,
               SUBSCRIBE on its hello channel, ...)
=============  =====================================================================

and ``min-replicas-to-write``/``min-replicas-max-lag``: a primary without a current replica
refuses writes (``NOREPLICAS``; the receivers answer 451/503) instead of accepting mail only one
node holds.  With ``WAIT`` in the producers (:class:`common.queue.ReplicaAck`) an acknowledged
submission is on at least one replica before the receivers answer 250/200.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final

from common.config.base import SentinelSettings
from common.config.redismodule import Replication, SentinelProcess
from common.redisacl import glob_escape

#: The ACL user replicas log in to their primary with.
REPLICATION_USER: Final = "replication"
#: The ACL user sentinels log in to the data nodes with.
SENTINEL_USER: Final = "sentinel"
#: What a replica runs on its primary.
REPLICATION_COMMANDS: Final = ("psync", "replconf", "ping")
#: What a sentinel runs on a data node (Redis' ACL documentation, "ACL rules for Sentinel and Replicas").
SENTINEL_COMMANDS: Final = (
    "multi",
    "exec",
    "slaveof",
    "replicaof",
    "ping",
    "subscribe",
    "publish",
    "info",
    "role",
    "config|rewrite",
    "client|setname",
    "client|kill",
    "script|kill",
    "auth",
    "hello",
)
#: The channel sentinels announce themselves on (through every data node).
HELLO_CHANNEL: Final = "__sentinel__:hello"

Address = tuple[str, int]


def _hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def internal_user_lines(replication: Replication) -> list[str]:
    """The ``user`` directives of the replication and sentinel users (passwords as SHA-256 hashes)."""
    replica = " ".join("+" + c for c in REPLICATION_COMMANDS)
    sentinel = " ".join("+" + c for c in SENTINEL_COMMANDS)
    return [
        f"user {REPLICATION_USER} reset on #{_hash(replication.replication_password.get_secret_value())} "
        f"resetchannels -@all {replica}",
        f"user {SENTINEL_USER} reset on #{_hash(replication.sentinel_password.get_secret_value())} "
        f"resetchannels &{glob_escape(HELLO_CHANNEL)} -@all {sentinel}",
    ]


def node_settings(replication: Replication, *, me: Address, primary: Address) -> dict[str, str]:
    """The replication settings of the data node ``me`` (a replica of ``primary`` unless it is ``primary``).

    ``min-replicas-to-write`` is set on every node: it takes effect when a node is (or becomes) the
    primary.  Announcing the node's name (not its pod IP, which changes with every restart) keeps
    the sentinels' and the clients' view valid across restarts.
    """
    settings = {
        "min-replicas-to-write": str(replication.min_replicas_to_write),
        "min-replicas-max-lag": str(replication.min_replicas_max_lag),
        "masteruser": REPLICATION_USER,
        "masterauth": quote(replication.replication_password.get_secret_value()),
        "replica-announce-ip": me[0],
        "replica-announce-port": str(me[1]),
        # A replica that lost its primary starts its full resynchronisation at once.
        "repl-diskless-sync-delay": "0",
        "replica-read-only": "yes",
    }
    if primary != me:
        settings["replicaof"] = f"{primary[0]} {primary[1]}"
    return settings


def sentinel_lines(
    client: SentinelSettings,
    process: SentinelProcess,
    replication: Replication,
    *,
    me: Address,
    primary: Address,
    myid: str,
) -> list[str]:
    """The configuration file of one sentinel watching ``primary`` (it learns replicas and peers itself).

    Sentinel rewrites this file as it learns; it holds the sentinels' password and the data
    nodes' sentinel password, so it lives on a memory-backed volume readable by the pod only.
    """
    name = client.master_name
    lines = [
        f"port {me[1]}",
        f"bind {process.bind.inet_interface}",
        "daemonize no",
        'logfile ""',
        f"dir {quote(str(process.data_directory))}",
        f"sentinel myid {myid}",
        "sentinel resolve-hostnames yes",
        "sentinel announce-hostnames yes",
        f"sentinel announce-ip {me[0]}",
        f"sentinel announce-port {me[1]}",
        f"sentinel monitor {name} {primary[0]} {primary[1]} {process.quorum}",
        f"sentinel auth-user {name} {SENTINEL_USER}",
        f"sentinel auth-pass {name} {quote(replication.sentinel_password.get_secret_value())}",
        f"sentinel down-after-milliseconds {name} {process.down_after_milliseconds}",
        f"sentinel failover-timeout {name} {process.failover_timeout_milliseconds}",
        f"sentinel parallel-syncs {name} 1",
    ]
    if client.password is not None:
        password = quote(client.password.get_secret_value())
        lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        if client.username:
            lines.append(f"sentinel sentinel-user {client.username}")
    return lines


def sentinel_id(name: str) -> str:
    """A stable 40-hex-digit sentinel id for the pod (or process) ``name``.

    A restarted sentinel keeps its id, so its peers do not count it twice.
    """
    return hashlib.sha1(f"inboxbooster-sentinel:{name}".encode(), usedforsecurity=False).hexdigest()


def quote(value: str) -> str:
    """A redis.conf string literal (double quotes; backslash, quote and controls escaped)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render(settings: Mapping[str, str]) -> str:
    """``name value`` lines of redis.conf."""
    return "".join(f"{name} {value}\n" for name, value in settings.items())
