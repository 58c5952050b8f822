"""``POST /v1/mail/send``: one raw RFC 822 message in, one entry on the P0 or P1 stream out.

Runs in the gunicorn worker's event loop (:mod:`httpreceiver.front` reads the whole request and
hands it over as a :class:`Request`), with the asyncio Redis client: the queue write joins the
transactions of concurrent requests (group commit, :class:`common.queue.AsyncQueues`), and no
thread or WSGI layer is involved.  Only a password hash runs in a thread.

Produces ``reliable-queue.queue-names.primary-queue`` (``X-Priority: 0``) or ``default-queue``
entries (:class:`common.payloads.SubmittedMail`: the body as the intake rule both doors share,
:func:`common.submission.accept`, returns it -- byte for byte but for CRLF line endings), with
the first entry of the message's timeline (``IB:trace:<uuid>``) in the same MULTI/EXEC.  The
client gets ``200 {"uuid", "queue"}`` only after Redis has the entry (AOF, DESIGN §2); every
refusal names its rule:

=====  =================================================================================
401    no or wrong credentials (HTTP Basic or a bearer API key)
429    too many wrong credentials from this address or for this account, or too many logins of
       them being checked at once (``httpreceiver.auth-lockout``; ``Retry-After``); no password
       was checked
503    the login guard cannot reach Redis (``Retry-After``): no password is checked without it
415    Content-Type is not application/octet-stream or message/rfc822
413    larger than ``max-message-size`` (refused from Content-Length, before reading)
400    a rule of :mod:`common.submission` failed (the body adds ``smtp_code`` and
       ``enhanced_status``: what Receiver answers the same message), or a bad Idempotency-Key
409    the same Idempotency-Key is being processed right now
422    the Idempotency-Key was used before with a different message
503    Redis is unavailable or the queue is over its limit (``Retry-After`` says when to retry)
=====  =================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from common import trace
from common.config import Config
from common.config.httpreceiver import HttpReceiverSection
from common.errors import QueueFullError, QueueUnavailableError, ReplicaAckError, TemporaryError
from common.payloads import SubmittedMail
from common.queue import AsyncQueues
from common.submission import Rejection, Submission, accept
from common.trace import TraceSettings
from httpreceiver.idempotency import IdempotencyStore, Record, Reservation, fingerprint, valid_key
from httpreceiver.login import AsyncLogin
from httpreceiver.metrics import HttpMetrics
from httpreceiver.responses import Answer, bug_event, internal_error

log = logging.getLogger(__name__)

CONTENT_TYPES: Final = frozenset(("application/octet-stream", "message/rfc822"))
#: Seconds a client should wait after a 503: Redis down (usually a restart) / queue full (backlog).
RETRY_AFTER_UNAVAILABLE_S: Final = 5
RETRY_AFTER_FULL_S: Final = 30


@dataclass(frozen=True)
class Request:
    """A whole submission as read from the connection.

    ``headers`` have lower-case names (repeated ones joined with ``,``); ``body`` is empty when
    ``declared_length`` was already over the limit (nothing was read), and at most one byte over
    the limit otherwise.
    """

    headers: Mapping[str, str]
    peer: str
    body: bytes
    declared_length: int | None


class MailIntake:
    """The send endpoint of one worker."""

    def __init__(
        self,
        config: Config,
        section: HttpReceiverSection,
        queues: AsyncQueues,
        login: AsyncLogin,
        idempotency: IdempotencyStore | None,
        metrics: HttpMetrics,
    ) -> None:
        names = config.global_.reliable_queue.queue_names
        self.queue_of = {0: names.primary_queue, 1: names.default_queue}
        self.events_queue = config.global_.backdata.queue_name
        self.max_size = section.max_message_size
        self.queues = queues
        self.login = login
        self.idempotency = idempotency
        self.metrics = metrics
        self.trace = TraceSettings.from_config(config)
        transformer = config.transformer
        self._configured = lambda domain: transformer.domain(domain) is not None

    async def send(self, request: Request) -> Answer:
        """Handle one submission."""
        user = await self.login.check(request.headers.get("authorization"), request.peer)
        if isinstance(user, Answer):
            return user
        refusal = self._check_request(request)
        if refusal is not None:
            return refusal
        # Without Content-Length (chunked) the reader stops at one byte over the limit: a body
        # over the limit is refused, never truncated.
        if len(request.body) > self.max_size:
            return self.too_large()
        try:
            accepted = accept(request.body, self._configured)
        except Rejection as exc:
            return self.refuse(exc.http_status, exc.rule, exc.message, details=exc.details())
        key = request.headers.get("idempotency-key") if self.idempotency is not None else None
        return await self._queue(user, accepted.raw, accepted.submission, key)

    async def failed(self, exc: Exception) -> Answer:
        """The answer to a request that raised (a bug): the customer hears of it as an error event."""
        with contextlib.suppress(TemporaryError):
            await self.queues.enqueue(self.events_queue, bug_event(exc).to_fields())
        return internal_error()

    def _check_request(self, request: Request) -> Answer | None:
        """Refusals decided from the headers alone, before the body is used."""
        mimetype = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if mimetype not in CONTENT_TYPES:
            return self.refuse(
                415,
                "content-type",
                f"Content-Type must be application/octet-stream or message/rfc822, not {mimetype or 'none'!r}",
            )
        length = request.declared_length
        if length is not None and length > self.max_size:
            return self.too_large()
        key = request.headers.get("idempotency-key")
        if key is not None and self.idempotency is not None and not valid_key(key):
            return self.refuse(400, "idempotency-key", "Idempotency-Key must be 1-255 printable ASCII characters")
        return None

    async def _queue(self, user: str, raw: bytes, submission: Submission, key: str | None) -> Answer:
        """Queue a valid message (once per Idempotency-Key); 200 only after Redis has it."""
        queue = self.queue_of[submission.priority]
        answer = {"uuid": submission.uuid, "queue": queue}
        reservation: Reservation | None = None
        if key is not None and self.idempotency is not None:
            try:
                found = await self.idempotency.reserve(user, key, fingerprint(raw), 200, answer)
            except QueueUnavailableError as exc:
                return self.unavailable(exc, submission.uuid)
            if isinstance(found, Record):
                return self.repeat(found, fingerprint(raw), submission.uuid)
            reservation = found

        entry = SubmittedMail(
            raw=raw, uuid=submission.uuid, priority=submission.priority, via="http", submitted_at=time.time()
        )
        try:
            step = trace.entry(
                "accepted", door="http", queue=queue, bytes=len(raw), recipients=len(submission.recipients)
            )
            await self.queues.enqueue(
                queue, entry.to_fields(), with_writes=trace.append(self.trace, submission.uuid, step)
            )
        except TemporaryError as exc:
            if reservation is not None and self.idempotency is not None:
                with contextlib.suppress(QueueUnavailableError):
                    await self.idempotency.release(reservation)
            return self.unavailable(exc, submission.uuid)
        if reservation is not None and self.idempotency is not None:
            try:
                await self.idempotency.finish(reservation)
            except QueueUnavailableError as exc:
                log.warning("queued %s but could not store its Idempotency-Key answer: %s", submission.uuid, exc)
        self.metrics.enqueued.inc()
        self.metrics.recipients.inc(len(submission.recipients))
        log.info(
            "queued uuid=%s queue=%s user=%s bytes=%d recipients=%d",
            submission.uuid,
            queue,
            user,
            len(raw),
            len(submission.recipients),
        )
        return Answer(200, answer)

    def refuse(
        self,
        status: int,
        rule: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        details: Mapping[str, str | int] | None = None,
    ) -> Answer:
        """A refused submission: counted as dropped, logged with its rule."""
        self.metrics.dropped.inc()
        self.metrics.rejections.labels(rule).inc()
        log.info("refused submission (%d %s): %s", status, rule, message)
        return Answer.error(status, rule, message, headers, details=details)

    def too_large(self) -> Answer:
        """413 for a body over ``max-message-size``."""
        return self.refuse(
            413, "too-large", f"the message is larger than {self.max_size} bytes (httpreceiver.max-message-size)"
        )

    def unavailable(self, exc: TemporaryError, uuid: str) -> Answer:
        """503 with Retry-After: the message is not (durably) queued, the client must retry."""
        full = isinstance(exc, QueueFullError)
        retry_after = int(exc.retry_after or (RETRY_AFTER_FULL_S if full else RETRY_AFTER_UNAVAILABLE_S))
        log.warning("cannot queue %s, answering 503: %s", uuid, exc)
        if isinstance(exc, ReplicaAckError):
            # Written on the Redis primary, not confirmed by a replica in time (WAIT): the retry
            # is a duplicate if the primary survives -- the reservation is released all the same,
            # since recording it as done could make the retry skip a message a failover lost.
            what = "the queue (Redis) stored the message but no replica confirmed it in time"
            outcome = "it may be queued twice"
        else:
            what = "the queue is over its limit" if full else "the queue (Redis) is unavailable"
            outcome = "nothing was queued"
        return self.refuse(
            503,
            "queue-full" if full else "queue-unavailable",
            f"{what}; {outcome}, retry in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )

    def repeat(self, record: Record, fp: str, uuid: str) -> Answer:
        """Answer a request whose Idempotency-Key is already known."""
        if record.fp != fp:
            return self.refuse(
                422, "idempotency-key-reused", "this Idempotency-Key was already used with a different message"
            )
        if record.state != "done":
            return Answer.error(
                409,
                "idempotency-key-in-use",
                "a request with this Idempotency-Key is being processed; retry shortly",
                {"Retry-After": "1"},
            )
        self.metrics.idempotent_replays.inc()
        log.info("repeated submission uuid=%s answered from its Idempotency-Key record", uuid)
        return Answer(record.status, record.body, {"Idempotent-Replayed": "true"})
