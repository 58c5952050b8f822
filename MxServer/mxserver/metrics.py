"""MxServer's Prometheus metrics (one instance per process, on an explicit registry).

The original's names are kept: ``mxserver_received_unsubscribe_total``,
``mxserver_received_spam_total``, ``mxserver_received_autoreply_total``,
``mxserver_received_unclassified_total`` and ``mxserver_warnings_total``.  Metrics added since
are named ``mailer_mxserver_…``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mxserver.verification import REASONS, Outcome


class MxMetrics:
    """Counters of received mail by outcome, refused recipients, temporary failures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.unsubscribe = Counter("mxserver_received_unsubscribe", "Unsubscribe mails received", registry=r)
        self.spam = Counter("mxserver_received_spam", "Spam reports (ARF/JMRP) received", registry=r)
        self.autoreply = Counter("mxserver_received_autoreply", "Automatic replies received", registry=r)
        self.unclassified = Counter(
            "mxserver_received_unclassified", "Mails kept in the eml directory (not classified)", registry=r
        )
        self.bounce = Counter(
            "mailer_mxserver_received_bounce", "Bounce reports (DSN or text) received", ["report"], registry=r
        )
        self.deferred = Counter("mailer_mxserver_received_deferred", "Delay notices received", ["report"], registry=r)
        self.events = Counter(
            "mailer_mxserver_events", "Events written to the event queue", ["event", "type"], registry=r
        )
        self.rejected = Counter(
            "mailer_mxserver_rejected_recipients",
            "RCPT TO refused (relay, forged tag, unknown)",
            ["reason"],
            registry=r,
        )
        self.temporary_failures = Counter(
            "mailer_mxserver_temporary_failures",
            "Mails answered with a 4xx (Redis or disk unavailable)",
            ["cause"],
            registry=r,
        )
        self.warnings = Counter("mxserver_warnings", "Unexpected problems (see the log)", registry=r)
        self.sessions = Gauge("mailer_mxserver_sessions", "Open SMTP sessions", registry=r)
        self.connections_refused = Counter(
            "mailer_mxserver_connections_refused",
            "Connections refused at connect with 421, by reason (busy, per-ip)",
            ["reason"],
            registry=r,
        )
        self.eml_files = Gauge("mailer_mxserver_eml_directory_files", "Files in the eml directory", registry=r)
        self.eml_bytes = Gauge("mailer_mxserver_eml_directory_bytes", "Bytes in the eml directory", registry=r)
        self.unverified = Counter(
            "mailer_mxserver_unverified",
            "Recognised reports that did not verify (kept, no event), by reason",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.unverified.labels(reason)
        self.own_reports = Counter(
            "mailer_mxserver_own_reports",
            "Reports written by our own Postfix (already known from its log; no event)",
            registry=r,
        )
        self.classify_seconds = Histogram(
            "mailer_mxserver_classify_seconds",
            "Time to classify one mail in a worker process (queueing for a worker included)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.workers_replaced = Counter(
            "mailer_mxserver_classifier_workers_replaced",
            "Classifier worker processes replaced, by cause (overrun of the time budget, crash)",
            ["cause"],
            registry=r,
        )

    def count(self, result: Outcome) -> None:
        """Count one received mail by its outcome and the events it produced."""
        if result.kind == "unsubscribe":
            self.unsubscribe.inc()
        elif result.kind == "spam-report":
            self.spam.inc()
        elif result.kind == "autoreply":
            self.autoreply.inc()
        elif result.kind == "bounce":
            self.bounce.labels(result.report).inc()
        elif result.kind == "deferred":
            self.deferred.labels(result.report).inc()
        elif result.kind == "unverified":
            self.unverified.labels(result.reason or "no-tag").inc()
        elif result.kind == "own-report":
            self.own_reports.inc()
        else:
            self.unclassified.inc()
        for event in result.events:
            self.events.labels(event.event, event.type or "").inc()
