"""``redis-sidecar exporter``: queue depths for Prometheus.

Reads (never consumes) the four queue streams at scrape time and exports the original metric
names -- ``primary_queue_messages``, ``default_queue_messages``, ``event_queue_messages``,
``queue_to_postfix_messages`` (entries not yet completed: waiting plus being processed) -- plus,
per queue (label ``queue``): ``mailer_redis_queue_messages`` (the same length),
``mailer_redis_queue_pending_messages`` (on a consumer), ``mailer_redis_queue_dead_letter_messages``
and ``mailer_redis_queue_oldest_message_age_seconds``; and ``mailer_redis_last_backup_timestamp_seconds``.

Redis itself (``redis_up``, memory, clients, persistence) is the standard Redis exporter's job,
a container of its own in the pod.  When Redis does not answer, this collector exports no queue
value at all rather than a stale one (the original reported 0, which looks like an empty queue).

With several data nodes (``deploy/ha``) only the primary's exporter reports the queues -- a sum
over pods still counts every entry once, and after a failover the new primary's exporter takes
over; every node reports ``mailer_redis_is_primary`` (1 on the primary, 0 on a replica).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common import keys, redisreply
from common.config.globalfile import GlobalConfig
from common.errors import TemporaryError
from common.queue import Queues, QueueStats
from redis_sidecar.backup import LAST_BACKUP_KEY


@dataclass(frozen=True)
class WatchedQueue:
    """One queue stream, the original gauge that reports it, and its consumer group."""

    metric: str
    queue: str
    group: str
    role: str


def watched_queues(cfg: GlobalConfig) -> tuple[WatchedQueue, ...]:
    """The four queues of the global file, in pipeline order."""
    names = cfg.reliable_queue.queue_names
    return (
        WatchedQueue("primary_queue_messages", names.primary_queue, keys.GROUP_TRANSFORMER, "priority mail"),
        WatchedQueue("default_queue_messages", names.default_queue, keys.GROUP_TRANSFORMER, "default mail"),
        WatchedQueue("event_queue_messages", cfg.backdata.queue_name, keys.GROUP_BACKDATA, "events"),
        WatchedQueue(
            "queue_to_postfix_messages", cfg.postfix.incoming_queue_name, keys.GROUP_POSTFIXLOG, "signed mail"
        ),
    )


def _entry_age(entry_id: bytes | str, now: float) -> float:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return max(now - int(text.split("-", 1)[0]) / 1000.0, 0.0)


class QueueCollector(Collector):
    """Collects at scrape time, so values are never older than the scrape."""

    def __init__(self, queues: Queues, watched: Sequence[WatchedQueue]) -> None:
        self.queues = queues
        self.redis: redis.Redis = queues.redis
        self.watched = tuple(watched)

    def describe(self) -> Iterator[Metric]:
        """The families (without touching Redis at registration)."""
        yield from self._families().values()

    def _families(self) -> dict[str, GaugeMetricFamily]:
        fams = {
            w.metric: GaugeMetricFamily(
                w.metric, f"Entries in {w.queue} ({w.role}) not yet completed: waiting plus in progress"
            )
            for w in self.watched
        }
        labelled = {
            "mailer_redis_queue_messages": "Entries not yet completed (waiting plus in progress), per queue",
            "mailer_redis_queue_pending_messages": "Entries delivered to a consumer and not yet acknowledged",
            "mailer_redis_queue_dead_letter_messages": "Entries in the queue's dead-letter stream (<queue>:dead)",
            "mailer_redis_queue_oldest_message_age_seconds": "Age of the oldest entry not yet completed (0 when empty)",
        }
        for name, text in labelled.items():
            fams[name] = GaugeMetricFamily(name, text, labels=["queue"])
        fams["mailer_redis_last_backup_timestamp_seconds"] = GaugeMetricFamily(
            "mailer_redis_last_backup_timestamp_seconds", "Time of the last periodic or manual backup upload"
        )
        fams["mailer_redis_is_primary"] = GaugeMetricFamily(
            "mailer_redis_is_primary", "1 when this data node is the primary (it reports the queues), 0 on a replica"
        )
        return fams

    def collect(self) -> Iterator[Metric]:
        """Read every queue (on the primary only); nothing at all when Redis does not answer."""
        fams = self._families()
        try:
            primary = redisreply.role(self.redis) == "master"
            fams["mailer_redis_is_primary"].add_metric([], 1 if primary else 0)
            if not primary:
                yield fams["mailer_redis_is_primary"]
                return
            stats = [self.queues.stats(w.queue, w.group) for w in self.watched]
            pipe = self.redis.pipeline(transaction=False)
            for w in self.watched:
                pipe.xrange(w.queue, count=1)
            pipe.get(LAST_BACKUP_KEY)
            *oldest, last_backup = pipe.execute()
        except (TemporaryError, redis.exceptions.RedisError):
            return
        now = time.time()
        for w, s, first in zip(self.watched, stats, oldest, strict=True):
            self._add_queue(fams, w, s, _entry_age(first[0][0], now) if first else 0.0)
        if last_backup is not None:
            fams["mailer_redis_last_backup_timestamp_seconds"].add_metric([], float(last_backup))
        yield from (f for f in fams.values() if f.samples)

    @staticmethod
    def _add_queue(fams: dict[str, GaugeMetricFamily], w: WatchedQueue, s: QueueStats, age: float) -> None:
        fams[w.metric].add_metric([], s.length)
        fams["mailer_redis_queue_messages"].add_metric([w.queue], s.length)
        fams["mailer_redis_queue_pending_messages"].add_metric([w.queue], s.pending)
        fams["mailer_redis_queue_dead_letter_messages"].add_metric([w.queue], s.dead)
        fams["mailer_redis_queue_oldest_message_age_seconds"].add_metric([w.queue], age)


class RedisMetrics:
    """Every metric of the Redis pod's exporter, in an explicit registry."""

    def __init__(self, queues: Queues, cfg: GlobalConfig, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.collector = QueueCollector(queues, watched_queues(cfg))
        registry.register(self.collector)
