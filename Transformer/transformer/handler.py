"""The worker-loop handler: P0/P1 entries in, INCOMING-TO-POSTFIX entries out.

Consumes ``reliable-queue.queue-names.primary-queue`` before ``default-queue`` (the common
:class:`~common.queue.Consumer` reads P0 first and lets P1 lead every Nth batch, so P1 never
starves); produces one :class:`~common.payloads.OutboundMail` per recipient on
``postfix.incoming-queue-name`` and the record of who the message went to (``IB:sent:<uuid>``,
:mod:`common.binding`), written in the same MULTI/EXEC that acknowledges the input.

A message that can never be sent (unparsable, no or invalid X-Uuid, unknown From domain, no
recipient) is dead-lettered on ``<queue>:dead`` together with an ``error`` event on
``backdata.queue-name`` -- one transaction, so it is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from common import logs
from common.addressing import valid_uuid
from common.errors import PermanentError
from common.events import error_event, make_event_id
from common.payloads import SubmittedMail
from common.queue import Entry, Output
from common.worker import Done, Fail, Outcome, Retry
from transformer.metrics import TransformerMetrics
from transformer.transform import MessageTransformer, Transformed, Unprocessable, printable

log = logging.getLogger(__name__)

SERVICE = "transformer"


class TransformHandler:
    """Transforms batches of submitted messages (a :class:`common.worker.BatchHandler`)."""

    def __init__(
        self,
        transformer: MessageTransformer,
        *,
        primary_queue: str,
        outgoing_queue: str,
        event_queue: str,
        metrics: TransformerMetrics,
    ) -> None:
        self.transformer = transformer
        self.primary_queue = primary_queue
        self.outgoing_queue = outgoing_queue
        self.event_queue = event_queue
        self.metrics = metrics
        if transformer.settings.warnings:
            metrics.warnings.inc(len(transformer.settings.warnings))

    def handle_batch(self, entries: Sequence[Entry]) -> list[Outcome]:
        """One outcome per entry: Done (hand-off), Fail (dead-letter + error event) or Retry."""
        return [self._handle(entry) for entry in entries]

    def _handle(self, entry: Entry) -> Outcome:
        if entry.queue == self.primary_queue:
            self.metrics.polled_primary.inc()
        else:
            self.metrics.polled_default.inc()
        started = time.perf_counter()
        try:
            submitted = SubmittedMail.from_fields(entry.fields)
            result = self.transformer.transform(submitted)
        except Unprocessable as exc:
            return self._fail(entry, str(exc), exc.uuid, exc.stream_id)
        except PermanentError as exc:
            return self._fail(entry, str(exc), _entry_uuid(entry), None)
        except Exception as exc:
            log.exception("unexpected error on %s %s (delivery %d)", entry.queue, entry.id, entry.deliveries)
            return Retry(f"{type(exc).__name__}: {exc}", counts=True)
        mail = result.mail
        where = logs.fields(uuid=mail.uuid, queue=entry.queue, entry_id=entry.id, stream_id=mail.stream_id)
        self.metrics.transform_seconds.observe(time.perf_counter() - started)
        self.metrics.signing_seconds.observe(result.sign_seconds)
        self.metrics.pushed.inc()
        if result.beacons:
            self.metrics.beacons.inc(result.beacons)
        self._count_wire_form(result, entry)
        for warning in result.warnings:
            self.metrics.warnings.inc()
            log.warning("uuid %s (%s %s): %s", mail.uuid, entry.queue, entry.id, warning, extra=where)
        log.info(
            "signed uuid %s from %s: %d copies (one per recipient), %d bytes each (%s %s)",
            mail.uuid,
            mail.from_domain,
            len(result.mails),
            len(mail.raw),
            entry.queue,
            entry.id,
            extra=where,
        )
        copies = [Output(self.outgoing_queue, copy.to_fields()) for copy in result.mails]
        return Done([*copies, result.record])

    def _count_wire_form(self, result: Transformed, entry: Entry) -> None:
        """Metrics (and INFO lines) for re-encodings and the customer's own signatures."""
        form = result.wire_form
        if form.body_parts:
            self.metrics.reencoded.labels("body-part").inc(form.body_parts)
        if form.headers:
            self.metrics.reencoded.labels("header").inc(form.headers)
        if form.smtputf8:
            self.metrics.smtputf8.inc()
        for verdict in result.customer_signatures:
            self.metrics.customer_signatures.labels("kept" if verdict.kept else "removed").inc()
            if not verdict.kept:
                log.info(
                    "uuid %s (%s %s): removed the sender's DKIM-Signature of d=%s: %s",
                    result.mail.uuid,
                    entry.queue,
                    entry.id,
                    verdict.domain,
                    verdict.reason,
                )

    def _fail(self, entry: Entry, reason: str, uuid: str | None, stream_id: str | None) -> Fail:
        self.metrics.failed.inc()
        reason = printable(reason)
        log.warning(
            "unprocessable message uuid %s (%s %s): %s",
            uuid,
            entry.queue,
            entry.id,
            reason,
            extra=logs.fields(uuid=uuid, queue=entry.queue, entry_id=entry.id),
        )
        return Fail(reason, [self._error_output(entry, reason, uuid, stream_id)])

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Output]:
        """The error event written with an entry the worker dead-letters (it kept failing)."""
        return [self._error_output(entry, reason, _entry_uuid(entry), None)]

    def _error_output(self, entry: Entry, reason: str, uuid: str | None, stream_id: str | None) -> Output:
        event = error_event(SERVICE, reason, uuid=uuid)
        # Stable id: the same entry always yields the same event id (customer-side de-duplication).
        event = dataclasses.replace(
            event, stream_id=stream_id, event_id=make_event_id("error", SERVICE, entry.queue, entry.id)
        )
        return Output(self.event_queue, event.to_fields())


def _entry_uuid(entry: Entry) -> str | None:
    raw = entry.fields.get(b"uuid", b"")
    uuid = raw.decode("ascii", "replace")
    return uuid if valid_uuid(uuid) else None
