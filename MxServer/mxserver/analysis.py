"""Phase 1 of classifying a received mail: what it is and what it says (pure, no I/O, no secret).

MxServer classifies each mail in two phases:

1. **analysis** (this module) -- parse the MIME structure, recognise the report format, read
   each recipient's failure with the bounce rules, and collect every tagged value (return path,
   unsubscribe address and token, Message-ID).  It needs only the raw bytes, the envelope
   recipients and :class:`Settings`; it does no I/O, reads no clock and holds no secret, so it
   runs in a worker process with a CPU budget (:mod:`mxserver.pool`) and its result,
   :class:`Analysis`, is a small picklable value;
2. **verification** (:mod:`mxserver.verification`, in the event loop) -- fetch the
   Transformer's records for the uuids found, check the tags' HMACs, decide which recipient the
   report is about, and make the events.

Formats are tried in this order; the first that recognises the mail wins:

================  ==================================================================
``unsubscribe``   sent to a tagged unsubscribe address (envelope)
``own-report``    a DSN or bounce written by our own Postfix (already known from its log)
``ses``           an Amazon SES notification (JSON bounce, complaint, delivery delay)
``arf``/``jmrp``  a feedback report (RFC 5965, Microsoft JMRP)
``dsn``           an RFC 3464 delivery status notification (also when its MIME is broken)
``text:<mta>``    a plain-text bounce of a known MTA family, or forwarded bounce
``autoreply``     an automatic reply (out of office, vacation, ticket acknowledgement)
================  ==================================================================

Nothing here raises on any input (``tests/mxserver/test_fuzz.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Final, Literal

from common import bounces
from common.bouncerules import Reading, Rules
from mxserver import arf, autoreply, dsn, mime, ses, tags, textbounces
from mxserver.tags import Found

Kind = Literal["unsubscribe", "spam-report", "bounce", "autoreply", "own-report", "unclassified"]
EventName = Literal["bounce", "deferred", "spam-report", "unsubscribe"]

#: Words that show a remote server answered (so a DNS-level wording is its verdict, not ours).
_REMOTE_RE: Final = re.compile(
    r"\bsaid:|SMTP error from remote|Remote host said|in reply to|<<<|Received <<<|Recipient address rejected"
    r"|Remote SMTP Server Returned|host \S+ \[[0-9a-fA-F:.]+\]\s*(?:\n\s*)?SMTP error",
    re.IGNORECASE,
)
#: Where a mail client starts a forwarded message inline.
_FORWARD_MARKER: Final = re.compile(
    r"^[ \t>]*(?:-{2,}[ \t]*(?:Forwarded message|Original message|Original bounce|Weitergeleitete Nachricht"
    r"|Ursprüngliche Nachricht|Message transféré|Message d'origine|Mensaje reenviado|Messaggio inoltrato)[ \t]*-{2,}"
    r"|_{16,}|Begin forwarded message:)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_HEADER_LINE_RE: Final = re.compile(r"^(?:From|Von|De|Da):[ \t]", re.IGNORECASE | re.MULTILINE)
_POSTFIX_HOST_RE: Final = re.compile(r"This is the mail system at host ([A-Za-z0-9.-]+)", re.IGNORECASE)
_RECEIVED_BY_RE: Final = re.compile(r"\bby\s+([A-Za-z0-9.-]+)\s+\(Postfix\)", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """What the analysis needs to know about the installation (picklable, no secret)."""

    #: Return-path domains: where our tagged addresses and Message-IDs live.
    domains: frozenset[str]
    rules: Rules
    #: Host names of our own outbound Postfix (its reports are already in its log).
    own_hosts: frozenset[str] = frozenset()
    #: FBL / abuse mailboxes (never a failed recipient).
    abuse_addresses: frozenset[str] = frozenset()
    #: Our sending (From) domains.
    from_domains: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Finding:
    """One recipient the report speaks about, as the report tells it (before verification)."""

    event: EventName
    #: Addresses the report uses for this recipient (Final-Recipient, Original-Rcpt-To…), decoded.
    names: tuple[str, ...] = ()
    #: The report named the recipient only in redacted form.
    redacted: bool = False
    #: Event fields read from the report (type, status, classification, reason, ip, …).
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def final_recipient(self) -> str | None:
        """The first name (what the event shows as ``final_recipient``)."""
        return self.names[0] if self.names else None


@dataclass(frozen=True)
class Analysis:
    """Phase 1's result for one mail."""

    kind: Kind
    report: str = ""
    findings: tuple[Finding, ...] = ()
    #: Tagged values: envelope first, then those in the report.
    tags: tuple[Found, ...] = ()
    #: Addresses a tag may be checked against when the record is gone (HMAC must match).
    candidates: tuple[str, ...] = ()
    #: Stable per report: with the bound recipient it makes the event ids.
    report_key: str = ""
    #: The returned original's From domain, when it is one of ours.
    from_domain: str | None = None
    #: False for feedback reports that are no complaint (not-spam, auth-failure).
    complaint: bool = True
    note: str = ""


def report_key(msg: Message, raw: bytes) -> str:
    """The report's Message-ID, else a hash of its bytes (line endings ignored)."""
    message_id = mime.header(msg, "Message-ID").strip().strip("<>").lower()
    if message_id:
        return message_id[:200]
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()[:32]


def analyse(settings: Settings, recipients: Sequence[str], raw: bytes) -> Analysis:
    """Phase 1 for one mail (see the module docstring)."""
    msg = mime.parse(raw)
    return _Job(settings, recipients, msg, raw).run()


class _Job:
    """One analysis: the parsed message plus what the steps learn on the way."""

    def __init__(
        self,
        settings: Settings,
        recipients: Sequence[str],
        msg: Message,
        raw: bytes,
        excluded: frozenset[str] = frozenset(),
    ) -> None:
        self.settings = settings
        #: Addresses that are never a failed recipient (e.g. whoever forwarded a bounce to us).
        self.excluded = excluded
        self.rules = settings.rules
        self.recipients = list(recipients)
        self.msg = msg
        self.raw = raw
        self.key = report_key(msg, raw)
        self.envelope = tags.envelope(recipients, settings.domains)
        self._text: str | None = None
        self._found: list[Found] | None = None
        self._original: Message | None = None
        self._original_done = False

    # -- shared views ---------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The report's own human-readable text."""
        if self._text is None:
            self._text = mime.body_text(self.msg)
        return self._text

    @property
    def found(self) -> list[Found]:
        """Envelope tags, then tags anywhere in the mail."""
        if self._found is None:
            seen = {f.key for f in self.envelope}
            inner = [f for f in tags.find(self.msg, self.raw, self.settings.domains) if f.key not in seen]
            self._found = self.envelope + inner
        return self._found

    @property
    def original(self) -> Message | None:
        """The returned original (attached, or quoted in the text)."""
        if not self._original_done:
            self._original_done = True
            self._original = mime.original_message(self.msg) or mime.quoted_original(self.text)
        return self._original

    def candidates(self, *extra: str) -> tuple[str, ...]:
        """Addresses a tag may be checked against: the report's names and the original's To/Cc."""
        out: list[str] = [e for e in extra if e]
        original = self.original
        if original is not None:
            for name in ("To", "Cc", "X-HmXmrOriginalRecipient", "Delivered-To", "X-Original-To"):
                out.extend(mime.addresses(mime.header(original, name)))
        for value in mime.header_values(self.msg, "X-Failed-Recipients"):
            out.extend(_split_addresses(value))
        return tuple(dict.fromkeys(out))

    def from_domain(self) -> str | None:
        original = self.original
        if original is None:
            return None
        sender = mime.first_address(mime.header(original, "From")) or ""
        domain = sender.rpartition("@")[2].lower()
        return domain if domain in self.settings.from_domains else None

    def analysis(self, kind: Kind, report: str, findings: Sequence[Finding] = (), **extra: Any) -> Analysis:
        names = [n for f in findings for n in f.names]
        return Analysis(
            kind=kind,
            report=report,
            findings=tuple(findings),
            tags=tuple(self.found),
            candidates=self.candidates(*names, *extra.pop("candidates", ())),
            report_key=self.key,
            from_domain=self.from_domain(),
            **extra,
        )

    # -- steps ----------------------------------------------------------------------------------

    def run(self) -> Analysis:
        unsubscribe = [f for f in self.envelope if f.tagged.kind == "unsub"]
        if unsubscribe:
            return self.unsubscribe(unsubscribe)
        return (
            self.ses()
            or self.complaint()
            or self.delivery_status()
            or self.pasted()
            or self.text_bounce()
            or self.forwarded()
            or self.auto_reply()
            or Analysis("unclassified", report_key=self.key, note="no known report format")
        )

    def unsubscribe(self, envelope: list[Found]) -> Analysis:
        sender = mime.first_address(mime.header(self.msg, "From"))
        reply_to = mime.first_address(mime.header(self.msg, "Reply-To"))
        fields: dict[str, Any] = {"source": "mailto"}
        if sender:
            fields["reported_recipient"] = sender
        return Analysis(
            kind="unsubscribe",
            report="mailto",
            findings=(Finding("unsubscribe", fields=fields),),
            tags=tuple(envelope),
            candidates=tuple(a for a in (sender, reply_to) if a),
            report_key=self.key,
        )

    def ses(self) -> Analysis | None:
        notification = ses.parse(self.msg)
        if notification is None:
            return None
        findings = []
        for rcpt in notification.recipients or (ses.Recipient(None),):
            names = (rcpt.address,) if rcpt.address else ()
            if notification.kind == "complaint":
                fields: dict[str, Any] = {"feedback_type": notification.feedback_type, "report": "ses"}
                findings.append(Finding("spam-report", names, fields=fields))
                continue
            delayed = notification.kind == "delay"
            reason = dsn.clean_reason(dsn.strip_type(rcpt.diagnostic))
            reading = self.rules.read(
                reason or notification.subtype,
                status=rcpt.status,
                delayed=delayed,
                permanent=notification.permanent,
            )
            findings.append(self.failure_finding(reading, names, reason, delayed, None, "ses"))
        kind: Kind = "spam-report" if notification.kind == "complaint" else "bounce"
        return self.analysis(kind, "ses", findings)

    def complaint(self) -> Analysis | None:
        found = arf.parse(self.msg)
        if found is None:
            return None
        fields: dict[str, Any] = {"feedback_type": found.feedback_type, "report": found.report}
        if found.user_agent:
            fields["user_agent"] = found.user_agent[:100]
        finding = Finding("spam-report", found.names, found.redacted, fields)
        note = "" if found.complaint else f"feedback report of type {found.feedback_type}: not a complaint"
        return self.analysis("spam-report", found.report, [finding], complaint=found.complaint, note=note)

    def delivery_status(self) -> Analysis | None:
        report = dsn.parse(self.msg, self.raw)
        if report is None:
            return None
        if self.own(report.reporting_mta):
            return self.analysis("own-report", "dsn", note=f"reported by our own MTA {report.reporting_mta}")
        if not report.failures:
            if report.scraped:
                return None  # fields read from broken MIME, none failed: let the text parsers try
            return self.analysis("unclassified", "dsn", note="delivery status report without a failed recipient")
        region = textbounces.report_region(self.text)
        findings = []
        for failure in report.failures:
            context = _context(region, failure.names)
            reason = failure.diagnostic
            reading = self.rules.read(
                reason,
                context=context,
                status=_specific(failure.status, reason),
                delayed=failure.action == "delayed",
                expired=failure.action == "failed" and (failure.status or "").startswith("4"),
                remote=failure.remote_mta is not None or bool(_REMOTE_RE.search(f"{reason}\n{context}")),
            )
            shown = reason or _first_line(context) or (f"Status {failure.status}" if failure.status else "")
            delayed = failure.action == "delayed"
            findings.append(self.failure_finding(reading, failure.names, shown, delayed, failure.ip, "dsn"))
        return self.analysis("bounce", "dsn", findings)

    def text_bounce(self) -> Analysis | None:
        if self.own_text():
            return self.analysis("own-report", "text", note="bounce written by our own MTA")
        subject = mime.header(self.msg, "Subject")
        if autoreply.subject_says_autoreply(subject) and not mime.has_header(self.msg, "X-Failed-Recipients"):
            return None
        excluded = set(self.settings.abuse_addresses) | {r.lower() for r in self.recipients} | set(self.excluded)
        original = self.original
        if original is not None:
            for name in ("From", "Sender", "Reply-To", "Return-Path"):
                excluded.update(a.lower() for a in mime.addresses(mime.header(original, name)))
        found = textbounces.parse(self.msg, self.text, excluded, self._ours, self.rules)
        if found is None:
            return None
        findings = []
        for failure in found.failures:
            if failure.final_recipient and self._ours(failure.final_recipient):
                continue
            delayed = failure.action == "delayed"
            reading = self.rules.read(
                failure.diagnostic,
                context=failure.context,
                status=failure.status,
                delayed=delayed,
                remote=bool(_REMOTE_RE.search(f"{failure.diagnostic}\n{failure.context}")),
            )
            findings.append(
                self.failure_finding(reading, failure.names, failure.diagnostic, delayed, failure.ip, found.report)
            )
        if not findings:
            return None
        return self.analysis("bounce", f"text:{found.report}", findings)

    def forwarded(self) -> Analysis | None:
        """A bounce someone forwarded to us: attached (message/rfc822) or inline after a marker."""
        reports: list[Message] = []
        for part in mime.leaves(self.msg):
            inner = mime.attached(part)
            if inner is not None and (dsn.is_dsn(inner) or textbounces.daemon_sender(inner)):
                reports.append(inner)
        match = _FORWARD_MARKER.search(self.text)
        if match is not None:
            block = self.text[match.end() :].lstrip("\n")
            if forward_header(block):
                reports.append(mime.parse(block.encode("utf-8", "replace")))
        return self._first_inner_bounce(reports)

    def pasted(self) -> Analysis | None:
        """A whole bounce (headers and body) pasted into a plain-text mail.

        ISP relays paste the DSN after a line of dashes; it is read before the outer text, whose
        own addresses are only the forwarder's.
        """
        # Every text bounce quotes a header block (the returned original's): parse the whole
        # rest only when it can be a report -- a mail system's sender or a delivery-status part.
        head = mime.quoted_original(self.text)
        if head is None or not (textbounces.daemon_sender(head) or "delivery-status" in self.text.lower()):
            return None
        inner = mime.inline_message(self.text)
        if inner is None or not (dsn.is_dsn(inner) or textbounces.daemon_sender(inner)):
            return None
        return self._first_inner_bounce([inner])

    def _first_inner_bounce(self, reports: list[Message]) -> Analysis | None:
        forwarder = frozenset(
            a.lower() for name in ("From", "To", "Cc", "Reply-To") for a in mime.addresses(mime.header(self.msg, name))
        )
        for inner in reports[:3]:
            job = _Job(self.settings, self.recipients, inner, mime.serialise(inner), forwarder | self.excluded)
            result = job.delivery_status() or job.text_bounce()
            if result is None or result.kind not in ("bounce", "own-report"):
                continue
            names = [n for f in result.findings for n in f.names]
            return dataclasses.replace(
                result,
                report=f"forwarded:{result.report}",
                tags=tuple(self.found),
                candidates=tuple(dict.fromkeys(self.candidates(*names) + result.candidates)),
                report_key=self.key,
                from_domain=result.from_domain or self.from_domain(),
            )
        return None

    def auto_reply(self) -> Analysis | None:
        indicator = autoreply.detect(self.msg, self.text)
        if indicator is None:
            return None
        sender = mime.first_address(mime.header(self.msg, "From")) or mime.first_address(
            mime.header(self.msg, "Reply-To")
        )
        fields: dict[str, Any] = {
            "ip": "",
            "type": "autoreply",
            "reason": f"automatic reply ({indicator})",
            "classification": "autoreply",
            "suppress": False,
            "report": "autoreply",
        }
        if sender:
            fields["reported_recipient"] = sender
        return self.analysis(
            "autoreply", "autoreply", [Finding("bounce", fields=fields)], candidates=[sender] if sender else []
        )

    # -- helpers --------------------------------------------------------------------------------

    def failure_finding(
        self,
        reading: Reading,
        names: Sequence[str],
        reason: str,
        delayed: bool,
        ip: str | None,
        report: str,
    ) -> Finding:
        verdict = reading.verdict
        fields: dict[str, Any] = {
            "ip": ip or "",
            "type": "soft" if delayed else verdict.type,
            "reason": reason or None,
            "status": verdict.status,
            "classification": verdict.classification,
            "suppress": verdict.suppress and not delayed,
            "report": report,
        }
        if reading.rule:
            fields["rule"] = reading.rule
        return Finding("deferred" if delayed else "bounce", tuple(n for n in names if n), fields=fields)

    def own(self, host: str | None) -> bool:
        return bool(host) and _host(host or "") in self.settings.own_hosts

    def own_text(self) -> bool:
        """A plain-text bounce of our own Postfix ("This is the mail system at host <ours>")."""
        if not self.settings.own_hosts:
            return False
        match = _POSTFIX_HOST_RE.search(self.text[:5000])
        return match is not None and self.own(match.group(1))

    def _ours(self, address: str) -> bool:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        return domain in self.settings.domains or domain in self.settings.from_domains


def forward_header(block: str) -> bool:
    """True when ``block`` starts with a forwarded header block (a From line within the first lines)."""
    head = block[:1000].split("\n\n", 1)[0]
    return _HEADER_LINE_RE.search(head) is not None


def _specific(status: str | None, reason: str) -> str | None:
    """The Status field, unless it is generic (``5.0.0``) and the reply has a precise code of its class."""
    quoted = dsn.find_status(reason)
    if status and status.endswith(".0.0") and quoted and quoted[0] == status[0]:
        return quoted
    return status


def _host(value: str) -> str:
    """A host name from a DSN MTA field (``dns; mta.example.test`` or ``mta.example.test (…)``)."""
    text = dsn.strip_type(value).strip().split()[0] if dsn.strip_type(value).strip() else ""
    return text.strip("[]()<>;,").rstrip(".").lower()


def _context(region: str, names: Sequence[str]) -> str:
    """The report text about one recipient: from the line naming it to the next blank line."""
    if not names:
        return ""
    lines = region.split("\n")
    wanted = [n.lower() for n in names]
    for i, line in enumerate(lines):
        lowered = line.lower()
        if any(n in lowered for n in wanted):
            block = [line]
            for nxt in lines[i + 1 : i + 1 + textbounces.MAX_WINDOW]:
                if not nxt.strip():
                    break
                block.append(nxt)
            return " ".join(s.strip() for s in block)
    return ""


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0][: dsn.MAX_REASON] if text.strip() else ""


def _split_addresses(value: str) -> list[str]:
    return [a.strip().strip("<>") for a in re.split(r"[,\s]+", mime.decode_words(value)) if "@" in a]


__all__ = ["Analysis", "Finding", "Settings", "analyse", "bounces"]
