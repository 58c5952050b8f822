"""Attribution and verification rules of the classifier that the corpus does not pin one by one.

A report produces an event only when a tag in it verifies (HMAC over uuid + recipient, against
the Transformer's record or an address the report names), all verified tags agree, and the
report -- when it names recipients -- names the bound one.
"""

from __future__ import annotations

from common.events import public
from devtools.testing import RETURN_PATH_DOMAIN
from mxserver.classifier import records_of
from tests.mxserver.conftest import CLASSIFIER, bounce_address, message_id, unsub_address

NOW = 1_700_000_000


def dsn(*final: str, inner_return_path: str = "", inner_message_id: str = "<x@elsewhere.example>") -> bytes:
    blocks = "".join(f"Final-Recipient: rfc822; {f}\nAction: failed\nStatus: 5.1.1\n\n" for f in final)
    return f"""From: MAILER-DAEMON@mx.example.org
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-1@mx.example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

{blocks}
--b
Content-Type: text/rfc822-headers

Return-Path: <{inner_return_path}>
Message-ID: {inner_message_id}

--b--
""".encode()


def classify(rcpts: list[str], raw: bytes, sent: dict[str, list[str]] | None = None):
    return CLASSIFIER.classify(rcpts, raw, records=records_of(sent or {}), now=NOW)


def test_envelope_tag_gives_the_bound_recipient() -> None:
    outcome = classify([bounce_address("u1", "a@example.org")], dsn("a@example.org"), {"u1": ["a@example.org"]})
    (event,) = outcome.events
    assert (event.uuid, event.recipient, event.extra["attribution"], event.extra["verified"]) == (
        "u1",
        "a@example.org",
        "envelope",
        True,
    )
    assert event.stream_id is None and event.extra["final_recipient"] == "a@example.org"


def test_inner_tag_is_used_when_the_envelope_has_none() -> None:
    raw = dsn("a@example.org", inner_return_path=bounce_address("u2", "a@example.org"))
    (event,) = classify([f"postmaster@{RETURN_PATH_DOMAIN}"], raw, {"u2": ["a@example.org"]}).events
    assert (event.uuid, event.recipient, event.extra["attribution"]) == ("u2", "a@example.org", "report")


def test_our_tagged_message_id_alone_attributes_a_report() -> None:
    raw = dsn("a@example.org", inner_message_id=message_id("u3", "a@example.org"))
    (event,) = classify([f"postmaster@{RETURN_PATH_DOMAIN}"], raw, {"u3": ["a@example.org"]}).events
    assert (event.uuid, event.recipient) == ("u3", "a@example.org")


def test_an_untagged_message_id_of_our_domain_attributes_nothing() -> None:
    # <uuid@return-path-domain> was the original's Message-ID: anybody can write it.
    raw = dsn("a@example.org", inner_message_id=f"<victimuuid@{RETURN_PATH_DOMAIN}>")
    outcome = classify([f"postmaster@{RETURN_PATH_DOMAIN}"], raw, {"victimuuid": ["a@example.org"]})
    assert (outcome.kind, outcome.reason) == ("unverified", "no-tag")


def test_tags_of_two_copies_disagree() -> None:
    # A genuine envelope of one uuid and a genuine original of another: spliced, unverified.
    raw = dsn("a@example.org", inner_return_path=bounce_address("u5", "b@example.org"))
    outcome = classify([bounce_address("u4", "a@example.org")], raw, {"u4": ["a@example.org"], "u5": ["b@example.org"]})
    assert (outcome.kind, outcome.reason) == ("unverified", "conflicting-tags")
    # Two recipients of the same uuid disagree too.
    raw = dsn("a@example.org", inner_return_path=bounce_address("u4", "b@example.org"))
    outcome = classify([bounce_address("u4", "a@example.org")], raw, {"u4": ["a@example.org", "b@example.org"]})
    assert (outcome.kind, outcome.reason) == ("unverified", "conflicting-tags")


def test_the_report_must_name_the_bound_recipient() -> None:
    sent = {"u6": ["a@example.org"]}
    outcome = classify([bounce_address("u6", "a@example.org")], dsn("victim@elsewhere.example"), sent)
    assert (outcome.kind, outcome.reason) == ("unverified", "recipient-mismatch")
    # Several blocks: the one naming the bound recipient gives the one event.
    outcome = classify([bounce_address("u6", "a@example.org")], dsn("x@example.org", "A@Example.org"), sent)
    assert [(e.recipient, e.extra["final_recipient"]) for e in outcome.events] == [("a@example.org", "A@Example.org")]


def test_a_tag_on_a_foreign_domain_is_not_ours() -> None:
    genuine = bounce_address("u7", "a@example.org")
    sent = {"u7": ["a@example.org"]}
    for foreign in (
        genuine.replace(RETURN_PATH_DOMAIN, "attacker.example"),
        genuine.replace(RETURN_PATH_DOMAIN, f"{RETURN_PATH_DOMAIN}.attacker.example"),
        genuine.replace("@", "@sub."),
    ):
        outcome = classify([f"postmaster@{RETURN_PATH_DOMAIN}"], dsn("a@example.org", inner_return_path=foreign), sent)
        assert (outcome.kind, outcome.reason) == ("unverified", "no-tag"), foreign
    outcome = classify([f"postmaster@{RETURN_PATH_DOMAIN}"], dsn("a@example.org", inner_return_path=genuine), sent)
    assert outcome.kind == "bounce"


def test_a_forged_tag_verifies_for_nobody() -> None:
    forged = bounce_address("u8", "a@example.org")[: -len(RETURN_PATH_DOMAIN) - 3] + "aa@" + RETURN_PATH_DOMAIN
    outcome = classify([forged], dsn("a@example.org"), {"u8": ["a@example.org"]})
    assert (outcome.kind, outcome.reason) == ("unverified", "bad-tag")


def test_unsubscribe_wins_and_names_the_bound_recipient_whoever_writes() -> None:
    raw = b"From: Victim <victim@example.net>\r\nSubject: unsubscribe\r\n\r\nplease\r\n"
    outcome = classify([unsub_address("u9", "reader@example.org")], raw, {"u9": ["reader@example.org"]})
    (event,) = outcome.events
    record = public(event.to_dict())
    assert (record["event"], record["uuid"], record["recipient"], record["reported_recipient"]) == (
        "unsubscribe",
        "u9",
        "reader@example.org",
        "victim@example.net",
    )


def test_event_ids_differ_per_uuid_and_are_stable_per_report() -> None:
    raw = dsn("a@example.org")
    sent = {"first": ["a@example.org"], "second": ["a@example.org"]}
    one = classify([bounce_address("first", "a@example.org")], raw, sent).events[0].event_id
    two = classify([bounce_address("second", "a@example.org")], raw, sent).events[0].event_id
    again = classify([bounce_address("first", "a@example.org")], raw, sent).events[0].event_id
    assert one != two and one == again
