"""Metrics and health endpoints, written once for every service (style anchor C11).

:func:`serve` starts a small HTTP server on the service's ``prometheus`` address:

* ``/metrics`` -- Prometheus text format (multiprocess-aware when ``PROMETHEUS_MULTIPROC_DIR``
  is set, as for gunicorn or a multi-process Receiver);
* ``/healthz`` -- 200 while the service's loop keeps beating (:meth:`Health.beat`);
* ``/readyz``  -- 200 when every readiness check passes (Redis answers, Postfix answers…).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
    multiprocess,
)

log = logging.getLogger(__name__)
# How often serve_forever looks for a shutdown request: close() returns within this.
_POLL_SECONDS = 0.05


class Health:
    """Liveness (a heartbeat that must stay fresh) and readiness (named checks)."""

    def __init__(self, stale_after_s: float = 120.0) -> None:
        self.stale_after_s = stale_after_s
        self._last_beat = time.monotonic()
        self._checks: list[tuple[str, Callable[[], bool]]] = []

    def beat(self) -> None:
        """Record that the main loop is alive."""
        self._last_beat = time.monotonic()

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """Add a readiness check; it must be quick and must not raise."""
        self._checks.append((name, check))

    def live(self) -> tuple[bool, str]:
        """(alive, explanation)."""
        age = time.monotonic() - self._last_beat
        if age > self.stale_after_s:
            return False, f"main loop silent for {age:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """(ready, explanation)."""
        failing = []
        for name, check in self._checks:
            try:
                ok = check()
            except Exception:  # noqa: BLE001 -- a failing probe means not ready, never a crash
                ok = False
            if not ok:
                failing.append(name)
        if failing:
            return False, "not ready: " + ", ".join(failing)
        return True, "ok"


def collecting_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to expose: a multiprocess collector when ``PROMETHEUS_MULTIPROC_DIR`` is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return registry or REGISTRY


class MetricsServer:
    """A running metrics/health server (stop it with :meth:`close`)."""

    def __init__(self, host: str, port: int, health: Health, registry: CollectorRegistry) -> None:
        handler = _make_handler(health, registry)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(_POLL_SECONDS,), name="metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics and health on %s:%d", host, self.port)

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(host: str, port: int, health: Health, registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a daemon thread."""
    return MetricsServer(host, port, health, collecting_registry(registry))


def _make_handler(health: Health, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/metrics", "/"):
                body = generate_latest(registry)
                self._reply(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, why = health.live()
                self._reply(200 if ok else 503, why.encode() + b"\n")
            elif path == "/readyz":
                ok, why = health.ready()
                self._reply(200 if ok else 503, why.encode() + b"\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the service log

    return Handler


def memory_usage_percent() -> float:
    """Host memory in use, as the original computed it: (total-free-buffers-cached)/total."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = fields.get("MemTotal", 0)
    if not total:
        return 0.0
    used = total - fields.get("MemFree", 0) - fields.get("Buffers", 0) - fields.get("Cached", 0)
    return 100.0 * used / total


def register_memory_gauge(registry: CollectorRegistry | None = None) -> Gauge:
    """Export the original's ``memory_usage_percent`` gauge."""
    kw = {"registry": registry} if registry is not None else {}
    gauge = Gauge("memory_usage_percent", "Host memory in use, percent", **kw)  # type: ignore[arg-type]
    gauge.set_function(memory_usage_percent)
    return gauge
