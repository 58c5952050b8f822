"""Which data node is the primary?  Asked once, when a data node or a sentinel starts (``deploy/ha``).

A data node (``redis-sidecar server`` with ``redis.replication``) or a sentinel
(``redis-sidecar sentinel``) that starts must join the primary that is serving now, never
declare itself one: a node that came back after a failover and started as a primary would take
writes nobody else sees, and its replicas would throw their newer data away to copy it.  So:

1. the sentinels (``common-config.redis.sentinel``), which know the current primary;
2. else the other data nodes (``ROLE``): one that is a primary;
3. else (a brand-new installation: nothing answers) the first of ``redis.replication.nodes``.

What can still go wrong is documented in the README ("What a failover can still lose"): losing
every sentinel *and* the primary's data at once makes step 3 start the first node empty.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import redisreply
from common.config.base import SentinelSettings
from common.config.redismodule import Replication

log = logging.getLogger(__name__)

Address = tuple[str, int]


@dataclass(frozen=True)
class Credentials:
    """How to log in to a data node to ask its ROLE."""

    username: str | None
    password: str | None


def announced(name: str | None, port: int, known: Sequence[Address] = ()) -> Address:
    """This pod's address as the others know it.

    ``name`` when configured; else the entry of ``known`` (the configured nodes or sentinels) whose
    first label is this host's name -- a StatefulSet pod ``redis-1`` is ``redis-1.redis-nodes`` in
    a configuration shared by all pods -- else the host's fully qualified name.
    """
    if name:
        return (name, port)
    host = socket.gethostname().split(".")[0].lower()
    for known_host, known_port in known:
        if known_port == port and known_host.split(".")[0].lower() == host and not _is_ip(known_host):
            return (known_host, port)
    return (socket.getfqdn(), port)


def same_node(a: Address, b: Address) -> bool:
    """True when two addresses name the same node (``redis-0`` and ``redis-0.redis-nodes.ns.svc``)."""
    if a[1] != b[1]:
        return False
    left, right = a[0].lower().rstrip("."), b[0].lower().rstrip(".")
    if left == right:
        return True
    return not _is_ip(left) and not _is_ip(right) and left.split(".")[0] == right.split(".")[0]


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def primary_from_sentinels(sentinel: SentinelSettings, *, skip: Address | None = None) -> Address | None:
    """The primary any sentinel (but ``skip``) names, or None when none answers or knows one."""
    for host, port in sentinel.hosts():
        if skip is not None and same_node((host, port), skip):
            continue
        client = redis.Redis(
            host,
            port,
            username=sentinel.username,
            password=sentinel.password.get_secret_value() if sentinel.password else None,
            socket_timeout=sentinel.socket_timeout,
            socket_connect_timeout=sentinel.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            with contextlib.closing(client):
                found = client.sentinel_get_master_addr_by_name(sentinel.master_name)
        except redis.exceptions.RedisError as exc:
            log.info("sentinel %s:%d does not answer (%s)", host, port, exc)
            continue
        if isinstance(found, tuple):
            address = (_text(found[0]), int(found[1]))
            log.info("sentinel %s:%d names %s:%d as the primary", host, port, *address)
            return address
    return None


def primary_from_nodes(
    nodes: Sequence[Address], credentials: Credentials, *, me: Address | None, timeout_s: float = 2.0
) -> Address | None:
    """A data node (but ``me``) whose ROLE is master, or None."""
    for host, port in nodes:
        if me is not None and same_node((host, port), me):
            continue
        client = redis.Redis(
            host,
            port,
            username=credentials.username,
            password=credentials.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            with contextlib.closing(client):
                role = redisreply.role(client)
        except redis.exceptions.RedisError as exc:
            log.info("data node %s:%d does not answer (%s)", host, port, exc)
            continue
        if role == "master":
            log.info("data node %s:%d is a primary", host, port)
            return (host, port)
    return None


def find_primary(
    sentinel: SentinelSettings | None,
    replication: Replication,
    credentials: Credentials,
    *,
    me: Address | None,
    skip_sentinel: Address | None = None,
) -> tuple[Address, str]:
    """The primary to join and how it was found (for the log); see the module docstring for the order."""
    if sentinel is not None:
        found = primary_from_sentinels(sentinel, skip=skip_sentinel)
        if found is not None:
            return found, "named by the sentinels"
    found = primary_from_nodes(replication.hosts(), credentials, me=me)
    if found is not None:
        return found, "the data node that is a primary"
    return replication.hosts()[0], "no sentinel or node knows one: the first of redis.replication.nodes"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
