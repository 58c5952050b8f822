"""The ``transformer`` console script: config check, real run against Redis, metrics, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from common.payloads import OutboundMail, SubmittedMail
from devtools import testing
from devtools.servers import free_port, wait_until

RAW = b"From: news@example.test\r\nTo: a@dest.test\r\nSubject: hi\r\nX-Uuid: svc1\r\n\r\nbody\r\n"


def _files(tmp_path: Path, customer: dict[str, Any]) -> list[str]:
    gpath, cpath = testing.write_configs(tmp_path / "configs", customer)
    return ["--global-config-file", str(gpath), "--customer-config-file", str(cpath)]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "transformer", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_check_config_accepts_a_good_file_and_names_a_bad_key(tmp_path: Path, customer_dict: dict[str, Any]) -> None:
    ok = _run([*_files(tmp_path, customer_dict), "--check-config"])
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    broken = testing.merge(customer_dict, {})
    broken["transformer"]["domain-settings"][0]["beacon-url"] = "https://t.test/{{campaign}}.gif"
    broken["transformer"]["email-headers"] = {"inject": {"Message-ID": "<x>"}}
    bad = _run([*_files(tmp_path / "bad", broken), "--check-config"])
    assert bad.returncode == 2
    assert "transformer.domain-settings[0].beacon-url: unknown placeholder {{campaign}}" in bad.stderr
    assert "transformer.email-headers.inject: header Message-ID is written by the Transformer" in bad.stderr


@pytest.mark.redis
@pytest.mark.slow
def test_console_script_transforms_serves_metrics_and_stops_on_sigterm(
    tmp_path: Path, customer_dict: dict[str, Any], redis_client: redis.Redis
) -> None:
    port = free_port()
    customer = testing.merge(
        customer_dict,
        {"transformer": {"prometheus": {"inet-interface": "127.0.0.1", "inet-port": port}}},
    )
    customer["transformer"]["email-headers"] = {
        "inject": {"List-Unsubscribe": "<mailto:unsub-{{uuid}}@{{from-domain}}>"}
    }
    client: Any = redis_client
    client.xadd("IB-MAIL-QUEUE-P1", SubmittedMail(RAW, "svc1", 1, "smtp", 1.0).to_fields())
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformer", *_files(tmp_path, customer)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: redis_client.xlen("INCOMING-TO-POSTFIX") == 1, timeout_s=20, what="hand-off")
        ((_, fields),) = client.xrange("INCOMING-TO-POSTFIX")
        assert OutboundMail.from_fields(fields).uuid == "svc1"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "transformer_pushed_total 1.0" in metrics
        assert "transformer_polled_default_total 1.0" in metrics
        assert "transformer_warnings_total 1.0" in metrics  # the ignored inject List-Unsubscribe
        assert "mailer_transformer_signing_seconds_bucket" in metrics
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert stderr.count("email-headers.inject.List-Unsubscribe is ignored") == 1
    assert "received SIGTERM" in stderr
