"""Reliable queues on Redis Streams with consumer groups (DESIGN §2, style anchor C7).

Every service reaches Redis queues through this module only.

Producers (:class:`Queues`, :class:`AsyncQueues`) add entries in one pipelined round trip
that also reads the stream's length.  The limit ``max_queue_length`` is *soft*: a producer that
sees the queue at or over the limit refuses its following writes with :class:`QueueFullError`
(receivers answer with a temporary failure) until a fresh length check shows room again, so a
queue overshoots by at most one batch per producer.  Writing first and checking in the same
round trip keeps 10 KB entries at pipelined-XADD speed (a Lua script that checks first copies
every argument twice and halves the throughput).

A :class:`Consumer` reads batches with ``XREADGROUP``.  An entry stays *pending* on that
consumer until it is completed:

* :meth:`Consumer.complete` writes the outputs to the next queue(s) and acknowledges and deletes
  the inputs in one ``MULTI/EXEC`` -- a crash leaves an entry either pending (it is delivered
  again) or handed off, never both and never neither;
* :meth:`Consumer.dead_letter` moves it, with the reason, to ``<queue>:dead`` (same atomicity).

Entries left pending by a consumer that died are claimed by another one after
``claim_idle_seconds`` (``XAUTOCLAIM``); a restarted consumer with the same name re-reads its
own pending entries first.  Redis counts deliveries; an entry delivered more than
``max_deliveries`` times is dead-lettered instead of being handed out again, so a message that
crashes its consumer cannot loop forever.

Duplicate window (at-least-once): an entry is processed twice when its consumer dies after
producing side effects but before :meth:`Consumer.complete` returns, or when it is claimed
while its slow owner is still working on it.

Clients (:func:`connect`, :func:`connect_async`) hold at most ``max-connections`` connections
(``common-config.redis`` or the service's ``reliable-queue.redis``).  A caller that finds them
all busy waits up to ``pool-timeout-seconds`` for one; after that it gets
:class:`PoolExhaustedError` (a ``ConnectionError``: receivers answer with a temporary failure),
a warning in the log and ``mailer_<service>_redis_pool_exhausted_total{client}``.

With ``sentinel`` configured (``deploy/ha``) every connection goes to the primary the sentinels
name at the time it is opened (redis-py's Sentinel support, in the same bounded pools): after a
failover, a command on an old connection fails once (connection refused, or ``READONLY`` from a
demoted primary: the connection is dropped), is retried on a new connection to the new primary,
and while no primary is known it fails with a ``ConnectionError`` -- a temporary failure, so
the receivers answer 451/503 and no acknowledged message depends on the outcome.

Replica acknowledgement (DESIGN §8): producers (:meth:`Queues.enqueue_many`, used by the
receivers and MxServer) send ``WAIT <replicas> <timeout>`` right after their MULTI/EXEC, on the
same connection and in the same round trip, when ``wait-replicas`` is above 0 (default: 1 with
sentinel).  Fewer acknowledgements within ``wait-timeout-seconds`` raise
:class:`ReplicaAckError`, a temporary failure: the entry *is* on the primary, so the client's
retry may add it a second time (a duplicate, never a loss).  Stage hand-offs
(:meth:`Consumer.complete`) do not wait: their output and their acknowledgement travel in one
MULTI/EXEC, so a failover that loses the hand-off loses the acknowledgement with it and the
input is delivered again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.connection
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT, FieldT, StreamIdT

from common import keys, logs, redisreply
from common.coalesce import Coalescer
from common.config.base import RedisServer
from common.config.globalfile import GlobalConfig
from common.errors import QueueFullError, QueueUnavailableError, ReplicaAckError, TemporaryError

if TYPE_CHECKING:
    # Never imported at run time from here: prometheus_client picks its multiprocess mode when
    # first imported (HttpReceiver's master imports this module before setting it up).
    from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

Fields = Mapping[str, bytes | str]

#: Prefix of the metadata fields added to a dead-lettered entry.
DEAD_PREFIX: Final = "dl-"
#: Field set on a replayed entry: when it was replayed (BackData's age limit restarts there).
REPLAYED_AT: Final = "replayed-at"


@dataclass(frozen=True)
class QueueSettings:
    """Queue semantics, from the global file's ``reliable-queue`` block."""

    max_length: int = 200_000
    max_deliveries: int = 5
    claim_idle_ms: int = 60_000
    batch_size: int = 64
    priority_share: int = 10
    dead_letter_max_length: int = 100_000

    @classmethod
    def from_config(cls, cfg: GlobalConfig) -> QueueSettings:
        """Settings of the global file."""
        rq = cfg.reliable_queue
        return cls(
            max_length=rq.max_queue_length,
            max_deliveries=rq.max_deliveries,
            claim_idle_ms=int(rq.claim_idle_seconds * 1000),
            batch_size=rq.batch_size,
            priority_share=rq.priority_share,
            dead_letter_max_length=rq.dead_letter_max_length,
        )


@dataclass(frozen=True)
class Entry:
    """One stream entry handed to a consumer; ``deliveries`` counts this delivery too."""

    queue: str
    id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    def field(self, name: str) -> bytes | None:
        """Raw value of a field, or None."""
        return self.fields.get(name.encode())


@dataclass(frozen=True)
class Output:
    """An entry to add to ``queue`` when an input is completed."""

    queue: str
    fields: Fields

    def write(self, pipe: redisreply.Pipeline) -> None:
        """Queue the XADD on a MULTI/EXEC pipeline."""
        pipe.xadd(self.queue, redisreply.field_map(self.fields))


@dataclass(frozen=True)
class HashWrite:
    """Fields to set in a hash (with an expiry) when an input is completed.

    A record that goes with the hand-off, in the same MULTI/EXEC (e.g. the Transformer's record
    of what it sent).
    """

    key: str
    mapping: Mapping[str, str]
    ttl_s: int

    def write(self, pipe: redisreply.Pipeline) -> None:
        """Queue the HSET and EXPIRE on a MULTI/EXEC pipeline."""
        _write_records(pipe, [self])


@dataclass(frozen=True)
class ListAppend:
    """Values to append to a bounded, expiring list when an input is completed.

    RPUSH, LTRIM to the newest ``max_length`` values, EXPIRE: the per-message timeline of
    :mod:`common.trace`, written in the transaction that moves the message.
    """

    key: str
    values: Sequence[str]
    max_length: int
    ttl_s: int

    def write(self, pipe: redisreply.Pipeline) -> None:
        """Queue the RPUSH, LTRIM and EXPIRE on a MULTI/EXEC pipeline."""
        _write_records(pipe, [self])


#: What a completed (or dead-lettered) entry writes, atomically with its acknowledgement.
Write = Output | HashWrite | ListAppend

#: The writes of several :class:`HashWrite` and :class:`ListAppend` records in one command.
#: KEYS: the hashes and lists; ARGV, for each key in turn: ``H``, 0, the TTL in seconds, n, then
#: n fields and values (HSET, EXPIRE); or ``L``, the maximum length, the TTL, n, then n values
#: (RPUSH, LTRIM, EXPIRE).  In redis-py each command of a pipeline costs its own packing and
#: reply parsing -- about as much client CPU as a 10 KB XADD -- so the records of a whole batch
#: (trace steps, the Transformer's sent records) cost one command when there are two or more
#: (:func:`write_all`; a lone record is cheaper for Redis as plain commands).  unpack() is
#: limited by Lua's stack, hence at most 1,000 arguments a call (an even number: field/value
#: pairs stay together).
_WRITE_RECORDS: Final = """
local a = 1
for k = 1, #KEYS do
  local kind, last = ARGV[a], a + 3 + tonumber(ARGV[a + 3])
  for i = a + 4, last, 1000 do
    redis.call(kind == 'L' and 'RPUSH' or 'HSET', KEYS[k], unpack(ARGV, i, math.min(i + 999, last)))
  end
  if kind == 'L' then
    redis.call('LTRIM', KEYS[k], -tonumber(ARGV[a + 1]), -1)
  end
  redis.call('EXPIRE', KEYS[k], ARGV[a + 2])
  a = last + 1
end
return #KEYS
"""


def write_all(pipe: redisreply.Pipeline, writes: Iterable[Write]) -> None:
    """Queue ``writes`` on a pipeline: the XADDs in order, then the records (two or more: one script call).

    The records' reply is not a positional result for the caller: put these commands after the
    ones whose replies are read.
    """
    records: list[HashWrite | ListAppend] = []
    for write in writes:
        if isinstance(write, Output):
            write.write(pipe)
        else:
            records.append(write)
    _write_records(pipe, records)


def _write_records(pipe: redisreply.Pipeline, records: Sequence[HashWrite | ListAppend]) -> None:
    records = [r for r in records if (r.values if isinstance(r, ListAppend) else r.mapping)]
    if len(records) == 1:
        # One record: its own commands.  A script call costs Redis more than the two or three
        # commands it replaces (Lua's set-up: ~9 us of Redis CPU a call on the bench machine);
        # from two records on it costs less.
        _write_natively(pipe, records[0])
    elif records:
        args: list[EncodableT] = []
        for record in records:
            if isinstance(record, ListAppend):
                args += ("L", record.max_length, record.ttl_s, len(record.values), *record.values)
            else:
                items = [item for pair in record.mapping.items() for item in pair]
                args += ("H", 0, record.ttl_s, len(items), *items)
        pipe.eval(_WRITE_RECORDS, len(records), *(record.key for record in records), *args)


def _write_natively(pipe: redisreply.Pipeline, record: HashWrite | ListAppend) -> None:
    if isinstance(record, ListAppend):
        pipe.rpush(record.key, *record.values)
        pipe.ltrim(record.key, -record.max_length, -1)
    else:
        pipe.hset(record.key, mapping=redisreply.field_map(record.mapping))
    pipe.expire(record.key, record.ttl_s)


@dataclass(frozen=True)
class QueueStats:
    """Counts of one queue, for metrics and back-pressure."""

    queue: str
    length: int
    pending: int
    dead: int

    @property
    def waiting(self) -> int:
        """Entries not yet handed to any consumer."""
        return max(self.length - self.pending, 0)


@dataclass(frozen=True)
class ReplicaAck:
    """What a producer's ``WAIT`` asks for: ``replicas`` confirmations within ``timeout_ms`` (0: no WAIT)."""

    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def of(cls, server: RedisServer) -> ReplicaAck:
        """The replica acknowledgement configured for ``server``."""
        return cls(server.replica_acks, max(int(server.wait_timeout_seconds * 1000), 1))


NO_REPLICA_ACK: Final = ReplicaAck()


def replica_ack(client: redis.Redis | redis.asyncio.Redis) -> ReplicaAck:
    """The replica acknowledgement of a client made by :func:`connect` / :func:`connect_async`."""
    ack = getattr(client.connection_pool, "replica_ack", NO_REPLICA_ACK)
    return ack if isinstance(ack, ReplicaAck) else NO_REPLICA_ACK


class PoolExhaustedError(redis.exceptions.ConnectionError):
    """Every pooled connection stayed busy for ``pool-timeout-seconds``."""


_POOL_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


class _PoolWatch:
    """What happens when a pool runs dry: one warning line and a counted event."""

    def __init__(self, server: RedisServer, client_name: str | None, registry: CollectorRegistry | None) -> None:
        self.server = server
        self.client = client_name or "redis"
        self.counter: Counter | None = None
        if registry is not None:
            from prometheus_client import Counter

            counter = _POOL_METRICS.get(registry)
            if counter is None:
                # Client names start with the service's name ("receiver", "httpreceiver-probe"…).
                service = self.client.split("-", 1)[0]
                counter = _POOL_METRICS[registry] = Counter(
                    f"mailer_{service}_redis_pool_exhausted",
                    "Redis commands refused because every pooled connection stayed busy (max-connections)",
                    ["client"],
                    registry=registry,
                )
            self.counter = counter

    def exhausted(self, exc: redis.exceptions.ConnectionError) -> PoolExhaustedError:
        if self.counter is not None:
            self.counter.labels(self.client).inc()
        log.warning(
            "Redis connection pool of %s exhausted: all %d connections busy for %.1fs "
            "(raise reliable-queue.redis.max-connections if this is not an attack)",
            self.client,
            self.server.max_connections,
            self.server.pool_timeout_seconds,
        )
        return PoolExhaustedError(
            f"no Redis connection free within {self.server.pool_timeout_seconds:g}s "
            f"(all {self.server.max_connections} busy): {exc}"
        )


class _BlockingPool(redis.BlockingConnectionPool):
    """redis-py's blocking pool, reporting exhaustion (:class:`_PoolWatch`)."""

    #: The WAIT of producers using this pool (set by :func:`connect`).
    replica_ack: ReplicaAck = NO_REPLICA_ACK

    def __init__(self, watch: _PoolWatch, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._watch = watch

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A pooled connection, waiting up to the pool timeout."""
        try:
            return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except PoolExhaustedError:
            raise
        except redis.exceptions.ConnectionError as exc:
            if "No connection available" not in str(exc):
                raise
            raise self._watch.exhausted(exc) from exc


class _AsyncBlockingPool(redis.asyncio.BlockingConnectionPool):
    """The asyncio flavour of :class:`_BlockingPool`."""

    #: The WAIT of producers using this pool (set by :func:`connect_async`).
    replica_ack: ReplicaAck = NO_REPLICA_ACK

    def __init__(self, watch: _PoolWatch, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._watch = watch

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        """A pooled connection, waiting up to the pool timeout."""
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except PoolExhaustedError:
            raise
        except redis.exceptions.ConnectionError as exc:
            if "No connection available" not in str(exc):
                raise
            raise self._watch.exhausted(exc) from exc


class _HiredisPacking:
    """Commands packed by hiredis (C), as redis-py's synchronous connections already do.

    redis-py's asyncio connection packs every argument in Python: about a third of the
    Receiver's Redis client CPU per message (seven commands each) in the issue 20 profile.
    Same bytes on the wire; a value of an unsupported type raises ``DataError`` as before.
    """

    _serializer: Final = redis.connection.HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        """The RESP bytes of one command."""
        packed: list[bytes] = self._serializer.pack(*args)
        return packed


class _AsyncConnection(_HiredisPacking, redis.asyncio.Connection):
    """An asyncio connection packing with hiredis."""


class _AsyncSentinelConnection(_HiredisPacking, redis.asyncio.sentinel.SentinelManagedConnection):
    """A connection to the sentinels' primary packing with hiredis."""


class _SentinelBlockingPool(redis.sentinel.SentinelConnectionPool, _BlockingPool):
    """Connections to the primary the sentinels name, in a bounded pool (:class:`_BlockingPool`)."""

    def __init__(self, master_name: str, manager: redis.sentinel.Sentinel, watch: _PoolWatch, **kwargs: Any) -> None:
        super().__init__(master_name, manager, watch=watch, **kwargs)  # type: ignore[no-untyped-call]


class _AsyncSentinelBlockingPool(redis.asyncio.sentinel.SentinelConnectionPool, _AsyncBlockingPool):
    """The asyncio flavour of :class:`_SentinelBlockingPool`."""

    def __init__(
        self, master_name: str, manager: redis.asyncio.sentinel.Sentinel, watch: _PoolWatch, **kwargs: Any
    ) -> None:
        super().__init__(master_name, manager, watch=watch, **kwargs)  # type: ignore[no-untyped-call]


def connect(
    server: RedisServer, *, client_name: str | None = None, registry: CollectorRegistry | None = None
) -> redis.Redis:
    """A synchronous client for ``server`` (bytes responses), its pool sized by ``max-connections``.

    With ``sentinel`` the client follows the primary the sentinels name.  ``registry`` receives
    ``mailer_<service>_redis_pool_exhausted_total`` (counted when the pool runs dry).
    """
    watch = _PoolWatch(server, client_name, registry)
    kwargs = _client_kwargs(server, client_name)
    pool: _BlockingPool
    if server.sentinel is None:
        pool = _BlockingPool(
            watch, max_connections=server.max_connections, timeout=server.pool_timeout_seconds, **kwargs
        )
    else:
        for name in ("host", "port"):
            kwargs.pop(name)
        manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            server.sentinel.hosts(), sentinel_kwargs=_sentinel_kwargs(server)
        )
        pool = _SentinelBlockingPool(
            server.sentinel.master_name,
            manager,
            watch,
            max_connections=server.max_connections,
            timeout=server.pool_timeout_seconds,
            **kwargs,
        )
    pool.replica_ack = ReplicaAck.of(server)
    return redis.Redis.from_pool(pool)


def connect_async(
    server: RedisServer, *, client_name: str | None = None, registry: CollectorRegistry | None = None
) -> redis.asyncio.Redis:
    """An asyncio client for ``server`` (bytes responses); see :func:`connect`."""
    watch = _PoolWatch(server, client_name, registry)
    kwargs = _client_kwargs(server, client_name)
    pool: _AsyncBlockingPool
    if server.sentinel is None:
        pool = _AsyncBlockingPool(
            watch,
            max_connections=server.max_connections,
            timeout=server.pool_timeout_seconds,
            connection_class=_AsyncConnection,
            **kwargs,
        )
    else:
        for name in ("host", "port"):
            kwargs.pop(name)
        manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            server.sentinel.hosts(), sentinel_kwargs=_sentinel_kwargs(server)
        )
        pool = _AsyncSentinelBlockingPool(
            server.sentinel.master_name,
            manager,
            watch,
            max_connections=server.max_connections,
            timeout=server.pool_timeout_seconds,
            connection_class=_AsyncSentinelConnection,
            **kwargs,
        )
    pool.replica_ack = ReplicaAck.of(server)
    return redis.asyncio.Redis.from_pool(pool)


def _client_kwargs(server: RedisServer, client_name: str | None) -> dict[str, Any]:
    return {
        "host": server.hostname,
        "port": server.port,
        "db": server.db,
        "username": server.username,
        "password": server.password.get_secret_value() if server.password else None,
        "socket_timeout": server.socket_timeout,
        "socket_connect_timeout": min(server.socket_timeout, 5.0),
        # One immediate retry replaces a pooled connection that Redis closed (restart, failover);
        # more would hold a client (and its SMTP reply) while Redis is down.
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
        "client_name": client_name,
        # No CLIENT SETINFO on connect: service users are not granted it (common.redisacl), and
        # a refused command would fill Redis' ACL LOG on every connection.
        "driver_info": None,
    }


def _sentinel_kwargs(server: RedisServer) -> dict[str, Any]:
    """How to reach the sentinels: their own credentials and a short timeout (one is tried after another)."""
    assert server.sentinel is not None
    sentinel = server.sentinel
    return {
        "username": sentinel.username,
        "password": sentinel.password.get_secret_value() if sentinel.password else None,
        "socket_timeout": sentinel.socket_timeout,
        "socket_connect_timeout": sentinel.socket_timeout,
        # A sentinel that does not answer is skipped at once: the next one is asked.
        "retry": Retry(NoBackoff(), 0),
        "driver_info": None,
    }


def consumer_name(service: str, index: int = 0) -> str:
    """Stable consumer name: a restarted process finds its own pending entries again.

    ``INBOXBOOSTER_CONSUMER_NAME`` overrides the host-name based default.
    """
    base = os.environ.get("INBOXBOOSTER_CONSUMER_NAME") or f"{service}-{socket.gethostname()}"
    return f"{base}-{index}"


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate redis-py errors into the project's temporary errors."""
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        text = str(exc)
        if text.startswith("QUEUEFULL"):
            raise QueueFullError(text.removeprefix("QUEUEFULL ")) from None
        # OOM, MISCONF (persistence failing), READONLY, LOADING, BUSY: all pass with time.
        raise QueueUnavailableError(f"{what}: Redis refused: {text}") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise QueueUnavailableError(f"{what}: Redis unavailable: {exc}") from exc


class _Limit:
    """Soft length limit per queue, as last seen by this producer."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._full: dict[str, int] = {}

    def blocked(self, queue: str) -> bool:
        return queue in self._full

    def update(self, queue: str, length_before: int, added: int) -> None:
        if self.max_length and length_before + added >= self.max_length:
            self._full[queue] = length_before + added
        else:
            self._full.pop(queue, None)

    def check(self, queue: str) -> None:
        if queue in self._full:
            raise QueueFullError(f"{queue} holds {self._full[queue]} entries (limit {self.max_length})")


def _uuid_of(entry: Entry) -> str | None:
    """The message uuid an entry carries (mail streams), for log fields."""
    raw = entry.fields.get(b"uuid")
    return raw.decode("utf-8", "replace") if raw else None


def _decode_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class Queues:
    """Producer and admin operations (synchronous)."""

    def __init__(self, client: redis.Redis, settings: QueueSettings, *, ack: ReplicaAck | None = None) -> None:
        self.client = client
        # redis-py types replies as unions of sync/async results; replies are decoded here.
        self.redis: redis.Redis = client
        self.settings = settings
        #: WAIT after :meth:`enqueue_many` (default: what the client was configured with).
        self.ack = replica_ack(client) if ack is None else ack
        self._limit = _Limit(settings.max_length)

    def enqueue(self, queue: str, fields: Fields, *, limit: bool = True, with_writes: Sequence[Write] = ()) -> str:
        """Add one entry (and ``with_writes``, e.g. its trace entry, in the same MULTI/EXEC); returns its id.

        Raises:
            QueueFullError: the queue is at its length limit.
            QueueUnavailableError: Redis is down or refused the write.
        """
        return self.enqueue_many(queue, [fields], limit=limit, with_writes=with_writes)[0]

    def enqueue_many(
        self, queue: str, batch: Sequence[Fields], *, limit: bool = True, with_writes: Sequence[Write] = ()
    ) -> list[str]:
        """Add entries in one round trip (all or nothing); returns their ids.

        Raises:
            QueueFullError: the queue was found at its length limit; nothing was written.
            QueueUnavailableError: Redis is down or refused the write.
        """
        if not batch:
            return []
        with redis_errors(f"enqueue to {queue}"):
            if limit and self._limit.blocked(queue):
                self._limit.update(queue, int(self.redis.xlen(queue)), 0)
                self._limit.check(queue)
            if self.ack.replicas:
                pipe = self.redis.pipeline(transaction=False)
                _queue_acknowledged_add(pipe, queue, batch, self.ack, with_writes)
                reply, acked = _acknowledged_reply(pipe.execute(raise_on_error=False))
            else:
                pipe = self.redis.pipeline(transaction=True)
                _queue_add(pipe, queue, batch, with_writes)
                reply, acked = pipe.execute(), None
        return self._added(queue, batch, reply, acked, limit=limit)

    def _added(
        self, queue: str, batch: Sequence[Fields], reply: list[Any], acked: int | None, *, limit: bool
    ) -> list[str]:
        """The ids of an XLEN+XADD(+writes) transaction's reply.

        Raises:
            ReplicaAckError: too few replicas confirmed the writes.
        """
        if limit:
            self._limit.update(queue, int(reply[0]), len(batch))
        ids = [_decode_id(i) for i in reply[1 : len(batch) + 1]]
        _check_acks(queue, ids, acked, self.ack)
        return ids

    def ensure_group(self, queue: str, group: str) -> None:
        """Create the stream and its consumer group if they do not exist."""
        with redis_errors(f"create group {group} on {queue}"):
            try:
                self.redis.xgroup_create(queue, group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stats(self, queue: str, group: str) -> QueueStats:
        """Length, pending and dead-letter counts of ``queue`` (one round trip)."""
        with redis_errors(f"stats of {queue}"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.xlen(queue)
            pipe.xlen(keys.dead_letter(queue))
            pipe.xinfo_groups(queue)
            length, dead, groups = pipe.execute(raise_on_error=False)
        if isinstance(length, Exception) or isinstance(dead, Exception):
            raise QueueUnavailableError(f"stats of {queue}: {length if isinstance(length, Exception) else dead}")
        pending = 0
        if isinstance(groups, list):
            for info in groups:
                name = info.get("name")
                if name in (group, group.encode()):
                    pending = int(info.get("pending", 0))
        return QueueStats(queue=queue, length=int(length), pending=pending, dead=int(dead))

    def length(self, queue: str) -> int:
        """Number of entries in ``queue`` (waiting plus pending)."""
        with redis_errors(f"length of {queue}"):
            return int(self.redis.xlen(queue))

    def dead_letters(self, queue: str, count: int = 100) -> list[Entry]:
        """The oldest dead-lettered entries of ``queue`` (fields include the ``dl-*`` metadata)."""
        dead = keys.dead_letter(queue)
        with redis_errors(f"read {dead}"):
            rows = redisreply.stream_rows(self.redis.xrange(dead, count=count))
        return [Entry(dead, _decode_id(i), f) for i, f in rows]

    def replay_dead_letters(self, queue: str, ids: Sequence[str] | None = None, count: int = 1000) -> int:
        """Move dead-lettered entries back to ``queue`` (metadata removed); returns how many.

        Each move is atomic (add to the queue and delete from the dead-letter stream in one
        MULTI/EXEC).  Without ``ids`` the oldest ``count`` entries are replayed.  Every replayed
        entry gets :data:`REPLAYED_AT` (the time of the replay).
        """
        dead = keys.dead_letter(queue)
        with redis_errors(f"replay {dead}"):
            if ids is None:
                rows = redisreply.stream_rows(self.redis.xrange(dead, count=count))
            else:
                rows = []
                for wanted in ids:
                    rows.extend(redisreply.stream_rows(self.redis.xrange(dead, min=wanted, max=wanted)))
            if not rows:
                return 0
            now = repr(time.time()).encode()
            pipe = self.redis.pipeline(transaction=True)
            for entry_id, fields in rows:
                original: dict[FieldT, EncodableT] = {
                    k: v for k, v in fields.items() if not k.startswith(DEAD_PREFIX.encode())
                }
                original[REPLAYED_AT.encode()] = now
                pipe.xadd(queue, original)
                pipe.xdel(dead, entry_id)
            pipe.execute()
        log.info("replayed %d dead-lettered entries of %s", len(rows), queue)
        return len(rows)

    def purge_dead_letters(self, queue: str, older_than_s: float, *, now: float | None = None) -> int:
        """Delete dead letters of ``queue`` dead-lettered more than ``older_than_s`` ago; returns how many.

        Dead-letter entry ids are the time they were dead-lettered, so this is one ``XTRIM MINID``.
        """
        cutoff_ms = int(((time.time() if now is None else now) - older_than_s) * 1000)
        dead = keys.dead_letter(queue)
        with redis_errors(f"purge {dead}"):
            removed = int(self.redis.xtrim(dead, minid=f"{max(cutoff_ms, 0)}-0", approximate=False))
        log.info("purged %d dead-lettered entries of %s older than %.0fs", removed, queue, older_than_s)
        return removed


class AsyncQueues:
    """Producer operations for asyncio services (Receiver, MxServer).

    With ``coalesce``, the :meth:`enqueue` calls of concurrent tasks that arrive while a
    transaction is in flight wait for it and then go together in the next one (group commit,
    :mod:`common.coalesce`): one MULTI/EXEC (and one WAIT) for all of them, each entry with its
    own writes.  Every caller still
    returns only once Redis has acknowledged its entry, and all of them get the error of a failed
    transaction.  The per-call client work (pool, pipeline, replies) was about a third of the
    Receiver's CPU per message; Redis also fsyncs once per transaction.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        settings: QueueSettings,
        *,
        ack: ReplicaAck | None = None,
        coalesce: bool = False,
    ) -> None:
        self.client = client
        self.settings = settings
        #: WAIT after :meth:`enqueue_many` (default: what the client was configured with).
        self.ack = replica_ack(client) if ack is None else ack
        self._limit = _Limit(settings.max_length)
        self._group: Coalescer[tuple[str, bool], tuple[Fields, Sequence[Write]], str] | None = (
            Coalescer(self._enqueue_group) if coalesce else None
        )

    async def enqueue(
        self, queue: str, fields: Fields, *, limit: bool = True, with_writes: Sequence[Write] = ()
    ) -> str:
        """Add one entry; see :meth:`Queues.enqueue` (and the class docstring for ``coalesce``)."""
        if self._group is None:
            return (await self.enqueue_many(queue, [fields], limit=limit, with_writes=with_writes))[0]
        return await self._group.call((queue, limit), (fields, tuple(with_writes)))

    async def _enqueue_group(
        self, target: tuple[str, bool], batch: Sequence[tuple[Fields, Sequence[Write]]]
    ) -> list[str]:
        """One transaction for the coalesced enqueues to one queue."""
        queue, limit = target
        writes = [write for _, entry_writes in batch for write in entry_writes]
        return await self.enqueue_many(queue, [fields for fields, _ in batch], limit=limit, with_writes=writes)

    async def enqueue_many(
        self, queue: str, batch: Sequence[Fields], *, limit: bool = True, with_writes: Sequence[Write] = ()
    ) -> list[str]:
        """Add entries in one round trip (all or nothing); see :meth:`Queues.enqueue_many`."""
        if not batch:
            return []
        with redis_errors(f"enqueue to {queue}"):
            if limit and self._limit.blocked(queue):
                self._limit.update(queue, int(await self.client.xlen(queue)), 0)
                self._limit.check(queue)
            pipe: redisreply.Pipeline
            if self.ack.replicas:
                pipe = self.client.pipeline(transaction=False)
                _queue_acknowledged_add(pipe, queue, batch, self.ack, with_writes)
                reply, acked = _acknowledged_reply(await pipe.execute(raise_on_error=False))
            else:
                pipe = self.client.pipeline(transaction=True)
                _queue_add(pipe, queue, batch, with_writes)
                reply, acked = await pipe.execute(), None
        if limit:
            self._limit.update(queue, int(reply[0]), len(batch))
        ids = [_decode_id(i) for i in reply[1 : len(batch) + 1]]
        _check_acks(queue, ids, acked, self.ack)
        return ids

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self.client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False


def _queue_add(
    pipe: redisreply.Pipeline, queue: str, batch: Sequence[Fields], with_writes: Sequence[Write] = ()
) -> None:
    """XLEN (for the length limit), one XADD per entry and the entries' other writes, on a pipeline."""
    pipe.xlen(queue)
    for fields in batch:
        pipe.xadd(queue, redisreply.field_map(fields))
    write_all(pipe, with_writes)


def _queue_acknowledged_add(
    pipe: redisreply.Pipeline, queue: str, batch: Sequence[Fields], ack: ReplicaAck, with_writes: Sequence[Write] = ()
) -> None:
    """``MULTI``, the adds, ``EXEC``, then ``WAIT`` -- sent together on one connection.

    WAIT counts the replicas that have everything this connection wrote, so it must follow the
    EXEC on the same connection; inside MULTI it would not block.  A plain (non-transaction)
    pipeline with the transaction spelled out keeps all of it on one connection and one round trip.
    """
    pipe.execute_command("MULTI")
    _queue_add(pipe, queue, batch, with_writes)
    pipe.execute_command("EXEC")
    pipe.execute_command("WAIT", ack.replicas, ack.timeout_ms)


def _acknowledged_reply(replies: list[Any]) -> tuple[list[Any], int]:
    """The EXEC reply and WAIT's count of the pipeline of :func:`_queue_acknowledged_add`.

    A WAIT that Redis refuses after a successful EXEC (e.g. a user without ``+wait``) counts as
    no replica: the entries are written, so the caller must not say "nothing was written".

    Raises:
        redis.exceptions.ResponseError: a command was refused (e.g. ``NOREPLICAS``: the primary
            has fewer replicas than ``min-replicas-to-write``); nothing was written.
    """
    *queued, executed, acked = replies
    for reply in (*queued, executed):
        if isinstance(reply, redis.exceptions.ResponseError) and not isinstance(reply, redis.exceptions.ExecAbortError):
            raise reply
    if isinstance(executed, Exception) or not isinstance(executed, list):
        raise redis.exceptions.ResponseError(f"transaction not executed: {executed!r}")
    if isinstance(acked, Exception):
        log.error("WAIT refused after the write: %s", acked)
        return executed, 0
    return executed, int(acked)


def _check_acks(queue: str, ids: list[str], acked: int | None, ack: ReplicaAck) -> None:
    """Raise :class:`ReplicaAckError` when WAIT saw fewer replicas than asked for."""
    if acked is None or acked >= ack.replicas:
        return
    log.warning(
        "%d entries added to %s (%s) but confirmed by %d of %d replicas within %d ms: answering a temporary failure",
        len(ids),
        queue,
        ",".join(ids[:3]),
        acked,
        ack.replicas,
        ack.timeout_ms,
        extra=logs.fields(queue=queue),
    )
    raise ReplicaAckError(
        f"{queue}: written on the primary but confirmed by {acked} of {ack.replicas} replicas "
        f"within {ack.timeout_ms} ms",
        ids=ids,
    )


class Consumer:
    """One named consumer of a group, reading one or more streams in priority order.

    With several streams (``[P0, P1]``) each batch is filled from the first stream, then the
    next; every ``priority_share``-th batch starts with the second stream, so the default
    queue keeps moving under sustained priority load.

    With ``fill_wait_ms``, a batch of new entries smaller than ``batch_size`` waits up to that
    long for more, so a trickle is handled in a few batches instead of one call per entry
    (BackData: a few webhook POSTs instead of one per event).
    """

    def __init__(
        self,
        queues: Queues,
        streams: Sequence[str],
        group: str,
        name: str,
        *,
        batch_size: int | None = None,
        block_ms: int = 1000,
        fill_wait_ms: int = 0,
    ) -> None:
        if not streams:
            raise ValueError("a consumer needs at least one stream")
        self.queues = queues
        self.client: redis.Redis = queues.redis
        self.settings = queues.settings
        self.streams = list(streams)
        self.group = group
        self.name = name
        self.batch_size = batch_size or self.settings.batch_size
        self.block_ms = block_ms
        self.fill_wait_ms = fill_wait_ms
        self._round = 0
        #: The last read of new entries found fewer than ``batch_size``: the streams were empty.
        self._caught_up = False
        self._history_done = False
        self._next_reclaim = 0.0
        self._claim_cursor = dict.fromkeys(self.streams, "0-0")
        #: Outputs to write with an entry dead-lettered during :meth:`read` (set by the worker).
        self.on_dead_letter: Callable[[Entry, str], Sequence[Write]] | None = None

    # -- reading ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Create the streams and the group if needed."""
        for stream in self.streams:
            self.queues.ensure_group(stream, self.group)

    def read(self) -> list[Entry]:
        """The next batch: own leftovers first, then claimed orphans, then new entries.

        Blocks at most ``block_ms`` when there is nothing to do (so a stop request is seen).

        Raises:
            QueueUnavailableError: Redis is down.
        """
        with redis_errors(f"read {','.join(self.streams)}"):
            if not self._history_done:
                entries = self._read_history()
                if entries:
                    return entries
                self._history_done = True
            if time.monotonic() >= self._next_reclaim:
                entries = self._reclaim()
                if entries:
                    return entries
                self._next_reclaim = time.monotonic() + self.settings.claim_idle_ms / 2000
            entries = self._read_new()
        if entries and len(entries) < self.batch_size and self.fill_wait_ms > 0:
            entries.extend(self._fill(self.batch_size - len(entries)))
        return entries

    def _fill(self, need: int) -> list[Entry]:
        """New entries arriving within ``fill_wait_ms``.

        A Redis error ends the wait: the batch in hand is processed, the rest stays in Redis.
        """
        deadline = time.monotonic() + self.fill_wait_ms / 1000
        more: list[Entry] = []
        while len(more) < need:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms < 1:
                break
            try:
                with redis_errors("fill batch"):
                    reply = self.client.xreadgroup(
                        self.group, self.name, dict.fromkeys(self.streams, ">"), count=need - len(more), block=left_ms
                    )
            except TemporaryError as exc:
                log.warning("stopped filling the batch: %s", exc)
                break
            more.extend(Entry(stream, i, dict(f)) for stream, rows in _streams(reply) for i, f in rows)
        return more

    def _read_history(self) -> list[Entry]:
        """Entries this consumer name read before a restart and never completed."""
        entries: list[Entry] = []
        deleted: list[tuple[str, str]] = []
        for stream in self.streams:
            reply = self.client.xreadgroup(self.group, self.name, {stream: "0"}, count=self.batch_size)
            for entry_id, fields in _rows(reply):
                if fields:
                    entries.append(Entry(stream, entry_id, dict(fields)))
                else:
                    deleted.append((stream, entry_id))
        self._ack_only(deleted)
        return self._screen(self._with_deliveries(entries))

    def _reclaim(self) -> list[Entry]:
        """Claim entries idle longer than ``claim_idle_ms`` on other (dead) consumers."""
        entries: list[Entry] = []
        for stream in self.streams:
            reply = self.client.xautoclaim(
                stream,
                self.group,
                self.name,
                self.settings.claim_idle_ms,
                start_id=self._claim_cursor[stream],
                count=self.batch_size,
            )
            self._claim_cursor[stream] = _decode_id(reply[0])
            for entry_id, fields in reply[1]:
                if fields:
                    entries.append(Entry(stream, _decode_id(entry_id), dict(fields)))
        if entries:
            log.warning("claimed %d entries left pending by other consumers", len(entries))
        return self._screen(self._with_deliveries(entries))

    def _read_new(self) -> list[Entry]:
        """New entries: stream by stream in priority order while behind, in one call when caught up.

        After a batch smaller than ``batch_size`` every stream was empty; what arrived since
        is read with the one blocking call on all streams (which returns at once when there
        is something, the streams in priority order). So a consumer keeping up with a trickle
        makes one call per batch instead of one per stream plus the blocking one.
        """
        self._round += 1
        order = list(self.streams)
        if len(order) > 1 and self._round % self.settings.priority_share == 0:
            order = order[1:] + order[:1]
        entries: list[Entry] = []
        if len(order) > 1 and not self._caught_up:
            for stream in order:
                need = self.batch_size - len(entries)
                if need <= 0:
                    break
                reply = self.client.xreadgroup(self.group, self.name, {stream: ">"}, count=need)
                entries.extend(Entry(stream, i, dict(f)) for i, f in _rows(reply))
            if entries:
                self._caught_up = len(entries) < self.batch_size
                return entries
        reply = self.client.xreadgroup(
            self.group, self.name, dict.fromkeys(order, ">"), count=self.batch_size, block=self.block_ms
        )
        for stream, rows in _streams(reply):
            entries.extend(Entry(stream, i, dict(f)) for i, f in rows)
        self._caught_up = len(entries) < self.batch_size
        return entries

    def _with_deliveries(self, entries: list[Entry]) -> list[Entry]:
        """Fill in Redis' delivery counters (one XPENDING per stream)."""
        if not entries:
            return entries
        counts: dict[tuple[str, str], int] = {}
        pipe = self.client.pipeline(transaction=False)
        spans = []
        for stream in self.streams:
            ids: list[StreamIdT] = [e.id for e in entries if e.queue == stream]
            if ids:
                spans.append(stream)
                pipe.xpending_range(
                    stream,
                    self.group,
                    min=ids[0],
                    max=ids[-1],
                    count=len(ids) * 4 + 16,
                    consumername=self.name,
                )
        for stream, rows in zip(spans, pipe.execute(), strict=True):
            for row in rows:
                counts[(stream, _decode_id(row["message_id"]))] = int(row["times_delivered"])
        return [Entry(e.queue, e.id, e.fields, counts.get((e.queue, e.id), e.deliveries)) for e in entries]

    def _screen(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter entries delivered too often (their consumers keep dying on them)."""
        limit = self.settings.max_deliveries
        over = [e for e in entries if e.deliveries > limit]
        if over:
            failed = []
            for entry in over:
                reason = (
                    f"delivered {entry.deliveries} times without completing (limit {limit}); "
                    "consumers crashed or hung on it"
                )
                outputs = self.on_dead_letter(entry, reason) if self.on_dead_letter else ()
                failed.append((entry, reason, outputs))
            self.dead_letter(failed)
        return [e for e in entries if e.deliveries <= limit]

    # -- completing ------------------------------------------------------------------------

    def complete(self, done: Sequence[tuple[Entry, Sequence[Write]]]) -> None:
        """Hand off: add every output and ack+delete every input, in one MULTI/EXEC.

        Raises:
            QueueUnavailableError: Redis is down; nothing was written or acknowledged.
        """
        if not done:
            return
        pipe = self.client.pipeline(transaction=True)
        write_all(pipe, [out for _, outputs in done for out in outputs])
        self._ack_into(pipe, [(e.queue, e.id) for e, _ in done])
        with redis_errors("complete batch"):
            pipe.execute()

    def dead_letter(self, failed: Sequence[tuple[Entry, str, Sequence[Write]]]) -> None:
        """Move entries to their dead-letter streams with the reason, atomically with the ack.

        Each entry's outputs (e.g. an ``error`` event) are written in the same transaction.

        Raises:
            QueueUnavailableError: Redis is down; the entries stay pending.
        """
        if not failed:
            return
        pipe = self.client.pipeline(transaction=True)
        now = repr(time.time())
        for entry, reason, outputs in failed:
            for out in outputs:
                out.write(pipe)
            fields: dict[Any, Any] = dict(entry.fields)
            fields.update(
                {
                    DEAD_PREFIX + "reason": reason[:2000],
                    DEAD_PREFIX + "queue": entry.queue,
                    DEAD_PREFIX + "id": entry.id,
                    DEAD_PREFIX + "deliveries": str(entry.deliveries),
                    DEAD_PREFIX + "group": self.group,
                    DEAD_PREFIX + "consumer": self.name,
                    DEAD_PREFIX + "at": now,
                }
            )
            cap = self.settings.dead_letter_max_length
            # Approximate trimming (whole macro nodes): cheap, and never below the cap.
            pipe.xadd(keys.dead_letter(entry.queue), fields, maxlen=cap or None, approximate=True)
            log.error(
                "dead-lettered %s %s after %d deliveries: %s",
                entry.queue,
                entry.id,
                entry.deliveries,
                reason[:300],
                extra=logs.fields(uuid=_uuid_of(entry), queue=entry.queue, entry_id=entry.id),
            )
        self._ack_into(pipe, [(e.queue, e.id) for e, _, _ in failed])
        with redis_errors("dead-letter"):
            pipe.execute()

    def redeliver(self, entries: Sequence[Entry]) -> list[Entry]:
        """Count another delivery of entries that failed unexpectedly (XCLAIM bumps the counter)."""
        with redis_errors("redeliver"):
            for stream in self.streams:
                ids: list[StreamIdT] = [e.id for e in entries if e.queue == stream]
                if ids:
                    self.client.xclaim(stream, self.group, self.name, 0, ids)
        return [Entry(e.queue, e.id, e.fields, e.deliveries + 1) for e in entries]

    def release(self, entries: Sequence[Entry]) -> None:
        """Give back entries this consumer will not finish (graceful stop during a retry wait).

        Their delivery counters are set back to the deliveries that really happened, and they
        become claimable by any consumer at once; a restart of this consumer re-reads them.
        """
        with redis_errors("release"):
            pipe = self.client.pipeline(transaction=False)
            for entry in entries:
                pipe.xclaim(
                    entry.queue,
                    self.group,
                    self.name,
                    0,
                    [entry.id],
                    idle=self.settings.claim_idle_ms,
                    retrycount=max(entry.deliveries - 1, 0),
                    justid=True,
                )
            pipe.execute()

    def touch(self, entries: Sequence[Entry]) -> None:
        """Reset the idle time of entries this consumer still works on (keeps them ours)."""
        with redis_errors("touch"):
            for stream in self.streams:
                ids: list[StreamIdT] = [e.id for e in entries if e.queue == stream]
                if ids:
                    self.client.xclaim(stream, self.group, self.name, 0, ids, justid=True)

    def _ack_into(self, pipe: redisreply.Pipeline, items: Sequence[tuple[str, str]]) -> None:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in items:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self.group, *ids)
            pipe.xdel(stream, *ids)

    def _ack_only(self, items: Sequence[tuple[str, str]]) -> None:
        if items:
            pipe = self.client.pipeline(transaction=True)
            self._ack_into(pipe, items)
            pipe.execute()


def _streams(reply: Any) -> list[tuple[str, list[tuple[str, dict[bytes, bytes]]]]]:
    """Normalise an XREADGROUP reply (RESP2 list or RESP3 dict) to (stream, rows)."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out = []
    for stream, rows in items:
        name = stream.decode() if isinstance(stream, bytes) else stream
        if rows and isinstance(rows[0], list) and len(rows) == 1 and isinstance(rows[0][0], list):
            rows = rows[0]
        out.append((name, [(_decode_id(i), f or {}) for i, f in rows]))
    return out


def _rows(reply: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    rows: list[tuple[str, dict[bytes, bytes]]] = []
    for _, stream_rows in _streams(reply):
        rows.extend(stream_rows)
    return rows
