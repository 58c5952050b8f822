"""The ASGI application a gunicorn worker runs: the send endpoint in the loop, the rest in Flask.

``POST /v1/mail/send`` -- the hot path, every submission -- is answered in the worker's event
loop by :class:`httpreceiver.intake.MailIntake` (asyncio Redis client, group-committed queue
writes, no thread hop and no WSGI layer: about half the CPU per request of the same code as a
Flask view, ``bench/httpreceiver``).  Every other request -- one-click unsubscribes, the control
API, the OpenAPI document, and any other method on the send path (405, OPTIONS) -- goes to the
Flask app through :class:`httpreceiver.bridge.WsgiBridge`.  Both read the whole body in the loop
under the same limits (:meth:`WsgiBridge.read`).

The client address of a submission (login guard, logs) is the peer's, or behind
``httpreceiver.trusted-proxy-hops`` proxies the one they put in ``X-Forwarded-For`` -- what
werkzeug's ``ProxyFix`` gives the Flask endpoints.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from prometheus_client import Counter
from werkzeug.http import parse_list_header

from httpreceiver.bridge import Receive, Scope, Send, WsgiBridge, content_length, send_response, serve_lifespan
from httpreceiver.intake import MailIntake, Request
from httpreceiver.metrics import HttpMetrics
from httpreceiver.responses import Answer

log = logging.getLogger(__name__)

SEND_PATH: Final = "/v1/mail/send"
#: The endpoint label of the send endpoint's metrics (the Flask view name it had).
SEND_ENDPOINT: Final = "send"
_SLASHES: Final = re.compile(r"/{2,}")


class HttpApi:
    """The worker's ASGI application."""

    def __init__(
        self,
        intake: MailIntake,
        bridge: WsgiBridge,
        metrics: HttpMetrics,
        *,
        proxy_hops: int,
        on_shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        self.intake = intake
        self.bridge = bridge
        self.metrics = metrics
        self.proxy_hops = proxy_hops
        self.on_shutdown = on_shutdown
        # The send endpoint's series, looked up once (labels() per request showed in profiles).
        self._latency = metrics.latency.labels(SEND_ENDPOINT)
        self._requests: dict[int, Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (``http`` and ``lifespan``)."""
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, self._shut_down)
        elif scope["type"] == "http" and scope["method"] == "POST" and route_path(scope["path"]) == SEND_PATH:
            await self._send_endpoint(scope, receive, send)
        else:
            await self.bridge(scope, receive, send)

    async def _shut_down(self) -> None:
        """The worker stops: the running Flask requests finish, then the connections close."""
        self.bridge.close()
        await self.on_shutdown()

    async def _send_endpoint(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        body = await self.bridge.read(scope, receive, send)
        if body is None:
            return
        headers = header_map(scope)
        peer = client_address(scope, headers, self.proxy_hops)
        request = Request(headers, peer, body, content_length(scope))
        try:
            answer = await self.intake.send(request)
        except Exception as exc:  # the request's boundary, as Flask's 500 handler for the others
            log.exception("POST %s from %s failed", SEND_PATH, peer)
            answer = await self.intake.failed(exc)
        requests = self._requests.get(answer.status)
        if requests is None:
            requests = self._requests[answer.status] = self.metrics.requests.labels(SEND_ENDPOINT, str(answer.status))
        requests.inc()
        self._latency.observe(time.perf_counter() - started)
        encoded = answer.encoded()
        await send_response(send, answer.status, response_headers(answer, len(encoded)), encoded)


def route_path(path: str) -> str:
    """The path as the Flask routes match it: repeated slashes merged (werkzeug's ``merge_slashes``)."""
    return _SLASHES.sub("/", path) if "//" in path else path


def header_map(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (latin-1, as WSGI); repeated ones joined by ``,``."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out


def client_address(scope: Scope, headers: Mapping[str, str], proxy_hops: int) -> str:
    """The peer, or the address the ``proxy_hops``-th trusted proxy saw (``X-Forwarded-For``).

    As werkzeug's ``ProxyFix(x_for=proxy_hops)``: the value that many entries from the right,
    and the peer itself when the header has fewer entries (a request that bypassed a proxy).
    """
    peer = str((scope.get("client") or ("unknown", 0))[0])
    forwarded = headers.get("x-forwarded-for")
    if not proxy_hops or forwarded is None:
        return peer
    chain = parse_list_header(forwarded)
    return chain[-proxy_hops] if len(chain) >= proxy_hops and chain[-proxy_hops] else peer


def response_headers(answer: Answer, body_length: int) -> list[tuple[bytes, bytes]]:
    """The ASGI headers of a JSON answer whose body has ``body_length`` bytes."""
    out = [(b"content-type", b"application/json"), (b"content-length", str(body_length).encode())]
    out += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers.items()]
    return out
