"""DKIM signer: canonicalisation agrees with dkimpy; signatures cover what DESIGN §4 lists."""

from __future__ import annotations

import dkim.canonicalization
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.payloads import SubmittedMail
from transformer.message import RawMessage
from transformer.signer import DkimSigner, relaxed_body, relaxed_header

MESSAGE = (
    b"From: news@example.test\r\nTo: a@dest.test\r\nSubject: hello\r\nX-Uuid: abc\r\n"
    b"Reply-To: r@example.test\r\nIn-Reply-To: <q1@client.test>\r\n"
    b"References: <q0@client.test> <q1@client.test>\r\n\r\nbody\r\n"
)

_lines = st.lists(
    st.text(alphabet=st.sampled_from(["a", "b", " ", "\t", "é", "\r"]), max_size=12).map(lambda s: s.encode()),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(_lines, st.integers(min_value=0, max_value=3))
def test_relaxed_body_matches_dkimpy(lines: list[bytes], trailing_empty: int) -> None:
    # Our replace-based canonicalisation gives dkimpy's (regular-expression) result.
    body = b"".join(line + b"\r\n" for line in lines) + b"\r\n" * trailing_empty
    assert relaxed_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"Subject", b"TO", b"x-Custom"]),
    st.lists(st.text(alphabet=st.sampled_from(["a", " ", "\t", ":", "é"]), max_size=10), min_size=1, max_size=4),
)
def test_relaxed_header_matches_dkimpy(name: bytes, pieces: list[str]) -> None:
    # Folded values with runs of spaces and tabs canonicalise as dkimpy does.
    value = b"\r\n\t".join(p.encode() for p in pieces)
    raw = name + b":" + value + b"\r\n"
    ((cname, cvalue),) = dkim.canonicalization.Relaxed.canonicalize_headers([(name, value)])
    assert relaxed_header(raw) == cname + b":" + cvalue


def test_empty_and_blank_bodies_canonicalise_to_nothing() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n \t\r\n") == b""
    assert relaxed_body(b"a  \t b \r\n\r\n") == b"a b\r\n"


def _signed(transformer_factory, raw: bytes = MESSAGE, **kwargs):
    transformer, records = transformer_factory(**kwargs)
    result = transformer.transform(SubmittedMail(raw, "abc", 1, "smtp", 0.0))
    return result.mail.raw, records


@pytest.mark.parametrize("rsa", ["rsa1024.pem", "rsa2048.pem", "rsa4096.pem"])
def test_every_key_size_verifies_with_both_verifiers(transformer_factory, verifiers, rsa: str) -> None:
    raw, records = _signed(transformer_factory, rsa=rsa)
    dkimpy, perl = verifiers(raw, records)
    assert dkimpy == [True]
    assert "rsa-sha256 example.test mailer pass" in perl


@pytest.mark.parametrize(
    ("description", "edit"),
    [
        ("subject changed", lambda m: m.replace(b"Subject: hello", b"Subject: hellO")),
        ("body changed", lambda m: m.replace(b"body\r\n", b"bodY\r\n")),
        ("second From added", lambda m: m.replace(b"To: ", b"From: evil@attacker.test\r\nTo: ", 1)),
        ("List-Unsubscribe changed", lambda m: m.replace(b"<mailto:unsub-abc-", b"<mailto:unsub-abd-")),
        (
            "List-Unsubscribe-Post removed",
            lambda m: m.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b""),
        ),
        ("Feedback-ID changed", lambda m: m.replace(b"Feedback-ID: newsletter", b"Feedback-ID: other")),
        ("Message-ID changed", lambda m: m.replace(b"Message-ID: <abc.", b"Message-ID: <abd.")),
        ("Reply-To changed", lambda m: m.replace(b"Reply-To: r@", b"Reply-To: evil@")),
        ("In-Reply-To changed", lambda m: m.replace(b"In-Reply-To: <q1@", b"In-Reply-To: <q2@")),
        ("References changed", lambda m: m.replace(b"References: <q0@", b"References: <q9@")),
        ("Date changed", lambda m: m.replace(b"2023 22:13:20", b"2023 22:13:21")),
    ],
)
def test_tampering_breaks_the_signature(transformer_factory, verifiers, description: str, edit) -> None:
    # Every header DESIGN §4 names is covered, From is over-signed.
    raw, records = _signed(transformer_factory, unsubscribe_url="https://u.example.test/{{token}}")
    assert verifiers(raw, records)[0] == [True]
    tampered = edit(raw)
    assert tampered != raw, description
    dkimpy, perl = verifiers(tampered, records)
    assert dkimpy == [False], description
    assert any(" fail" in line for line in perl), (description, perl)


def test_unsigned_headers_may_change(transformer_factory, verifiers) -> None:
    # A relay adding trace headers (not in the signed list) does not break anything.
    raw, records = _signed(transformer_factory)
    relayed = b"Received: from relay by mx; Tue, 14 Nov 2023 22:13:21 +0000\r\n" + raw
    assert verifiers(relayed, records)[0] == [True]


def test_signature_field_is_folded_within_78_columns(transformer_factory) -> None:
    raw, _ = _signed(transformer_factory, rsa="rsa4096.pem")
    header = raw.split(b"\r\n\r\n", 1)[0]
    msg = RawMessage.parse(raw)
    sig = next(f for f in msg.fields if f.key == "dkim-signature")
    assert all(len(line) <= 78 for line in sig.raw.split(b"\r\n"))
    assert header.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;")


def test_repeated_headers_are_all_signed(transformer_factory, verifiers) -> None:
    raw_in = MESSAGE.replace(b"To: a@dest.test\r\n", b"To: a@dest.test\r\nTo: b@dest.test\r\n")
    raw, records = _signed(transformer_factory, raw=raw_in)
    sig = RawMessage.parse(raw).fields[0].raw.replace(b"\r\n\t", b"").replace(b" ", b"")
    assert b"h=from:from:to:to:subject:" in sig
    assert verifiers(raw, records)[0] == [True]
    swapped = raw.replace(b"To: a@dest.test\r\nTo: b@dest.test", b"To: b@dest.test\r\nTo: a@dest.test")
    assert verifiers(swapped, records)[0] == [False]


def test_signer_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DkimSigner([], clock=lambda: 0.0)
