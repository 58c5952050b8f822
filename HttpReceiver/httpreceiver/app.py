"""The Flask application of HttpReceiver (app factory; no module-level app or client).

Routes (API port ``httpreceiver.bind.inet-port``):

* ``POST /v1/mail/send`` -- :mod:`httpreceiver.intake` (to ``IB-MAIL-QUEUE-P0``/``P1``);
* ``GET|POST /unsubscribe/<token>`` -- :mod:`httpreceiver.unsubscribe` (to ``EVENT_QUEUE``);
* ``/v1/suppressions…`` and ``GET /v1/messages/<uuid>`` -- :mod:`httpreceiver.control` (the
  suppression list and message timelines, same credentials as sending);
* ``GET /v1/openapi.json`` -- the API contract (:mod:`httpreceiver.contract`), public.

Metrics and health are not served here but by the gunicorn master on the metrics port
(:mod:`httpreceiver.server`).
"""

from __future__ import annotations

import contextlib
import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from common.addressing import AddressSigner
from common.authguard import LoginGuard
from common.config import Config
from common.errors import TemporaryError
from common.events import error_event
from common.queue import Queues, QueueSettings, connect
from common.suppression import SuppressionList, SuppressionSettings
from common.trace import TraceSettings
from httpreceiver import contract
from httpreceiver.auth import Authenticator
from httpreceiver.control import ControlApi
from httpreceiver.idempotency import IdempotencyStore
from httpreceiver.intake import MailIntake
from httpreceiver.metrics import HttpMetrics
from httpreceiver.responses import error_answer
from httpreceiver.settings import SERVICE, section_of
from httpreceiver.unsubscribe import OneClickUnsubscribe


def create_app(
    config: Config,
    *,
    queues: Queues | None = None,
    registry: CollectorRegistry | None = None,
    signer: AddressSigner | None = None,
) -> Flask:
    """Build the app; it connects to Redis lazily, so it starts while Redis is down.

    ``queues`` defaults to a client of ``config.redis_for("httpreceiver")`` (one per process:
    call this after forking), ``registry`` to a private one (under gunicorn the values go to
    ``PROMETHEUS_MULTIPROC_DIR`` whatever the registry).
    """
    section = section_of(config)
    registry = registry if registry is not None else CollectorRegistry()
    if queues is None:
        client = connect(config.redis_for(SERVICE), client_name=SERVICE, registry=registry)
        queues = Queues(client, QueueSettings.from_config(config.global_))
    metrics = HttpMetrics(registry)
    idempotency = (
        IdempotencyStore(queues.client, section.idempotency_window_seconds)
        if section.idempotency_window_seconds > 0
        else None
    )
    intake = MailIntake(
        config,
        section,
        queues,
        Authenticator(section.auth_logins, section.api_keys),
        LoginGuard(queues.client, SERVICE, section.auth_lockout),
        idempotency,
        metrics,
    )
    unsubscribe = OneClickUnsubscribe(config, queues, metrics, signer, rate_limit=section.unsubscribe_rate_limit)
    control = ControlApi(
        SuppressionList(queues.client, SuppressionSettings.from_config(config)),
        TraceSettings.from_config(config),
        intake.authenticate,
        max_import_bytes=section.max_message_size,
    )

    app = Flask(SERVICE)
    if section.trusted_proxy_hops:
        # The client address (auth-lockout, logs) from the proxies' X-Forwarded-For.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=section.trusted_proxy_hops)  # type: ignore[method-assign]
    # Default for every route; the views set their own per request.
    app.config["MAX_CONTENT_LENGTH"] = section.max_message_size + 1
    app.extensions[SERVICE] = metrics
    app.add_url_rule("/v1/mail/send", "send", intake.send, methods=["POST"])
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
        if request.endpoint == "send":
            return intake.too_large()
        return error_answer(413, "too-large", "the request body is too large")

    @app.errorhandler(InternalServerError)
    def _bug(exc: InternalServerError) -> Response:
        # Flask has logged the traceback; the customer hears of it as an error event (as the
        # original did), when Redis takes it.
        original = exc.original_exception
        what = f"{type(original).__name__}: {original}"[:300] if original is not None else "internal error"
        with contextlib.suppress(TemporaryError):
            queues.enqueue(config.global_.backdata.queue_name, error_event("http-receiver", what).to_fields())
        return error_answer(500, "internal-error", "unexpected error; retry (with the same Idempotency-Key)")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        allow = {name: value for name, value in exc.get_headers() if name == "Allow"}
        rule = (exc.name or "error").lower().replace(" ", "-")
        return error_answer(exc.code or 500, rule, exc.description or "", allow)

    return app
