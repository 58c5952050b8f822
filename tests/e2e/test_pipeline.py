"""End to end: submission -> Transformer -> Postfix -> "the internet", and every outcome back
at the customer's webhook; MxServer's async signals too.

Everything is real: redis-server, a private Postfix, the seven services as processes, an SMTP
sink with scripted replies per recipient, and an HTTP webhook receiver.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import ssl
import uuid as uuidlib
from email.message import EmailMessage
from typing import Any

import dkim
import pytest
import requests

from common.dkimkeys import load_private_key, public_key_record
from devtools import testing
from devtools.servers import wait_until
from devtools.sink import Received
from devtools.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

INTERNAL_HEADERS = ("X-Uuid", "X-Priority", "X-Stream-Id", "X-ReturnPathIb", "X-RecipientIb", "X-IB-Route")


def _uuid() -> str:
    return uuidlib.uuid4().hex[:20]


def _message(uuid: str, to: str, *, stream: str | None = "spring-sale", cc: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Shop <news@{testing.SENDER_DOMAIN}>"
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = "Spring sale: 20 % off ✓"
    msg["X-Uuid"] = uuid
    if stream:
        msg["X-Stream-Id"] = stream
    msg.set_content("Hello,\nour spring sale starts today.\n")
    msg.add_alternative("<html><body><p>Hello, our <b>spring sale</b> starts today.</p></body></html>", subtype="html")
    return msg.as_bytes(policy=email.policy.SMTP)


def submit_smtp(stack: Stack, raw: bytes) -> None:
    """Submit through Receiver: STARTTLS + AUTH, as a customer's application would."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the local stack uses a self-signed certificate
    with smtplib.SMTP("127.0.0.1", stack.ports["receiver"], local_hostname="app.test", timeout=30) as client:
        client.starttls(context=context)
        client.login(testing.RECEIVER_USER, testing.RECEIVER_PASSWORD)
        client.sendmail("ignored@app.test", ["ignored@app.test"], raw)


def submit_http(stack: Stack, raw: bytes) -> requests.Response:
    """Submit through HttpReceiver; the answer must be 200."""
    reply = requests.post(
        f"http://127.0.0.1:{stack.ports['httpreceiver']}/v1/mail/send",
        data=raw,
        headers={"Content-Type": "message/rfc822"},
        auth=(testing.RECEIVER_USER, testing.RECEIVER_PASSWORD),
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return reply


def events_for(stack: Stack, uuid: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in stack.webhook.events if e.get("uuid") == uuid and (kind is None or e["event"] == kind)]


def wait_event(stack: Stack, uuid: str, kind: str, timeout_s: float = 60) -> dict[str, Any]:
    wait_until(lambda: bool(events_for(stack, uuid, kind)), timeout_s=timeout_s, what=f"{kind} event for {uuid}")
    return events_for(stack, uuid, kind)[0]


def delivered_copy(stack: Stack, rcpt: str) -> Received:
    wait_until(lambda: any(m.rcpt == rcpt for m in stack.sink.messages), timeout_s=60, what=f"mail for {rcpt}")
    found: Received = next(m for m in stack.sink.messages if m.rcpt == rcpt)
    return found


def _dns(stack: Stack) -> dict[bytes, bytes]:
    key = load_private_key(stack.config_dir / f"dkim-{testing.SENDER_DOMAIN}.pem", "rsa")
    name = f"{testing.SELECTOR}._domainkey.{testing.SENDER_DOMAIN}.".encode()
    return {name: public_key_record(key).encode()}


def test_smtp_submission_is_delivered_signed_and_reported(stack: Stack) -> None:
    uuid = _uuid()
    submit_smtp(stack, _message(uuid, "alice@dest.test"))
    event = wait_event(stack, uuid, "delivered")
    assert event["recipient"] == "alice@dest.test"
    assert event["stream_id"] == "spring-sale"
    assert event["ip"] == "127.0.0.1"
    assert "fd" not in event and "rcpt" not in event and event["event_id"]
    copy = delivered_copy(stack, "alice@dest.test")
    dns = _dns(stack)
    assert dkim.verify(copy.data, dnsfunc=lambda name, timeout=5: dns.get(name))
    parsed = email.message_from_bytes(copy.data)
    for header in INTERNAL_HEADERS:
        assert header not in parsed, f"{header} leaked into the delivered message"
    assert re.fullmatch(
        rf"<{uuid}\.[a-z2-7]{{10}}\.[a-z2-7]{{16}}@{re.escape(testing.RETURN_PATH_DOMAIN)}>", parsed["Message-ID"]
    )
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert re.match(rf"bounce-{uuid}-[a-z2-7]{{10}}@{re.escape(testing.RETURN_PATH_DOMAIN)}$", copy.mail_from)


def test_http_submission_with_cc_reaches_every_recipient(stack: Stack) -> None:
    uuid = _uuid()
    reply = submit_http(stack, _message(uuid, "bob@dest.test", cc="carol@dest.test"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["uuid"] == uuid
    wait_until(lambda: len(events_for(stack, uuid, "delivered")) == 2, timeout_s=60, what="two deliveries")
    assert {e["recipient"] for e in events_for(stack, uuid, "delivered")} == {"bob@dest.test", "carol@dest.test"}


def test_hard_bounce_from_the_remote_server(stack: Stack) -> None:
    uuid = _uuid()
    submit_smtp(stack, _message(uuid, "bounce-user@dest.test"))
    event = wait_event(stack, uuid, "bounce")
    assert event["type"] == "hard"
    assert event["status"] == "5.1.1"
    assert event["classification"] == "user-unknown"
    assert event["suppress"] is True
    assert "user unknown" in event["reason"]


def test_deferred_delivery_is_reported(stack: Stack) -> None:
    uuid = _uuid()
    submit_http(stack, _message(uuid, "defer-user@dest.test"))
    event = wait_event(stack, uuid, "deferred")
    assert event["recipient"] == "defer-user@dest.test"
    assert "450" in event["reason"]


def _dsn_for(copy: Received, uuid: str) -> bytes:
    """An RFC 3464 report from the recipient's domain, sent later to our return path."""
    original = email.message_from_bytes(copy.data)
    return (
        f"From: MAILER-DAEMON@dest.test\r\nTo: {copy.mail_from}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\nAuto-Submitted: auto-replied\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nThe mailbox no longer exists.\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {copy.rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{copy.rcpt}>: mailbox gone\r\n"
        "--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {original['Message-ID']}\r\nFrom: {original['From']}\r\n"
        "--b1--\r\n"
    ).encode()


def _send_to_mx(stack: Stack, mail_from: str, rcpt: str, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", stack.ports["mxserver"], local_hostname="mx.dest.test", timeout=30) as client:
        client.sendmail(mail_from, [rcpt], raw)


def test_async_dsn_becomes_a_bounce(stack: Stack) -> None:
    uuid = _uuid()
    submit_smtp(stack, _message(uuid, "dave@dest.test"))
    copy = delivered_copy(stack, "dave@dest.test")
    _send_to_mx(stack, "", copy.mail_from, _dsn_for(copy, uuid))
    event = wait_event(stack, uuid, "bounce")
    assert event["type"] == "hard"
    assert event["status"] == "5.1.1"
    assert event["recipient"] == "dave@dest.test"


def _list_unsubscribe(copy: Received) -> tuple[str, str]:
    header = email.message_from_bytes(copy.data)["List-Unsubscribe"]
    urls = re.findall(r"<([^>]+)>", header)
    https = next(u for u in urls if u.startswith("http"))
    mailto = next(u for u in urls if u.startswith("mailto:")).removeprefix("mailto:")
    return https, mailto


def test_unsubscribe_by_mail_and_one_click(stack: Stack) -> None:
    first, second = _uuid(), _uuid()
    submit_smtp(stack, _message(first, "erin@dest.test"))
    submit_smtp(stack, _message(second, "frank@dest.test"))
    _, mailto = _list_unsubscribe(delivered_copy(stack, "erin@dest.test"))
    _send_to_mx(stack, "erin@dest.test", mailto, b"From: erin@dest.test\r\nSubject: unsubscribe\r\n\r\nunsubscribe\r\n")
    assert wait_event(stack, first, "unsubscribe")
    url, _ = _list_unsubscribe(delivered_copy(stack, "frank@dest.test"))
    reply = requests.post(
        url,
        data="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
        allow_redirects=False,
    )
    assert reply.status_code == 200
    assert wait_event(stack, second, "unsubscribe")
    forged = url.rsplit("/", 1)[0] + f"/{second}-aaaaaaaaaa"
    assert requests.post(forged, data="List-Unsubscribe=One-Click", timeout=10).status_code == 404


def test_arf_report_becomes_a_spam_report(stack: Stack) -> None:
    uuid = _uuid()
    submit_smtp(stack, _message(uuid, "grace@dest.test"))
    copy = delivered_copy(stack, "grace@dest.test")
    original = copy.data.decode("utf-8", "replace")
    report = (
        "From: feedback@fbl.dest.test\r\nTo: fbl@" + testing.RETURN_PATH_DOMAIN + "\r\n"
        "Subject: FW: Spring sale\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="arf"\r\n\r\n'
        "--arf\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
        "--arf\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: dest-fbl/1.0\r\nVersion: 1\r\n"
        f"Original-Mail-From: <{copy.mail_from}>\r\nOriginal-Rcpt-To: <grace@dest.test>\r\n\r\n"
        "--arf\r\nContent-Type: message/rfc822\r\n\r\n" + original + "\r\n--arf--\r\n"
    ).encode()
    _send_to_mx(stack, "feedback@fbl.dest.test", f"fbl@{testing.RETURN_PATH_DOMAIN}", report)
    event = wait_event(stack, uuid, "spam-report")
    assert event["email"] == "grace@dest.test"
