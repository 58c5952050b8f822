"""The forgery table of issue 13 on the running stack: forged reports yield no customer event,
genuine ones exactly one, about the right uuid and recipient.

A message goes To + Cc through the Receiver, Postfix delivers one copy per recipient to the sink
("the internet"); the test then plays the remote mail systems and the recipients (DSN, ARF --
redacted as Microsoft, AOL and Yahoo send them -- mail unsubscribe, one-click unsubscribe) and an
outsider who copied one of the delivered mails.
"""

from __future__ import annotations

import re
import smtplib
import uuid as uuidlib
from dataclasses import dataclass
from email import message_from_bytes, policy
from typing import Any

import pytest
import requests

from devtools import testing
from devtools.servers import wait_until
from devtools.stack import Stack
from tests.e2e.test_pipeline import _message, delivered_copy, submit_smtp

pytestmark = [pytest.mark.e2e, pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

REPORTS = ("bounce", "spam-report", "unsubscribe")
FBL = f"fbl@{testing.RETURN_PATH_DOMAIN}"


@dataclass
class Copy:
    """What a recipient (or anyone holding the mail) sees of its delivered copy."""

    rcpt: str
    return_path: str
    unsub_address: str
    token: str
    message_id: str
    headers: str


def _copy(stack: Stack, rcpt: str) -> Copy:
    received = delivered_copy(stack, rcpt)
    msg = message_from_bytes(received.data, policy=policy.compat32)
    unsub = str(msg["List-Unsubscribe"])
    mailto = re.search(r"<mailto:([^>]+)>", unsub)
    token = re.search(r"/unsubscribe/([^>]+)>", unsub)
    assert mailto and token, unsub
    head = received.data.split(b"\r\n\r\n", 1)[0].decode()
    return Copy(rcpt, received.mail_from, mailto.group(1), token.group(1), str(msg["Message-ID"]), head)


def _mx(stack: Stack, rcpt: str, data: str, mail_from: str = "") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", stack.ports["mxserver"], local_hostname="mx.remote.test", timeout=30) as client:
        client.ehlo()
        code, text = client.mail(f"<{mail_from}>")
        assert code == 250, text
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text
        return client.data(data.replace("\n", "\r\n").encode())


def _dsn(to: str, final_recipients: list[str], original_headers: str, status: str = "5.1.1") -> str:
    blocks = "\n".join(
        f"Final-Recipient: rfc822; {r}\nAction: failed\nStatus: {status}\n"
        f"Diagnostic-Code: smtp; 550 {status} <{r}>: user unknown\n"
        for r in final_recipients
    )
    return (
        f"From: MAILER-DAEMON@mx.dest.test\nTo: {to}\nSubject: Undelivered Mail Returned to Sender\n"
        f"Message-ID: <{uuidlib.uuid4().hex}@mx.dest.test>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n"
        "--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.dest.test\n\n"
        f"{blocks}\n--B\nContent-Type: text/rfc822-headers\n\n{original_headers}\n--B--\n"
    )


def _arf(original_headers: str, original_rcpt: str | None) -> str:
    rcpt = f"Original-Rcpt-To: {original_rcpt}\n" if original_rcpt else ""
    return (
        "From: staff@hotmail.example\nTo: " + FBL + "\nSubject: complaint about message\n"
        f"Message-ID: <{uuidlib.uuid4().hex}@fbl.example>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\n\n'
        "--F\nContent-Type: text/plain\n\nThis is an abuse report.\n\n"
        "--F\nContent-Type: message/feedback-report\n\nFeedback-Type: abuse\nUser-Agent: fbl/1.0\nVersion: 1\n"
        f"{rcpt}\n--F\nContent-Type: text/rfc822-headers\n\n{original_headers}\n--F--\n"
    )


def _redacted(headers: str, rcpt: str) -> str:
    """The original's headers with the recipient's address removed (as Microsoft's JMRP does)."""
    return re.sub(re.escape(rcpt), "redacted@example.com", headers, flags=re.IGNORECASE)


def _reports(stack: Stack, uuid: str) -> list[dict[str, Any]]:
    return [e for e in stack.webhook.events if e.get("uuid") == uuid and e["event"] in REPORTS]


def _unsubscribe(stack: Stack, token: str) -> int:
    url = f"http://127.0.0.1:{stack.ports['httpreceiver']}/unsubscribe/{token}"
    return requests.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=10).status_code


def test_forgeries_yield_no_event_and_genuine_reports_exactly_one(stack: Stack) -> None:
    uuid = uuidlib.uuid4().hex[:20]
    alice, bob = f"alice-{uuid[:6]}@dest.test", f"bob-{uuid[:6]}@dest.test"
    submit_smtp(stack, _message(uuid, alice, cc=bob))
    a, b = _copy(stack, alice), _copy(stack, bob)
    # Each copy has its own tagged values.
    assert len({a.return_path, b.return_path, a.unsub_address, b.unsub_address, a.token, b.token}) == 6
    assert a.message_id != b.message_id
    victim = "victim@elsewhere.test"

    # -- forgeries: none may produce a customer event ---------------------------------------
    untagged_id = a.headers.replace(a.message_id, f"<{uuid}@{testing.RETURN_PATH_DOMAIN}>")
    untagged_id = untagged_id.replace(a.return_path, f"bounce@{testing.RETURN_PATH_DOMAIN}")
    untagged_id = re.sub(r"List-Unsubscribe:.*(\r?\n\s.*)*", "", untagged_id)
    forged = [
        # ARF whose only link to us is a Message-ID the outsider wrote, with any Original-Rcpt-To.
        (FBL, _arf(untagged_id, victim)),
        # DSN to Alice's genuine bounce address naming a third party, or the other recipient.
        (a.return_path, _dsn(a.return_path, [victim], a.headers)),
        (a.return_path, _dsn(a.return_path, [bob], a.headers)),
        # A DSN with several Final-Recipients, none of them Alice.
        (a.return_path, _dsn(a.return_path, [victim, "other@elsewhere.test"], a.headers)),
        # Alice's tag on another uuid's address.
        (
            a.return_path.replace(f"bounce-{uuid}-", f"bounce-{'1' if uuid[0] == '0' else '0'}{uuid[1:]}-"),
            _dsn(a.return_path, [alice], a.headers),
        ),
        # ARF naming Alice's original with Bob's Original-Rcpt-To.
        (FBL, _arf(a.headers, bob)),
    ]
    for rcpt, data in forged:
        _mx(stack, rcpt, data)
    tampered = a.token[:-1] + ("a" if a.token[-1] != "a" else "b")
    assert _unsubscribe(stack, tampered) == 404

    # -- genuine reports: exactly one event each, for the right recipient ----------------------
    code, text = _mx(stack, a.return_path, _dsn(a.return_path, [alice], a.headers))
    assert code == 250, text
    code, _ = _mx(stack, FBL, _arf(_redacted(b.headers, bob), None))  # redacted ARF about Bob's copy
    assert code == 250
    code, _ = _mx(stack, a.unsub_address, f"From: {victim}\nTo: {a.unsub_address}\nSubject: unsubscribe\n\nstop\n")
    assert code == 250
    for _ in range(3):  # repeated one-click POSTs of Bob's token: one event
        assert _unsubscribe(stack, b.token) == 200

    expected = {("bounce", alice), ("spam-report", bob), ("unsubscribe", alice), ("unsubscribe", bob)}
    # MxServer answers 250 only once a report's events are in the event stream, and BackData
    # posts that stream in order: events of the forgeries (sent first) would arrive before these.
    wait_until(lambda: len(_reports(stack, uuid)) >= len(expected), timeout_s=60, what="the genuine events")
    got = [(e["event"], e.get("recipient")) for e in _reports(stack, uuid)]
    assert sorted(got) == sorted(expected), got
    assert all(e.get("recipient") != victim for e in stack.webhook.events)
    unsub = [e for e in _reports(stack, uuid) if e["event"] == "unsubscribe"]
    assert {e.get("source") for e in unsub} == {"mailto", "one-click"}
