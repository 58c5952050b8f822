"""The aiosmtpd handler: RCPT policy, then classify each mail and make the outcome durable.

Produces events on the event stream (``backdata.queue-name``, default ``EVENT_QUEUE``) and
files in the eml directory.  Each mail is classified in two phases (:mod:`mxserver.analysis`
in a worker process under a time budget, then :mod:`mxserver.verification` here in the loop,
with the Transformer's records fetched from Redis in one round trip).  The reply to DATA is
``250`` only after the events are in Redis (or the file is fsync'd); when Redis or the disk is
unavailable it is ``451 4.3.0`` and the sending MTA retries later.  A mail the classifier fails
on (a bug, a worker over its budget) is kept as unclassified, never lost.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import redis
import redis.asyncio
from aiosmtpd.smtp import SMTP, Envelope, Session

from common import keys, logs
from common import smtpreplies as replies
from common.addressing import AddressSigner
from common.binding import Sent, decode_record
from common.errors import QueueFullError, TemporaryError
from common.queue import AsyncQueues
from mxserver.analysis import Analysis
from mxserver.emlstore import EmlStore
from mxserver.metrics import MxMetrics
from mxserver.pool import Overrun, WorkerLost
from mxserver.recipients import MAX_RECIPIENTS, RecipientPolicy
from mxserver.verification import Outcome, uuids, verify

log = logging.getLogger(__name__)


class Analyser(Protocol):
    """Phase 1 of classification (a :class:`mxserver.pool.ClassifierPool`)."""

    async def analyse(self, recipients: Sequence[str], raw: bytes, client: str = "") -> Analysis:
        """Analyse one mail from ``client`` (an address; may raise Overrun or WorkerLost)."""
        ...


class MxHandler:
    """aiosmtpd hooks of the public MX."""

    def __init__(
        self,
        *,
        analyser: Analyser,
        signer: AddressSigner,
        policy: RecipientPolicy,
        redis_client: redis.asyncio.Redis,
        queues: AsyncQueues,
        event_queue: str,
        store: EmlStore,
        metrics: MxMetrics,
        hostname: str,
    ) -> None:
        self.analyser = analyser
        self.signer = signer
        self.policy = policy
        self.redis = redis_client
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
            return replies.MX_TOO_MANY_RECIPIENTS
        decision = self.policy.check(address)
        if decision.tagged is not None:
            decision = self.policy.check_record(address, decision, await self._record(decision.tagged.uuid))
        if decision.refused is not None:
            self.metrics.rejected.labels(decision.refused).inc()
            log.info(
                "refused RCPT (%s) for domain %s from %s",
                decision.refused,
                _domain(address),
                _ip(session),
                extra=logs.fields(uuid=decision.tagged.uuid if decision.tagged else None, peer=_ip(session)),
            )
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
        return replies.MX_TEMPORARY

    # -- DATA -------------------------------------------------------------------------------------

    async def _data(self, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        outcome = await self._classify(envelope.rcpt_tos, raw, _ip(session))
        if outcome is None:
            return self._temporary("redis", "cannot read the records of the tagged values", replies.MX_TEMPORARY)
        if outcome.events:
            try:
                await self.queues.enqueue_many(self.event_queue, [e.to_fields() for e in outcome.events])
            except QueueFullError as exc:
                return self._temporary("queue-full", exc, replies.MX_EVENT_QUEUE_FULL)
            except TemporaryError as exc:
                return self._temporary("redis", exc, replies.MX_TEMPORARY)
            self.metrics.count(outcome)
            for event in outcome.events:
                log.info(
                    "%s (%s) from %s: %s event %s",
                    outcome.kind,
                    outcome.report,
                    _ip(session),
                    event.event,
                    event.event_id,
                    extra=logs.fields(
                        uuid=event.uuid,
                        recipient=event.recipient,
                        event_id=event.event_id,
                        queue=self.event_queue,
                        peer=_ip(session),
                    ),
                )
            return replies.mx_accepted(outcome.kind)
        if not outcome.kept:
            self.metrics.count(outcome)
            log.info(
                "%s from %s: no event (%s)",
                outcome.kind,
                _ip(session),
                outcome.note,
                extra=logs.fields(peer=_ip(session)),
            )
            return replies.mx_accepted(outcome.kind)
        try:
            path = await asyncio.to_thread(self.store.save, self._trace(session, envelope) + raw)
        except OSError as exc:
            return self._temporary("disk", exc, replies.MX_DISK_UNAVAILABLE)
        self.metrics.count(outcome)
        self.metrics.eml_files.set(self.store.count)
        self.metrics.eml_bytes.set(self.store.total_bytes)
        log.info(
            "%s mail from %s kept as %s: %s%s",
            outcome.kind,
            _ip(session),
            path.name,
            outcome.note,
            f" ({outcome.reason})" if outcome.reason else "",
            extra=logs.fields(peer=_ip(session)),
        )
        return "250 2.0.0 OK kept"

    async def _classify(self, recipients: list[str], raw: bytes, client: str) -> Outcome | None:
        """Both phases; None when Redis cannot give the records (answer 451)."""
        started = time.monotonic()
        try:
            analysis = await self.analyser.analyse(recipients, raw, client)
        except Overrun as exc:
            self.metrics.workers_replaced.labels("overrun").inc()
            log.warning("a %d-byte mail went over the classification budget: %s; keeping it", len(raw), exc)
            return Outcome("unclassified", note=f"not classified: {exc}")
        except WorkerLost as exc:
            self.metrics.workers_replaced.labels("crash").inc()
            self.metrics.warnings.inc()
            log.error("classifying a %d-byte mail: %s; keeping it", len(raw), exc)
            return Outcome("unclassified", note=f"not classified: {exc}")
        except Exception:  # the one boundary: a classifier bug must not lose the mail
            self.metrics.warnings.inc()
            log.exception("classifier failed on a %d-byte mail; keeping it as unclassified", len(raw))
            return Outcome("unclassified", note="classifier error (see log)")
        finally:
            self.metrics.classify_seconds.observe(time.monotonic() - started)
        if analysis.kind in ("unclassified", "own-report"):
            return verify(analysis, {}, self.signer, now=int(time.time()))  # no report to verify: no Redis
        try:
            records = await self._records(uuids(analysis))
        except redis.exceptions.RedisError as exc:
            log.warning("cannot fetch the records of %s: %s", ",".join(uuids(analysis)), exc)
            return None
        return verify(analysis, records, self.signer, now=int(time.time()))

    async def _records(self, wanted: Sequence[str]) -> dict[str, list[Sent]]:
        """The Transformer's records of ``wanted`` uuids, in one round trip."""
        if not wanted:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for uuid in wanted:
            pipe.hgetall(keys.sent_record(uuid))
        replies_: list[dict[Any, Any]] = await pipe.execute()
        return {uuid: decode_record(raw) for uuid, raw in zip(wanted, replies_, strict=True) if raw}

    async def _record(self, uuid: str) -> list[Sent]:
        """The record of one uuid; empty when there is none or Redis does not answer (decide at DATA)."""
        try:
            raw: dict[Any, Any] = await self.redis.hgetall(keys.sent_record(uuid))
        except redis.exceptions.RedisError as exc:
            log.warning("cannot read the record of %s at RCPT (%s); deciding at DATA", uuid, exc)
            return []
        return decode_record(raw)

    def _temporary(self, cause: str, exc: Exception | str, reply: str) -> str:
        self.metrics.temporary_failures.labels(cause).inc()
        log.warning("answering %s (%s): %s", reply[:3], cause, exc)
        return reply

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
