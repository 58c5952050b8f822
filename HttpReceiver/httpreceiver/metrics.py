"""Prometheus metrics of HttpReceiver (one instance per worker process).

Names of the original: ``nbr_emails_enqueued_total``, ``nbr_recipients_total`` (To + Cc of each
queued message) and ``nbr_dropped_emails_total`` (submissions refused with 400/413/415/422/503).
Under gunicorn the values live in ``PROMETHEUS_MULTIPROC_DIR`` and the master serves their sum
on ``httpreceiver.bind.inet-port-metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class HttpMetrics:
    """Counters of one app instance, registered in ``registry`` (never the default one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.enqueued = Counter("nbr_emails_enqueued", "Messages accepted and queued (P0 + P1)", registry=registry)
        self.recipients = Counter("nbr_recipients", "To + Cc addresses of the queued messages", registry=registry)
        self.dropped = Counter(
            "nbr_dropped_emails", "Submissions refused (invalid, too large, queue unavailable)", registry=registry
        )
        self.requests = Counter(
            "mailer_httpreceiver_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=registry,
        )
        self.rejections = Counter(
            "mailer_httpreceiver_rejections",
            "Submissions refused, by rule (x-uuid-missing, too-large, queue-full…)",
            ["rule"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "mailer_httpreceiver_auth_failures",
            "Submissions refused for credentials, by reason (no-credentials, bad-credentials, locked-out)",
            ["reason"],
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "mailer_httpreceiver_idempotent_replays",
            "Repeated submissions answered from the Idempotency-Key record (nothing queued)",
            registry=registry,
        )
        self.unsubscribes = Counter(
            "mailer_httpreceiver_unsubscribes",
            "One-click unsubscribe requests by outcome (accepted, forged, unavailable)",
            ["outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "mailer_httpreceiver_request_seconds",
            "Time to answer a request, by endpoint",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=registry,
        )
