"""Redis ACL users, one per service, with only the commands and keys it uses (DESIGN §8).

Every service logs in with its own user (``<service>.reliable-queue.redis.username`` and
``password``, on top of ``common-config.redis``).  :func:`user_lines` turns the configuration into
the ``user`` directives of ``redis.conf`` (the same lines make an ACL file); the Redis launcher
(``redis-sidecar server``) and the local stack (``devtools.stack``) start redis-server with them,
and ``python -m common.redisacl`` prints them for a Redis you run yourself.  Passwords appear
only as SHA-256 hashes (``#<hex>``).

What each service may do is derived from :mod:`common.keys` and the configured queue names
(:data:`GRANTS` lists the commands, :func:`key_patterns` the keys); the default user stays the
administrator (the Redis pod's own sidecar, backups, ``mailer-queue``).  A service that has no
user of its own logs in as the default user, with every right: :func:`user_lines` warns.

=============  ====================================================================
service        keys
=============  ====================================================================
receiver       P0, P1 (XADD, XLEN); ``IB:receiver:*`` (login guard, Lua); ``IB:trace:*``
httpreceiver   P0, P1, EVENT_QUEUE; ``IB:httpreceiver:*``; ``IB:sent:*`` (read);
               ``IB:address-secret``; ``IB:trace:*``; ``IB:suppr:*`` (the API)
transformer    P0, P1 (+ their ``:dead``) as consumer; INCOMING-TO-POSTFIX,
               EVENT_QUEUE (XADD); ``IB:sent:*`` (write); ``IB:address-secret``;
               ``IB:suppr:*`` (MGET); ``IB:trace:*``
postfixlog     INCOMING-TO-POSTFIX (+ ``:dead``) as consumer and for requeueing;
               EVENT_QUEUE; ``IB:postfixlog:*``; ``IB:trace:*``
mxserver       EVENT_QUEUE; ``IB:sent:*`` (read); ``IB:address-secret``; ``IB:mxserver:*``
backdata       EVENT_QUEUE (+ ``:dead``) as consumer; ``IB:backdata:*``; ``IB:suppr:*``,
               ``IB:suppr-fed:*`` (feeding the list, Lua); ``IB:sent:*`` (read: the scope
               of an event without its From domain); ``IB:trace:*``
backdata       EVENT_QUEUE (+ ``:dead``) as consumer; ``IB:backdata:*``
(autoscaler)   P0, P1, INCOMING-TO-POSTFIX, EVENT_QUEUE: statistics only (XINFO GROUPS,
               XPENDING, XLEN) -- KEDA's queue-lag triggers, when ``redis.autoscaler`` is set
=============  ====================================================================
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from common import cli, keys
from common.config import Config, load_config
from common.config.base import UnresolvedSecret
from common.errors import ConfigError

log = logging.getLogger(__name__)

#: Services with a Redis user of their own (the Redis pod itself is the administrator).
SERVICES: Final = ("receiver", "httpreceiver", "transformer", "postfixlog", "mxserver", "backdata")

#: What every client sends: login, PING (health checks), its name (common.queue clients send no
#: CLIENT SETINFO).
CONNECTION: Final = frozenset({"auth", "hello", "ping", "echo", "select", "quit", "reset", "client|setname"})
#: Adding to a stream with its length in one MULTI/EXEC, then WAIT for the replicas
#: (common.queue producers; WAIT touches no key).
PRODUCER: Final = frozenset({"xadd", "xlen", "multi", "exec", "discard", "wait"})
#: Consumer groups (common.queue.Consumer: read, claim, hand off, dead-letter, stats).
CONSUMER: Final = PRODUCER | {
    "xreadgroup",
    "xack",
    "xdel",
    "xautoclaim",
    "xclaim",
    "xpending",
    "xrange",
    "xgroup|create",
    "xinfo|groups",
}
#: Lua (the scripts' own commands are checked too: they are in the service's grant).
SCRIPTS: Final = frozenset({"eval", "evalsha", "script|load", "script|exists"})
STRINGS: Final = frozenset({"get", "mget", "set", "incr", "decr", "del", "exists", "expire", "pexpire", "pttl", "ttl"})
HASHES: Final = frozenset({"hget", "hgetall", "hset", "hdel", "hexists", "del", "exists", "expire"})

#: A message's timeline (common.trace): appended, trimmed, expired with the hand-off (one script call).
TRACE_WRITE: Final = frozenset({"eval", "rpush", "ltrim", "expire"})
#: The suppression list (common.suppression): checked in bulk; managed over the API.
SUPPRESSION_READ: Final = frozenset({"mget", "ttl"})
SUPPRESSION_ADMIN: Final = SUPPRESSION_READ | {"scan", "set", "del"}
#: What KEDA's redis-streams triggers run.
AUTOSCALER: Final = CONNECTION | {"xinfo|groups", "xpending", "xlen"}

#: The commands of each service.
GRANTS: Final[Mapping[str, frozenset[str]]] = {
    "receiver": CONNECTION | PRODUCER | SCRIPTS | STRINGS | TRACE_WRITE,
    "httpreceiver": CONNECTION | PRODUCER | SCRIPTS | STRINGS | TRACE_WRITE | SUPPRESSION_ADMIN | {"hgetall", "lrange"},
    "transformer": CONNECTION | CONSUMER | SCRIPTS | STRINGS | TRACE_WRITE | SUPPRESSION_READ | {"hset"},
    "postfixlog": CONNECTION
    | CONSUMER
    | SCRIPTS
    | STRINGS
    | HASHES
    | TRACE_WRITE
    # Instances (membership: sweep stale consumers) and traffic shaping (buckets, pauses, held mail).
    | {"hmget", "hsetnx", "hkeys", "incrby", "zadd", "zrem", "zrange", "zrangebyscore", "zremrangebyscore"}
    | {"xinfo|consumers", "xgroup|delconsumer"},
    "mxserver": CONNECTION | PRODUCER | SCRIPTS | STRINGS | {"hgetall"},
    "backdata": CONNECTION | CONSUMER | SCRIPTS | STRINGS | TRACE_WRITE | {"hgetall"},
}


def glob_escape(name: str) -> str:
    """A key name as a literal Redis glob pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in name)


def key_patterns(config: Config, service: str) -> list[str]:
    """The key patterns (Redis glob) ``service`` may touch, from :mod:`common.keys` and the queue names."""
    names = config.global_.reliable_queue.queue_names
    mail = [names.primary_queue, names.default_queue]
    events = config.global_.backdata.queue_name
    incoming = config.global_.postfix.incoming_queue_name
    secret = [keys.ADDRESS_SECRET]
    literal: dict[str, list[str]] = {
        "receiver": mail,
        "httpreceiver": [*mail, events, *secret],
        "transformer": [*mail, *(keys.dead_letter(q) for q in mail), incoming, events, *secret],
        "postfixlog": [incoming, keys.dead_letter(incoming), events],
        "mxserver": [events, *secret],
        "backdata": [events, keys.dead_letter(events)],
    }
    own, sent = keys.service_key(service, "*"), keys.sent_record("*")
    trace, suppressed = keys.trace("*"), glob_escape(keys.SUPPRESSION_PREFIX) + "*"
    fed = glob_escape(keys.suppression_fed("")) + "*"
    globs: dict[str, list[str]] = {
        "receiver": [own, trace],
        "httpreceiver": [own, sent, trace, suppressed],
        "transformer": [sent, trace, suppressed],
        "postfixlog": [own, trace],
        "mxserver": [own, sent],
        "backdata": [own, sent, trace, suppressed, fed],
    }
    return [glob_escape(name) for name in literal[service]] + globs[service]


@dataclass(frozen=True)
class User:
    """One service's Redis user."""

    service: str
    name: str
    password_sha256: str
    commands: frozenset[str]
    patterns: tuple[str, ...]

    def line(self) -> str:
        """The ``user`` directive (redis.conf or ACL file)."""
        keys_part = " ".join("~" + p for p in self.patterns)
        commands = " ".join("+" + c for c in sorted(self.commands))
        return f"user {self.name} reset on #{self.password_sha256} {keys_part} resetchannels -@all {commands}"


def users(config: Config) -> list[User]:
    """The ACL user of every service that has its own ``reliable-queue.redis.username``.

    Raises:
        ConfigError: a user without password, two services sharing a user, or a user named
            ``default`` with a password other than the administrator's.
    """
    problems: list[str] = []
    found: list[User] = []
    owners: dict[str, str] = {}
    where = config.customer_path
    for service in SERVICES:
        server = config.redis_for(service)
        if server.username in (None, "default"):
            continue
        key = f"{where}: {service}.reliable-queue.redis"
        if server.username in owners:
            problems.append(f"{key}.username: {server.username!r} is already the user of {owners[server.username]}")
            continue
        owners[server.username] = service
        if server.password is None or isinstance(server.password, UnresolvedSecret):
            problems.append(f"{key}.password: the Redis user {server.username!r} needs a password")
            continue
        digest = hashlib.sha256(server.password.get_secret_value().encode()).hexdigest()
        found.append(User(service, server.username, digest, GRANTS[service], tuple(key_patterns(config, service))))
    autoscaler = _autoscaler(config, owners, problems)
    if autoscaler is not None:
        found.append(autoscaler)
    if problems:
        raise ConfigError(problems)
    return found


def _autoscaler(config: Config, owners: dict[str, str], problems: list[str]) -> User | None:
    """The read-only user of KEDA's triggers (``redis.autoscaler``), or None."""
    section = config.customer.redis
    wanted = section.autoscaler if section is not None else None
    if wanted is None:
        return None
    if wanted.username in (*owners, "default"):
        problems.append(
            f"{config.customer_path}: redis.autoscaler.username: {wanted.username!r} is already "
            f"the user of {owners.get(wanted.username, 'the administrator')}"
        )
        return None
    if isinstance(wanted.password, UnresolvedSecret):
        problems.append(f"{config.customer_path}: redis.autoscaler.password: not available to this service")
        return None
    names = config.global_.reliable_queue.queue_names
    queues = [names.primary_queue, names.default_queue, config.global_.postfix.incoming_queue_name]
    queues.append(config.global_.backdata.queue_name)
    digest = hashlib.sha256(wanted.password.get_secret_value().encode()).hexdigest()
    return User("autoscaler", wanted.username, digest, AUTOSCALER, tuple(glob_escape(q) for q in queues))


def user_lines(config: Config) -> list[str]:
    """The ``user`` directives of every service user (the default user is left as configured).

    Raises:
        ConfigError: see :func:`users`.
    """
    found = users(config)
    missing = [s for s in SERVICES if s not in {u.service for u in found}]
    if missing:
        log.warning(
            "Redis: %s log in as the default (administrator) user; give each service its own "
            "reliable-queue.redis.username and password (least privilege)",
            ", ".join(missing),
        )
    return [user.line() for user in found]


def main(argv: list[str] | None = None) -> int:
    """Print the ``user`` lines for redis.conf or an ACL file (``python -m common.redisacl``)."""
    parser = cli.parser("python -m common.redisacl", "Print the Redis ACL user of every service")
    args = parser.parse_args(argv)
    try:
        lines = user_lines(load_config(*cli.config_paths(args)))
    except ConfigError as exc:
        cli.report_problems("redisacl", exc.problems)
        return cli.EXIT_CONFIG
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
