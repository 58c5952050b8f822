"""Prometheus metrics of the Transformer (the original's names plus signing time).

``transformer_polled_primary_total`` / ``transformer_polled_default_total`` count entries read
from P0 / P1, ``transformer_pushed_total`` messages handed to Postfix's queue,
``transformer_warnings_total`` recoverable oddities (a client's List-Unsubscribe replaced, a
part the beacon could not enter, an ignored config entry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_SECONDS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)


class TransformerMetrics:
    """The Transformer's metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.polled_primary = Counter(
            "transformer_polled_primary", "Messages read from the priority queue (P0)", registry=registry
        )
        self.polled_default = Counter(
            "transformer_polled_default", "Messages read from the default queue (P1)", registry=registry
        )
        self.pushed = Counter("transformer_pushed", "Signed messages handed to the Postfix queue", registry=registry)
        self.warnings = Counter("transformer_warnings", "Recoverable problems (see the log)", registry=registry)
        self.failed = Counter(
            "mailer_transformer_failed",
            "Unprocessable messages dead-lettered with an error event",
            registry=registry,
        )
        self.beacons = Counter(
            "mailer_transformer_beacons_inserted",
            "Open-tracking beacons inserted (one per HTML part)",
            registry=registry,
        )
        self.signing_seconds = Histogram(
            "mailer_transformer_signing_seconds",
            "Time to DKIM-sign one message (all its signatures)",
            buckets=_SECONDS,
            registry=registry,
        )
        self.transform_seconds = Histogram(
            "mailer_transformer_transform_seconds",
            "Time to transform one message (parse, headers, beacon, signing)",
            buckets=_SECONDS,
            registry=registry,
        )
