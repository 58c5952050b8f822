"""Receiver metrics: the original names plus reasons, in one or several processes.

Original names (dashboards and alerts use them): ``nbr_emails_enqueued_total``,
``nbr_recipients_total`` (To + Cc addresses of accepted mail), ``nbr_dropped_emails_total``
(messages whose DATA did not end in ``250``: rejected, too big, or refused for a temporary
reason), ``receiver_warnings_total`` (failed AUTH) and ``memory_usage_percent``.  Added:
``mailer_receiver_auth_failures_total{reason}``, ``mailer_receiver_rejections_total{rule}``,
``mailer_receiver_temporary_failures_total{reason}``, ``mailer_receiver_enqueue_seconds``,
``mailer_receiver_connections_refused_total{reason}`` and ``mailer_receiver_sessions``.

With several worker processes every worker writes its counters to
``PROMETHEUS_MULTIPROC_DIR`` and the supervisor serves their sum.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.metrics import memory_usage_percent


@dataclass
class ReceiverMetrics:
    """Counters of one Receiver process (created in the process that counts)."""

    registry: CollectorRegistry
    enqueued: Counter = field(init=False)
    recipients: Counter = field(init=False)
    dropped: Counter = field(init=False)
    warnings: Counter = field(init=False)
    auth_failures: Counter = field(init=False)
    rejections: Counter = field(init=False)
    temporary_failures: Counter = field(init=False)
    enqueue_seconds: Histogram = field(init=False)
    connections_refused: Counter = field(init=False)
    sessions: Gauge = field(init=False)

    def __post_init__(self) -> None:
        reg = self.registry
        self.enqueued = Counter("nbr_emails_enqueued", "Mails put on the P0/P1 queues", registry=reg)
        self.recipients = Counter("nbr_recipients", "To + Cc addresses of enqueued mails", registry=reg)
        self.dropped = Counter(
            "nbr_dropped_emails", "Mails refused at the end of DATA (rejected or temporary failure)", registry=reg
        )
        self.warnings = Counter("receiver_warnings", "Failed SMTP AUTH attempts", registry=reg)
        self.auth_failures = Counter(
            "mailer_receiver_auth_failures", "Refused SMTP AUTH attempts, by reason", ["reason"], registry=reg
        )
        self.rejections = Counter(
            "mailer_receiver_rejections", "Messages rejected permanently, by rule", ["rule"], registry=reg
        )
        self.temporary_failures = Counter(
            "mailer_receiver_temporary_failures",
            "Messages refused with a 4xx (queue unavailable or full), by reason",
            ["reason"],
            registry=reg,
        )
        self.connections_refused = Counter(
            "mailer_receiver_connections_refused",
            "Connections refused at connect with 421, by reason (busy, per-ip)",
            ["reason"],
            registry=reg,
        )
        self.sessions = Gauge(
            "mailer_receiver_sessions",
            "Open SMTP sessions (summed over worker processes)",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.enqueue_seconds = Histogram(
            "mailer_receiver_enqueue_seconds",
            "Time from end of DATA to the message being durable in Redis",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2, 10),
            registry=reg,
        )


class MemoryCollector(Collector):
    """The original's ``memory_usage_percent``, computed at scrape time (works in multiprocess mode)."""

    def collect(self) -> Iterator[Metric]:
        """Yield the gauge."""
        yield GaugeMetricFamily("memory_usage_percent", "Host memory in use, percent", value=memory_usage_percent())


def enable_multiprocess(directory: Path) -> None:
    """Switch this process (and children forked later) to multiprocess metrics in ``directory``.

    ``prometheus_client`` picks its value class when it is imported, from the environment; a
    supervisor that decides on multiprocess mode at run time re-picks it here, before any metric
    exists.  Files of earlier runs are removed so counters start at zero, as in the original.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_registry() -> CollectorRegistry:
    """What the supervisor serves: the workers' summed counters plus the memory gauge."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(MemoryCollector())
    return registry


def mark_dead(pid: int) -> None:
    """Forget live-gauge samples of a worker that exited (counters are kept)."""
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
