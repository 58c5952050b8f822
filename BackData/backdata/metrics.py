"""BackData's metrics: the original's names (dashboards and alerts use them) plus retry state.

Original (per event, counted once it is delivered to the webhook): ``delivered_events_total``,
``bounced_events_total``, ``error_events_total``, ``spam_report_events_total``,
``unsubscribe_events_total``; ``malformed_events_total`` (unknown type -- still forwarded -- or
not an event at all -- dead-lettered); ``successfully_pushed_events_total`` /
``failed_pushed_events_total`` (events in POSTs answered 2xx / not, every attempt counts);
``number_of_events_currently_posting`` (events in the POST in flight).

New: ``mailer_backdata_deferred_events_total``, ``mailer_backdata_suppressed_events_total``;
``mailer_backdata_suppression_entries_fed_total{reason}`` (:mod:`common.suppression`);
``mailer_backdata_event_age_seconds`` (event timestamp ->
delivered); ``mailer_backdata_post_seconds``; ``mailer_backdata_posts_total{target,outcome}``;
``mailer_backdata_parked_events_total``; ``mailer_backdata_dead_lettered_events_total{reason}``;
and, read from Redis at scrape time, ``mailer_backdata_backlog_events{state}`` (waiting,
pending, parked) and ``mailer_backdata_dead_letter_events`` (entries in the dead-letter stream).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backdata.parking import PARKED
from common import keys
from common.errors import TemporaryError
from common.queue import Queues

log = logging.getLogger(__name__)

_AGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400, 3 * 86400)


class BackDataMetrics:
    """Every BackData metric, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.by_type = {
            "delivered": counter("delivered_events", "delivered events posted to the webhook"),
            "bounce": counter("bounced_events", "bounce events posted to the webhook"),
            "error": counter("error_events", "error events posted to the webhook"),
            "spam-report": counter("spam_report_events", "spam-report events posted to the webhook"),
            "unsubscribe": counter("unsubscribe_events", "unsubscribe events posted to the webhook"),
            "deferred": counter("mailer_backdata_deferred_events", "deferred events posted to the webhook"),
            "suppressed": counter("mailer_backdata_suppressed_events", "suppressed events posted to the webhook"),
        }
        self.fed = counter(
            "mailer_backdata_suppression_entries_fed",
            "events that put their recipient on the suppression list, by reason",
            ("reason",),
        )
        self.malformed = counter("malformed_events", "events of unknown type (forwarded) or unreadable (dead-lettered)")
        self.pushed_ok = counter("successfully_pushed_events", "events in webhook POSTs answered 2xx")
        self.pushed_failed = counter(
            "failed_pushed_events", "events in webhook POSTs that failed (each attempt counts)"
        )
        self.posting = Gauge(
            "number_of_events_currently_posting", "events in the webhook POST in flight", registry=registry
        )
        self.age = Histogram(
            "mailer_backdata_event_age_seconds",
            "seconds from an event's timestamp to its delivery to the webhook",
            buckets=_AGE_BUCKETS,
            registry=registry,
        )
        self.post_seconds = Histogram(
            "mailer_backdata_post_seconds",
            "duration of one POST",
            ["target"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.posts = counter(
            "mailer_backdata_posts",
            "POSTs by target (webhook, bounce-manager) and outcome (ok, transient, rejected)",
            ("target", "outcome"),
        )
        self.parked = counter("mailer_backdata_parked_events", "events parked after the webhook refused them")
        self.dead_lettered = counter(
            "mailer_backdata_dead_lettered_events",
            "events moved to a dead-letter stream, by reason (malformed, max-age)",
            ("reason",),
        )

    def count_delivered(self, kind: str) -> None:
        """Count one event delivered to the webhook under its type."""
        counter = self.by_type.get(kind)
        if counter is None:
            self.malformed.inc()
        else:
            counter.inc()


class BacklogCollector(Collector):
    """Queue depths read from Redis when Prometheus scrapes (nothing is exported if Redis is down)."""

    def __init__(self, queues: Queues, queue: str, group: str) -> None:
        self.queues = queues
        self.queue = queue
        self.group = group

    def collect(self) -> Iterator[Metric]:
        """Yield the backlog and dead-letter gauges."""
        try:
            stats = self.queues.stats(self.queue, self.group)
            parked = self.queues.length(PARKED)
        except TemporaryError as exc:
            log.debug("backlog metrics unavailable: %s", exc)
            return
        backlog = GaugeMetricFamily(
            "mailer_backdata_backlog_events",
            "events not yet delivered: waiting (never read), pending (read, being retried), parked",
            labels=["state"],
        )
        backlog.add_metric(["waiting"], stats.waiting)
        backlog.add_metric(["pending"], stats.pending)
        backlog.add_metric(["parked"], parked)
        yield backlog
        yield GaugeMetricFamily(
            "mailer_backdata_dead_letter_events",
            f"entries in {keys.dead_letter(self.queue)} (replay with: backdata replay)",
            value=stats.dead,
        )
