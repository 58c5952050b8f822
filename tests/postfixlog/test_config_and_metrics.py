"""PostfixLog's configuration section, CLI and metrics endpoint."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.metrics import serve
from common.queue import Queues
from devtools import testing
from devtools.servers import wait_until
from devtools.sink import Sink

from .conftest import RunningService, events_of, outbound

ORIGINAL_METRICS = (
    "postfix_incoming_queue_messages",
    "postfix_active_queue_messages",
    "postfix_deferred_queue_messages",
    "postfix_corrupt_queue_messages",
    "postfix_hold_queue_messages",
    "postfix_emails_polled_total",
    "postfix_emails_to_postfix_total",
    "memory_usage_percent",
)


def _write(tmp_path: Path, customer: dict[str, Any]) -> tuple[Path, Path]:
    return testing.write_configs(tmp_path / "cfg", customer)


@pytest.mark.parametrize(
    ("main_cf", "message"),
    [
        ({"inet_interfaces": "all"}, "'inet_interfaces' is managed by PostfixLog"),
        ({"mynetworks": "0.0.0.0/0"}, "'mynetworks' is managed by PostfixLog"),
        ({"Bad-Name": "x"}, "'Bad-Name' is not a Postfix parameter name"),
        ({"smtpd_banner": "a\nrelayhost = [evil]"}, "'smtpd_banner' must be a single line"),
    ],
)
def test_dangerous_overrides_are_refused_naming_file_and_key(
    tmp_path: Path, customer_dict: dict[str, Any], main_cf: dict[str, Any], message: str
) -> None:
    customer = testing.merge(customer_dict, {"postfixlog": {"string-replacer": {"main-cf": main_cf}}})
    gpath, cpath = _write(tmp_path, customer)
    with pytest.raises(ConfigError) as raised:
        load_config(gpath, cpath, service="postfixlog")
    problem = "\n".join(raised.value.problems)
    assert str(cpath) in problem
    assert "postfixlog.string-replacer.main-cf" in problem
    assert message in problem


def test_original_keys_still_load(tmp_path: Path, customer_dict: dict[str, Any]) -> None:
    # The original's section: logfile (dead key), postfix host/port, myhostname/mailname, smtpd-port.
    section = {
        "logfile": "/var/log/mail.log",
        "reliable-queue": {"redis": {"hostname": "redis", "port": 6379}},
        "postfix": {"hostname": "localhost", "port": 25},
        "prometheus": {"inet-interface": "0.0.0.0", "inet-port": 9090},
        "string-replacer": {
            "main-cf": {"myhostname": "mx.example.com", "mailname": "example.com", "smtputf8_enable": False},
            "master-cf": {"smtpd-port": 25},
        },
    }
    customer = {**customer_dict, "postfixlog": section}
    gpath, cpath = _write(tmp_path, customer)
    config = load_config(gpath, cpath, service="postfixlog")
    assert config.customer.postfixlog is not None
    assert config.customer.postfixlog.string_replacer.main_cf["smtputf8_enable"] is False


@pytest.mark.slow
def test_check_config_cli(tmp_path: Path, customer_dict: dict[str, Any]) -> None:
    gpath, cpath = _write(tmp_path, customer_dict)
    ok = subprocess.run(
        testing.service_command("postfixlog", gpath, cpath, "--check-config"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = testing.merge(customer_dict, {"postfixlog": {"postfix": {"connections": 0}}})
    gpath, cpath = _write(tmp_path / "bad", bad)
    refused = subprocess.run(
        testing.service_command("postfixlog", gpath, cpath, "--check-config"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "postfixlog.postfix.connections" in refused.stderr


@pytest.mark.postfix
@pytest.mark.redis
def test_metrics_and_health_endpoints(service_config, queues: Queues, redis_client: Any, sink: Sink) -> None:
    queues.enqueue(INCOMING, outbound("m1", ["ok@dest.test", "bounce@dest.test"]).to_fields())
    running = RunningService(service_config()).start()
    server = serve("127.0.0.1", 0, running.health, running.registry)
    try:
        wait_until(lambda: len(events_of(redis_client)) == 2, 30, what="two events")
        base = f"http://127.0.0.1:{server.port}"
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        for name in ORIGINAL_METRICS:
            assert f"\n{name} " in text or text.startswith(f"{name} "), name
        assert "postfix_emails_polled_total 1.0" in text
        assert "postfix_emails_to_postfix_total 1.0" in text
        assert 'mailer_postfixlog_events_total{event="delivered",type=""} 1.0' in text
        assert 'mailer_postfixlog_events_total{event="bounce",type="hard"} 1.0' in text
        assert 'mailer_postfixlog_recipients_total{outcome="accepted"} 2.0' in text
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    finally:
        server.close()
        assert running.stop() == 0


INCOMING = "INCOMING-TO-POSTFIX"
