"""Fixtures of the HttpReceiver tests: the worker's application on the test Redis, and a real gunicorn.

``app``/``client`` run in-process the application a gunicorn worker runs (the send endpoint in
the event loop, the others through the bridge and Flask: :func:`httpreceiver.app.create_api`),
under werkzeug's test client, against the session's real redis-server; ``Gunicorn`` starts the
``httpreceiver`` console script (master + workers) on free loopback ports, as in production.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

from common.config import Config, RedisServer
from common.queue import AsyncQueues, Queues, QueueSettings, ReplicaAck, connect, connect_async
from devtools import testing
from devtools.asgi import AsgiAsWsgi
from devtools.servers import free_port, port_open, wait_until
from httpreceiver.app import Backends, create_api

P0, P1, EVENTS = "IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1", "EVENT_QUEUE"
USER, PASSWORD = testing.RECEIVER_USER, testing.RECEIVER_PASSWORD


def basic(user: str = USER, password: str = PASSWORD) -> str:
    """An ``Authorization`` header value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def headers(**extra: str) -> dict[str, str]:
    """Headers of a valid submission (plus ``extra``; underscores become dashes)."""
    out = {"Authorization": basic(), "Content-Type": "message/rfc822"}
    out.update({k.replace("_", "-"): v for k, v in extra.items()})
    return out


def message(uuid: str = "abc123", *, priority: str | None = None, body: bytes = b"Hello.\r\n") -> bytes:
    """A valid message from the configured sending domain."""
    head = f"From: News <news@{testing.SENDER_DOMAIN}>\r\nTo: someone@dest.test\r\nSubject: test\r\nX-Uuid: {uuid}\r\n"
    if priority is not None:
        head += f"X-Priority: {priority}\r\n"
    return head.encode() + b"\r\n" + body


def entries(client: redis.Redis, queue: str) -> list[dict[bytes, bytes]]:
    """Fields of every entry of ``queue``."""
    rows: Any = client.xrange(queue)
    return [fields for _, fields in rows]


@pytest.fixture
def http_config(make_config: Callable[..., Config]) -> Callable[..., Config]:
    """Factory: the test configuration with ``httpreceiver`` overrides."""

    def make(
        section: dict[str, Any] | None = None,
        global_override: dict[str, Any] | None = None,
        customer_override: dict[str, Any] | None = None,
    ) -> Config:
        override = testing.merge(customer_override or {}, {"httpreceiver": section or {}})
        return make_config(override, global_override, service="httpreceiver")

    return make


@dataclass
class AppUnderTest:
    """An in-process app, its registry and its Redis."""

    app: AsgiAsWsgi
    client: Client
    registry: CollectorRegistry
    redis: redis.Redis

    @property
    def flask(self) -> Flask:
        """The Flask app behind the bridge (every endpoint but the send endpoint)."""
        flask_app: Flask = self.app.app.bridge.app  # type: ignore[attr-defined]
        return flask_app

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (0 when absent)."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0


def backends_on(server: RedisServer, settings: QueueSettings, ack: ReplicaAck | None = None) -> Backends:
    """Both clients of a worker on ``server`` (e.g. one nobody listens on), with ``ack``."""
    return Backends(
        Queues(connect(server), settings, ack=ack),
        AsyncQueues(connect_async(server), settings, ack=ack, coalesce=True),
    )


def redis_down() -> RedisServer:
    """A Redis address nobody listens on."""
    return RedisServer(hostname="127.0.0.1", port=free_port(), socket_timeout=1)


@pytest.fixture
def make_app(http_config: Callable[..., Config], redis_client: redis.Redis) -> Iterator[Callable[..., AppUnderTest]]:
    """Factory: an app built from the test config (on the test Redis unless ``backends``)."""
    made: list[AsgiAsWsgi] = []

    def make(
        section: dict[str, Any] | None = None,
        global_override: dict[str, Any] | None = None,
        backends: Backends | None = None,
        customer_override: dict[str, Any] | None = None,
    ) -> AppUnderTest:
        config = http_config(section, global_override, customer_override)
        registry = CollectorRegistry()
        app = AsgiAsWsgi(create_api(config, backends=backends, registry=registry))
        made.append(app)
        return AppUnderTest(app, Client(app), registry, redis_client)

    yield make
    for app in made:
        app.close()


@pytest.fixture
def hr(make_app: Callable[..., AppUnderTest]) -> AppUnderTest:
    """The app with the default test configuration."""
    return make_app()


class Gunicorn:
    """The ``httpreceiver`` console script running on free loopback ports."""

    def __init__(self, directory: Path, redis_port: int, section: dict[str, Any] | None = None) -> None:
        self.api_port, self.metrics_port = free_port(), free_port()
        customer = testing.customer_config(
            directory,
            redis_port=redis_port,
            ports={"httpreceiver": self.api_port, "httpreceiver-metrics": self.metrics_port},
        )
        customer = testing.merge(customer, {"httpreceiver": {"workers": 2, **(section or {})}})
        self.global_path, self.customer_path = testing.write_configs(directory / "configs", customer)
        self.log_path = directory / "httpreceiver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the API port."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def metrics_url(self) -> str:
        """Base URL of the metrics port."""
        return f"http://127.0.0.1:{self.metrics_port}"

    def command(self, *extra: str) -> list[str]:
        """The console script's command line."""
        return testing.service_command("httpreceiver", self.global_path, self.customer_path, *extra)

    def start(self) -> Gunicorn:
        """Start and wait until the API port accepts connections and every worker runs."""
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until(self._up, 20, what=f"httpreceiver on port {self.api_port}")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"httpreceiver exited with {self.proc.returncode}:\n{self.log()}")
        return port_open("127.0.0.1", self.api_port) and len(self.workers()) == 2

    def workers(self) -> list[int]:
        """Pids of the worker processes."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")

    def post(self, data: bytes, **kw: Any) -> requests.Response:
        """POST /v1/mail/send."""
        kw.setdefault("headers", headers())
        return requests.post(self.url + "/v1/mail/send", data=data, timeout=10, **kw)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[Gunicorn]:
    """A running server (2 workers) on the session's Redis, shared by a module's tests."""
    server = Gunicorn(tmp_path_factory.mktemp("httpreceiver"), redis_server.port).start()
    yield server
    server.stop()
