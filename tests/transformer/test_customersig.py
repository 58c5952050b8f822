"""The customer's own DKIM-Signature (transformer.customersig): kept only when nothing it covers
changed, and then it still verifies at the receiver; otherwise removed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dkim
import pytest

from common.payloads import SubmittedMail
from tests.transformer.conftest import KEYS, key, verify_dkimpy
from transformer.customersig import Snapshot, review, signature_tags
from transformer.message import RawMessage
from transformer.transform import MessageTransformer

CLIENT = ("client.test", "cust")
ASCII = (
    b"From: news@example.test\r\nTo: a@dest.test\r\nSubject: hello\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"X-Uuid: cs1\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain body\r\n"
)
Factory = Callable[..., tuple[MessageTransformer, dict[str, str]]]


def client_signed(raw: bytes, headers: Sequence[bytes], *, canon: bytes = b"relaxed", length: bool = False) -> bytes:
    """``raw`` signed by the customer's own key (d=client.test, s=cust)."""
    signature: bytes = dkim.sign(
        raw,
        CLIENT[1].encode(),
        CLIENT[0].encode(),
        (KEYS / "rsa1024.pem").read_bytes(),
        include_headers=list(headers),
        canonicalize=(canon, canon),
        length=length,
    )
    return signature + raw


def transform(factory: Factory, raw: bytes) -> tuple[bytes, list[bool], list[str]]:
    """(output, dkimpy verdicts top first, d= of the signatures left) with the client's key published."""
    transformer, records = factory()
    result = transformer.transform(SubmittedMail(raw, "cs1", 1, "smtp", 0.0))
    records[f"{CLIENT[1]}._domainkey.{CLIENT[0]}"] = _client_record()
    out = result.mail.raw
    domains = [signature_tags(f.raw)["d"] for f in RawMessage.parse(out).fields if f.key == "dkim-signature"]
    return out, verify_dkimpy(out, records), domains


def _client_record() -> str:
    from common.dkimkeys import public_key_record

    return public_key_record(key("rsa1024.pem"))


def test_signature_over_headers_we_keep_stays_and_still_verifies(transformer_factory: Factory) -> None:
    raw = client_signed(ASCII, [b"from", b"to", b"subject", b"date"])
    _, verdicts, domains = transform(transformer_factory, raw)
    assert domains == ["example.test", CLIENT[0]]
    assert verdicts == [True, True], "ours and the customer's verify"


def test_simple_canonicalisation_and_body_length_limit(transformer_factory: Factory) -> None:
    raw = client_signed(ASCII, [b"from", b"subject"], canon=b"simple", length=True)
    assert b" l=" in raw or b";l=" in raw.replace(b" ", b"")
    _, verdicts, domains = transform(transformer_factory, raw)
    assert domains == ["example.test", CLIENT[0]] and verdicts == [True, True]


@pytest.mark.parametrize(
    ("description", "raw"),
    [
        ("covers Message-ID (we replace it)", client_signed(ASCII, [b"from", b"subject", b"message-id"])),
        ("covers X-Uuid (we remove it)", client_signed(ASCII, [b"from", b"x-uuid"])),
        ("covers List-Unsubscribe (we add one)", client_signed(ASCII, [b"from", b"list-unsubscribe"])),
        (
            "covers an 8-bit body (we re-encode it)",
            client_signed(ASCII.replace(b"plain body", "Grüße".encode()), [b"from"]),
        ),
        (
            "covers a raw UTF-8 Subject (we encode it)",
            client_signed(ASCII.replace(b"Subject: hello", "Subject: héllo".encode()), [b"from", b"subject"]),
        ),
    ],
)
def test_signature_over_something_we_change_is_removed(
    transformer_factory: Factory, description: str, raw: bytes
) -> None:
    _, verdicts, domains = transform(transformer_factory, raw)
    assert domains == ["example.test"], description
    assert verdicts == [True]


def test_review_names_what_changed() -> None:
    msg = RawMessage.parse(client_signed(ASCII, [b"from", b"subject"]))
    before = Snapshot.of(msg)
    msg.remove(["subject"])
    msg.append("Subject", "changed")
    [verdict] = review(before, msg)
    assert (verdict.domain, verdict.kept, verdict.reason) == (CLIENT[0], False, "header subject changed")
    assert not msg.has("DKIM-Signature")


def test_review_keeps_a_signature_when_nothing_changed() -> None:
    msg = RawMessage.parse(client_signed(ASCII, [b"from", b"subject"]))
    [verdict] = review(Snapshot.of(msg), msg)
    assert verdict.kept and msg.has("DKIM-Signature")


def test_malformed_length_tag_removes_the_signature() -> None:
    raw = client_signed(ASCII, [b"from"]).replace(b"DKIM-Signature: ", b"DKIM-Signature: l=x; ", 1)
    msg = RawMessage.parse(raw)
    [verdict] = review(Snapshot.of(msg), msg)
    assert not verdict.kept
