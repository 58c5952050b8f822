"""Golden files: each message in tests/data/dkim is transformed with a fixed clock, checked
against its expected headers and signature tags, and verified by dkimpy and by Mail::DKIM.

``GOLDEN_UPDATE=1`` rewrites the ``h``/``bh``/``b`` expectations from the current output (review
the diff: both verifiers still have to accept the signatures).

``headers`` expectations are compared decoded (RFC 2047), since the wire form encodes raw UTF-8;
``wire`` says how many body parts and header fields it re-encoded (default none).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.addressing import AddressSigner
from common.config.transformer import FeedbackId
from common.payloads import SubmittedMail
from transformer.message import RawMessage
from transformer.transform import MessageTransformer

REPO = Path(__file__).resolve().parents[2]
CASES = sorted((REPO / "tests/data/dkim").glob("*.msg"))
SIGNER = AddressSigner(b"golden-secret")


@dataclass
class Case:
    path: Path
    meta: dict[str, Any]
    message: bytes

    @property
    def expect(self) -> dict[str, Any]:
        return dict(self.meta.get("expect") or {})


def load_case(path: Path) -> Case:
    data = path.read_bytes()
    head, sep, message = data.partition(b"\n---\n")
    assert sep, f"{path.name}: no '---' line between front matter and message"
    meta = yaml.safe_load(head)
    if meta.get("line-endings", "lf") == "crlf":
        message = message.replace(b"\n", b"\r\n")
    return Case(path, meta, message)


def build(case: Case, factory: Callable[..., tuple[MessageTransformer, dict[str, str]]]):
    m = case.meta
    ed = (m["ed25519-key"], m["ed25519-selector"]) if m.get("ed25519-key") else None
    kwargs: dict[str, Any] = {
        "now": float(m["time"]),
        "domain": m["domain"],
        "selector": m["selector"],
        "rsa": m["key"],
        "ed25519": ed,
        "return_path_domain": m["return-path-domain"],
        "beacon_url": m.get("beacon-url"),
        "unsubscribe_url": m.get("unsubscribe-url"),
        "x_mailer": m.get("x-mailer", "Inboxbooster-Mailer"),
        "inject": m.get("inject"),
    }
    if "feedback-id" in m:
        kwargs["feedback"] = FeedbackId.model_validate(m["feedback-id"])
    return factory(**kwargs)


def tags(text: str, rcpt: str) -> str:
    """Fill the tags (``-TAG@``, ``-TAG`` before ``?``/``>``, ``.TAG.``) of the uuid in front, for ``rcpt``.

    The copy checked is the first recipient's; ``.SUFFIX@`` is the Message-ID suffix of the fixed
    clock and nonce.
    """

    def fill(match: re.Match[str]) -> str:
        kind, uuid = match.group(1), match.group(2)
        tag = SIGNER.tag("bounce" if kind == "bounce" else "unsub", uuid, rcpt)
        return f"{match.group(0)[: -len('TAG')]}{tag}"

    text = re.sub(r"(bounce|unsub)-([a-z0-9]+)-TAG", fill, text)
    text = re.sub(r"/(u[a-z0-9]+)-TAG", lambda mt: f"/{mt.group(1)}-{SIGNER.tag('unsub', mt.group(1), rcpt)}", text)
    return re.sub(
        r"<(u[a-z0-9]+)\.TAG\.SUFFIX@",
        lambda mt: (
            SIGNER.message_id(mt.group(1), rcpt, "x", now=1700000000.0, nonce=b"\x00" * 5)[:-2].rsplit("@", 1)[0] + "@"
        ),
        text,
    )


def signature_tags(raw_field: bytes) -> dict[str, str]:
    value = raw_field.split(b":", 1)[1].decode()
    value = re.sub(r"\s+", "", value)
    return dict(part.split("=", 1) for part in value.split(";") if part)


@pytest.mark.parametrize("path", CASES, ids=[c.name for c in CASES])
def test_golden_message(path: Path, transformer_factory, verifiers) -> None:
    # The transformed message matches the file's expectations and every signature verifies
    # with two independent implementations.
    case = load_case(path)
    expect = case.expect
    transformer, records = build(case, transformer_factory)
    submitted = SubmittedMail(case.message, "", 1, "smtp", 1700000000.0)
    result = transformer.transform(submitted)
    out = RawMessage.parse(result.mail.raw)
    assert result.mail.raw == out.to_bytes(), "the output must already be CRLF and re-parse identically"

    rcpt = result.mail.recipients[0]
    for name, wanted in (expect.get("headers") or {}).items():
        values = [str(make_header(decode_header(v))) for v in out.get_all(name)]
        wanted_list = wanted if isinstance(wanted, list) else [wanted]
        assert values == [tags(str(w), rcpt) for w in wanted_list], name
    for name, wanted in (expect.get("raw") or {}).items():
        raws = [f.raw for f in out.fields if f.key == name.lower()]
        assert raws == [tags(wanted, rcpt).replace("\n", "\r\n").encode()], name
    for name in expect.get("absent") or []:
        assert not out.has(name), name
    assert b"=?" not in b"".join(f.raw for f in out.fields if f.key == "list-unsubscribe")
    assert result.mail.mail_from == tags(expect["mail-from"], rcpt)
    assert [copy.recipients[0] for copy in result.mails] == expect["recipients"]
    assert result.beacons == expect["beacons"]
    assert len(result.warnings) == expect["warnings"], result.warnings
    wire = expect.get("wire") or {}
    assert (result.wire_form.body_parts, result.wire_form.headers) == (
        wire.get("body-parts", 0),
        wire.get("headers", 0),
    )
    assert not result.wire_form.smtputf8 and result.mail.raw.isascii(), "the wire form is 7-bit"

    _check_untouched_headers(case, out)
    source = RawMessage.parse(case.message)
    if expect["body-unchanged"]:
        assert out.body == source.body
    else:
        _check_mime(source.to_bytes(), result.mail.raw, expect.get("beacon-src"))

    sigs = [f for f in out.fields if f.key == "dkim-signature"]
    assert len(sigs) == expect.get("signatures", 1)
    rsa = next(signature_tags(f.raw) for f in sigs if b"a=rsa-sha256" in f.raw)
    assert rsa["d"] == case.meta["domain"] and rsa["s"] == case.meta["selector"]
    assert rsa["t"] == str(case.meta["time"]) and rsa["c"] == "relaxed/relaxed"
    got = {"h": rsa["h"], "bh": rsa["bh"], "b": rsa["b"]}
    if os.environ.get("GOLDEN_UPDATE"):
        _update(path, got)
    else:
        assert {k: expect.get(k) for k in got} == got

    dkimpy, perl = verifiers(result.mail.raw, records)
    assert dkimpy == [True] * len(sigs), "dkimpy rejects a signature"
    assert f"rsa-sha256 {case.meta['domain']} {case.meta['selector']} pass" in perl, perl
    assert not any(" fail" in line for line in perl), perl


def _check_untouched_headers(case: Case, out: RawMessage) -> None:
    """Every input field the Transformer does not manage is in the output, in order: byte for byte,
    or decoded to the same text when the wire form encoded it (raw UTF-8 in the input)."""
    managed = {
        "x-uuid", "x-stream-id", "x-priority", "bcc", "return-path", "message-id", "feedback-id",
        "list-unsubscribe", "list-unsubscribe-post", "dkim-signature",
    }  # fmt: skip
    if case.meta.get("x-mailer", "Inboxbooster-Mailer") is not None:
        managed.add("x-mailer")
    managed.update(k.lower() for k in (case.meta.get("inject") or {}))
    if (case.expect.get("wire") or {}).get("body-parts"):
        managed.add("content-transfer-encoding")
    kept = [_shown(f) for f in RawMessage.parse(case.message).fields if f.key not in managed]
    assert [_shown(f) for f in out.fields if f.key not in managed][: len(kept)] == kept


def _shown(field: Any) -> bytes | str:
    """The raw field when it is ASCII; otherwise its name and decoded value (what a reader sees)."""
    text = f"{field.name}: {make_header(decode_header(field.value))}"
    return field.raw if field.raw.isascii() and "=?" not in field.value else text


def _check_mime(before: bytes, after: bytes, beacon_src: str | None) -> None:
    """Same MIME tree; every non-HTML part decodes to the same bytes; inline HTML has the beacon.

    Line endings of decoded text are compared as CRLF (re-encoded parts decode to CRLF lines).
    """
    old = email.message_from_bytes(before, policy=email.policy.compat32)
    new = email.message_from_bytes(after, policy=email.policy.compat32)
    old_parts, new_parts = list(old.walk()), list(new.walk())
    assert [p.get_content_type() for p in old_parts] == [p.get_content_type() for p in new_parts]
    assert new.defects == [] and all(p.defects == [] for p in new_parts)
    tag = f'<img width="1" height="1" border="0" alt="" src="{beacon_src}">'.replace("&", "&amp;")
    inline_html = 0
    for o, n in zip(old_parts, new_parts, strict=True):
        if o.is_multipart():
            continue
        old_data, new_data = _crlf(o.get_payload(decode=True)), _crlf(n.get_payload(decode=True))
        is_inline_html = (
            o.get_content_type() == "text/html"
            and o.get_content_disposition() != "attachment"
            and not _inside_rfc822(old, o)
        )
        if not is_inline_html:
            assert new_data == old_data
            continue
        inline_html += 1
        assert isinstance(new_data, bytes) and isinstance(old_data, bytes)
        charset = o.get_content_charset() or "us-ascii"
        html = new_data.decode(charset)
        assert html.replace(tag, "") == old_data.decode(charset)
        pos = html.lower().rfind("</body")
        assert html.count(tag) == 1
        if pos >= 0:
            assert html[pos - len(tag) : pos] == tag
    assert inline_html >= (1 if beacon_src else 0)


def _crlf(data: Any) -> Any:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if isinstance(data, bytes) else data


def _inside_rfc822(root: Any, part: Any) -> bool:
    for p in root.walk():
        if p.get_content_type() == "message/rfc822" and any(q is part for q in p.walk() if q is not p):
            return True
    return False


def _update(path: Path, got: dict[str, str]) -> None:
    text = path.read_text()
    head, sep, message = text.partition("\n---\n")
    lines = [ln for ln in head.split("\n") if not re.match(r"^  (h|bh|b): ", ln)]
    lines += [f"  {k}: {v}" for k, v in got.items()]
    path.write_text("\n".join(lines) + sep + message)
