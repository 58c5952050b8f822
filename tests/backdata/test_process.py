"""BackData as a real process with real config files: kill -9, SIGTERM, health, replay CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from backdata.__main__ import main
from common.config import Config
from devtools import testing
from devtools.servers import free_port, port_open, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # main() installs the service's log handler on the root logger; undo it after the test.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _spawn(config: Config, started: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "INBOXBOOSTER_CONSUMER_NAME": "backdata-test", "INBOXBOOSTER_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        testing.service_command("backdata", config.global_path, config.customer_path, *args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    started.append(proc)
    return proc


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_kill_9_during_retries_then_restart_loses_nothing(
    backdata_config, bd, webhook, event_queues, processes
) -> None:
    webhook.set_responder(lambda _: (500, {}, 0.0))
    sent = bd.enqueue(bd.events(100))
    config = backdata_config(batch_size=20)
    first = _spawn(config, processes)
    wait_until(lambda: len(webhook.requests) >= 3, 20, what="retries")
    assert event_queues.stats(bd.queue, "backdata").pending == 20
    first.kill()
    first.wait(10)
    assert event_queues.length(bd.queue) == 100  # nothing acknowledged without delivery
    webhook.set_responder(lambda _: (200, {}, 0.0))
    second = _spawn(config, processes)
    wait_until(lambda: sent <= bd.received_ids(webhook), 20, what="every event after restart")
    wait_until(lambda: event_queues.length(bd.queue) == 0, 10)
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
    assert event_queues.stats(bd.queue, "backdata").dead == 0


def test_sigterm_during_a_post_finishes_it_and_exits_zero(
    backdata_config, bd, webhook, event_queues, processes
) -> None:
    webhook.set_responder(lambda _: (200, {}, 1.5))
    sent = bd.enqueue(bd.events(10))
    proc = _spawn(backdata_config(timeout_seconds=10), processes)
    wait_until(lambda: len(webhook.requests) >= 1, 20, what="a POST in flight")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert sent == bd.received_ids(webhook)
    assert event_queues.length(bd.queue) == 0


def test_sigterm_during_backoff_exits_at_once_keeping_events(
    backdata_config, bd, webhook, event_queues, processes
) -> None:
    webhook.set_responder(lambda _: (503, {"Retry-After": "120"}, 0.0))
    bd.enqueue(bd.events(5))
    proc = _spawn(backdata_config(), processes)
    wait_until(lambda: len(webhook.requests) >= 1, 20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    stats = event_queues.stats(bd.queue, "backdata")
    assert (stats.length, stats.dead) == (5, 0)


def test_health_readiness_and_metrics_endpoints(backdata_config, bd, webhook, processes) -> None:
    port = free_port()
    proc = _spawn(backdata_config(prometheus={"inet-interface": "127.0.0.1", "inet-port": port}), processes)
    wait_until(lambda: port_open("127.0.0.1", port), 20, what="metrics port")
    sent = bd.enqueue(bd.events(3))
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    assert _get(port, "/readyz") == (200, "ok\n")
    assert _get(port, "/healthz")[0] == 200
    status, text = _get(port, "/metrics")
    assert status == 200
    for name in (
        "delivered_events_total 3.0",
        "bounced_events_total",
        "error_events_total",
        "spam_report_events_total",
        "unsubscribe_events_total",
        "malformed_events_total",
        "number_of_events_currently_posting",
        "successfully_pushed_events_total 3.0",
        "failed_pushed_events_total",
        "memory_usage_percent",
        "mailer_backdata_event_age_seconds_bucket",
        'mailer_backdata_backlog_events{state="waiting"}',
        "mailer_backdata_dead_letter_events",
    ):
        assert name in text, name
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0


def test_check_config_and_bad_config(backdata_config, tmp_path: Path) -> None:
    config = backdata_config()
    ok = subprocess.run(
        testing.service_command("backdata", config.global_path, config.customer_path, "--check-config"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("backdata:\n  post-url: ftp://nowhere\n  webhook-secret: 'whsec_'\n")
    failed = subprocess.run(
        testing.service_command("backdata", config.global_path, bad, "--check-config"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert failed.returncode == 2
    assert f"{bad}: backdata.post-url: must be an absolute http:// or https:// URL" in failed.stderr
    assert f"{bad}: backdata.webhook-secret: not a Standard Webhooks secret" in failed.stderr


def test_dead_letter_after_max_age_then_replay(
    start_backdata, backdata_config, bd, webhook, event_queues, capsys: pytest.CaptureFixture[str]
) -> None:
    webhook.set_responder(lambda _: (500, {}, 0.0))
    sent = bd.enqueue(bd.events(4))
    config = backdata_config(max_age_seconds=1)
    running = start_backdata(config)
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").dead == 4, 15, what="dead letters")
    assert event_queues.length(bd.queue) == 0
    assert running.metric("mailer_backdata_dead_lettered_events_total", reason="max-age") == 4
    assert running.metric("mailer_backdata_dead_letter_events") == 4
    assert bd.received_ids(webhook) == set()
    webhook.set_responder(lambda _: (200, {}, 0.0))
    files = ["--global-config-file", str(config.global_path), "--customer-config-file", str(config.customer_path)]

    assert main([*files, "replay", "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 4 and all("max-age-seconds=1" in line for line in listing)
    first_id = listing[0].split()[0]
    first_event = json.loads(event_queues.dead_letters(bd.queue, 1)[0].fields[b"data"])["event_id"]

    assert main(["replay", "--id", first_id, *files]) == 0
    wait_until(lambda: bd.received_ids(webhook) == {first_event}, 10)
    assert main([*files, "replay", "--id", first_id]) == 1  # already replayed: reported
    assert main([*files, "replay"]) == 0
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    assert "replayed 3 dead-lettered entries of EVENT_QUEUE" in capsys.readouterr().out
    # Received by the webhook, then acknowledged (and deleted) right after: wait for that too.
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").length == 0, 10, what="replayed events acknowledged")
    assert event_queues.stats(bd.queue, "backdata").dead == 0


def test_replayed_event_gets_a_fresh_age_window(start_backdata, backdata_config, bd, webhook, event_queues) -> None:
    # An event dead-lettered for age is retried again for max-age after its replay.
    webhook.set_responder(lambda _: (500, {}, 0.0))
    bd.enqueue(bd.events(1))
    config = backdata_config(max_age_seconds=2)
    start_backdata(config)
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").dead == 1, 15)
    files = ["--global-config-file", str(config.global_path), "--customer-config-file", str(config.customer_path)]
    requests_before = len(webhook.requests)
    assert main([*files, "replay"]) == 0
    wait_until(lambda: len(webhook.requests) >= requests_before + 5, 10, what="retries after replay")
    assert event_queues.stats(bd.queue, "backdata").dead == 0  # not dead again at its first failure
    wait_until(lambda: event_queues.stats(bd.queue, "backdata").dead == 1, 15)
    (dead,) = event_queues.dead_letters(bd.queue)
    assert b"replayed-at" in dead.fields
