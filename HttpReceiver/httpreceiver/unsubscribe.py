"""RFC 8058 one-click unsubscribe: ``POST /unsubscribe/<token>`` -> one ``unsubscribe`` event.

Public (behind the reverse proxy): no login, no redirect, no cookie.  ``<token>`` is the tagged
token of ONE recipient's copy (``transformer.unsubscribe-url`` with ``{{token}}``; the tag is
bound to uuid + recipient, :mod:`common.addressing`).  The recipient is found in the platform's
record of what it sent (:mod:`common.binding`); a token that verifies for nobody is forged
(404).  A genuine POST whose body is ``List-Unsubscribe=One-Click`` produces::

    {"event": "unsubscribe", "uuid": <uuid>, "recipient": <that recipient>, "stream_id": …,
     "event_id": <stable per uuid and recipient>, "source": "one-click"}

on the event stream (global ``backdata.queue-name``) before the 200 answer, exactly once: a
repeated POST of the same token answers 200 and emits nothing (a Redis marker set in the same
Lua call as the event, kept as long as the record).  When Redis is down the answer is 503, so
the click is never lost silently.  Requests that do nothing useful (forged tokens, repeats, bad
forms) count against ``httpreceiver.unsubscribe-rate-limit`` per client address (429 with
``Retry-After`` beyond it); a genuine first POST never counts.  ``GET`` shows a page whose
button sends that POST; it never unsubscribes by itself (link scanners fetch URLs).
"""

from __future__ import annotations

import logging
from typing import Final

import redis
from flask import Response, request

from common import binding, keys, logs
from common.addressing import AddressSigner, load_secret, parse_token
from common.authguard import client_key
from common.binding import Binding
from common.config import Config
from common.errors import TemporaryError
from common.events import Event, make_event_id
from common.queue import Queues, redis_errors
from httpreceiver.metrics import HttpMetrics

log = logging.getLogger(__name__)

ONE_CLICK: Final = "One-Click"
#: Largest accepted POST body (a form with one field).
MAX_FORM_BYTES: Final = 16_384

#: KEYS: done marker, event stream.  ARGV: marker TTL s, event JSON.
#: Adds the event only when the marker was not there (1), else nothing (0).
_EMIT_ONCE: Final = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', 'data', ARGV[2])
  return 1
end
return 0
"""
#: KEYS: counter.  ARGV: window s.  Counts one wasted request; returns the count in the window.
_COUNT: Final = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""
RATE_WINDOW_S: Final = 60

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
        self,
        config: Config,
        queues: Queues,
        metrics: HttpMetrics,
        signer: AddressSigner | None = None,
        *,
        rate_limit: int = 30,
    ) -> None:
        self.config = config
        self.queues = queues
        self.metrics = metrics
        self.event_queue = config.global_.backdata.queue_name
        self.retention_s = binding.retention_s(config)
        self.rate_limit = rate_limit
        self._signer = signer
        self._emit_once = queues.client.register_script(_EMIT_ONCE)
        self._count = queues.client.register_script(_COUNT)

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
        found = self._binding(token)
        if isinstance(found, Response):
            return found
        return _page(200, "Unsubscribe", _FORM)

    def post(self, token: str) -> Response:
        """``POST``: record the unsubscribe (once), then answer 200."""
        request.max_content_length = MAX_FORM_BYTES
        limited = self._over_limit()
        if limited is not None:
            return limited
        found = self._binding(token)
        if isinstance(found, Response):
            if found.status_code == 404:
                self._wasted()
            return found
        if request.form.get("List-Unsubscribe") != ONE_CLICK and request.get_data().strip() != (
            b"List-Unsubscribe=" + ONE_CLICK.encode()
        ):
            self._wasted()
            return _page(400, "Bad request", "<p>Expected the form field List-Unsubscribe=One-Click.</p>")
        event = Event(
            event="unsubscribe",
            uuid=found.uuid,
            event_id=make_event_id("unsubscribe", found.uuid, found.recipient.lower()),
            recipient=found.recipient,
            stream_id=found.stream_id,
            fd=found.from_domain,
            extra={"source": "one-click"},
        )
        marker = keys.service_key("httpreceiver", "unsubscribed", found.uuid, token.strip().lower().rpartition("-")[2])
        try:
            with redis_errors("record one-click unsubscribe"):
                emitted = int(
                    self._emit_once(keys=[marker, self.event_queue], args=[self.retention_s, event.to_json()])
                )
        except TemporaryError as exc:
            self.metrics.unsubscribes.labels("unavailable").inc()
            log.warning("cannot record one-click unsubscribe of %s, answering 503: %s", found.uuid, exc)
            return self._unavailable()
        if not emitted:
            self.metrics.unsubscribes.labels("repeated").inc()
            self._wasted()
            return _page(200, "Unsubscribed", "<p>You are unsubscribed.</p>")
        self.metrics.unsubscribes.labels("accepted").inc()
        log.info(
            "one-click unsubscribe uuid=%s queued to %s",
            found.uuid,
            self.event_queue,
            extra=logs.fields(uuid=found.uuid, recipient=found.recipient, event_id=event.event_id),
        )
        return _page(200, "Unsubscribed", "<p>You have been unsubscribed.</p>")

    def _binding(self, token: str) -> Binding | Response:
        """The recipient of a genuine token, else the answer to give (404 forged, 503 Redis down)."""
        tagged = parse_token(token)
        try:
            signer = self.signer()
            record = self.queues.client.hgetall(keys.sent_record(tagged.uuid)) if tagged is not None else {}
        except redis.exceptions.RedisError as exc:
            self.metrics.unsubscribes.labels("unavailable").inc()
            log.warning("cannot check an unsubscribe token, answering 503: %s", exc)
            return self._unavailable()
        found = binding.resolve(signer, tagged, binding.decode_record(record)) if tagged is not None else None
        if found is None:
            self.metrics.unsubscribes.labels("forged").inc()
            log.info("refused an unsubscribe link with an invalid or expired token")
            return _page(404, "Not found", "<p>This unsubscribe link is not valid (or has expired).</p>")
        return found

    def _rate_key(self) -> str:
        return keys.service_key("httpreceiver", "unsubscribe-rate", client_key(request.remote_addr or ""))

    def _over_limit(self) -> Response | None:
        """429 when this client address wasted too many requests in the current minute."""
        try:
            wasted = int(self.queues.client.get(self._rate_key()) or 0)
        except redis.exceptions.RedisError:
            return None  # the real work below answers 503 when Redis is down
        if wasted < self.rate_limit:
            return None
        self.metrics.unsubscribes.labels("rate-limited").inc()
        return _page(429, "Too many requests", "<p>Please try again in a minute.</p>", {"Retry-After": "60"})

    def _wasted(self) -> None:
        """Count a request that did nothing useful (forged, repeated, malformed)."""
        try:
            self._count(keys=[self._rate_key()], args=[RATE_WINDOW_S])
        except redis.exceptions.RedisError as exc:
            log.debug("cannot count a wasted unsubscribe request: %s", exc)

    @staticmethod
    def _unavailable() -> Response:
        return _page(503, "Try again", "<p>Please try again in a minute.</p>", {"Retry-After": "5"})
