"""The wire form (transformer.wire): 7-bit clean, lines of at most 998 octets, CRLF only, and
every part decodes to what the customer wrote; clean parts are kept byte for byte."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer.message import Field, RawMessage
from transformer.wire import (
    WireError,
    WireReport,
    ascii_domain,
    clean,
    decode_words,
    has_long_line,
    make_wire_safe,
    needs_smtputf8,
)

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


def _wire(raw: bytes) -> tuple[bytes, WireReport]:
    msg = RawMessage.parse(raw)
    report = make_wire_safe(msg)
    return msg.to_bytes(), report


def _leaves(raw: bytes) -> list[Message]:
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [p for p in parsed.walk() if not p.is_multipart()]


def _assert_wire_safe(out: bytes) -> None:
    assert out.isascii(), "8-bit bytes left"
    assert out.count(b"\n") == out.count(b"\r\n") == out.count(b"\r"), "a bare CR or LF"
    assert max(map(len, out.split(b"\r\n"))) <= 998, "a line over 998 octets"


def _assert_same_payloads(before: bytes, after: bytes) -> None:
    old, new = _leaves(before), _leaves(after)
    assert [p.get_content_type() for p in old] == [p.get_content_type() for p in new]
    for o, n in zip(old, new, strict=True):
        assert n.get_payload(decode=True) == o.get_payload(decode=True), o.get_content_type()


# -- properties --------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=1300)
_text_body = st.lists(_text, min_size=1, max_size=5).map(lambda lines: "\r\n".join(lines).encode())
_binary = st.binary(max_size=2500).map(lambda data: _LINE_ENDS.sub(b"\r\n", data))


@st.composite
def _part(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(part headers, content) of one leaf part as a customer might send it."""
    kind = draw(st.sampled_from(["text", "html-qp", "binary", "base64-one-line", "ascii"]))
    if kind == "text":
        cte = draw(
            st.sampled_from([b"", b"Content-Transfer-Encoding: 8bit\r\n", b"Content-Transfer-Encoding: 7bit\r\n"])
        )
        return b"Content-Type: text/plain; charset=utf-8\r\n" + cte, draw(_text_body)
    if kind == "html-qp":
        data = draw(_text_body)
        qp = binascii.b2a_qp(data, istext=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n", qp
    if kind == "binary":
        return b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n", draw(_binary)
    if kind == "base64-one-line":
        data = base64.b64encode(draw(st.binary(max_size=2000)))
        return b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n", data
    return b"Content-Type: text/plain\r\n", draw(st.text(alphabet="abc .-", max_size=300)).encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(_part(), min_size=1, max_size=4), _text, st.booleans())
def test_every_message_gets_a_safe_wire_form_with_the_same_content(
    parts: list[tuple[bytes, bytes]], subject: str, preamble: bool
) -> None:
    # 7-bit, short lines, CRLF; every part decodes to the same bytes; clean parts are untouched.
    body = b"This is a multi-part message.\r\n" if preamble else b""
    for head, content in parts:
        body += b"--b0undary\r\n" + head + b"\r\n" + content + b"\r\n"
    body += b"--b0undary--\r\n"
    raw = (
        b"From: a@example.test\r\nTo: b@dest.test\r\nSubject: " + subject.encode() + b"\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b0undary"\r\n\r\n' + body
    )
    if len(raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[2]) > 998:
        return  # the intake refuses such a header line
    out, report = _wire(raw)
    _assert_wire_safe(out)
    _assert_same_payloads(raw, out)
    assert decode_words(RawMessage.parse(out).get("Subject") or "") == subject.strip(" \t")
    for head, content in parts:
        if clean(content):
            assert b"\r\n" + head + b"\r\n" + content + b"\r\n" in out, "a clean part was rewritten"
    again, second = _wire(out)
    assert again == out and (second.body_parts, second.headers) == (0, 0), "not idempotent"
    assert not report.smtputf8


@settings(max_examples=100, deadline=None)
@given(_text_body)
def test_single_part_text_round_trips(data: bytes) -> None:
    raw = b"From: a@example.test\r\nSubject: s\r\n\r\n" + data + b"\r\n"
    out, _ = _wire(raw)
    _assert_wire_safe(out)
    _assert_same_payloads(raw, out)


_line_lengths = st.sampled_from([0, 1, 497, 498, 499, 500, 501, 997, 998, 999, 1000, 1997, 1998]) | st.integers(0, 2100)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(_line_lengths, st.sampled_from([b"a", b"\r", b"\n", b"\xe9"])), max_size=12),
    st.sampled_from([b"", b"\r\n", b"\r", b"\n"]),
)
def test_long_lines_are_found_as_splitting_into_lines_finds_them(lines: list[tuple[int, bytes]], end: bytes) -> None:
    # The windowed search must agree with the definition: a CRLF-separated line over 998 octets
    # (bare CR or LF inside a line count as octets of it).
    data = b"\r\n".join(fill * length for length, fill in lines) + end
    assert has_long_line(data) == (max(map(len, data.split(b"\r\n"))) > 998)


# -- examples ----------------------------------------------------------------------------------


def test_clean_message_is_kept_byte_for_byte() -> None:
    raw = b"From: a@example.test\r\nSubject: plain\r\n\r\n.dot line\r\ntrailing  \r\n" + b"x" * 998 + b"\r\n"
    out, report = _wire(raw)
    assert out == raw
    assert (report.body_parts, report.headers, report.smtputf8) == (0, 0, False)


def test_message_without_mime_headers_gets_them_when_reencoded() -> None:
    out, report = _wire("From: a@example.test\r\nSubject: s\r\n\r\nGrüße\r\n".encode())
    msg = RawMessage.parse(out)
    assert msg.get("MIME-Version") == "1.0"
    assert msg.get("Content-Type") == "text/plain; charset=utf-8"
    assert msg.get("Content-Transfer-Encoding") == "quoted-printable"
    assert msg.body == b"Gr=C3=BC=C3=9Fe\r\n"
    assert report.body_parts == 1


def test_declared_charset_is_kept() -> None:
    raw = b"From: a@example.test\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nCaf\xe9\r\n"
    msg = RawMessage.parse(_wire(raw)[0])
    assert msg.get("Content-Type") == "text/plain; charset=iso-8859-1"
    assert msg.body == b"Caf=E9\r\n"


def test_smtputf8_message_keeps_8bit_but_not_long_lines() -> None:
    raw = "From: zoë@example.test\r\nSubject: é\r\n\r\nGrüße\r\n".encode() + b"y" * 1500 + b"\r\n"
    out, report = _wire(raw)
    assert report.smtputf8
    assert "From: zoë@example.test\r\n".encode() in out
    assert max(map(len, out.split(b"\r\n"))) <= 998
    assert RawMessage.parse(out).get("Content-Transfer-Encoding") == "quoted-printable"
    _assert_same_payloads(raw, out)


def test_smtputf8_message_keeps_a_short_8bit_body_as_it_is() -> None:
    raw = "From: a@example.test\r\nTo: jörg@dest.test\r\n\r\nGrüße\r\n".encode()
    out, report = _wire(raw)
    assert report.smtputf8 and out.endswith("\r\n\r\nGrüße\r\n".encode())


def test_address_headers_encode_names_and_domains_only() -> None:
    raw = 'From: "Müller, Jörg" <j@bücher.test>\r\nTo: "Doe, John" <john@dest.test>, c@dest.test\r\n\r\nx\r\n'
    out, report = _wire(raw.encode())
    msg = RawMessage.parse(out)
    assert out.isascii() and not report.smtputf8
    assert decode_words(msg.get("From") or "") == "Müller, Jörg <j@xn--bcher-kva.test>"
    assert msg.get("To") == '"Doe, John" <john@dest.test>, c@dest.test', "an ASCII field is untouched"
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert [a.display_name for a in parsed["From"].addresses] == ["Müller, Jörg"]


def test_encoded_words_and_raw_utf8_mixed_in_one_subject() -> None:
    out, _ = _wire("From: a@example.test\r\nSubject: =?utf-8?q?caf=C3=A9?= crème\r\n\r\nx\r\n".encode())
    assert decode_words(RawMessage.parse(out).get("Subject") or "") == "café crème"


def test_non_ascii_filename_becomes_rfc2231() -> None:
    raw = (
        b'From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: application/pdf\r\n"
        + 'Content-Disposition: attachment; filename="naïve résumé.pdf"\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n"
    )
    out, report = _wire(raw)
    assert out.isascii() and report.headers == 1
    [part] = _leaves(out)
    assert part.get_filename() == "naïve résumé.pdf"


def test_long_filename_uses_rfc2231_continuations() -> None:
    name = "é" * 200 + ".txt"
    raw = (
        b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
        + f'Content-Type: text/plain; name="{name}"\r\n'.encode()
        + b"\r\nx\r\n"
    )
    out, _ = _wire(raw)
    _assert_wire_safe(out)
    assert email.message_from_bytes(out, policy=email.policy.compat32).get_param("name", unquote=True) is not None
    assert email.message_from_bytes(out, policy=email.policy.default).get_filename() == name


def test_multipart_label_8bit_becomes_7bit_when_its_parts_were_reencoded() -> None:
    raw = (
        b"From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: 8bit\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        + "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGrüße\r\n--b--\r\n".encode()
    )
    out, _ = _wire(raw)
    assert RawMessage.parse(out).get("Content-Transfer-Encoding") == "7bit"
    _assert_same_payloads(raw, out)


def test_message_rfc822_part_with_8bit_travels_as_base64() -> None:
    inner = "From: x@y.test\r\nSubject: é\r\n\r\nHällo\r\n".encode()
    raw = (
        b'From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--b--\r\n"
    )
    out, _ = _wire(raw)
    _assert_wire_safe(out)
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n" in out
    part = out.split(b"base64\r\n\r\n", 1)[1].split(b"\r\n--b--", 1)[0]
    assert base64.b64decode(part) == inner


def test_unclosed_multipart_and_8bit_preamble() -> None:
    # The last part runs to the end without a closing delimiter; an 8-bit preamble is dropped.
    raw = (
        b'From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + "Präambel\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄnde\r\n".encode()
    )
    out, report = _wire(raw)
    _assert_wire_safe(out)
    assert report.body_parts == 2
    assert [p.get_payload(decode=True) for p in _leaves(out)] == ["Ände".encode()]


def test_qp_and_base64_parts_with_long_lines_are_encoded_again() -> None:
    qp_long = b"a" * 1200  # quoted-printable without soft line breaks
    b64_long = base64.b64encode(bytes(range(256)) * 4)  # base64 on one line of 1368 characters
    raw = (
        b'From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + qp_long + b"\r\n"
        b"--b\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64_long + b"\r\n--b--\r\n"
    )
    out, report = _wire(raw)
    _assert_wire_safe(out)
    _assert_same_payloads(raw, out)
    assert report.body_parts == 2


def test_part_header_line_too_long_is_folded_or_refused() -> None:
    def message(value: str) -> bytes:
        return (
            b'From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            + f"--b\r\nContent-Type: text/plain\r\nX-Part: {value}\r\n\r\nx\r\n--b--\r\n".encode()
        )

    out, report = _wire(message(" ".join(["word"] * 300)))
    _assert_wire_safe(out)
    assert report.headers == 1
    with pytest.raises(WireError, match="cannot be folded"):
        _wire(message("w" * 1200))


def test_multipart_without_boundary_holding_8bit_is_refused() -> None:
    raw = "From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\nGrüße\r\n".encode()
    with pytest.raises(WireError, match="boundary"):
        _wire(raw)


def test_needs_smtputf8_only_for_a_non_ascii_local_part() -> None:
    def fields(value: str) -> list[Field]:
        return RawMessage.parse(f"To: {value}\r\n\r\n".encode()).fields

    assert needs_smtputf8(fields("Jörg <jörg@dest.test>"))
    assert not needs_smtputf8(fields("Jörg <joerg@bücher.test>"))
    assert not needs_smtputf8(fields("joerg@dest.test"))


def test_ascii_domain() -> None:
    assert ascii_domain("a@bücher.test") == "a@xn--bcher-kva.test"
    assert ascii_domain("jörg@dest.test") == "jörg@dest.test"
    assert ascii_domain("a@dest.test") == "a@dest.test"
