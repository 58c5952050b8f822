"""Spam complaints: RFC 5965 ARF reports from any provider, and Microsoft's JMRP format.

ARF (Yahoo, AOL, Comcast, Fastmail, Mail.ru, Zoho, ...)::

    Content-Type: multipart/report; report-type=feedback-report
      text/plain                  human-readable summary
      message/feedback-report     Feedback-Type: abuse / Original-Mail-From / Original-Rcpt-To ...
      message/rfc822              the reported message (or text/rfc822-headers)

Microsoft's Junk Mail Reporting Program sends ``multipart/mixed`` with the reported message
attached as ``message/rfc822``; the complaining mailbox is in the attached message's
``X-HmXmrOriginalRecipient`` header.

Only complaints count: ``Feedback-Type`` ``not-spam`` (the user rescued the message) and
``auth-failure`` (DMARC/SPF forensic reports, RFC 6591) are parsed but marked
``complaint=False``: they never become a spam report.

The addresses the report names (``Original-Rcpt-To``, ``Removal-Recipient``,
``X-HmXmrOriginalRecipient``) are information: the event's recipient is the one bound to a tag
in the report (:mod:`mxserver.verification`).  Redacted names (``redacted``, ``***@gmx.de``,
``[REDACTED]``, ``xxxxxxxx@hotmail.com``) are kept apart: they name nobody.
Part of the pure classification phase (:mod:`mxserver.analysis`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from typing import Final

from mxserver import mime
from mxserver.dsn import address, status_text, strip_type

FEEDBACK_TYPES: Final = frozenset(("message/feedback-report",))
NOT_COMPLAINTS: Final = frozenset(("not-spam", "auth-failure", "dmarc"))
_REDACTED: Final = re.compile(r"redacted|x{4,}@|\*{2,}|\[email\]|^@|\.\.\.@|…@", re.I)
_FIELD_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9-]{0,40})[ \t]*:[ \t]*(.*)$")
_JMRP_SUBJECT: Final = re.compile(r"complaint about message from", re.I)
_MICROSOFT_DOMAINS: Final = frozenset(("hotmail.com", "outlook.com", "microsoft.com", "live.com", "msn.com"))


@dataclass(frozen=True)
class Complaint:
    """A feedback report (complaint or not) about a message."""

    report: str  # "arf" or "jmrp"
    feedback_type: str
    #: Addresses the report names as the complaining recipient (not redacted).
    names: tuple[str, ...]
    #: True when the report names the recipient only in redacted form.
    redacted: bool
    user_agent: str
    original: Message | None

    @property
    def complaint(self) -> bool:
        """False for not-spam and authentication-failure reports."""
        return self.feedback_type not in NOT_COMPLAINTS


def redacted(value: str) -> bool:
    """True when an address was masked by the reporter (``***@gmx.de``, ``[REDACTED]``)."""
    return bool(_REDACTED.search(value))


def _names(values: list[str]) -> tuple[tuple[str, ...], bool]:
    names: list[str] = []
    masked = False
    for value in values:
        text = strip_type(value)
        if not text:
            continue
        if redacted(text):
            masked = True
            continue
        found = address(text) or mime.first_address(text)
        if found and found not in names:
            names.append(found)
    return tuple(names), masked


def fields(part: Message) -> list[tuple[str, str]]:
    """``(name, value)`` of every field of a feedback-report part (repeated fields kept)."""
    pairs = [(name.lower(), mime.header(part, name)) for name in part if name.lower() != "content-type"]
    for line in status_text(part).replace("\r\n", "\n").split("\n"):
        match = _FIELD_RE.match(line)
        if match is not None:
            pairs.append((match.group(1).lower(), match.group(2).strip()))
    return pairs


def _parse_arf(msg: Message, part: Message) -> Complaint:
    pairs = fields(part)
    first = {name: value for name, value in reversed(pairs)}
    feedback_type = (first.get("feedback-type", "").split() or ["abuse"])[0].lower()
    named = [v for n, v in pairs if n in ("original-rcpt-to", "removal-recipient")]
    names, masked = _names(named)
    masked = masked or any(n == "redacted-address" for n, _ in pairs)
    return Complaint(
        report="arf",
        feedback_type=feedback_type,
        names=names,
        redacted=masked,
        user_agent=first.get("user-agent", ""),
        original=mime.original_message(msg),
    )


def _parse_jmrp(msg: Message) -> Complaint | None:
    original = mime.original_message(msg)
    if original is None:
        return None
    reporter = mime.header(original, "X-HmXmrOriginalRecipient")
    sender = (mime.first_address(mime.header(msg, "From")) or "").lower()
    from_microsoft = sender.rpartition("@")[2] in _MICROSOFT_DOMAINS
    if not reporter and not (from_microsoft and _JMRP_SUBJECT.search(mime.header(msg, "Subject"))):
        return None
    names, masked = _names([reporter] if reporter else [])
    return Complaint(
        report="jmrp",
        feedback_type="abuse",
        names=names,
        redacted=masked,
        user_agent="Microsoft JMRP",
        original=original,
    )


def parse(msg: Message) -> Complaint | None:
    """The feedback report in ``msg``; None when it is none (see :attr:`Complaint.complaint`)."""
    part = mime.find_part(msg, FEEDBACK_TYPES)
    if part is not None:
        return _parse_arf(msg, part)
    if mime.content_type(msg).startswith("multipart/"):
        return _parse_jmrp(msg)
    return None
