"""Prometheus metrics of the Transformer (the original's names plus signing time).

``transformer_polled_primary_total`` / ``transformer_polled_default_total`` count entries read
from P0 / P1, ``transformer_pushed_total`` messages handed to Postfix's queue,
``transformer_warnings_total`` recoverable oddities (a client's List-Unsubscribe replaced, a
part the beacon could not enter, an ignored config entry).

``mailer_transformer_reencoded_total{what="body-part|header"}`` counts what the wire form
(:mod:`transformer.wire`) had to re-encode so that no MTA after us changes a byte,
``mailer_transformer_smtputf8_total`` the messages that need SMTPUTF8 (a non-ASCII local part),
``mailer_transformer_customer_signatures_total{outcome="kept|removed"}`` the customers' own
DKIM-Signatures (:mod:`transformer.customersig`), ``mailer_transformer_suppressed_total{reason}``
the recipients not sent to because of the suppression list (:mod:`common.suppression`).
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
        self.reencoded = Counter(
            "mailer_transformer_reencoded",
            "Body parts (quoted-printable/base64) and header fields (RFC 2047/2231, IDNA) re-encoded "
            "for a wire form no MTA changes",
            ["what"],
            registry=registry,
        )
        self.smtputf8 = Counter(
            "mailer_transformer_smtputf8", "Messages that need SMTPUTF8 (a non-ASCII local part)", registry=registry
        )
        self.customer_signatures = Counter(
            "mailer_transformer_customer_signatures",
            "The sender's own DKIM-Signatures: kept (nothing they cover changed) or removed",
            ["outcome"],
            registry=registry,
        )
        self.suppressed = Counter(
            "mailer_transformer_suppressed",
            "Recipients not sent to: on the suppression list (a suppressed event instead)",
            ["reason"],
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
