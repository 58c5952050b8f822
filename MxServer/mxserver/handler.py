"""The aiosmtpd handler: RCPT policy, then classify each mail and make the outcome durable.

Produces events on the event stream (``backdata.queue-name``, default ``EVENT_QUEUE``) and
files in the eml directory.  The reply to DATA is ``250`` only after the events are in Redis
(or the file is fsync'd); when Redis or the disk is unavailable it is ``451 4.3.0`` and the
sending MTA retries later.  A mail the classifier fails on (a bug) is kept as unclassified,
never lost.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from typing import Final

from aiosmtpd.smtp import SMTP, Envelope, Session

from common.errors import QueueFullError, TemporaryError
from common.queue import AsyncQueues
from mxserver.classifier import Classification, Classifier
from mxserver.emlstore import EmlStore
from mxserver.metrics import MxMetrics
from mxserver.recipients import MAX_RECIPIENTS, RecipientPolicy

log = logging.getLogger(__name__)

#: Mails larger than this are classified in a worker thread so other sessions keep moving.
THREAD_THRESHOLD: Final = 256 * 1024


class MxHandler:
    """aiosmtpd hooks of the public MX."""

    def __init__(
        self,
        *,
        classifier: Classifier,
        policy: RecipientPolicy,
        queues: AsyncQueues,
        event_queue: str,
        store: EmlStore,
        metrics: MxMetrics,
        hostname: str,
    ) -> None:
        self.classifier = classifier
        self.policy = policy
        self.queues = queues
        self.event_queue = event_queue
        self.store = store
        self.metrics = metrics
        self.hostname = hostname
        self.in_flight = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Accept only the addresses this installation owns (see :mod:`mxserver.recipients`)."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        decision = self.policy.check(address)
        if decision.refused is not None:
            self.metrics.rejected.labels(decision.refused).inc()
            log.info("refused RCPT (%s) for domain %s from %s", decision.refused, _domain(address), _ip(session))
            return decision.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return decision.reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Classify the mail, store the outcome durably, then answer."""
        self.in_flight += 1
        try:
            return await self._data(session, envelope)
        finally:
            self.in_flight -= 1

    async def handle_exception(self, error: Exception) -> str:
        """Any unexpected error in a hook: a temporary failure, so the sender keeps the mail."""
        log.error("unexpected %s in an SMTP session: %s", type(error).__name__, error, exc_info=error)
        self.metrics.warnings.inc()
        return "451 4.3.0 Temporary failure, please try again later"

    async def _data(self, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        result = await self._classify(envelope.rcpt_tos, raw)
        if result.events:
            try:
                await self.queues.enqueue_many(self.event_queue, [e.to_fields() for e in result.events])
            except QueueFullError as exc:
                return self._temporary("queue-full", exc, "Event queue full, please try again later")
            except TemporaryError as exc:
                return self._temporary("redis", exc, "Temporary failure, please try again later")
            self.metrics.count(result)
            log.info(
                "%s (%s) from %s: %d event(s) for uuid %s",
                result.kind,
                result.report,
                _ip(session),
                len(result.events),
                ",".join(result.uuids),
            )
            return f"250 2.0.0 OK {result.kind}"
        try:
            path = await asyncio.to_thread(self.store.save, self._trace(session, envelope) + raw)
        except OSError as exc:
            return self._temporary("disk", exc, "Cannot store the message now, please try again later")
        self.metrics.count(result)
        self.metrics.eml_files.set(self.store.count)
        self.metrics.eml_bytes.set(self.store.total_bytes)
        log.info("unclassified mail from %s kept as %s: %s", _ip(session), path.name, result.note)
        return "250 2.0.0 OK kept"

    async def _classify(self, recipients: list[str], raw: bytes) -> Classification:
        try:
            if len(raw) > THREAD_THRESHOLD:
                return await asyncio.to_thread(self.classifier.classify, recipients, raw)
            return self.classifier.classify(recipients, raw)
        except Exception:  # the one boundary: a classifier bug must not lose the mail; keep it unclassified
            log.exception("classifier failed on a %d-byte mail; keeping it as unclassified", len(raw))
            self.metrics.warnings.inc()
            return Classification("unclassified", note="classifier error (see log)")

    def _temporary(self, cause: str, exc: Exception, text: str) -> str:
        self.metrics.temporary_failures.labels(cause).inc()
        log.warning("answering 451 (%s): %s", cause, exc)
        if cause == "queue-full":
            return f"452 4.3.1 {text}"
        return f"451 4.3.0 {text}"

    def _trace(self, session: Session, envelope: Envelope) -> bytes:
        """Trace headers for a kept file (as a delivering MTA would add them)."""
        mail_from = _header_safe(envelope.mail_from or "")
        lines = [f"Return-Path: <{mail_from.strip('<>')}>"]
        lines += [f"X-Original-To: {_header_safe(r)}" for r in envelope.rcpt_tos]
        helo = _header_safe(session.host_name or "unknown")
        tls = "S" if session.ssl else ""
        lines.append(
            f"Received: from {helo} ([{_ip(session)}])\r\n\tby {self.hostname} (mxserver) with ESMTP{tls};"
            f"\r\n\t{email.utils.formatdate()}"
        )
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def _header_safe(value: str) -> str:
    return "".join(ch for ch in value if ch.isprintable())[:300]


def _ip(session: Session) -> str:
    peer: object = session.peer
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def _domain(address: str) -> str:
    return address.rpartition("@")[2][:100] or "(none)"
