"""mxserver.textbounces: which addresses of a plain-text bounce are failed recipients."""

from __future__ import annotations

import re
from pathlib import Path

from common import bouncerules as rules
from mxserver import mime, textbounces

CORPUS = Path(__file__).resolve().parents[1] / "data" / "mx"


def _failures(raw: bytes) -> list[textbounces.TextFailure]:
    msg = mime.parse(raw)
    found = textbounces.parse(msg, mime.body_text(msg), rules=rules.shipped())
    assert found is not None
    return found.failures


def _recipients(raw: bytes) -> list[str | None]:
    return [f.final_recipient for f in _failures(raw)]


def test_a_contact_address_in_the_template_is_no_recipient() -> None:
    raw = (CORPUS / "text" / "postfix-template-with-helpdesk-contact.eml").read_bytes()
    raw = re.sub(rb"\{\{[^}]*\}\}", b"bounce-x@bounces.example.test", raw)  # the corpus' placeholders
    assert _recipients(raw) == ["kenta.mori@broadband.example"]


def test_an_address_to_forward_the_report_to_is_no_recipient() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\nSubject: failure notice\n\n"
        b"Sorry, we were unable to deliver your message to the following address.\n\n"
        b"<jo@example.net>:\n"
        b"553 5.3.0 DNSBL:RBL 521< 198.51.100.7 >_is_blocked. For assistance forward this email to rbl@example.net\n"
    )
    assert _recipients(raw) == ["jo@example.net"]


def test_a_recipient_named_in_a_sentence_is_still_one() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\nSubject: Undelivered Mail Returned to Sender\n\n"
        b"Delivery to the following recipient failed permanently:\n\n     jo@example.net\n\n"
        b"The error that the other server returned was:\n550 5.1.1 The email account does not exist.\n"
    )
    assert _recipients(raw) == ["jo@example.net"]


def test_a_transcript_names_the_failed_recipient_with_the_failure_reply() -> None:
    # Success replies and the MAIL FROM of the transcript are neither reasons nor recipients.
    raw = (
        b"From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\nSubject: Undelivered Mail Returned to Sender\n\n"
        b"Transcript of session follows.\n\n"
        b" Out: 220 mx.example.net ESMTP\n In:  EHLO mta.example.test\n Out: 250 mx.example.net\n"
        b" In:  MAIL\n     FROM:<bounce-x@bounces.example.test> SIZE=2048\n Out: 250 2.1.0 Ok\n"
        b" In:  RCPT TO:<jo@example.net>\n Out: 250 2.1.5 Ok\n In:  DATA\n Out: 354 go ahead\n"
        b" Out: 451 4.3.0 Error: queue file write error\n In:  QUIT\n Out: 221 2.0.0 Bye\n"
    )
    assert [(f.final_recipient, f.status) for f in _failures(raw)] == [("jo@example.net", "4.3.0")]
