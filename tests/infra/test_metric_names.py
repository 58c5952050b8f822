"""Metric names: the original's are kept exactly, every new one is ``mailer_<service>_…``.

Every metric each service registers (built the way the service builds it) is either a name of
the original system (``tests/data/infra/original-metrics.txt``) or starts with
``mailer_<that service>_``.  So no name of ours collides with the standard Redis exporter
(``redis_…``) or another exporter, and a series names the service that exports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from prometheus_client.metrics_core import Metric

from common.queue import Queues
from redis_sidecar.backup import LAST_BACKUP_KEY
from tests.infra.repo import MODULES, ROOT
from tests.infra.test_monitoring import DATA, registries

SERVICES = ("receiver", "httpreceiver", "transformer", "postfixlog", "mxserver", "backdata", "redis")
ORIGINAL = frozenset(
    line.strip() for line in (DATA / "original-metrics.txt").read_text().splitlines() if line.strip()[:1].isalpha()
)


#: The worker loop's metrics (common/worker.py) are renamed to ``mailer_<service>_worker_…`` with
#: the service bootstrap of issue 21; until then they are the one known exception.
def exposed_name(family: Metric) -> str:
    """The name a family is known by: counters with their ``_total``."""
    return family.name + "_total" if family.type == "counter" else family.name


def allowed(name: str, service: str) -> bool:
    """An original name, or one under the service's own ``mailer_<service>_`` prefix."""
    return name in ORIGINAL or re.fullmatch(rf"mailer_{service}_[a-z0-9_]+", name) is not None


@pytest.fixture
def registered(queues: Queues) -> dict[str, set[str]]:
    """Metric names per service (a backup recorded, so every scrape-time family has a value)."""
    queues.redis.set(LAST_BACKUP_KEY, 1_700_000_000)
    return {service: {exposed_name(f) for f in reg.collect()} for service, reg in registries(queues).items()}


def test_the_original_list_is_the_originals() -> None:
    assert len(ORIGINAL) == 35
    assert {"nbr_emails_enqueued_total", "primary_queue_messages", "memory_usage_percent"} <= ORIGINAL


def test_the_rule() -> None:
    assert allowed("mxserver_received_spam_total", "mxserver")  # original
    assert allowed("mailer_mxserver_sessions", "mxserver")
    assert not allowed("mxserver_sessions", "mxserver")  # new, but not under mailer_
    assert not allowed("mailer_backdata_posts_total", "mxserver")  # another service's prefix
    assert not allowed("redis_up", "redis")  # the standard Redis exporter's
    assert not allowed("mailer_worker_entries_total", "transformer")


@pytest.mark.redis
def test_every_registered_metric_is_original_or_under_its_service(registered: dict[str, set[str]]) -> None:
    assert set(registered) == set(SERVICES)
    wrong = sorted(
        (service, name) for service, names in registered.items() for name in names if not allowed(name, service)
    )
    assert wrong == []
    assert sum(len(names) for names in registered.values()) > 60


_DECLARATION = re.compile(
    r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum|GaugeMetricFamily|CounterMetricFamily|counter)"
    r'\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"'
)


def _declared() -> Iterator[tuple[str, str]]:
    """(file, name) of every metric declared with a literal name in the services and common."""
    packages = ["common/common", *(f"{m.folder}/{m.package.replace('-', '_')}" for m in MODULES)]
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            for match in _DECLARATION.finditer(path.read_text()):
                yield path.relative_to(ROOT).as_posix(), match.group(1)


@pytest.mark.redis
def test_the_registries_cover_every_declared_metric(registered: dict[str, set[str]]) -> None:
    # A metric declared somewhere the registries above do not build would escape the rule.
    everything = {re.sub(r"_total$", "", n) for names in registered.values() for n in names}
    declared = list(_declared())
    assert len(declared) > 40
    assert [(path, name) for path, name in declared if name not in everything] == []
