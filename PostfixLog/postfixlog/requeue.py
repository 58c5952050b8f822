"""Move mail still in Postfix' queue back to ``INCOMING-TO-POSTFIX`` (shutdown, with Postfix stopped).

Produces ``INCOMING-TO-POSTFIX`` entries (:class:`common.payloads.OutboundMail`): the envelope
comes from ``postqueue -j`` (return path, recipients not delivered yet) and the message's
record (uuid, stream id, From domain); the content from ``postcat -bh`` without the
``Received:`` header this Postfix added and without PostfixLog's routing header
(:mod:`postfixlog.routing`), so the copy delivered later carries nothing internal.

Exactly once: each message is added to the queue in the same MULTI/EXEC that marks its record
``requeued``; then it is removed from Postfix (``postsuper -d``).  When PostfixLog dies in
between, the next start removes the marked messages before starting Postfix
(:meth:`Requeuer.finish_interrupted`), so none is sent twice.

Messages without a record (Postfix' own notifications, mail from other clients) stay in
Postfix' queue and are delivered when it starts again.  A message whose outcome the log already
gave (record ``fin``: Postfix logged it, then stopped before marking the recipient done) is
removed, not requeued: it would be delivered twice.

While Postfix runs, :meth:`Requeuer.withdraw` takes the deferred mail of paused providers out of
it (automatic back-off, :mod:`postfixlog.shaping`): ``postsuper -h`` first (Postfix stops
retrying it at once), then each held message goes to its provider's hold in Redis -- in the same
MULTI/EXEC that marks its record ``requeued`` -- and is deleted from Postfix.  So a paused
provider's mail waits in Redis, not in Postfix' deferred queue, and comes back at the ramp's pace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from common import logs
from common.payloads import OutboundMail
from common.queue import Output, Write, redis_errors, write_all
from postfixlog import records
from postfixlog.instance import PostfixError, PostfixInstance
from postfixlog.records import Delivery
from postfixlog.routing import strip_route

log = logging.getLogger(__name__)

REQUEUED_FIELD = "requeued"
_HEADER_START = re.compile(rb"^[^\s:]+:", re.MULTILINE)


@dataclass
class RequeueReport:
    """What a requeue pass did."""

    requeued: int = 0
    #: Messages whose outcome was already logged: removed from Postfix, not requeued.
    finished: int = 0
    removed: int = 0
    left: int = 0
    failed: int = 0


def strip_own_received(content: bytes, myhostname: str, queue_id: str) -> bytes:
    """``content`` without the first ``Received:`` header when this Postfix added it."""
    if not content.startswith(b"Received:"):
        return content
    nxt = _HEADER_START.search(content, 1)
    end = nxt.start() if nxt else len(content)
    header = content[:end]
    if f"by {myhostname} (Postfix)".encode() in header and f"id {queue_id}".encode() in header:
        return content[end:]
    return content


def crlf(content: bytes) -> bytes:
    """LF line ends (postcat) back to CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", content)


class Requeuer:
    """Drains a stopped Postfix' queue into ``INCOMING-TO-POSTFIX``."""

    def __init__(self, instance: PostfixInstance, client: redis.Redis, *, incoming_queue: str, name: str) -> None:
        self.instance = instance
        self.redis: redis.Redis = client
        self.incoming_queue = incoming_queue
        #: The PostfixLog instance whose records (``IB:postfixlog:qid:<name>:…``) describe the queue.
        self.name = name
        self._last_report: RequeueReport | None = None

    def _scan(self) -> list[tuple[dict[str, Any], dict[bytes, bytes]]]:
        queued = self.instance.queue_json()
        if not queued:
            return []
        with redis_errors("read records of queued messages"):
            pipe = self.redis.pipeline(transaction=False)
            for message in queued:
                pipe.hgetall(records.qid_key(self.name, message["queue_id"]))
                pipe.hgetall(records.legacy_qid_key(message["queue_id"]))
            found = pipe.execute()
        # A record written before 2.1 (legacy key) counts when the instance's own is missing.
        return [(m, found[2 * i] or found[2 * i + 1]) for i, m in enumerate(queued)]

    @property
    def last_report(self) -> RequeueReport | None:
        """What the last :meth:`requeue_all` did (None before it ran)."""
        return self._last_report

    def finish_interrupted(self) -> int:
        """Remove messages an interrupted requeue already put back in Redis; returns how many."""
        marked = [m["queue_id"] for m, rec in self._scan() if REQUEUED_FIELD.encode() in rec]
        if marked:
            log.warning("removing %d messages already requeued by the previous run", len(marked))
            self._remove(marked)
        return len(marked)

    def requeue_all(self) -> RequeueReport:
        """Requeue every message PostfixLog injected that Postfix has not finished."""
        report = RequeueReport()
        self._last_report = report
        done: list[str] = []
        for message, raw_record in self._scan():
            qid = message["queue_id"]
            if REQUEUED_FIELD.encode() in raw_record:
                done.append(qid)
                continue
            delivery = Delivery.from_hash(raw_record)
            if delivery is None:
                report.left += 1
                if message.get("sender"):
                    log.warning("queued message %s has no PostfixLog record; left in Postfix' queue", qid)
                continue
            if delivery.final:
                # Its outcome is logged (and reported); Postfix was stopped before it marked the
                # recipient done.  Sending it again would deliver it twice.
                log.info("not requeued: %s (uuid=%s) has its final outcome already", qid, delivery.uuid)
                done.append(qid)
                report.finished += 1
                continue
            try:
                self._requeue_one(message, delivery)
            except PostfixError as exc:
                report.failed += 1
                log.error("cannot requeue %s (uuid=%s): %s; left in Postfix' queue", qid, delivery.uuid, exc)
                continue
            done.append(qid)
            report.requeued += 1
        self._remove(done)
        report.removed = len(done)
        log.info(
            "requeue: %d messages back to %s, %d left in Postfix, %d failed",
            report.requeued,
            self.incoming_queue,
            report.left,
            report.failed,
        )
        return report

    def withdraw(
        self, providers: Collection[str], writes: Callable[[dict[str, bytes | str], str], Sequence[Write]]
    ) -> int:
        """Move deferred mail of ``providers`` from the running Postfix to Redis; returns how many.

        ``writes(fields, provider)`` says where a withdrawn entry goes (the provider's hold).
        Messages a previous call put on hold but did not finish are moved too, whatever their
        provider.

        Raises:
            PostfixError: Postfix' queue cannot be read or changed.
            QueueUnavailableError: Redis is down.
        """
        scanned = [(m, r) for m, r in self._scan() if m.get("queue_name") in ("deferred", "hold")]
        deferred = []
        for message, raw_record in scanned:
            delivery = Delivery.from_hash(raw_record)
            if message.get("queue_name") == "deferred" and delivery is not None and delivery.provider in providers:
                deferred.append(str(message["queue_id"]))
        self.instance.hold(deferred, queue="deferred")  # from now on Postfix leaves them alone
        moved: list[str] = []
        for message, raw_record in self._scan():
            delivery = Delivery.from_hash(raw_record)
            if message.get("queue_name") != "hold" or delivery is None:
                continue
            if REQUEUED_FIELD.encode() in raw_record:  # in Redis already (an interrupted call)
                moved.append(message["queue_id"])
                continue
            provider = delivery.provider or delivery.recipient.rpartition("@")[2].lower()
            mail = self._outbound(message, delivery)
            try:
                self._move(message["queue_id"], writes(dict(mail.to_fields()), provider))
            except PostfixError as exc:
                log.error("cannot withdraw %s (uuid=%s): %s", message["queue_id"], delivery.uuid, exc)
                continue
            moved.append(message["queue_id"])
        if moved:
            self.instance.delete(moved, queue="hold")
            with redis_errors("delete records of withdrawn messages"):
                self.redis.delete(*(records.qid_key(self.name, q) for q in moved))
            log.warning("withdrew %d deferred messages of paused providers from Postfix into Redis", len(moved))
        return len(moved)

    def _move(self, qid: str, writes: Sequence[Write]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        write_all(pipe, writes)
        pipe.hset(records.qid_key(self.name, qid), REQUEUED_FIELD, "1")
        with redis_errors(f"withdraw {qid}"):
            pipe.execute()

    def _outbound(self, message: dict[str, Any], delivery: Delivery) -> OutboundMail:
        """The queued message as an ``INCOMING-TO-POSTFIX`` entry (without what Postfix/PostfixLog added).

        Raises:
            PostfixError: postcat failed.
        """
        qid = message["queue_id"]
        content = strip_route(strip_own_received(self.instance.message(qid), self.instance.myhostname, qid))
        recipients = tuple(r["address"] for r in message.get("recipients", ())) or (delivery.recipient,)
        return OutboundMail(
            raw=crlf(content),
            uuid=delivery.uuid,
            mail_from=message.get("sender") or delivery.mail_from,
            recipients=recipients,
            from_domain=delivery.from_domain,
            stream_id=delivery.stream_id,
            submitted_at=delivery.submitted_at,
            meta=delivery.meta,
        )

    def _requeue_one(self, message: dict[str, Any], delivery: Delivery) -> None:
        qid = message["queue_id"]
        mail = self._outbound(message, delivery)
        self._move(qid, [Output(self.incoming_queue, mail.to_fields())])
        log.info(
            "requeued uuid=%s (Postfix queue id %s)",
            delivery.uuid,
            qid,
            extra=logs.fields(uuid=delivery.uuid, queue=self.incoming_queue, recipient=mail.recipients[0]),
        )

    def _remove(self, queue_ids: list[str]) -> None:
        if not queue_ids:
            return
        self.instance.delete(queue_ids)
        with redis_errors("delete records of requeued messages"):
            self.redis.delete(*(records.qid_key(self.name, q) for q in queue_ids))
            self.redis.delete(*(records.legacy_qid_key(q) for q in queue_ids))
