"""A customer webhook endpoint for tests, benchmarks and the local stack.

It accepts ``POST`` of a JSON array (BackData's batches), keeps every event and answers with a
scriptable status: a :class:`WebhookReceiver` is given a ``responder`` that sees each request
and returns (status, headers, delay seconds).  Events of requests answered 2xx are recorded
(:attr:`WebhookReceiver.events`) and, with ``out``, appended to a JSON-lines file.  Status
:data:`DROP` (0) closes the connection without any answer (a crashed or reset endpoint).

With ``validate`` every recorded event is checked against the published event schema
(:mod:`devtools.contracts`); what does not conform is logged and kept in
:attr:`WebhookReceiver.violations` (the local stack and the end-to-end tests use this: an event
with an undocumented field fails the tests).

Run it alone: ``python -m devtools.webhook --listen 127.0.0.1:8099 --out run/events.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common import logs

log = logging.getLogger(__name__)
# How often serve_forever looks for a shutdown request: close() returns within this.
_POLL_SECONDS = 0.05


@dataclass
class Request:
    """One request as received."""

    number: int
    path: str
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, dict[str, str], float]
Responder = Callable[[Request], Reply]

#: Responder status that closes the connection without answering.
DROP = 0


def always_ok(_: Request) -> Reply:
    """Answer 200 at once."""
    return 200, {}, 0.0


@dataclass(frozen=True)
class Violation:
    """An event that does not conform to the published schema, and why."""

    event: dict[str, Any]
    problems: tuple[str, ...]


@dataclass
class _State:
    responder: Responder
    out: Path | None
    validate: bool = False
    requests: list[Request] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class WebhookReceiver:
    """A running webhook endpoint on ``host:port`` (threads)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        responder: Responder = always_ok,
        out: Path | None = None,
        validate: bool = False,
    ) -> None:
        self.state = _State(responder, out, validate)
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self.state))
        self.httpd.daemon_threads = True
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(_POLL_SECONDS,), name="webhook", daemon=True
        )

    @property
    def url(self) -> str:
        """URL to configure as ``backdata.post-url``."""
        return f"http://{self.host}:{self.port}/events"

    @property
    def events(self) -> list[dict[str, Any]]:
        """Events of accepted (2xx) requests, in arrival order."""
        with self.state.lock:
            return list(self.state.events)

    @property
    def violations(self) -> list[Violation]:
        """Recorded events that do not conform to the event schema (with ``validate``)."""
        with self.state.lock:
            return list(self.state.violations)

    @property
    def requests(self) -> list[Request]:
        """Every request, whatever it was answered."""
        with self.state.lock:
            return list(self.state.requests)

    def set_responder(self, responder: Responder) -> None:
        """Change how the following requests are answered."""
        self.state.responder = responder

    def start(self) -> WebhookReceiver:
        """Start serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _make_handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without TCP_NODELAY every answer waits for
        # the client's delayed ACK (40 ms), which caps a keep-alive client at 25 requests/s.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            with state.lock:
                request = Request(len(state.requests) + 1, self.path, dict(self.headers.items()), body)
                state.requests.append(request)
            status, headers, delay = state.responder(request)
            if delay:
                time.sleep(delay)
            if status == DROP:
                self.close_connection = True
                return
            if 200 <= status < 300:
                _record(state, body)
            try:
                self._answer(status, headers)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (timed out) before the answer

        def _answer(self, status: int, headers: dict[str, str]) -> None:
            reply = json.dumps({"status": status}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


def _record(state: _State, body: bytes) -> None:
    try:
        events = json.loads(body)
    except json.JSONDecodeError:
        log.warning("request body is not JSON")
        return
    if not isinstance(events, list):
        events = [events]
    found = []
    if state.validate:
        from devtools.contracts import event_problems  # jsonschema only when asked for

        for event in events:
            problems = event_problems(event) if isinstance(event, dict) else ["not a JSON object"]
            if problems:
                log.warning("event does not conform to the event schema: %s", "; ".join(problems))
                found.append(Violation(event if isinstance(event, dict) else {"value": event}, tuple(problems)))
    with state.lock:
        state.events.extend(events)
        state.violations.extend(found)
        if state.out is not None:
            with state.out.open("a", encoding="utf-8") as f:
                for event in events:
                    f.write(json.dumps(event, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run a webhook endpoint until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Webhook endpoint that records events")
    parser.add_argument("--listen", default="127.0.0.1:8099", help="host:port (loopback)")
    parser.add_argument("--out", type=Path, default=None, help="append events here (JSON lines)")
    args = parser.parse_args(argv)
    logs.setup("webhook")
    host, _, port = args.listen.rpartition(":")
    receiver = WebhookReceiver(host, int(port), out=args.out).start()
    log.info("webhook receiver on %s", receiver.url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
