"""Dashboard and alert rules: valid PromQL, tested alerts, and only metrics the services export.

The original's dashboard queried a metric under the wrong panel and its ServiceMonitor scraped
the wrong port; here every metric a panel or a rule queries is looked up in the registries the
services really build.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from common import keys
from common.config.globalfile import GlobalConfig
from common.metrics import register_memory_gauge
from common.queue import Queues
from common.worker import WorkerMetrics
from tests.infra.repo import ROOT, load_yaml, tool

DATA = ROOT / "tests" / "data" / "infra"
DASHBOARD = ROOT / "Grafana" / "Inboxbooster-Dashboard.json"
RULES = ROOT / "Grafana" / "prometheusRule.yaml"
#: Series Prometheus makes itself.
BUILTIN = {"up"}
#: Series of the standard Redis exporter, the Redis pod's second exporter container.
REDIS_EXPORTER = {
    line.strip()
    for line in (DATA / "redis-exporter-metrics.txt").read_text().splitlines()
    if line.strip()[:1].isalpha()
}


# -- what the services export ----------------------------------------------------------------


def registries(queues: Queues) -> dict[str, CollectorRegistry]:
    """Each service's metrics, built the way the service builds them (fresh registries)."""
    from backdata.metrics import BackDataMetrics, BacklogCollector
    from httpreceiver.metrics import HttpMetrics
    from mxserver.metrics import MxMetrics
    from postfixlog.metrics import PostfixLogMetrics
    from receiver.metrics import MemoryCollector, ReceiverMetrics
    from redis_sidecar.exporter import RedisMetrics
    from transformer.metrics import TransformerMetrics

    def registry(*builders: Any) -> CollectorRegistry:
        reg = CollectorRegistry()
        for build in builders:
            build(reg)
        return reg

    cfg = GlobalConfig()
    return {
        "redis": registry(lambda r: RedisMetrics(queues, cfg, r), register_memory_gauge),
        "backdata": registry(
            BackDataMetrics,
            lambda r: WorkerMetrics("backdata", r),
            register_memory_gauge,
            lambda r: r.register(BacklogCollector(queues, cfg.backdata.queue_name, keys.GROUP_BACKDATA)),
        ),
        "mxserver": registry(MxMetrics, register_memory_gauge),
        "postfixlog": registry(
            lambda r: PostfixLogMetrics(r, lambda: {}), lambda r: WorkerMetrics("postfixlog", r), register_memory_gauge
        ),
        "transformer": registry(TransformerMetrics, lambda r: WorkerMetrics("transformer", r), register_memory_gauge),
        "receiver": registry(ReceiverMetrics, lambda r: r.register(MemoryCollector())),
        "httpreceiver": registry(HttpMetrics),
    }


def _series_names(family: Metric) -> Iterator[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
    }.get(family.type, ("",))
    yield from (family.name + s for s in suffixes)
    yield from (s.name for s in family.samples)


@pytest.fixture
def exported(queues: Queues) -> dict[str, set[str]]:
    """Series names per service (Redis running, so scrape-time collectors report too)."""
    return {
        service: {name for family in reg.collect() for name in _series_names(family)}
        for service, reg in registries(queues).items()
    }


# -- what the dashboard and the rules query ----------------------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (queue) (rate(x_total{a="b", c=~"d|e"}[5m])) / on() group_left y', {"x_total", "y"}),
        ("deriv(queue_depth[30m]) > 0 and queue_depth > 1000", {"queue_depth"}),
        ("a / (b > 0) > 0.8", {"a", "b"}),
        ('max_over_time(m{job="by"}[5m] offset 1h)', {"m"}),
        ("histogram_quantile(0.9, sum without (le2) (rate(h_bucket[1m])))", {"h_bucket"}),
        ("1e3 * scalar(v)", {"v"}),
    ],
)
def test_metric_names_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def _rules() -> list[dict[str, Any]]:
    (rule,) = load_yaml(RULES)
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


@pytest.mark.redis
def test_every_dashboard_and_alert_metric_is_exported(exported: dict[str, set[str]]) -> None:
    everything = set().union(*exported.values()) | BUILTIN | REDIS_EXPORTER
    queried = [(f"panel {title!r}", expr) for title, expr in _dashboard_exprs()]
    queried += [(f"alert {r['alert']}", r["expr"]) for r in _rules()]
    missing = [(where, sorted(metric_names(expr) - everything)) for where, expr in queried]
    assert [m for m in missing if m[1]] == []
    assert len(queried) > 40


@pytest.mark.redis
def test_the_original_metric_names_are_still_exported(exported: dict[str, set[str]]) -> None:
    everything = set().union(*exported.values())
    names = [
        line.strip() for line in (DATA / "original-metrics.txt").read_text().splitlines() if line.strip()[:1].isalpha()
    ]
    assert len(names) == 35
    assert [n for n in names if n not in everything] == []


@pytest.mark.redis
def test_the_check_can_fail(exported: dict[str, set[str]]) -> None:
    # The original's dashboard queried an "autoreply" series that no module had; here it is real.
    everything = set().union(*exported.values())
    assert "mxserver_received_autoreply_total" in everything
    assert "mxserver_received_autoreplies_total" not in everything


# -- the dashboard ------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            # Job names differ between installations (the original hard-coded and mixed them).
            assert "job=" not in target["expr"], panel["title"]


def _promtool() -> str:
    return tool("promtool", package="Debian: apt-get install prometheus")


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:panel{i}", "expr": expr} for i, (_, expr) in enumerate(_dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the alert rules ----------------------------------------------------------------------------


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    (rule,) = load_yaml(RULES)
    path = tmp_path / "inboxbooster-mailer.rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_promtool_check_rules(rules_file: Path) -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_promtool_test_rules(rules_file: Path, tmp_path: Path) -> None:
    # Unit tests of the alerts (tests/data/infra/alerts.test.yaml), run by promtool itself.
    tests = yaml.safe_load((DATA / "alerts.test.yaml").read_text())
    tests["rule_files"] = [str(rules_file)]
    path = tmp_path / "alerts.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_and_text() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["alert"].startswith("Mailer"), rule["alert"]
