"""What a mail received by the MX means: a pure function of (envelope recipients, raw bytes).

First match wins:

1. ``unsubscribe``  -- sent to a genuine tagged unsubscribe address (one event per address);
2. ``spam-report``  -- an ARF report (any provider) or a Microsoft JMRP complaint;
3. ``bounce``/``deferred`` -- an RFC 3464 DSN: one ``bounce`` per failed recipient, one
   ``deferred`` per delayed one;
4. the same from a plain-text bounce of a known MTA (:mod:`mxserver.textbounces`);
5. ``autoreply``    -- an automatic reply: a ``bounce`` event with ``type: autoreply``;
6. ``unclassified`` -- anything else, or a report we cannot attribute to one of our messages
   (the caller keeps the mail in the eml directory).

Bounces and auto-replies are attributed only through a genuine tagged address (envelope first,
then the report); spam reports may also use the original's Message-ID
(:mod:`mxserver.attribution`).  Event ids are stable: the same report received again yields
the same ids, so the customer can drop the duplicate.

Nothing here does I/O or reads the clock unless ``now`` is omitted; no input makes it raise
(tests/mxserver/test_fuzz.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Final, Literal

from common import bounces
from common.addressing import AddressSigner
from common.config import Config
from common.events import Event, make_event_id
from mxserver import arf, autoreply, dsn, mime, textbounces
from mxserver.attribution import Attribution, Attributor
from mxserver.dsn import Failure

SERVICE: Final = "mxserver"

Kind = Literal["unsubscribe", "spam-report", "bounce", "deferred", "autoreply", "unclassified"]


@dataclass(frozen=True)
class Classification:
    """The outcome for one received mail."""

    kind: Kind
    events: tuple[Event, ...] = ()
    report: str = ""
    note: str = ""

    @property
    def uuids(self) -> list[str]:
        """The uuids of the events (for logs)."""
        return sorted({e.uuid for e in self.events if e.uuid})


@dataclass(frozen=True)
class Classifier:
    """Classifies received mail for one installation (its signer, domains and FBL mailboxes)."""

    signer: AddressSigner
    return_path_domains: frozenset[str]
    abuse_addresses: frozenset[str] = frozenset()
    #: return-path domain -> the From domain that uses it (only when exactly one does).
    from_domains: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, signer: AddressSigner) -> Classifier:
        """The classifier of a loaded configuration."""
        section = config.customer.mxserver
        users: dict[str, set[str]] = {}
        for setting in config.transformer.domain_settings:
            users.setdefault(setting.return_path_domain, set()).add(setting.domain)
        return cls(
            signer=signer,
            return_path_domains=config.transformer.return_path_domains,
            abuse_addresses=section.abuse.all() if section is not None else frozenset(),
            from_domains={rp: next(iter(d)) for rp, d in users.items() if len(d) == 1},
        )

    @property
    def attributor(self) -> Attributor:
        """Attribution helper with this classifier's signer and domains."""
        return Attributor(self.signer, self.return_path_domains)

    def classify(self, recipients: Sequence[str], raw: bytes, *, now: int | None = None) -> Classification:
        """Classify one received mail (first match wins; see the module docstring)."""
        msg = mime.parse(raw)
        job = _Job(self, recipients, msg, raw, int(time.time()) if now is None else now)
        return (
            job.unsubscribe()
            or job.complaint()
            or job.delivery_status()
            or job.text_bounce()
            or job.auto_reply()
            or _unclassified("no known report format")
        )


class _Job:
    """One classification: the parsed message plus what the steps learn on the way."""

    def __init__(self, owner: Classifier, recipients: Sequence[str], msg: Message, raw: bytes, now: int) -> None:
        self.owner = owner
        self.attributor = owner.attributor
        self.recipients = list(recipients)
        self.msg = msg
        self.now = now
        message_id = mime.header(msg, "Message-ID").strip().strip("<>").lower()
        self.report_key = message_id or hashlib.sha256(raw).hexdigest()[:32]
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = mime.body_text(self.msg)
        return self._text

    # -- steps ---------------------------------------------------------------------------------

    def unsubscribe(self) -> Classification | None:
        sender: str | None = None
        events = []
        seen: set[str] = set()
        for rcpt in self.recipients:
            found = self.attributor.tagged(rcpt)
            if found is None or found[0] != "unsub" or found[1] in seen:
                continue
            uuid = found[1]
            seen.add(uuid)
            sender = sender or mime.first_address(mime.header(self.msg, "From"))
            events.append(
                self._event(
                    "unsubscribe", Attribution(uuid, "envelope", "unsub", rcpt), recipient=sender, source="mailto"
                )
            )
        return Classification("unsubscribe", tuple(events), "mailto") if events else None

    def complaint(self) -> Classification | None:
        found = arf.parse(self.msg)
        if found is None:
            return None
        original = found.original
        attribution = (
            self.attributor.from_envelope(self.recipients)
            or self.attributor.from_original(original, found.mail_from)
            or self.attributor.from_message_id(original)
        )
        if attribution is None:
            return _unclassified(f"{found.report} report about a message that is not ours (no tag, no Message-ID)")
        extra: dict[str, Any] = {"feedback_type": found.feedback_type, "report": found.report}
        if found.user_agent:
            extra["user_agent"] = found.user_agent[:100]
        event = self._event(
            "spam-report", attribution, recipient=found.email, email=found.email, original=original, **extra
        )
        return Classification("spam-report", (event,), found.report)

    def delivery_status(self) -> Classification | None:
        if not dsn.is_dsn(self.msg):
            return None
        failures = dsn.parse(self.msg) or []
        original = mime.original_message(self.msg)
        return self._bounces("dsn", failures, original)

    def text_bounce(self) -> Classification | None:
        subject = mime.header(self.msg, "Subject")
        if autoreply.subject_says_autoreply(subject) and not mime.has_header(self.msg, "X-Failed-Recipients"):
            return None
        original = mime.original_message(self.msg) or mime.quoted_original(self.text)
        excluded = set(self.owner.abuse_addresses) | set(self.recipients)
        if original is not None:
            for name in ("From", "Sender", "Reply-To", "Return-Path"):
                excluded.update(mime.addresses(mime.header(original, name)))
        found = textbounces.parse(self.msg, self.text, excluded)
        if found is None:
            return None
        failures = [f for f in found.failures if not self._ours(f.recipient)]
        if not failures:
            return None
        if original is not None and len(failures) == 1 and failures[0].recipient is None:
            to = mime.addresses(mime.header(original, "To"))
            if len(to) == 1:
                failures = [_with_recipient(failures[0], to[0])]
        return self._bounces(found.report, failures, original)

    def auto_reply(self) -> Classification | None:
        indicator = autoreply.detect(self.msg, self.text)
        if indicator is None:
            return None
        attribution = self.attributor.from_envelope(self.recipients) or self.attributor.from_text(
            [mime.headers_text(self.msg), self.text]
        )
        if attribution is None:
            return _unclassified("automatic reply to an address that is not tagged")
        sender = mime.first_address(mime.header(self.msg, "From")) or mime.first_address(
            mime.header(self.msg, "Reply-To")
        )
        event = self._event(
            "bounce",
            attribution,
            recipient=sender,
            ip="",
            type="autoreply",
            reason=f"automatic reply ({indicator})",
            classification="autoreply",
            suppress=False,
            report="autoreply",
        )
        return Classification("autoreply", (event,), "autoreply")

    # -- helpers -------------------------------------------------------------------------------

    def _ours(self, address: str | None) -> bool:
        return address is not None and address.rpartition("@")[2].lower() in self.owner.return_path_domains

    def _bounces(self, report: str, failures: Sequence[Failure], original: Message | None) -> Classification:
        attribution = self.attributor.from_envelope(self.recipients, "bounce") or self.attributor.from_original(
            original, self.text
        )
        if attribution is None:
            return _unclassified(f"{report} bounce without a genuine tagged address")
        events = []
        seen: set[tuple[str, str | None]] = set()
        for failure in failures:
            key = (failure.action, (failure.final_recipient or failure.recipient or "").lower() or None)
            if key in seen:
                continue
            seen.add(key)
            events.append(self._failure_event(report, attribution, failure, original))
        if not events:
            return _unclassified(f"{report} report without a failed or delayed recipient")
        kind: Kind = "bounce" if any(e.event == "bounce" for e in events) else "deferred"
        return Classification(kind, tuple(events), report)

    def _failure_event(
        self, report: str, attribution: Attribution, failure: Failure, original: Message | None
    ) -> Event:
        text = failure.diagnostic or (f"Status {failure.status}" if failure.status else "")
        code, _ = bounces.parse_reply(text)
        status = failure.status
        if code is not None and status is not None and str(code)[0] != status[0]:
            code = None  # the Status field is authoritative for the class of the failure
        verdict = bounces.classify(text, code=code, status=status, expired=_expired(failure))
        return self._event(
            "deferred" if failure.action == "delayed" else "bounce",
            attribution,
            recipient=failure.recipient,
            ip=failure.ip or "",
            type="soft" if failure.action == "delayed" else verdict.type,
            reason=text or None,
            status=verdict.status,
            classification=verdict.classification,
            suppress=verdict.suppress and failure.action == "failed",
            original=original,
            report=report,
            **({"final_recipient": failure.final_recipient} if failure.final_recipient else {}),
        )

    def _event(
        self,
        event: Literal["unsubscribe", "spam-report", "bounce", "deferred"],
        attribution: Attribution,
        *,
        recipient: str | None,
        original: Message | None = None,
        ip: str | None = None,
        type: Literal["hard", "soft", "unroutable", "autoreply"] | None = None,
        reason: str | None = None,
        status: str | None = None,
        classification: str | None = None,
        suppress: bool | None = None,
        email: str | None = None,
        **extra: Any,
    ) -> Event:
        kind_key = f"{event}:{type}" if type == "autoreply" else event
        who = str(extra.get("final_recipient") or recipient or "").lower()
        event_id = make_event_id(SERVICE, kind_key, attribution.uuid, who, self.report_key)
        extra["attribution"] = attribution.source
        return Event(
            event=event,
            uuid=attribution.uuid,
            event_id=event_id,
            timestamp=self.now,
            recipient=recipient,
            ip=ip,
            type=type,
            reason=reason,
            status=status,
            classification=classification,
            suppress=suppress,
            email=email,
            fd=self._from_domain(attribution, original),
            extra=extra,
        )

    def _from_domain(self, attribution: Attribution, original: Message | None) -> str | None:
        if original is not None:
            sender = mime.first_address(mime.header(original, "From"))
            domain = sender.rpartition("@")[2].lower() if sender else ""
            if domain in self.owner.from_domains.values():
                return domain
        if attribution.address:
            return self.owner.from_domains.get(attribution.address.rpartition("@")[2].lower())
        return None


def _unclassified(note: str) -> Classification:
    """A mail to keep: no known format, or a known format we cannot attribute (nothing after it runs)."""
    return Classification("unclassified", note=note)


def _expired(failure: Failure) -> bool:
    # A final report with a temporary status: the reporting MTA gave up (queue lifetime over).
    return failure.action == "failed" and (failure.status or "").startswith("4")


def _with_recipient(failure: Failure, recipient: str) -> Failure:
    return dataclasses.replace(failure, recipient=recipient)
