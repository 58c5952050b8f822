"""The worker-loop handler: P0/P1 entries in, INCOMING-TO-POSTFIX entries out.

Consumes ``reliable-queue.queue-names.primary-queue`` before ``default-queue`` (the common
:class:`~common.queue.Consumer` reads P0 first and lets P1 lead every Nth batch, so P1 never
starves); produces one :class:`~common.payloads.OutboundMail` per recipient on
``postfix.incoming-queue-name`` and the record of who the message went to (``IB:sent:<uuid>``,
:mod:`common.binding`), written in the same MULTI/EXEC that acknowledges the input.

Before signing, every recipient of the batch is looked up on the suppression list
(:mod:`common.suppression`) in one ``MGET``: a recipient with an enforced entry gets no copy, and
the customer a ``suppressed`` event (``uuid``, ``recipient``, ``reason``, ``since``, ``scope``) on
``backdata.queue-name`` -- in the same MULTI/EXEC as the other copies.  Each copy and each
suppressed recipient adds an entry to the message's timeline (:mod:`common.trace`), same
transaction.

A message that can never be sent (unparsable, no or invalid X-Uuid, unknown From domain, no
recipient) is dead-lettered on ``<queue>:dead`` together with an ``error`` event on
``backdata.queue-name`` -- one transaction, so it is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from typing import Final

from common import logs, trace
from common.addressing import valid_uuid
from common.errors import PermanentError, TemporaryError
from common.events import Event, error_event, make_event_id
from common.payloads import SubmittedMail
from common.queue import Entry, Output, Write
from common.suppression import Entry as SuppressionEntry
from common.suppression import SuppressionList, normalise_address
from common.trace import TraceSettings
from common.worker import Done, Fail, Outcome, Retry
from transformer.metrics import TransformerMetrics
from transformer.transform import MessageTransformer, Prepared, Transformed, Unprocessable, printable

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
        suppression: SuppressionList | None = None,
        trace_settings: TraceSettings = trace.DISABLED,
    ) -> None:
        self.transformer = transformer
        self.suppression = suppression if suppression is not None and suppression.settings.enabled else None
        self.trace = trace_settings
        self.primary_queue = primary_queue
        self.outgoing_queue = outgoing_queue
        self.event_queue = event_queue
        self.metrics = metrics
        if transformer.settings.warnings:
            metrics.warnings.inc(len(transformer.settings.warnings))

    def handle_batch(self, entries: Sequence[Entry]) -> list[Outcome]:
        """One outcome per entry: Done (hand-off), Fail (dead-letter + error event) or Retry.

        Every message is prepared first, then the suppression list is read once for all their
        recipients, then the copies are signed.
        """
        prepared: dict[int, tuple[Prepared, float]] = {}
        outcomes: dict[int, Outcome] = {}
        for i, entry in enumerate(entries):
            started = time.perf_counter()
            found = self._prepare(entry)
            if isinstance(found, Prepared):
                prepared[i] = (found, started)
            else:
                outcomes[i] = found
        try:
            suppressed = self._suppressed([p for p, _ in prepared.values()])
        except TemporaryError as exc:
            log.warning("cannot read the suppression list (%s); the batch waits", exc)
            reason = f"suppression list unavailable: {exc}"
            return [outcomes.get(i) or Retry(reason) for i in range(len(entries))]
        for i, (item, started) in prepared.items():
            outcomes[i] = self._sign(entries[i], item, started, suppressed)
        return [outcomes[i] for i in range(len(entries))]

    def _prepare(self, entry: Entry) -> Prepared | Outcome:
        if entry.queue == self.primary_queue:
            self.metrics.polled_primary.inc()
        else:
            self.metrics.polled_default.inc()
        try:
            submitted = SubmittedMail.from_fields(entry.fields)
            return self.transformer.prepare(submitted)
        except Unprocessable as exc:
            return self._fail(entry, str(exc), exc.uuid, exc.stream_id)
        except PermanentError as exc:
            return self._fail(entry, str(exc), _entry_uuid(entry), None)
        except Exception as exc:
            log.exception("unexpected error on %s %s (delivery %d)", entry.queue, entry.id, entry.deliveries)
            return Retry(f"{type(exc).__name__}: {exc}", counts=True)

    def _scope(self, item: Prepared) -> str | None:
        if self.suppression is None:
            return None
        return self.suppression.settings.scope_of(item.profile.domain, item.stream_id)

    def _suppressed(self, items: Sequence[Prepared]) -> dict[tuple[str, str], SuppressionEntry]:
        """The enforced suppression entries of the batch's recipients (one Redis call)."""
        if self.suppression is None or not items:
            return {}
        pairs: list[tuple[str, str]] = []
        for item in items:
            scope = self._scope(item)
            if scope is not None:
                pairs.extend((scope, rcpt) for rcpt in item.recipients)
        return self.suppression.check(pairs)

    def _sign(
        self, entry: Entry, item: Prepared, started: float, suppressed: dict[tuple[str, str], SuppressionEntry]
    ) -> Outcome:
        scope = self._scope(item)
        hits = {}
        if scope is not None and suppressed:
            for rcpt in item.recipients:
                hit = suppressed.get((scope, normalise_address(rcpt)))
                if hit is not None:
                    hits[rcpt] = hit
        try:
            result = self.transformer.sign(item, skip=hits)
        except Exception as exc:
            log.exception("unexpected error on %s %s (delivery %d)", entry.queue, entry.id, entry.deliveries)
            return Retry(f"{type(exc).__name__}: {exc}", counts=True)
        uuid = item.uuid
        where = logs.fields(uuid=uuid, queue=entry.queue, entry_id=entry.id, stream_id=item.stream_id)
        self.metrics.transform_seconds.observe(time.perf_counter() - started)
        self.metrics.signing_seconds.observe(result.sign_seconds)
        if result.mails:
            self.metrics.pushed.inc()
        if result.beacons:
            self.metrics.beacons.inc(result.beacons)
        self._count_wire_form(result, entry)
        for warning in result.warnings:
            self.metrics.warnings.inc()
            log.warning("uuid %s (%s %s): %s", uuid, entry.queue, entry.id, warning, extra=where)
        copies = [Output(self.outgoing_queue, copy.to_fields()) for copy in result.mails]
        steps = [
            trace.entry(
                "signed",
                recipient=copy.recipients[0],
                message_id=_message_id(copy.raw),
                return_path=copy.mail_from,
                bytes=len(copy.raw),
            )
            for copy in result.mails
        ]
        events = []
        for rcpt, hit in hits.items():
            self.metrics.suppressed.labels(hit.reason).inc()
            steps.append(
                trace.entry("suppressed", recipient=rcpt, reason=hit.reason, since=int(hit.first), scope=scope)
            )
            events.append(self._suppressed_event(item, rcpt, hit))
            log.info(
                "uuid %s: a recipient is on the suppression list of %s (%s since %d); not sent",
                uuid,
                hit.scope,
                hit.reason,
                hit.first,
                extra=logs.fields(uuid=uuid, recipient=rcpt, stream_id=item.stream_id),
            )
        log.info(
            "signed uuid %s from %s: %d copies (one per recipient), %d suppressed (%s %s)",
            uuid,
            item.profile.domain,
            len(result.mails),
            len(hits),
            entry.queue,
            entry.id,
            extra=where,
        )
        return Done([*copies, result.record, *events, *trace.append(self.trace, uuid, *steps)])

    def _suppressed_event(self, item: Prepared, rcpt: str, hit: SuppressionEntry) -> Output:
        event = Event(
            event="suppressed",
            uuid=item.uuid,
            event_id=make_event_id("suppressed", item.uuid, rcpt.lower()),
            recipient=rcpt,
            stream_id=item.stream_id,
            reason=hit.reason,
            fd=item.profile.domain,
            extra={"since": int(hit.first), "scope": hit.scope},
        )
        return Output(self.event_queue, event.to_fields())

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
                    result.uuid,
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
        steps = trace.append(self.trace, uuid, trace.entry("failed", reason=reason))
        return Fail(reason, [self._error_output(entry, reason, uuid, stream_id), *steps])

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Write]:
        """The error event (and trace entry) written with an entry the worker dead-letters (it kept failing)."""
        uuid = _entry_uuid(entry)
        return [
            self._error_output(entry, reason, uuid, None),
            *trace.append(self.trace, uuid, trace.entry("failed", reason=reason)),
        ]

    def _error_output(self, entry: Entry, reason: str, uuid: str | None, stream_id: str | None) -> Output:
        event = error_event(SERVICE, reason, uuid=uuid)
        # Stable id: the same entry always yields the same event id (customer-side de-duplication).
        event = dataclasses.replace(
            event, stream_id=stream_id, event_id=make_event_id("error", SERVICE, entry.queue, entry.id)
        )
        return Output(self.event_queue, event.to_fields())


_MESSAGE_ID: Final = re.compile(rb"^Message-ID:\s*(<[^>\r\n]{1,300}>)", re.IGNORECASE | re.MULTILINE)


def _message_id(raw: bytes) -> str | None:
    """The Message-ID of a signed copy (its header block is searched, not parsed)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    found = _MESSAGE_ID.search(head)
    return found.group(1).decode("ascii", "replace") if found else None


def _entry_uuid(entry: Entry) -> str | None:
    raw = entry.fields.get(b"uuid", b"")
    uuid = raw.decode("ascii", "replace")
    return uuid if valid_uuid(uuid) else None
