"""Header-block model: exact bytes kept, LF turned into CRLF, our own folding round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.submission import Rejection, accept
from transformer.message import MessageError, RawMessage, fold, parse_fields


def test_lf_input_becomes_crlf_and_fields_keep_their_folding() -> None:
    msg = RawMessage.parse(b"Subject: a\n  b\nTo:x@y.test\n\nline1\r\nline2\n")
    assert [f.raw for f in msg.fields] == [b"Subject: a\r\n  b\r\n", b"To:x@y.test\r\n"]
    assert msg.get("subject") == "a  b"
    assert msg.body == b"line1\r\nline2\r\n"


def test_crlf_input_is_kept_byte_for_byte() -> None:
    raw = b"A: 1\r\nB:  two\r\n\tthree \r\n\r\nbody \t\r\n\r\n"
    assert RawMessage.parse(raw).to_bytes() == raw


def test_headers_only_message_and_missing_final_newline() -> None:
    msg = RawMessage.parse(b"A: 1\nB: 2")
    assert [f.name for f in msg.fields] == ["A", "B"]
    assert msg.body == b""
    assert RawMessage.parse(b"A: 1\n\nno newline").body == b"no newline\r\n"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty"),
        (b"\r\nbody only\r\n", "no header block"),
        (b"Subject: ok\r\nthis is not a header\r\n\r\nbody", "header line 2"),
        (b" continuation first: x\r\n\r\n", "continuation"),
    ],
)
def test_unparsable_messages_name_the_problem(raw: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        RawMessage.parse(raw)


def test_remove_append_and_eight_bit_values() -> None:
    msg = RawMessage.parse("X-Uuid: a\r\nSubject: Grüße\r\nx-uuid: b\r\n\r\n".encode())
    assert msg.get_all("X-UUID") == ["a", "b"]
    assert msg.get("Subject") == "Grüße"
    assert msg.remove(["X-Uuid"]) == 2
    msg.append("X-New", "v")
    assert msg.header_bytes() == "Subject: Grüße\r\nX-New: v\r\n".encode()


def test_fold_breaks_at_spaces_and_puts_a_long_first_word_on_its_own_line() -> None:
    value = "<mailto:unsub-" + "a" * 40 + "@bounces.example.test>, <https://x.test/" + "b" * 70 + ">"
    folded = fold("List-Unsubscribe", value)
    lines = folded.split(b"\r\n")[:-1]
    assert lines[0] == b"List-Unsubscribe:"
    assert all(line.startswith(b" ") for line in lines[1:])
    assert folded.replace(b"\r\n", b"") == f"List-Unsubscribe: {value}".encode()


@given(st.lists(st.text(alphabet="abc<>@.:,=-", min_size=1, max_size=30), min_size=1, max_size=12))
def test_fold_round_trips(words: list[str]) -> None:
    # Unfolding (removing CRLF) gives back exactly "Name: value"; fields re-parse as one.
    value = " ".join(words)
    folded = fold("X-Test", value)
    assert folded.replace(b"\r\n", b"") == f"X-Test: {value}".encode()
    (field,) = parse_fields(folded)
    assert field.value == value
    assert all(len(line) <= 78 or b" " not in line.strip() for line in folded.split(b"\r\n"))


_LINES = st.sampled_from(
    [b"Subject: hi", b" folded", b"\tfolded", b"X-A:", b"no colon", b"Bad Name: x", b": no name", b"", b"X-B: \x00"]
)


@given(st.lists(_LINES, max_size=6), st.booleans())
def test_what_the_doors_accept_the_transformer_can_parse(extra: list[bytes], leading: bool) -> None:
    # The intake rule (common.submission.accept) runs before 250/200: a header block it lets
    # through must never be refused later by the Transformer's parser (an error event and a dead
    # letter after the client was told "accepted").
    head = [b"From: app@example.test", b"To: a@dest.test", b"X-Uuid: u1"]
    raw = b"\r\n".join([*extra, *head] if leading else [*head, *extra]) + b"\r\n\r\nbody\r\n"
    try:
        accepted = accept(raw, lambda domain: domain == "example.test")
    except Rejection:
        return
    RawMessage.parse(accepted.raw)
