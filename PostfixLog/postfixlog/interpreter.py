"""Turn parsed Postfix log lines into events and record updates (pure: no I/O).

The log follower reads a chunk of lines, fetches the records the chunk refers to
(:meth:`Interpreter.needs`), and calls :meth:`Interpreter.apply`, which returns the events to
emit and the Redis writes to make -- both committed in one MULTI/EXEC with the new log
position, so every line produces its events exactly once.

Events (DESIGN §5):

* ``status=sent``      -> ``delivered`` with the remote IP (``relay=host[ip]:port``);
* ``status=bounced``   -> ``bounce`` with ``type`` hard/soft/unroutable, ``reason``, ``status``,
  ``classification`` and ``suppress`` from :func:`common.bouncerules.classify` with the
  installation's rules (the shipped ones and the customer file's ``common-config.bounce-rules``);
* ``status=deferred``  -> ``deferred`` with the remote reply (never ``suppress``);
* qmgr's message-level ``status=expired`` -> ``bounce`` classified ``expired``, with the last
  deferral's reason.

``event_id`` is derived from (queue id, recipient, status, the log line itself), so it names
one delivery attempt.  Lines about queue files PostfixLog did not inject (Postfix's own
notifications, mail from other clients) produce no event.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from common import trace
from common.bouncerules import Rules, classify
from common.bounces import BounceType
from common.events import Event, EventKind, make_event_id
from postfixlog.logparser import Line
from postfixlog.records import Delivery

#: The tagged return path of :mod:`common.addressing`: ``bounce-<uuid>-<tag>@<domain>``.
_RETURN_PATH = re.compile(r"^bounce-([a-z0-9]+)-[a-z2-7]{10}@[^@\s]+$")

#: Reason prefix of an ``expired`` bounce.
EXPIRED_REASON = "undelivered within the queue lifetime (maximal_queue_lifetime)"


@dataclass
class Effects:
    """What one chunk of lines produces."""

    events: list[Event] = field(default_factory=list)
    qid_updates: dict[str, dict[str, str]] = field(default_factory=dict)
    tx_updates: dict[str, dict[str, str]] = field(default_factory=dict)
    qid_deletes: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    #: Timeline entries (uuid, JSON) of the delivery attempts seen (:mod:`common.trace`).
    traces: list[tuple[str, str]] = field(default_factory=list)
    #: Remote answers of deferred and bounced deliveries: (provider or None, recipient, text),
    #: for the shaper's automatic back-off.
    replies: list[tuple[str | None, str, str]] = field(default_factory=list)

    def update_qid(self, queue_id: str, fields: Mapping[str, str]) -> None:
        """Add fields to write into a queue id's record."""
        self.qid_updates.setdefault(queue_id, {}).update(fields)

    def update_tx(self, token: str, fields: Mapping[str, str]) -> None:
        """Add fields to write into an injection record."""
        self.tx_updates.setdefault(token, {}).update(fields)


class Interpreter:
    """Stateless rules; the state lives in Redis records fetched per chunk."""

    def __init__(self, rules: Rules | None = None) -> None:
        #: The bounce rules that read failures (default: the shipped ones).
        self.rules = rules

    def needs(self, lines: Iterable[Line]) -> tuple[set[str], set[str]]:
        """(tokens, queue ids) whose records :meth:`apply` needs for ``lines``.

        Queue ids introduced by a ``client=`` line are fetched too: their injection record may
        already be gone (entry acknowledged and cleaned up while the follower lagged), and then
        the record the injector wrote after Postfix' 250 is the one to use.
        """
        tokens: set[str] = set()
        qids: set[str] = set()
        for line in lines:
            if line.queue_id is None:
                continue
            if line.kind == "client" and line.token:
                tokens.add(line.token)
            elif line.kind in ("from", "status", "expired", "removed"):
                qids.add(line.queue_id)
        return tokens, qids

    def apply(
        self,
        lines: Iterable[Line],
        tx_records: Mapping[str, Delivery | None],
        qid_records: Mapping[str, Delivery | None],
    ) -> Effects:
        """Events and record updates for ``lines``, given the fetched records."""
        effects = Effects()
        deliveries: dict[str, Delivery | None] = dict(qid_records)
        for line in lines:
            effects.counts[f"line:{line.kind}"] += 1
            qid = line.queue_id
            if qid is None or line.kind in ("other", "unparsed"):
                continue
            if line.kind == "client":
                self._client(line, qid, tx_records, deliveries, effects)
                continue
            delivery = deliveries.get(qid)
            if delivery is None and line.kind == "from":
                delivery = self._from_return_path(line, qid, effects)
            if delivery is None:
                if line.kind in ("status", "expired"):
                    effects.counts["foreign"] += 1
                continue
            if not delivery.recipient and line.recipient:
                delivery = replace(delivery, recipient=line.recipient)
            deliveries[qid] = self._apply_one(line, qid, delivery, effects)
        return effects

    def _client(
        self,
        line: Line,
        qid: str,
        tx_records: Mapping[str, Delivery | None],
        deliveries: dict[str, Delivery | None],
        effects: Effects,
    ) -> None:
        if not line.token:
            return
        record = tx_records.get(line.token)
        if record is None:
            return
        delivery = record.with_queue_id(qid, accepted=False)
        deliveries[qid] = delivery
        effects.update_qid(qid, delivery.to_hash())
        effects.update_tx(line.token, {"qid": qid})

    def _from_return_path(self, line: Line, qid: str, effects: Effects) -> Delivery | None:
        """Rebuild a record from qmgr's ``from=`` line when no other record is there yet.

        That happens when smtpd's ``client=`` line was lost (an smtpd that outlived a killed
        Postfix master logs into the void) and the status line comes before the injector wrote
        the record after Postfix' 250.  The tagged return path names the uuid; the status line
        names the recipient.  The injector's full record, when it lands, replaces this one.
        """
        match = _RETURN_PATH.match(line.sender or "")
        if match is None:
            return None  # Postfix' own notifications (null sender) and foreign mail
        delivery = Delivery(
            uuid=match.group(1), recipient="", mail_from=line.sender or "", from_domain="", queue_id=qid
        )
        effects.update_qid(qid, delivery.to_hash())
        effects.counts["record-from-return-path"] += 1
        return delivery

    def _apply_one(self, line: Line, qid: str, delivery: Delivery, effects: Effects) -> Delivery | None:
        if line.kind == "from":
            # qmgr picked the queue file up: Postfix has committed the message.
            if not delivery.accepted:
                effects.update_qid(qid, {"acc": "1"})
                return delivery.with_queue_id(qid, accepted=True)
            return delivery
        if line.kind == "removed":
            if delivery.accepted and not delivery.final and line.program.endswith("qmgr"):
                effects.events.append(self._inferred(line, qid, delivery))
                effects.counts["event:delivered-inferred"] += 1
                effects.traces.append((delivery.uuid, _attempt(qid, delivery, "sent", line, inferred=True)))
            effects.qid_deletes.add(qid)
            effects.qid_updates.pop(qid, None)
            return None
        if delivery.final:
            # This recipient's outcome is already out.  Postfix marks a recipient done in its
            # queue file just after logging it; a Postfix stopped in between tries it again and
            # logs a second outcome for the same copy -- the customer gets the first one only.
            effects.counts["status-after-final"] += 1
            return delivery
        event = self.event(line, qid, delivery)
        if event is None:
            effects.counts["status-ignored"] += 1
            return delivery
        effects.events.append(event)
        effects.counts[f"event:{event.event}"] += 1
        status = "expired" if line.kind == "expired" or line.status == "expired" else line.status or ""
        effects.traces.append((delivery.uuid, _attempt(qid, delivery, status, line)))
        if event.event in ("deferred", "bounce") and line.kind == "status":
            effects.replies.append((delivery.provider, delivery.recipient, line.text))
        if event.event != "deferred":
            effects.update_qid(qid, {"fin": "1"})
            return replace(delivery, final=True)
        last = {"last-reason": line.text, "last-status": event.status or ""}
        if line.ip:
            last["last-ip"] = line.ip
        effects.update_qid(qid, last)
        return replace(delivery, last_reason=line.text, last_status=event.status, last_ip=line.ip or delivery.last_ip)

    def event(self, line: Line, qid: str, delivery: Delivery) -> Event | None:
        """The event of one status or expiry line, or None for statuses that are not outcomes."""
        if line.kind == "expired" or line.status == "expired":
            return self._expired(line, qid, delivery)
        event_id = make_event_id("postfix", qid, delivery.recipient, line.status or "", line.raw)
        if line.status == "sent":
            return _event("delivered", delivery, event_id, ip=line.ip, status=line.dsn)
        if line.status not in ("bounced", "deferred"):
            return None
        verdict = classify(line.text, rules=self.rules)
        return _event(
            "bounce" if line.status == "bounced" else "deferred",
            delivery,
            event_id,
            ip=line.ip,
            type=verdict.type,
            reason=line.text,
            status=verdict.status or line.dsn,
            classification=verdict.classification,
            suppress=verdict.suppress if line.status == "bounced" else False,
        )

    def _inferred(self, line: Line, qid: str, delivery: Delivery) -> Event:
        """``delivered`` for a recipient Postfix marked done without a status line we could read.

        Postfix marks a recipient done only after the remote server accepted the message (or
        after its bounce was recorded, which a killed Postfix cannot do); the status line itself
        can be lost when Postfix' master is killed while a delivery agent logs it.
        """
        event = _event(
            "delivered",
            delivery,
            make_event_id("postfix", qid, delivery.recipient, "removed", line.raw),
            ip=delivery.last_ip,
            status=None,
        )
        return replace(event, extra={"inferred": True})

    def _expired(self, line: Line, qid: str, delivery: Delivery) -> Event:
        # type keeps what the last attempt says: soft after a 4xx reply, unroutable when the
        # destination never answered (DNS failure, connection refused or timed out).
        last = delivery.last_reason
        verdict = classify(last or "", expired=True, rules=self.rules)
        bounce_type = classify(last, rules=self.rules).type if last else "soft"
        return _event(
            "bounce",
            delivery,
            make_event_id("postfix", qid, delivery.recipient, "expired", line.raw),
            ip=delivery.last_ip,
            type=bounce_type,
            reason=f"{EXPIRED_REASON}; last attempt: {last}" if last else EXPIRED_REASON,
            status=delivery.last_status or verdict.status or "4.4.7",
            classification=verdict.classification,
            suppress=False,
        )


def _attempt(qid: str, delivery: Delivery, status: str, line: Line, *, inferred: bool = False) -> str:
    """The timeline entry of one status line."""
    if inferred:
        return trace.entry(
            "attempt",
            recipient=delivery.recipient,
            queue_id=qid,
            status=status,
            reply="status line lost; Postfix removed the message after delivering it",
        )
    return trace.entry(
        "attempt",
        recipient=delivery.recipient,
        queue_id=qid,
        status=status,
        relay=line.relay,
        dsn=line.dsn,
        reply=line.text or None,
    )


def _event(
    kind: EventKind,
    delivery: Delivery,
    event_id: str,
    *,
    ip: str | None,
    status: str | None,
    type: BounceType | None = None,
    reason: str | None = None,
    classification: str | None = None,
    suppress: bool | None = None,
) -> Event:
    return Event(
        event=kind,
        uuid=delivery.uuid,
        event_id=event_id,
        recipient=delivery.recipient,
        stream_id=delivery.stream_id,
        fd=delivery.from_domain or None,
        ip=ip,
        status=status,
        type=type,
        reason=reason,
        classification=classification,
        suppress=suppress,
    )
