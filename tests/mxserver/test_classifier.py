"""Attribution rules of the classifier that the corpus does not pin one by one."""

from __future__ import annotations

from common.addressing import AddressSigner
from devtools.testing import RETURN_PATH_DOMAIN, SENDER_DOMAIN
from mxserver.classifier import Classifier
from tests.mxserver.conftest import bounce_address, unsub_address

CLASSIFIER = Classifier(
    signer=AddressSigner(b"test-address-secret-0123456789abcdef"),
    return_path_domains=frozenset({RETURN_PATH_DOMAIN}),
    abuse_addresses=frozenset({f"fbl@{RETURN_PATH_DOMAIN}"}),
    from_domains={RETURN_PATH_DOMAIN: SENDER_DOMAIN},
)


def dsn(inner_return_path: str, message_id: str = "<x@elsewhere.example>") -> bytes:
    return f"""From: MAILER-DAEMON@mx.example.org
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-1@mx.example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; a@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 user unknown

--b
Content-Type: text/rfc822-headers

Return-Path: <{inner_return_path}>
Message-ID: {message_id}

--b--
""".encode()


def test_envelope_tag_beats_the_tag_inside_the_report() -> None:
    result = CLASSIFIER.classify([bounce_address("fromenvelope")], dsn(bounce_address("frominside")), now=1)
    (event,) = result.events
    assert (event.uuid, event.extra["attribution"]) == ("fromenvelope", "envelope")


def test_inner_tag_is_used_when_the_envelope_has_none() -> None:
    result = CLASSIFIER.classify([f"postmaster@{RETURN_PATH_DOMAIN}"], dsn(bounce_address("frominside")), now=1)
    (event,) = result.events
    assert (event.uuid, event.extra["attribution"]) == ("frominside", "return-path")


def test_message_id_alone_never_attributes_a_bounce() -> None:
    # Message-IDs are in every sent mail and carry no tag: a bounce needs a genuine tag.
    raw = dsn("spoof@attacker.example", message_id=f"<victimuuid@{RETURN_PATH_DOMAIN}>")
    result = CLASSIFIER.classify([f"postmaster@{RETURN_PATH_DOMAIN}"], raw, now=1)
    assert result.kind == "unclassified"
    assert "without a genuine tagged address" in result.note


def test_tag_on_a_foreign_domain_is_not_ours() -> None:
    foreign = bounce_address("abc123").replace(RETURN_PATH_DOMAIN, "attacker.example")
    result = CLASSIFIER.classify([f"postmaster@{RETURN_PATH_DOMAIN}"], dsn(foreign), now=1)
    assert result.kind == "unclassified"


def test_unsubscribe_wins_over_everything_else() -> None:
    # First match wins: mail to a genuine unsubscribe address is an unsubscribe, whatever it holds.
    result = CLASSIFIER.classify([unsub_address("u1"), bounce_address("b1")], dsn(bounce_address("b1")), now=1)
    assert result.kind == "unsubscribe"
    assert [e.uuid for e in result.events] == ["u1"]


def test_event_ids_differ_per_uuid_and_kind() -> None:
    raw = dsn(bounce_address("x"))
    one = CLASSIFIER.classify([bounce_address("first")], raw, now=1).events[0].event_id
    two = CLASSIFIER.classify([bounce_address("second")], raw, now=1).events[0].event_id
    assert one != two
