"""PostfixLog's Prometheus metrics (the original's names first).

Original names (dashboards and alert rules depend on them):

* ``postfix_{incoming,active,deferred,corrupt,hold}_queue_messages`` -- queue files per Postfix
  queue, counted at scrape time;
* ``postfix_emails_polled_total`` -- entries read from ``INCOMING-TO-POSTFIX``;
* ``postfix_emails_to_postfix_total`` -- entries completely handed to Postfix;
* ``postfix_poller_warnings_total`` -- log lines PostfixLog could not parse.

Added: ``mailer_postfixlog_events_total{event,type}``, ``mailer_postfixlog_log_lines_total{kind}``,
``mailer_postfixlog_recipients_total{outcome}``, ``mailer_postfixlog_log_unread_bytes``,
``mailer_postfixlog_postfix_up`` and ``mailer_postfixlog_postfix_restarts_total``.

Shaping (:mod:`postfixlog.shaping`; ``provider`` is a provider of the rules, or ``other`` for
domains that are providers of their own -- bounded label values).  The gauges show the state
shared by all instances (every instance exports the same values: aggregate with ``max``):

* ``mailer_postfixlog_provider_paused{provider}`` -- 1 while paused (``other``: how many);
* ``mailer_postfixlog_provider_blocked{provider}`` -- 1 while paused by a "stop" answer;
* ``mailer_postfixlog_provider_rate_limit_per_minute{provider}`` -- the rate PostfixLog keeps
  to (absent: no limit);
* ``mailer_postfixlog_held_messages{hold}`` -- entries waiting in Redis (``provider:<p>``,
  ``warmup:<domain>``);
* ``mailer_postfixlog_provider_messages_total{provider,outcome}`` -- injected, held (paused,
  rate, warmup) and released entries of this instance;
* ``mailer_postfixlog_provider_replies_total{provider,kind}`` -- slow-down/stop answers read;
* ``mailer_postfixlog_provider_pauses_total{provider,kind}``, ``…_resumes_total{provider}`` --
  pauses started and resumes logged by this instance;
* ``mailer_postfixlog_provider_lookups_total{outcome}`` -- provider lookups (listed, cached,
  mx, no-mx, nxdomain, failed, no-dns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from postfixlog.interpreter import Effects

QUEUE_GAUGES = ("incoming", "active", "deferred", "corrupt", "hold")


class QueueCollector(Collector):
    """The original's ``postfix_<queue>_queue_messages`` gauges, read at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge per queue."""
        try:
            counts = self.counts()
        except OSError:
            counts = {}
        for name in QUEUE_GAUGES:
            family = GaugeMetricFamily(f"postfix_{name}_queue_messages", f"Messages in Postfix' {name} queue")
            family.add_metric([], float(counts.get(name, 0)))
            yield family


class PostfixLogMetrics:
    """Every metric of one PostfixLog process, in an explicit registry."""

    def __init__(self, registry: CollectorRegistry, queue_counts: Callable[[], dict[str, int]] | None = None) -> None:
        self.polled_total = Counter("postfix_emails_polled", "Entries read from INCOMING-TO-POSTFIX", registry=registry)
        self.to_postfix_total = Counter(
            "postfix_emails_to_postfix", "Entries completely handed to Postfix", registry=registry
        )
        self.warnings_total = Counter(
            "postfix_poller_warnings", "Postfix log lines that could not be parsed", registry=registry
        )
        self.events_total = Counter(
            "mailer_postfixlog_events", "Events produced from Postfix' log", ["event", "type"], registry=registry
        )
        self.lines_total = Counter(
            "mailer_postfixlog_log_lines", "Postfix log lines read, by kind", ["kind"], registry=registry
        )
        self.recipients_total = Counter(
            "mailer_postfixlog_recipients",
            "Recipients handed to Postfix, by Postfix' answer",
            ["outcome"],
            registry=registry,
        )
        self.unread_bytes = Gauge(
            "mailer_postfixlog_log_unread_bytes", "Bytes of Postfix' log not read yet", registry=registry
        )
        self.postfix_up = Gauge("mailer_postfixlog_postfix_up", "1 while Postfix answers", registry=registry)
        self.postfix_restarts = Counter(
            "mailer_postfixlog_postfix_restarts", "Times Postfix was restarted after dying", registry=registry
        )
        self.provider_messages = Counter(
            "mailer_postfixlog_provider_messages",
            "Entries per provider: injected, held (paused, rate, warmup), released",
            ["provider", "outcome"],
            registry=registry,
        )
        self.provider_replies = Counter(
            "mailer_postfixlog_provider_replies",
            "Remote answers that mean slow down or stop, per provider",
            ["provider", "kind"],
            registry=registry,
        )
        self.provider_pauses = Counter(
            "mailer_postfixlog_provider_pauses",
            "Provider pauses started by this instance",
            ["provider", "kind"],
            registry=registry,
        )
        self.provider_resumes = Counter(
            "mailer_postfixlog_provider_resumes",
            "Provider resumes logged by this instance",
            ["provider"],
            registry=registry,
        )
        self.provider_paused = Gauge(
            "mailer_postfixlog_provider_paused",
            "1 while the provider is paused (shared state)",
            ["provider"],
            registry=registry,
        )
        self.provider_blocked = Gauge(
            "mailer_postfixlog_provider_blocked",
            "1 while the provider is paused after a stop (blocklisting) answer",
            ["provider"],
            registry=registry,
        )
        self.provider_rate = Gauge(
            "mailer_postfixlog_provider_rate_limit_per_minute",
            "Messages per minute PostfixLog hands to the provider at most (absent: no limit)",
            ["provider"],
            registry=registry,
        )
        self.held_messages = Gauge(
            "mailer_postfixlog_held_messages", "Entries waiting in Redis, by hold", ["hold"], registry=registry
        )
        self.provider_lookups = Counter(
            "mailer_postfixlog_provider_lookups",
            "Provider lookups of recipient domains",
            ["outcome"],
            registry=registry,
        )
        if queue_counts is not None:
            registry.register(QueueCollector(queue_counts))

    # -- injector hooks --------------------------------------------------------------------

    def polled(self, n: int) -> None:
        """Entries read from the queue."""
        self.polled_total.inc(n)

    def handed(self, n: int) -> None:
        """Entries completely handed to Postfix."""
        self.to_postfix_total.inc(n)

    def recipient(self, outcome: str) -> None:
        """One recipient's answer from Postfix."""
        self.recipients_total.labels(outcome=outcome).inc()

    # -- follower hooks --------------------------------------------------------------------

    def count(self, effects: Effects) -> None:
        """Lines and events of a committed chunk."""
        for key, n in effects.counts.items():
            kind, _, name = key.partition(":")
            if kind == "line":
                self.lines_total.labels(kind=name).inc(n)
                if name == "unparsed":
                    self.warnings_total.inc(n)
        for event in effects.events:
            self.events_total.labels(event=event.event, type=event.type or "").inc()

    def lag(self, unread_bytes: int) -> None:
        """Bytes of log not read yet."""
        self.unread_bytes.set(unread_bytes)

    # -- shaping hooks ---------------------------------------------------------------------

    def shaped(self, provider: str, outcome: str, n: int) -> None:
        """Entries injected, held or released."""
        self.provider_messages.labels(provider=provider, outcome=outcome).inc(n)

    def provider_reply(self, provider: str, kind: str, n: int) -> None:
        """Slow-down/stop answers read."""
        self.provider_replies.labels(provider=provider, kind=kind).inc(n)

    def provider_pause(self, provider: str, kind: str) -> None:
        """A pause this instance started."""
        self.provider_pauses.labels(provider=provider, kind=kind).inc()

    def provider_resume(self, provider: str) -> None:
        """A resume this instance logged."""
        self.provider_resumes.labels(provider=provider).inc()

    def provider_state(self, provider: str, paused: int, blocked: int, limit: float | None) -> None:
        """The shared state of a provider label."""
        self.provider_paused.labels(provider=provider).set(paused)
        self.provider_blocked.labels(provider=provider).set(blocked)
        if limit is None:
            with contextlib.suppress(KeyError):
                self.provider_rate.remove(provider)
        else:
            self.provider_rate.labels(provider=provider).set(limit)

    def held(self, hold: str, n: int) -> None:
        """Entries waiting in a hold."""
        self.held_messages.labels(hold=hold).set(n)

    def lookup(self, outcome: str) -> None:
        """One provider lookup."""
        self.provider_lookups.labels(outcome=outcome).inc()
