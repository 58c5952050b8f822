"""HttpReceiver's application (factories; no module-level app or client).

:func:`create_api` builds what a gunicorn worker runs (:class:`httpreceiver.front.HttpApi`):

* ``POST /v1/mail/send`` -- :mod:`httpreceiver.intake` in the event loop (to
  ``IB-MAIL-QUEUE-P0``/``P1``);

and, in the Flask app of :func:`create_app` behind :class:`httpreceiver.bridge.WsgiBridge`:

* ``GET|POST /unsubscribe/<token>`` -- :mod:`httpreceiver.unsubscribe` (to ``EVENT_QUEUE``);
* ``/v1/suppressions…`` and ``GET /v1/messages/<uuid>`` -- :mod:`httpreceiver.control` (the
  suppression list and message timelines, same credentials as sending);
* ``GET /v1/openapi.json`` -- the API contract (:mod:`httpreceiver.contract`), public.

All on the API port ``httpreceiver.bind.inet-port``.  Metrics and health are not served here
but by the gunicorn master on the metrics port (:mod:`httpreceiver.server`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from common.addressing import AddressSigner
from common.authguard import AsyncLoginGuard, LoginGuard
from common.config import Config
from common.errors import TemporaryError
from common.queue import AsyncQueues, Queues, QueueSettings, connect, connect_async
from common.suppression import SuppressionList, SuppressionSettings
from common.trace import TraceSettings
from httpreceiver import contract
from httpreceiver.auth import Authenticator
from httpreceiver.bridge import WsgiBridge
from httpreceiver.control import ControlApi
from httpreceiver.front import HttpApi
from httpreceiver.idempotency import IdempotencyStore
from httpreceiver.intake import MailIntake
from httpreceiver.login import AsyncLogin, Login
from httpreceiver.metrics import HttpMetrics
from httpreceiver.responses import Answer, bug_event, error_answer, internal_error
from httpreceiver.settings import SERVICE, section_of
from httpreceiver.unsubscribe import OneClickUnsubscribe


@dataclass(frozen=True)
class Backends:
    """The Redis side of one worker.

    A synchronous client for the Flask endpoints' threads, an asyncio one for the send endpoint
    (its queue writes group-committed).
    """

    queues: Queues
    async_queues: AsyncQueues

    @classmethod
    def connect(cls, config: Config, registry: CollectorRegistry) -> Backends:
        """Clients of ``config.redis_for("httpreceiver")``; call after forking (one per process)."""
        server = config.redis_for(SERVICE)
        settings = QueueSettings.from_config(config.global_)
        client = connect(server, client_name=SERVICE, registry=registry)
        async_client = connect_async(server, client_name=SERVICE, registry=registry)
        return cls(Queues(client, settings), AsyncQueues(async_client, settings, coalesce=True))

    async def close(self) -> None:
        """Close both clients' connections (the worker stops)."""
        self.queues.client.close()
        await self.async_queues.client.aclose()


def create_api(
    config: Config,
    *,
    backends: Backends | None = None,
    registry: CollectorRegistry | None = None,
    signer: AddressSigner | None = None,
) -> HttpApi:
    """The ASGI application of one worker; it connects to Redis lazily, so it starts while Redis is down.

    ``backends`` default to :meth:`Backends.connect`, ``registry`` to a private one (under
    gunicorn the values go to ``PROMETHEUS_MULTIPROC_DIR`` whatever the registry).
    """
    section = section_of(config)
    registry = registry if registry is not None else CollectorRegistry()
    backends = backends if backends is not None else Backends.connect(config, registry)
    metrics = HttpMetrics(registry)
    auth = Authenticator(section.auth_logins, section.api_keys)
    login = Login(auth, LoginGuard(backends.queues.client, SERVICE, section.auth_lockout), metrics)
    bridge = WsgiBridge(
        create_app(config, backends.queues, metrics, login, signer=signer),
        threads=section.threads,
        max_body=section.max_message_size + 1,
        body_timeout_s=section.request_timeout_seconds,
    )
    async_client = backends.async_queues.client
    intake = MailIntake(
        config,
        section,
        backends.async_queues,
        AsyncLogin(auth, AsyncLoginGuard(async_client, SERVICE, section.auth_lockout), metrics, bridge.run_blocking),
        (
            IdempotencyStore(async_client, section.idempotency_window_seconds)
            if section.idempotency_window_seconds > 0
            else None
        ),
        metrics,
    )
    return HttpApi(intake, bridge, metrics, proxy_hops=section.trusted_proxy_hops, on_shutdown=backends.close)


def create_app(
    config: Config, queues: Queues, metrics: HttpMetrics, login: Login, *, signer: AddressSigner | None = None
) -> Flask:
    """The Flask app of every endpoint but ``POST /v1/mail/send`` (see :func:`create_api`)."""
    section = section_of(config)

    def authenticate() -> str | Response:
        user = login.check(request.headers.get("Authorization"), request.remote_addr or "unknown")
        return user.flask() if isinstance(user, Answer) else user

    unsubscribe = OneClickUnsubscribe(config, queues, metrics, signer, rate_limit=section.unsubscribe_rate_limit)
    control = ControlApi(
        SuppressionList(queues.client, SuppressionSettings.from_config(config)),
        TraceSettings.from_config(config),
        authenticate,
        max_import_bytes=section.max_message_size,
    )

    app = Flask(SERVICE)
    if section.trusted_proxy_hops:
        # The client address (auth-lockout, logs) from the proxies' X-Forwarded-For.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=section.trusted_proxy_hops)  # type: ignore[method-assign]
    # Default for every route; the views set their own per request.
    app.config["MAX_CONTENT_LENGTH"] = section.max_message_size + 1
    app.extensions[SERVICE] = metrics
    # Answered by the front (httpreceiver.front) before Flask; the rule keeps 405 and OPTIONS.
    app.add_url_rule("/v1/mail/send", "send", _answered_by_the_front, methods=["POST"])
    app.add_url_rule("/unsubscribe/<token>", "unsubscribe-page", unsubscribe.page, methods=["GET"])
    app.add_url_rule("/unsubscribe/<token>", "unsubscribe", unsubscribe.post, methods=["POST"])
    app.add_url_rule("/v1/suppressions", "suppressions", control.listing, methods=["GET"])
    app.add_url_rule("/v1/suppressions/export", "suppressions-export", control.export, methods=["GET"])
    app.add_url_rule("/v1/suppressions/import", "suppressions-import", control.import_, methods=["POST"])
    app.add_url_rule("/v1/suppressions/<scope>/<address>", "suppression", control.one, methods=["GET", "PUT", "DELETE"])
    app.add_url_rule("/v1/messages/<uuid>", "message", control.message, methods=["GET"])
    app.add_url_rule("/v1/openapi.json", "openapi", contract.serve, methods=["GET"])

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        endpoint = request.endpoint or "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        started = g.get("started")
        if started is not None:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc: RequestEntityTooLarge) -> Response:
        return error_answer(413, "too-large", "the request body is too large")

    @app.errorhandler(InternalServerError)
    def _bug(exc: InternalServerError) -> Response:
        # Flask has logged the traceback; the customer hears of it as an error event (as the
        # original did), when Redis takes it.
        with contextlib.suppress(TemporaryError):
            queues.enqueue(config.global_.backdata.queue_name, bug_event(exc.original_exception).to_fields())
        return internal_error().flask()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        allow = {name: value for name, value in exc.get_headers() if name == "Allow"}
        rule = (exc.name or "error").lower().replace(" ", "-")
        return error_answer(exc.code or 500, rule, exc.description or "", allow)

    return app


def _answered_by_the_front() -> Response:
    # Not reached: the front takes every POST this rule matches (route_path).  Should a path
    # variant slip through, it gets a plain 404, not a 500 with an error event for the customer.
    return error_answer(404, "not-found", "POST /v1/mail/send")
