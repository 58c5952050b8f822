"""RFC 8058 one-click unsubscribe: ``POST /unsubscribe/<token>`` -> an ``unsubscribe`` event.

Public (behind the reverse proxy): no login, no redirect, no cookie.  ``<token>`` is the tagged
token the Transformer puts in ``List-Unsubscribe`` (``transformer.unsubscribe-url`` with
``{{token}}``); :meth:`common.addressing.AddressSigner.parse_token` tells a genuine one from a
forged one (404).  A genuine POST whose body is ``List-Unsubscribe=One-Click`` produces::

    {"event": "unsubscribe", "uuid": <uuid>, "event_id": <stable per uuid>, "source": "one-click"}

on the event stream (global ``backdata.queue-name``) before the 200 answer; when Redis is down
the answer is 503, so the click is never lost silently.  ``GET`` shows a page whose button
sends that POST; it never unsubscribes by itself (link scanners fetch URLs).
"""

from __future__ import annotations

import logging
from typing import Final

import redis
from flask import Response, request

from common.addressing import AddressSigner, load_secret
from common.config import Config
from common.errors import TemporaryError
from common.events import Event, make_event_id
from common.queue import Queues
from httpreceiver.metrics import HttpMetrics

log = logging.getLogger(__name__)

ONE_CLICK: Final = "One-Click"
#: Largest accepted POST body (a form with one field).
MAX_FORM_BYTES: Final = 16_384

_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
}
_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="robots" content="noindex"><title>{title}</title></head>
<body>{body}</body></html>
"""
_FORM: Final = (
    '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
    '<p>Stop receiving these emails?</p><button type="submit">Unsubscribe</button></form>'
)


def _page(status: int, title: str, body: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        _PAGE.format(title=title, body=body),
        status=status,
        mimetype="text/html",
        headers={**_HEADERS, **(headers or {})},
    )


class OneClickUnsubscribe:
    """The unsubscribe endpoints of one app instance."""

    def __init__(
        self, config: Config, queues: Queues, metrics: HttpMetrics, signer: AddressSigner | None = None
    ) -> None:
        self.config = config
        self.queues = queues
        self.metrics = metrics
        self.event_queue = config.global_.backdata.queue_name
        self._signer = signer

    def signer(self) -> AddressSigner:
        """The installation's signer (read from Redis on first use when not configured).

        Raises:
            redis.exceptions.RedisError: the secret lives in Redis and Redis is down.
        """
        if self._signer is None:
            self._signer = load_secret(self.config, self.queues.client)
        return self._signer

    def page(self, token: str) -> Response:
        """``GET``: the confirmation page (its button POSTs to the same URL)."""
        uuid = self._uuid(token)
        if isinstance(uuid, Response):
            return uuid
        return _page(200, "Unsubscribe", _FORM)

    def post(self, token: str) -> Response:
        """``POST``: record the unsubscribe, then answer 200."""
        request.max_content_length = MAX_FORM_BYTES
        uuid = self._uuid(token)
        if isinstance(uuid, Response):
            return uuid
        if request.form.get("List-Unsubscribe") != ONE_CLICK and request.get_data().strip() != (
            b"List-Unsubscribe=" + ONE_CLICK.encode()
        ):
            return _page(400, "Bad request", "<p>Expected the form field List-Unsubscribe=One-Click.</p>")
        event = Event(
            event="unsubscribe",
            uuid=uuid,
            event_id=make_event_id("unsubscribe", uuid),
            extra={"source": "one-click"},
        )
        try:
            self.queues.enqueue(self.event_queue, event.to_fields(), limit=False)
        except TemporaryError as exc:
            self.metrics.unsubscribes.labels("unavailable").inc()
            log.warning("cannot record one-click unsubscribe of %s, answering 503: %s", uuid, exc)
            return self._unavailable()
        self.metrics.unsubscribes.labels("accepted").inc()
        log.info("one-click unsubscribe uuid=%s queued to %s", uuid, self.event_queue)
        return _page(200, "Unsubscribed", "<p>You have been unsubscribed.</p>")

    def _uuid(self, token: str) -> str | Response:
        """The uuid of a genuine token, else the answer to give (404 forged, 503 Redis down)."""
        try:
            uuid = self.signer().parse_token(token)
        except redis.exceptions.RedisError as exc:
            log.warning("cannot check an unsubscribe token, answering 503: %s", exc)
            return self._unavailable()
        if uuid is None:
            self.metrics.unsubscribes.labels("forged").inc()
            log.info("refused an unsubscribe link with an invalid token")
            return _page(404, "Not found", "<p>This unsubscribe link is not valid.</p>")
        return uuid

    @staticmethod
    def _unavailable() -> Response:
        return _page(503, "Try again", "<p>Please try again in a minute.</p>", {"Retry-After": "5"})
