"""The intake rule both doors share (common.submission.accept): line endings, header lines,
header bytes and the fields we read; the queued bytes are what the Transformer will parse."""

from __future__ import annotations

import email.utils
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.submission import PlainHeaders, Rejection, accept, getaddresses, header_end, normalise, parse_headers

HEAD = b"From: app@example.test\r\nTo: a@dest.test\r\nX-Uuid: u1\r\n"


def _accept(raw: bytes) -> bytes:
    return accept(raw, lambda domain: domain == "example.test").raw


def _rule(raw: bytes) -> tuple[str, str]:
    with pytest.raises(Rejection) as info:
        _accept(raw)
    return info.value.rule, info.value.smtp_reply


def test_crlf_message_is_queued_as_it_is() -> None:
    raw = HEAD + b"\r\n.leading dot\r\ntrailing space  \r\n" + b"x" * 5000 + b"\r\n"
    assert _accept(raw) == raw


def test_bare_lf_and_body_bare_cr_become_crlf_and_a_final_crlf_is_added() -> None:
    raw = b"From: app@example.test\nTo: a@dest.test\nX-Uuid: u1\n\nline1\nline2\rline3\r\r\nend"
    assert _accept(raw) == HEAD + b"\r\nline1\r\nline2\r\nline3\r\n\r\nend\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"From: app@example.test\r\nTo: a@dest.test\r\nX-Uuid: u1\r\nX-Stream-Id: camp\rX-Injected: yes\r\n\r\nb\r\n",
        b"From: app@example.test\r\nTo: a@dest.test\r\nX-Uuid: u\r1\r\n\r\nb\r\n",
        b"From: app@example.test\nSubject: a\r\r\nTo: a@dest.test\nX-Uuid: u1\n\nb\n",
    ],
)
def test_bare_cr_in_the_header_block_is_refused(raw: bytes) -> None:
    rule, reply = _rule(raw)
    assert rule == "bare-cr" and reply.startswith("554 5.6.0 ")


def test_header_line_over_998_octets_is_refused_body_line_is_not() -> None:
    assert _rule(HEAD + b"Subject: " + b"s" * 990 + b"\r\n\r\nb\r\n") == (
        "header-line-too-long",
        "554 5.6.3 header line 4 is longer than 998 octets (RFC 5322 2.1.1); fold it",
    )
    assert _accept(HEAD + b"Subject: " + b"s" * 989 + b"\r\n\r\n" + b"b" * 999 + b"\r\n")


def test_8bit_header_bytes_must_be_utf8() -> None:
    assert _accept(HEAD + "Subject: Grüße\r\n\r\nb\r\n".encode())
    assert _rule(HEAD + b"Subject: Gr\xfc\xdfe\r\n\r\nb\r\n")[0] == "header-not-utf8"


@pytest.mark.parametrize("name", ["X-Stream-Id", "From", "To", "Cc", "X-Priority"])
def test_control_characters_in_fields_we_read_are_refused(name: str) -> None:
    raw = HEAD + f"{name}: a\x00b@dest.test\r\n".encode() + b"\r\nb\r\n"
    assert _rule(raw) == ("header-control-char", f"554 5.6.0 the {name} header holds a control character")


def test_control_characters_elsewhere_and_tabs_are_accepted() -> None:
    assert _accept(HEAD + b"Subject: tab\there \x01\r\nX-Stream-Id: a\r\n\tfolded\r\n\r\nb\r\n")


def test_nul_is_refused_in_every_header_field() -> None:
    # Postfix cuts a header at a NUL: the copy would arrive changed, its signature broken.
    assert _rule(HEAD + b"Subject: a\x00b\r\n\r\nb\r\n") == (
        "header-control-char",
        "554 5.6.0 header line 4 holds a NUL byte",
    )
    assert _rule(HEAD + b"X-Foo: a\r\n b\x00\r\n\r\nb\r\n")[1] == "554 5.6.0 header line 5 holds a NUL byte"


@pytest.mark.parametrize(
    ("head", "reply"),
    [
        # No empty line: the "body" is read as header lines, which the Transformer cannot parse.
        (HEAD + b"this is the body\r\n", "554 5.6.0 header line 4 is not a header field (no 'name:')"),
        (HEAD + b"Subject hi\r\n\r\n", "554 5.6.0 header line 4 is not a header field (no 'name:')"),
        (b"From nobody 2026\r\n" + HEAD + b"\r\n", "554 5.6.0 header line 1 is not a header field (no 'name:')"),
        (b" folded\r\n" + HEAD + b"\r\n", "554 5.6.0 the header block starts with a continuation line"),
    ],
)
def test_every_header_line_is_a_field_or_its_continuation(head: bytes, reply: str) -> None:
    assert _rule(head + b"b\r\n") == ("header-syntax", reply)


def test_a_message_of_headers_only_is_accepted() -> None:
    assert _accept(HEAD) == HEAD


def test_rejection_details_for_the_http_answer() -> None:
    with pytest.raises(Rejection) as info:
        _accept(HEAD.replace(b"X-Uuid: u1", b"X-Uuid: U1") + b"\r\nb\r\n")
    assert info.value.details() == {"smtp_code": 554, "enhanced_status": "5.6.0"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_normalise_gives_crlf_only_and_keeps_everything_else(head: bytes, body: bytes) -> None:
    raw = head.replace(b"\r", b"") + b"\n\n" + body
    out = normalise(raw)
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert out.endswith(b"\r\n")
    assert re.sub(rb"\r\n|\r|\n", b"", out) == re.sub(rb"\r\n|\r|\n", b"", raw)
    assert normalise(out) == out


# getaddresses: the fast path for plain address lists gives the standard library's answer.

_ADDRESS_PIECES = st.sampled_from(
    [
        "a",
        "Bob",
        "x.y",
        "o'neil",
        "#!",
        "ü",
        "@",
        ".",
        ",",
        "<",
        ">",
        " ",
        "\t",
        "\r\n ",
        "\f",
        '"',
        "(",
        ")",
        "\\",
        "[",
        "]",
        ":",
        ";",
        "example.test",
        "-",
    ]
)
_ADDRESS_TEXT = st.lists(_ADDRESS_PIECES, max_size=14).map("".join)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(st.lists(_ADDRESS_TEXT, max_size=3))
def test_getaddresses_matches_the_standard_library(values: list[str]) -> None:
    assert getaddresses(values) == email.utils.getaddresses(values)


@pytest.mark.parametrize(
    "values",
    [
        ["app@example.test"],
        ["App <app@example.test>"],
        ["  Some  Name\r\n <a.b-c+d@mail.example.test> , x@y.test,<z@w.test>"],
        ["One <one@a.test>", "two@b.test"],
    ],
)
def test_getaddresses_plain_lists_take_the_fast_path(values: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    expected = email.utils.getaddresses(values)

    def refuse(_: object) -> None:
        raise AssertionError("the standard library's parser was used")

    monkeypatch.setattr(email.utils, "getaddresses", refuse)
    assert getaddresses(values) == expected


# PlainHeaders: the fields of a plain header block, as the standard parser reads them.

_HEADER_PIECES = st.sampled_from(
    [
        "To",
        "X-Uuid",
        "from",
        "CC",
        ":",
        " ",
        "\t",
        "\r\n",
        "\r\n ",
        "\r\n\t",
        "a@b.test",
        "<x@y.test>",
        "u1",
        "\n",
        "\r",
        "ü",
        "From ",
        "\r\n\r\n",
        "Bob",
        ",",
    ]
)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(st.lists(_HEADER_PIECES, max_size=24).map("".join))
def test_plain_headers_read_what_the_standard_parser_reads(text: str) -> None:
    head = text.encode("utf-8")
    plain = PlainHeaders.parse(head[: header_end(head)])
    if plain is None:
        return
    parsed = parse_headers(head)
    assert not parsed.defects
    assert plain.keys() == parsed.keys()
    for name in {*plain.keys(), "To", "Cc", "From", "X-Uuid", "X-Priority", "X-Stream-Id"}:
        assert plain.get_all(name) == parsed.get_all(name), name


@pytest.mark.parametrize(
    "head",
    [
        b"From: App <app@example.test>\r\nTo: a@b.test,\r\n  c@d.test\r\nX-Uuid:u1\r\n\r\nbody\r\n",
        b"To:   \r\n\tx@y.test \r\nSubject: s\r\n",
        b"\r\nbody",
    ],
)
def test_plain_headers_cases(head: bytes) -> None:
    plain = PlainHeaders.parse(head[: header_end(head)])
    assert plain is not None
    parsed = parse_headers(head)
    assert plain.keys() == parsed.keys()
    assert all(plain.get_all(k) == parsed.get_all(k) for k in parsed)


@pytest.mark.parametrize(
    "head",
    [b" folded first\r\nTo: a@b.test\r\n\r\n", b"From x@y Mon\r\nTo: a@b.test\r\n\r\n", b"To: \xc3\xbc@b.test\r\n\r\n"],
)
def test_headers_that_are_not_plain_go_to_the_standard_parser(head: bytes) -> None:
    assert PlainHeaders.parse(head[: header_end(head)]) is None
