"""Per-message rules: refused messages carry their uuid, nothing internal leaks, tags are genuine."""

from __future__ import annotations

import binascii
import re

import pytest

from common.addressing import AddressSigner, parse_address, parse_message_id, parse_token
from common.payloads import OutboundMail, SubmittedMail
from transformer.message import RawMessage
from transformer.transform import Unprocessable
from transformer.wire import decode_words

GOOD = (
    b"From: news@example.test\r\nTo: a@dest.test\r\nSubject: s\r\nX-Uuid: u1\r\n"
    b"X-Stream-Id: st\r\nX-Priority: 0\r\n\r\nbody\r\n"
)
SIGNER = AddressSigner(b"golden-secret")


def _submit(raw: bytes, uuid: str = "u1", priority: int = 1) -> SubmittedMail:
    return SubmittedMail(raw, uuid, priority, "smtp", 1234.5)


@pytest.mark.parametrize(
    ("raw", "entry_uuid", "reason", "event_uuid", "stream"),
    [
        (b"not a message at all\r\n", "u9", "unparsable message", "u9", None),
        (GOOD.replace(b"X-Uuid: u1\r\n", b""), "u9", "X-Uuid missing", "u9", "st"),
        (GOOD.replace(b"X-Uuid: u1", b"X-Uuid: Not-Valid"), "BAD!", "X-Uuid is not", None, "st"),
        (
            GOOD.replace(b"news@example.test", b"news@unknown.test"),
            "u1",
            "From domain unknown.test is not configured",
            "u1",
            "st",
        ),
        (GOOD.replace(b"From: news@example.test\r\n", b""), "u1", "From header is missing", "u1", "st"),
        (GOOD.replace(b"To: a@dest.test", b"To: undisclosed-recipients:;"), "u1", "no valid recipient", "u1", "st"),
    ],
)
def test_unprocessable_messages_say_why_and_keep_the_uuid(
    transformer_factory, raw: bytes, entry_uuid: str, reason: str, event_uuid: str | None, stream: str | None
) -> None:
    transformer, _ = transformer_factory()
    with pytest.raises(Unprocessable, match=reason) as info:
        transformer.transform(_submit(raw, entry_uuid))
    assert info.value.uuid == event_uuid
    assert info.value.stream_id == stream


def test_envelope_travels_in_fields_and_nothing_internal_leaks(transformer_factory) -> None:
    raw = GOOD.replace(
        b"X-Priority: 0\r\n",
        b"X-Priority: 0\r\nX-ReturnPathIb: bounce-x@evil.test\r\nX-RecipientIb: r@dest.test\r\n"
        b"Bcc: secret@dest.test\r\nX-UUID: again\r\nx-priority: 1\r\n",
    )
    transformer, _ = transformer_factory()
    mail = transformer.transform(_submit(raw, priority=0)).mail
    out = RawMessage.parse(mail.raw)
    for name in ("X-Uuid", "X-Stream-Id", "X-Priority", "X-ReturnPathIb", "X-RecipientIb", "Bcc"):
        assert not out.has(name), name
    assert b"secret@dest.test" not in mail.raw
    assert (mail.uuid, mail.stream_id, mail.from_domain, mail.recipients) == (
        "u1",
        "st",
        "example.test",
        ("a@dest.test",),
    )
    assert mail.submitted_at == 1234.5
    assert mail.meta == {"priority": "0"}
    fields = mail.to_fields()
    assert fields["mail_from"] == mail.mail_from
    assert set(fields) >= {"raw", "uuid", "mail_from", "rcpts", "from_domain", "ts", "stream_id"}


def _tagged_values(mail: OutboundMail) -> dict[str, str]:
    msg = RawMessage.parse(mail.raw)
    unsub_header = msg.get("List-Unsubscribe") or ""
    mailto = re.search(r"<mailto:([^>]+)>", unsub_header)
    token = re.search(r"/unsub/([^>]+)>", unsub_header)
    assert mailto is not None and token is not None
    return {
        "bounce": mail.mail_from,
        "unsub": mailto.group(1),
        "token": token.group(1),
        "msgid": msg.get("Message-ID") or "",
    }


def test_each_recipient_gets_a_copy_with_its_own_bound_tags(transformer_factory) -> None:
    # To + Cc: one signed copy per recipient; every tag verifies for that recipient only.
    transformer, _ = transformer_factory(unsubscribe_url="https://u.example.test/unsub/{{token}}")
    raw = GOOD.replace(b"To: a@dest.test\r\n", b'To: "Doe, Jane" <Jane@dest.test>\r\nCc: b@dest.test, a@dest.test\r\n')
    result = transformer.transform(_submit(raw))
    assert [m.recipients for m in result.mails] == [("Jane@dest.test",), ("b@dest.test",), ("a@dest.test",)]
    seen: set[str] = set()
    for mail in result.mails:
        (rcpt,) = mail.recipients
        values = _tagged_values(mail)
        found = {
            "bounce": parse_address(values["bounce"]),
            "unsub": parse_address(values["unsub"]),
            "token": parse_token(values["token"]),
            "msgid": parse_message_id(values["msgid"]),
        }
        for name, tagged in found.items():
            assert tagged is not None and tagged.uuid == "u1", name
            assert SIGNER.verify(tagged.kind, "u1", tagged.tag, rcpt), name
            assert SIGNER.verify(tagged.kind, "u1", tagged.tag, rcpt.upper()), name  # case does not matter
            for other in result.mails:
                if other is not mail:
                    assert not SIGNER.verify(tagged.kind, "u1", tagged.tag, other.recipients[0]), name
        assert len(values["bounce"].partition("@")[0]) <= 64
        seen.update(values.values())
    assert len(seen) == 4 * len(result.mails)  # nothing shared between copies
    # The record of who the message went to goes with the copies.
    assert result.record.key == "IB:sent:u1"
    assert set(result.record.mapping) == {"Jane@dest.test", "b@dest.test", "a@dest.test"}


def test_forged_tags_do_not_verify(transformer_factory) -> None:
    transformer, _ = transformer_factory(unsubscribe_url="https://u.example.test/unsub/{{token}}")
    mail = transformer.transform(_submit(GOOD)).mail
    bounce = parse_address(mail.mail_from)
    assert bounce is not None
    unsub = parse_address(_tagged_values(mail)["unsub"])
    assert unsub is not None
    assert not SIGNER.verify("bounce", "u2", bounce.tag, "a@dest.test")  # another message's uuid
    assert not SIGNER.verify("bounce", "u1", bounce.tag[::-1], "a@dest.test")  # tampered tag
    assert not SIGNER.verify("bounce", "u1", unsub.tag, "a@dest.test")  # an unsubscribe tag used as a bounce tag
    assert not AddressSigner(b"another installation").verify("bounce", "u1", bounce.tag, "a@dest.test")
    assert parse_address(f"bounce-u1@{mail.mail_from.partition('@')[2]}") is None  # the original's untagged format


def test_longest_uuid_keeps_local_parts_within_64_octets(transformer_factory) -> None:
    uuid = "z" * 46
    transformer, _ = transformer_factory()
    mail = transformer.transform(_submit(GOOD.replace(b"X-Uuid: u1", f"X-Uuid: {uuid}".encode()), uuid)).mail
    for address in (mail.mail_from, _tagged_values_no_token(mail)):
        assert len(address.partition("@")[0]) <= 64
    assert len(mail.mail_from.partition("@")[0]) == 64  # the longest: bounce- + 46 + - + 10


def _tagged_values_no_token(mail: OutboundMail) -> str:
    header = RawMessage.parse(mail.raw).get("List-Unsubscribe") or ""
    found = re.search(r"<mailto:([^>]+)>", header)
    assert found is not None
    return found.group(1)


def test_x_mailer_null_keeps_the_clients_and_configured_replaces_it(transformer_factory) -> None:
    raw = GOOD.replace(b"Subject: s\r\n", b"Subject: s\r\nX-Mailer: Client 1.0\r\n")
    keep, _ = transformer_factory(x_mailer=None)
    assert RawMessage.parse(keep.transform(_submit(raw)).mail.raw).get_all("X-Mailer") == ["Client 1.0"]
    ours, _ = transformer_factory(x_mailer="Inboxbooster-Mailer")
    assert RawMessage.parse(ours.transform(_submit(raw)).mail.raw).get_all("X-Mailer") == ["Inboxbooster-Mailer"]


def test_feedback_id_without_stream_or_campaign_has_empty_fields(transformer_factory) -> None:
    from common.config.transformer import FeedbackId

    transformer, _ = transformer_factory(feedback=FeedbackId())
    mail = transformer.transform(_submit(GOOD.replace(b"X-Stream-Id: st\r\n", b""))).mail
    assert RawMessage.parse(mail.raw).get("Feedback-ID") == ":u1::"


def test_non_ascii_injected_value_is_rfc2047_encoded(transformer_factory, verifiers) -> None:
    transformer, records = transformer_factory(inject={"X-Team": "Équipe {{stream-id}}"})
    mail = transformer.transform(_submit(GOOD)).mail
    (field,) = [f for f in RawMessage.parse(mail.raw).fields if f.key == "x-team"]
    assert field.raw.isascii() and b"=?utf-8?" in field.raw
    assert verifiers(mail.raw, records)[0] == [True]


def test_long_body_line_is_reencoded_before_signing(transformer_factory, verifiers) -> None:
    # A line over 998 octets would be folded by an MTA after signing: it travels as quoted-printable.
    raw = GOOD.replace(b"body\r\n", b"x" * 1200 + b"\r\n")
    transformer, records = transformer_factory()
    result = transformer.transform(_submit(raw))
    assert result.warnings == ()
    assert (result.wire_form.body_parts, result.wire_form.smtputf8) == (1, False)
    out = RawMessage.parse(result.mail.raw)
    assert out.get("Content-Transfer-Encoding") == "quoted-printable"
    assert out.get("MIME-Version") == "1.0"
    assert max(map(len, result.mail.raw.split(b"\r\n"))) <= 998
    assert binascii.a2b_qp(out.body) == b"x" * 1200 + b"\r\n"
    assert verifiers(result.mail.raw, records)[0] == [True]


def test_non_ascii_local_part_needs_smtputf8(transformer_factory, verifiers) -> None:
    # Nothing can encode a UTF-8 local part: the message stays 8-bit and says it needs SMTPUTF8.
    raw = GOOD.replace(b"To: a@dest.test", "To: Zoë <zoë@bücher.test>".encode()).replace(b"body", "Grüße".encode())
    transformer, records = transformer_factory()
    result = transformer.transform(_submit(raw))
    assert result.wire_form.smtputf8 and result.mail.meta["smtputf8"] == "yes"
    assert result.mail.recipients == ("zoë@xn--bcher-kva.test",)
    out = RawMessage.parse(result.mail.raw)
    to = out.get("To") or ""
    assert to.startswith("=?utf-8?") and to.endswith(" <zoë@xn--bcher-kva.test>")
    assert decode_words(to) == "Zoë <zoë@xn--bcher-kva.test>"
    assert out.body == "Grüße\r\n".encode()
    assert verifiers(result.mail.raw, records)[0] == [True]


def test_ascii_message_does_not_need_smtputf8(transformer_factory) -> None:
    transformer, _ = transformer_factory()
    result = transformer.transform(_submit(GOOD))
    assert "smtputf8" not in result.mail.meta and not result.wire_form.smtputf8
    assert (result.wire_form.body_parts, result.wire_form.headers) == (0, 0)


def test_bare_cr_in_the_header_block_is_unprocessable(transformer_factory) -> None:
    # The intake refuses it; an older queue entry must not grow a header either.
    raw = GOOD.replace(b"X-Stream-Id: st", b"X-Stream-Id: camp\rX-Injected: yes")
    transformer, _ = transformer_factory()
    with pytest.raises(Unprocessable, match="bare CR"):
        transformer.transform(_submit(raw))
