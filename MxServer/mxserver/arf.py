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
``auth-failure`` (DMARC/SPF forensic reports, RFC 6591) are not spam reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from typing import Final

from mxserver import mime
from mxserver.dsn import status_blocks, strip_type

FEEDBACK_TYPES: Final = frozenset(("message/feedback-report",))
NOT_COMPLAINTS: Final = frozenset(("not-spam", "auth-failure", "dmarc"))
_REDACTED: Final = re.compile(r"redacted|x{4,}|\*{3,}|\[email\]", re.I)
_JMRP_SUBJECT: Final = re.compile(r"complaint about message from", re.I)
_MICROSOFT_DOMAINS: Final = frozenset(("hotmail.com", "outlook.com", "microsoft.com", "live.com", "msn.com"))


@dataclass(frozen=True)
class Complaint:
    """A spam complaint about one of our messages."""

    report: str  # "arf" or "jmrp"
    feedback_type: str
    email: str | None
    mail_from: str
    user_agent: str
    original: Message | None


def _clean_email(value: str) -> str | None:
    addr = mime.first_address(strip_type(value))
    if addr is None or _REDACTED.search(addr):
        return None
    return addr


def _fields(part: Message) -> dict[str, str]:
    merged: dict[str, str] = {}
    for block in status_blocks(part):
        for key, value in block.items():
            merged.setdefault(key, value)
    return merged


def _parse_arf(msg: Message, part: Message) -> Complaint | None:
    fields = _fields(part)
    feedback_type = (fields.get("feedback-type", "").split() or ["abuse"])[0].lower()
    if feedback_type in NOT_COMPLAINTS:
        return None
    original = mime.original_message(msg)
    email = _clean_email(fields.get("original-rcpt-to", "")) or _clean_email(fields.get("removal-recipient", ""))
    if email is None and original is not None:
        recipients = mime.addresses(mime.header(original, "To"))
        email = _clean_email(recipients[0]) if len(recipients) == 1 else None
    return Complaint(
        report="arf",
        feedback_type=feedback_type,
        email=email,
        mail_from=fields.get("original-mail-from", ""),
        user_agent=fields.get("user-agent", ""),
        original=original,
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
    return Complaint(
        report="jmrp",
        feedback_type="abuse",
        email=_clean_email(reporter),
        mail_from=mime.header(original, "Return-Path"),
        user_agent="Microsoft JMRP",
        original=original,
    )


def parse(msg: Message) -> Complaint | None:
    """The complaint in ``msg``; None when it is not a spam complaint."""
    part = mime.find_part(msg, FEEDBACK_TYPES)
    if part is not None:
        return _parse_arf(msg, part)
    if mime.content_type(msg).startswith("multipart/"):
        return _parse_jmrp(msg)
    return None
