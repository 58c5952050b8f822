"""Hand ``INCOMING-TO-POSTFIX`` entries to the local Postfix over SMTP.

Consumes ``INCOMING-TO-POSTFIX`` (group ``postfixlog``, :class:`common.payloads.OutboundMail`);
produces ``bounce`` events on ``EVENT_QUEUE`` for recipients Postfix itself refuses (5xx),
``error`` events with entries it dead-letters, and the ``injected`` (with Postfix' queue id) and
``refused`` entries of the message's timeline (``IB:trace:<uuid>``), written with the entry's
acknowledgement.

Each recipient is one SMTP transaction (MAIL FROM = the return path, ``NOTIFY=NEVER``,
``ENVID=<uuid>``, ``XFORWARD IDENT=<token>``) on one of ``connections`` reusable, pipelining
sessions, multiplexed from the worker's thread.  The entry is acknowledged only once Postfix
answered every recipient.

Exactly once, per recipient (``IB:postfixlog:progress:<entry id>``):

1. before any transaction: ``t:<token>`` and the injection record ``IB:postfixlog:tx:<token>``
   (uuid, recipient, stream id, From domain) -- one round trip for the whole batch;
2. after the batch's transactions, again in one round trip: ``q:<queue id>`` and
   ``IB:postfixlog:qid:<queue id>`` for a ``250``; ``r:<reply>`` for a ``5xx`` (a bounce event,
   re-created with the same id if the entry comes back); for a ``4xx`` or a connection failure
   before the end of the message nothing was queued: the field is removed and the recipient
   is sent again later.

A redelivered entry skips ``q:`` and ``r:`` recipients.  A ``t:`` recipient (the process died,
or the connection broke, between sending the message and reading Postfix' answer) is looked
up: in the log follower's records (it links the token to its queue id, and marks the queue id
when qmgr picks the file up) and in Postfix' queue (sender + recipient); only when neither
knows it is it sent again.

Remaining duplicate window: Postfix still committing a message after PostfixLog gave up on the
connection (a reply slower than the SMTP timeout) -- it is then sent twice.

Shaping (when enabled): every recipient's provider is looked up for the batch
(:mod:`postfixlog.providers`) and its message carries the routing header of the provider's
Postfix transport (:mod:`postfixlog.routing`).  Untouched entries (no progress yet) are first
offered to :meth:`postfixlog.shaping.Shaper.admit`: an entry whose provider is paused or over
its rate, or whose sender is over its warm-up volume, is not sent but *held* -- completed with
outputs that move it to its hold's stream in the same MULTI/EXEC as its acknowledgement.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import redis

from common import logs, trace
from common.bouncerules import Rules, classify
from common.errors import PermanentError, TemporaryError
from common.events import Event, error_event, make_event_id
from common.payloads import OutboundMail
from common.queue import Entry, Output, Write, redis_errors
from common.trace import DISABLED, TraceSettings
from common.worker import Done, Fail, Outcome, Retry
from postfixlog import records
from postfixlog.providers import ProviderResolver
from postfixlog.records import Delivery, Progress
from postfixlog.routing import add_route, needs_utf8_route
from postfixlog.shaping import GRANT_FIELD, Candidate, Hold, Shaper
from postfixlog.smtpclient import Job, Message, Reply, Result, SmtpPool, SmtpUncertain

log = logging.getLogger(__name__)

#: ``service`` of the error events PostfixLog emits (the original's name).
ERROR_SERVICE = "postfix"
_EMPTY = Message(b"", False, 0)


class Resolver(Protocol):
    """Finds out whether Postfix queued transactions whose answers were never read."""

    def queued_ids(self, sent: Sequence[tuple[str, str, str]]) -> dict[str, str | None]:
        """For (token, mail_from, recipient) items: token -> Postfix' queue id, or None."""
        ...


class InjectorMetrics(Protocol):
    """Counters the injector updates (see :class:`postfixlog.metrics.PostfixLogMetrics`)."""

    def polled(self, n: int) -> None:
        """Entries read from the queue."""

    def handed(self, n: int) -> None:
        """Entries completely handed to Postfix."""

    def recipient(self, outcome: str) -> None:
        """One recipient's outcome: accepted, refused, deferred, failed."""


class NoMetrics:
    """Metrics sink for tests and tools."""

    def polled(self, n: int) -> None:
        """Ignore."""

    def handed(self, n: int) -> None:
        """Ignore."""

    def recipient(self, outcome: str) -> None:
        """Ignore."""


@dataclass
class _Job:
    """One recipient of one entry."""

    entry: Entry
    mail: OutboundMail
    recipient: str
    message: Message
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    result: Result | None = None
    error: TemporaryError | None = None
    uncertain: bool = False
    provider: str | None = None


@dataclass
class _EntryState:
    """Recipients of one entry and what became of them."""

    entry: Entry
    mail: OutboundMail
    accepted: dict[str, str] = field(default_factory=dict)  # recipient -> queue id
    refused: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    jobs: list[_Job] = field(default_factory=list)
    earlier_tokens: list[str] = field(default_factory=list)  # of attempts before this one
    providers: dict[str, str] = field(default_factory=dict)  # recipient -> provider
    hold: Hold | None = None  # waits in Redis (shaping) instead of going to Postfix now


class Injector:
    """The worker handler (``handle_batch``) of PostfixLog."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        host: str,
        port: int,
        event_queue: str,
        qid_ttl_s: int,
        resolver: Resolver,
        instance: str,
        connections: int = 8,
        timeout_s: float = 60.0,
        local_hostname: str = "postfixlog.localhost",
        metrics: InjectorMetrics | None = None,
        trace_settings: TraceSettings = DISABLED,
        providers: ProviderResolver | None = None,
        shaper: Shaper | None = None,
        rules: Rules | None = None,
    ) -> None:
        self.redis: redis.Redis = client
        self.host = host
        self.port = port
        self.event_queue = event_queue
        self.qid_ttl_s = qid_ttl_s
        self.resolver = resolver
        #: This PostfixLog instance (its Postfix' queue ids are recorded under its name).
        self.instance = instance
        self.timeout_s = timeout_s
        self.local_hostname = local_hostname
        self.metrics: InjectorMetrics = metrics or NoMetrics()
        #: The bounce rules that read Postfix' refusals (default: the shipped ones).
        self.rules = rules
        self.trace = trace_settings
        #: Provider of each recipient (routing header, shaping); None: no routing at all.
        self.providers = providers
        self.shaper = shaper
        self._pool = SmtpPool(host, port, size=connections, local_hostname=local_hostname, timeout_s=timeout_s)
        #: Progress Redis did not take yet (entry id -> recipient -> encoded Progress).
        self._unsaved: dict[str, dict[str, str]] = {}
        #: Entries completed by earlier batches: (stream, entry id, tokens) to clean up.
        self._completed: list[tuple[str, str, list[str]]] = []
        self._prewrite_script = client.register_script(records.PREWRITE_SCRIPT)
        self._finalize_script = client.register_script(records.FINALIZE_SCRIPT)

    # -- the worker's interface ------------------------------------------------------------

    def handle_batch(self, entries: Sequence[Entry]) -> list[Outcome]:
        """Hand a batch to Postfix; one outcome per entry."""
        self.metrics.polled(len(entries))
        try:
            return self._handle(entries)
        except Exception as exc:  # the boundary: a bug retries the batch (counted), never kills the loop
            log.exception("unexpected error handing %d entries to Postfix", len(entries))
            return [Retry(f"{type(exc).__name__}: {exc}", counts=True) for _ in entries]

    def _handle(self, entries: Sequence[Entry]) -> list[Outcome]:
        self._cleanup_completed()
        outcomes: dict[int, Outcome] = {}
        states: dict[int, _EntryState] = {}
        for i, entry in enumerate(entries):
            try:
                states[i] = _EntryState(entry, self._decode(entry))
            except PermanentError as exc:
                outcomes[i] = Fail(str(exc), self.dead_letter_outputs(entry, str(exc)))
        try:
            progress = self._read_progress(list(states.values()))
            self._route(list(states.values()))
            self._shape(list(states.values()), progress)
            going = [state for state in states.values() if state.hold is None]
            resolved = self._plan(going, [progress[state.entry.id] for state in going])
            self._prewrite([job for state in going for job in state.jobs], resolved)
        except TemporaryError as exc:
            reason = str(exc)
            return [outcomes.get(i) or Retry(reason) for i in range(len(entries))]
        jobs = [job for state in states.values() for job in state.jobs]
        self._send(jobs)
        self._finalize(jobs)
        for i, state in states.items():
            outcomes[i] = self._outcome(state)
        return [outcomes[i] for i in range(len(entries))]

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Output]:
        """An ``error`` event (service ``postfix``) for a dead-lettered entry."""
        uuid = (entry.field("uuid") or b"").decode("utf-8", "replace") or None
        event = error_event(ERROR_SERVICE, f"message not handed to Postfix: {reason}", uuid=uuid)
        return [Output(self.event_queue, event.to_fields())]

    def reconnect(self) -> None:
        """Use new SMTP sessions from the next batch on (thread-safe; after a Postfix restart)."""
        self._pool.request_reconnect()

    def close(self) -> None:
        """Close every SMTP session; delete records of the last completed entries."""
        self._pool.close()
        self._cleanup_completed()

    # -- steps -----------------------------------------------------------------------------

    @staticmethod
    def _decode(entry: Entry) -> OutboundMail:
        mail = OutboundMail.from_fields(entry.fields)
        if not mail.recipients:
            raise PermanentError("entry has no recipients")
        if not mail.mail_from or not mail.uuid:
            raise PermanentError("entry has no return path (mail_from) or no uuid")
        for address in (mail.mail_from, *mail.recipients):
            if any(ch in address for ch in "<>\r\n") or "@" not in address:
                raise PermanentError(f"entry has a malformed address {address[:100]!r}")
        return mail

    def _read_progress(self, states: list[_EntryState]) -> dict[str, dict[str, Progress | None]]:
        """Per entry: recipient -> what an earlier attempt did (Redis, and what Redis did not take)."""
        if not states:
            return {}
        with redis_errors("read injection progress"):
            pipe = self.redis.pipeline(transaction=False)
            for state in states:
                pipe.hgetall(records.progress_key(state.entry.id))
            replies = pipe.execute()
        progress: dict[str, dict[str, Progress | None]] = {}
        for state, reply in zip(states, replies, strict=True):
            known = {k.decode(): Progress.decode(v) for k, v in reply.items()}
            for rcpt, encoded in self._unsaved.get(state.entry.id, {}).items():
                known[rcpt] = Progress.decode(encoded)
            progress[state.entry.id] = known
        return progress

    def _route(self, states: list[_EntryState]) -> None:
        """The provider of every recipient (MX lookups of the batch in parallel, cached)."""
        if self.providers is None or not states:
            return
        domains = {rcpt.rpartition("@")[2] for state in states for rcpt in state.mail.recipients}
        found = self.providers.providers(domains)
        for state in states:
            state.providers = {rcpt: found[rcpt.rpartition("@")[2].lower()] for rcpt in state.mail.recipients}

    def _shape(self, states: list[_EntryState], progress: dict[str, dict[str, Progress | None]]) -> None:
        """Hold entries whose provider is paused or over its rate, or whose sender is over its warm-up.

        Only untouched entries: one that an earlier attempt partly handed to Postfix goes on.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        if self.shaper is None:
            return
        fresh = [s for s in states if not progress[s.entry.id] and s.providers]
        if not fresh:
            return
        candidates = []
        for state in fresh:
            provider = state.providers[state.mail.recipients[0]]
            grant = (state.entry.field(GRANT_FIELD) or b"").decode("utf-8", "replace")
            candidates.append(Candidate(provider, state.mail.from_domain, grant == provider))
        for state, hold in zip(fresh, self.shaper.admit(candidates), strict=True):
            state.hold = hold
            if hold is not None:
                log.debug(
                    "uuid=%s held (%s, %s)",
                    state.mail.uuid,
                    hold.name,
                    hold.reason,
                    extra=logs.fields(uuid=state.mail.uuid, queue=state.entry.queue, entry_id=state.entry.id),
                )

    def _plan(self, states: list[_EntryState], progress: list[dict[str, Progress | None]]) -> list[_Job]:
        """Decide which recipients still need a transaction.

        Returns recipients found already queued by Postfix (their progress is to be recorded).
        """
        found_queued: list[_Job] = []
        if not states:
            return found_queued
        uncertain: list[tuple[str, str, str]] = []
        for state, known in zip(states, progress, strict=True):
            uncertain += [
                (p.value, state.mail.mail_from, r) for r, p in known.items() if p is not None and p.kind == "t"
            ]
        resolved = self.resolver.queued_ids(uncertain) if uncertain else {}
        if uncertain:
            found = sum(1 for qid in resolved.values() if qid)
            log.info(
                "%d recipients of an earlier attempt have no recorded answer from Postfix: "
                "%d were queued by Postfix (not sent again), %d were not (sent now)",
                len(uncertain),
                found,
                len(uncertain) - found,
            )
        for state, known in zip(states, progress, strict=True):
            messages: dict[tuple[str | None, bool], Message] = {}
            for rcpt in _unique(state.mail.recipients):
                value = known.get(rcpt)
                if value is not None and value.kind == "t":
                    state.earlier_tokens.append(value.value)
                    qid = resolved.get(value.value)
                    if qid:
                        queued = _Job(state.entry, state.mail, rcpt, _EMPTY, token=value.value)
                        queued.result = Result("accepted", Reply(250, f"queued as {qid}"), "END", qid)
                        found_queued.append(queued)
                    value = Progress("q", qid) if qid else None
                if value is not None and value.kind == "q":
                    state.accepted[rcpt] = value.value
                elif value is not None and value.kind == "r":
                    state.refused[rcpt] = value.value
                else:
                    provider = state.providers.get(rcpt)
                    message = self._message(state.mail, provider, messages)
                    state.jobs.append(_Job(state.entry, state.mail, rcpt, message, provider=provider))
        return found_queued

    def _message(
        self, mail: OutboundMail, provider: str | None, prepared: dict[tuple[str | None, bool], Message]
    ) -> Message:
        """The message for one recipient, with the routing header of its provider's transport."""
        smtputf8 = mail.meta.get("smtputf8") == "yes"
        rules = self.shaper.rules if self.shaper is not None else None
        route = rules.route(provider) if rules is not None and rules.enabled and provider is not None else None
        utf8 = route is not None and needs_utf8_route(mail.raw, smtputf8)
        key = (route, utf8)
        if key not in prepared:
            raw = add_route(mail.raw, route, utf8=utf8) if route is not None else mail.raw
            prepared[key] = Message.prepare(raw, smtputf8=smtputf8)
        return prepared[key]

    def _prewrite(self, jobs: list[_Job], found_queued: list[_Job]) -> None:
        """Record every transaction (token, delivery) before sending any of them (one call)."""
        if jobs:
            keys: list[str] = []
            args: list[str | int] = [records.PROGRESS_TTL_S]
            for job in jobs:
                keys += [records.tx_key(job.token), records.progress_key(job.entry.id)]
                args += [
                    self._delivery(job).envelope(),
                    job.recipient,
                    Progress("t", job.token).encode(),
                ]
            with redis_errors("record injections"):
                self._prewrite_script(keys=keys, args=args)
        if found_queued:
            with redis_errors("record recipients Postfix had queued"):
                keys, args = self._finalize_arguments(found_queued)
                self._finalize_script(keys=keys, args=args)

    def _send(self, jobs: list[_Job]) -> None:
        """Every transaction, ``connections`` at a time, from this thread (SmtpPool)."""
        transactions = [
            Job(i, job.mail.mail_from, job.recipient, job.message, job.mail.uuid, job.token)
            for i, job in enumerate(jobs)
        ]
        self._pool.send_all(transactions)
        for job, transaction in zip(jobs, transactions, strict=True):
            job.result = transaction.result
            if transaction.error is not None:
                job.error = transaction.error
                job.uncertain = isinstance(transaction.error, SmtpUncertain)
                if job.uncertain:
                    log.warning(
                        "uuid=%s rcpt=%s: %s; will check before sending again",
                        job.mail.uuid,
                        job.recipient,
                        transaction.error,
                    )
                self.metrics.recipient("failed")
                continue
            assert job.result is not None
            outcome = job.result.outcome
            self.metrics.recipient({"accepted": "accepted", "rejected": "refused"}.get(outcome, "deferred"))
            if outcome != "accepted":
                log.warning(
                    "uuid=%s rcpt=%s %s by Postfix at %s: %s",
                    job.mail.uuid,
                    job.recipient,
                    "refused" if outcome == "rejected" else "deferred",
                    job.result.stage,
                    job.result.reply,
                )

    def _finalize_arguments(self, jobs: list[_Job]) -> tuple[list[str], list[str | int]]:
        keys: list[str] = []
        args: list[str | int] = [self.qid_ttl_s]
        for job in jobs:
            result = job.result
            progress = records.progress_key(job.entry.id)
            tx = records.tx_key(job.token)
            if result is not None and result.outcome == "accepted" and result.queue_id:
                qid = result.queue_id
                envelope = self._delivery(job).envelope()
                keys += [progress, tx, records.qid_key(self.instance, qid)]
                args += ["q", job.recipient, Progress("q", qid).encode(), envelope, qid]
            elif result is not None and result.outcome == "rejected":
                keys += [progress, tx, progress]
                args += ["r", job.recipient, Progress("r", str(result.reply)).encode(), "", ""]
            elif not job.uncertain:
                keys += [progress, tx, progress]
                args += ["x", job.recipient, "", "", ""]
        return keys, args

    def _finalize(self, jobs: list[_Job]) -> None:
        """Record what Postfix answered, in one call for the batch.

        Queued recipients get ``q:<queue id>`` (and the queue id's record), refused ones
        ``r:<reply>``; recipients Postfix did not queue lose their ``t:`` mark, those whose
        answer was lost keep it (checked before they are sent again).  When Redis is down the
        answers are kept in memory, so the retried entry does not send them again.
        """
        keys, args = self._finalize_arguments(jobs)
        if not keys:
            return
        try:
            with redis_errors("record Postfix' answers"):
                self._finalize_script(keys=keys, args=args)
        except TemporaryError as exc:
            log.error("cannot record Postfix' answers (%s); keeping them in memory", exc)
            for job in jobs:
                result = job.result
                if result is not None and result.outcome == "accepted" and result.queue_id:
                    value = Progress("q", result.queue_id)
                elif result is not None and result.outcome == "rejected":
                    value = Progress("r", str(result.reply))
                else:
                    continue
                self._unsaved.setdefault(job.entry.id, {})[job.recipient] = value.encode()

    def _outcome(self, state: _EntryState) -> Outcome:
        if state.hold is not None and self.shaper is not None:
            return Done(self.shaper.hold_writes(state.entry, state.hold))
        deferred: list[str] = []
        unavailable: list[str] = []
        for job in state.jobs:
            result = job.result
            if result is not None and result.outcome == "accepted":
                state.accepted[job.recipient] = result.queue_id or "unknown"
            elif result is not None and result.outcome == "rejected":
                state.refused[job.recipient] = str(result.reply)
            elif result is not None and result.outcome == "deferred":
                deferred.append(f"{job.recipient}: {result.reply}")
            else:
                unavailable.append(str(job.error) if job.error else f"{job.recipient}: no answer")
        if unavailable:
            return Retry(f"uuid={state.mail.uuid}: {unavailable[0]}")
        if deferred:
            return Retry(f"uuid={state.mail.uuid}: Postfix deferred {'; '.join(deferred)}", counts=True)
        self.metrics.handed(1)
        self._unsaved.pop(state.entry.id, None)
        tokens = [job.token for job in state.jobs] + state.earlier_tokens
        self._completed.append((state.entry.queue, state.entry.id, tokens))
        log.debug("uuid=%s handed to Postfix: %s", state.mail.uuid, state.accepted)
        steps = [trace.entry("injected", recipient=r, queue_id=q) for r, q in sorted(state.accepted.items())]
        steps += [trace.entry("refused", recipient=r, reply=reply) for r, reply in sorted(state.refused.items())]
        events: list[Write] = [Output(self.event_queue, e.to_fields()) for e in self._refusal_events(state)]
        return Done([*events, *trace.append(self.trace, state.mail.uuid, *steps)])

    def _refusal_events(self, state: _EntryState) -> list[Event]:
        events = []
        for rcpt, reply in sorted(state.refused.items()):
            verdict = classify(reply, rules=self.rules)
            events.append(
                Event(
                    event="bounce",
                    uuid=state.mail.uuid,
                    event_id=make_event_id("postfixlog-refused", state.entry.id, rcpt),
                    recipient=rcpt,
                    stream_id=state.mail.stream_id,
                    fd=state.mail.from_domain or None,
                    type=verdict.type,
                    reason=f"refused by the local Postfix: {reply}",
                    status=verdict.status,
                    classification=verdict.classification,
                    suppress=verdict.suppress,
                )
            )
        return events

    def _delivery(self, job: _Job) -> Delivery:
        mail = job.mail
        return Delivery(
            uuid=mail.uuid,
            recipient=job.recipient,
            mail_from=mail.mail_from,
            from_domain=mail.from_domain,
            stream_id=mail.stream_id,
            submitted_at=mail.submitted_at,
            token=job.token,
            meta=mail.meta,
            instance=self.instance,
            provider=job.provider,
        )

    def _cleanup_completed(self) -> None:
        """Delete progress and injection records of entries that are acknowledged by now."""
        if not self._completed:
            return
        done, self._completed = self._completed, []
        try:
            self._delete_acknowledged(done)
        except TemporaryError as exc:
            log.debug("cleanup of progress records postponed: %s", exc)
            self._completed = done + self._completed

    def _delete_acknowledged(self, done: list[tuple[str, str, list[str]]]) -> None:
        streams = sorted({stream for stream, _, _ in done})
        with redis_errors("clean up progress"):
            pipe = self.redis.pipeline(transaction=False)
            for stream in streams:
                ids = sorted((entry_id for s, entry_id, _ in done if s == stream), key=_id_order)
                pipe.xrange(stream, min=ids[0], max=ids[-1], count=len(done) * 4 + 64)
            present = {
                (stream, row[0].decode() if isinstance(row[0], bytes) else row[0])
                for stream, rows in zip(streams, pipe.execute(), strict=True)
                for row in rows
            }
            garbage: list[str] = []
            for stream, entry_id, tokens in done:
                if (stream, entry_id) in present:
                    self._completed.append((stream, entry_id, tokens))  # not acknowledged yet
                else:
                    garbage.append(records.progress_key(entry_id))
                    garbage.extend(records.tx_key(t) for t in tokens)
            if garbage:
                self.redis.delete(*garbage)


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _unique(addresses: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return out
