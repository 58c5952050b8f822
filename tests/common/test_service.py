"""The one service bootstrap (common.service.run_service) and the shared command-line options."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from common import logs
from common.errors import ConfigError
from common.lifecycle import Stopper
from common.service import Context, ServiceSpec, run_service
from common.version import __version__
from devtools import testing
from devtools.servers import free_port, wait_until

COMMANDS = [
    "receiver",
    "httpreceiver",
    "transformer",
    "postfixlog",
    "mxserver",
    "backdata",
    "redis-sidecar",
    "mailer-queue",
    "transformer-dkim",
    "mailer-stack",
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.slow
def test_every_command_prints_its_version(command: str) -> None:
    binary = Path(sys.executable).parent / command
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{command} {__version__}"


class Fake:
    """A service that records being run and waits for its stopper."""

    def __init__(self, context: Context, address: tuple[str, int] | None) -> None:
        self.context = context
        self.metrics_address = address
        self.ran = threading.Event()

    def run(self) -> int:
        self.ran.set()
        self.context.health.beat()
        self.context.stopper.wait(30)
        return 7


def _argv(config: Any, *extra: str) -> list[str]:
    return [
        "--global-config-file",
        str(config.global_path),
        "--customer-config-file",
        str(config.customer_path),
        *extra,
    ]


def test_check_config_builds_the_service_but_does_not_run_it(make_config, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(service="backdata")
    built: list[Fake] = []

    def build(context: Context) -> Fake:
        built.append(Fake(context, None))
        return built[-1]

    assert run_service(ServiceSpec("backdata", "doc", build), _argv(config, "--check-config")) == 0
    assert "backdata: configuration OK" in capsys.readouterr().out
    assert len(built) == 1 and not built[0].ran.is_set()


def test_a_problem_found_by_build_is_reported_like_a_file_problem(
    make_config, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(service="backdata")

    def build(context: Context) -> Fake:
        raise ConfigError([f"{context.config.customer_path}: backdata.thing: cannot be used"])

    for extra in ((), ("--check-config",)):
        assert run_service(ServiceSpec("backdata", "doc", build), _argv(config, *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("backdata: invalid configuration:\n")
        assert f"  {config.customer_path}: backdata.thing: cannot be used" in err


def test_runs_the_service_serves_metrics_and_stops_on_request(make_config, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(service="backdata")
    port = free_port()
    services: list[Fake] = []

    def build(context: Context) -> Fake:
        services.append(Fake(context, ("127.0.0.1", port)))
        return services[-1]

    # Signal handlers can only be installed from the main thread; this test runs the service in another.
    monkeypatch.setattr(Stopper, "install", lambda self, *signals: self)
    status: list[int] = []
    spec = ServiceSpec("backdata", "doc", build)
    thread = threading.Thread(target=lambda: status.append(run_service(spec, _argv(config))), daemon=True)
    thread.start()
    wait_until(lambda: bool(services) and services[0].ran.is_set(), 10, what="service running")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert b"memory_usage_percent" in reply.read()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
        assert reply.status == 200
    services[0].context.stopper.stop()
    thread.join(10)
    assert status == [7]


@pytest.mark.slow
def test_bad_key_fails_transformer_check_config(make_config, tmp_path: Path) -> None:
    # The Transformer's keys are loaded by build: --check-config and a real start fail alike (exit 2).
    config = make_config(service="transformer")
    Path(config.customer.transformer.domain_settings[0].dkim_private_key_file).write_text("not a key")
    for extra in (("--check-config",), ()):
        done = subprocess.run(
            testing.service_command("transformer", config.global_path, config.customer_path, *extra),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "transformer: invalid configuration:" in done.stderr
        assert "dkim-private-key-file" in done.stderr


def test_json_log_lines_carry_message_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info(
        "signed %s", "u1", extra=logs.fields(uuid="u1", queue="Q", entry_id="1-0", recipient="Alice@Example.org")
    )
    record = json.loads(stream.getvalue())
    assert record["uuid"] == "u1" and record["queue"] == "Q" and record["entry_id"] == "1-0"
    assert record["recipient_hash"] == logs.recipient_hash("alice@example.org")
    assert "Alice" not in stream.getvalue() and "alice" not in stream.getvalue()
