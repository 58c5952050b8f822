"""A message as header fields plus body bytes, edited without re-serialising anything.

The Transformer parses a submitted message once into :class:`RawMessage`: a list of header
fields, each kept as its exact bytes (folding included), and the body bytes.  Fields it adds are
folded here, byte for byte, so no library can re-encode them (Python's ``email`` package may
turn a long ``List-Unsubscribe`` into RFC 2047 encoded-words, which receivers cannot read).

Line endings are normalised to CRLF (and a non-empty body ends with CRLF), as SMTP transmits
them, so the DKIM signature is computed over exactly the bytes Postfix sends: a bare LF or, in
the body, a bare CR becomes CRLF; a bare CR in the header block makes the message unparsable
(the intake rule, :mod:`common.submission`, already refuses it).  Apart from that the body is
untouched here (:mod:`transformer.wire` decides its wire form).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from email.message import Message
from typing import Final

from common.errors import PermanentError

CRLF: Final = b"\r\n"
#: RFC 5322 recommends lines of at most 78 characters; 998 is the hard limit.
FOLD_AT: Final = 78
MAX_LINE: Final = 998

_FIELD_NAME: Final = re.compile(rb"([!-9;-~]+)[ \t]*:")
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")


class MessageError(PermanentError):
    """The message cannot be parsed (it will be dead-lettered with this reason)."""


def to_crlf(data: bytes) -> bytes:
    """``data`` with every bare LF turned into CRLF (cheap when it already is CRLF)."""
    if data.count(b"\n") == data.count(CRLF):
        return data
    return data.replace(CRLF, b"\n").replace(b"\n", CRLF)


class Field:
    """One header field: its name as written and its exact bytes (ending in CRLF)."""

    __slots__ = ("key", "name", "raw")

    def __init__(self, name: str, raw: bytes) -> None:
        self.name = name
        self.raw = raw
        #: Lower-case name, for comparisons (computed once: the signer looks at it often).
        self.key = name.lower()

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.raw!r})"

    @property
    def value(self) -> str:
        """The unfolded value, without surrounding white space (raw 8-bit bytes kept as UTF-8)."""
        value = self.raw.split(b":", 1)[1].replace(CRLF, b"")
        return value.decode("utf-8", "surrogateescape").strip(" \t")


def parse_fields(block: bytes) -> list[Field]:
    """Split a CRLF header block into fields.

    Raises:
        MessageError: a line is neither a field nor a continuation line.
    """
    fields: list[Field] = []
    name: str | None = None
    start = 0
    pos = 0
    number = 0
    size = len(block)
    while pos < size:
        end = block.find(CRLF, pos)
        end = size if end < 0 else end + 2
        number += 1
        first = block[pos : pos + 1]
        if first not in (b" ", b"\t"):
            match = _FIELD_NAME.match(block, pos, end)
            if match is None:
                raise MessageError(f"header line {number} is not a header field (no 'name:')")
            if name is not None:
                fields.append(Field(name, block[start:pos]))
            name, start = match.group(1).decode("ascii"), pos
        elif name is None:
            raise MessageError("the header block starts with a continuation line")
        pos = end
    if name is not None:
        fields.append(Field(name, _terminated(block[start:])))
    return fields


def _terminated(raw: bytes) -> bytes:
    return raw if raw.endswith(CRLF) else raw + CRLF


def fold(name: str, value: str) -> bytes:
    """``name: value`` folded at spaces so lines stay within 78 characters where possible.

    Unfolding the result (removing each CRLF) gives back exactly ``name: value``; characters
    outside ASCII (a client's raw UTF-8 stream id) are written back as the bytes they came
    from.  A word longer than a line stays whole (lines never exceed 998 characters for the
    values the Transformer writes, which config validation keeps short).
    """
    words = value.split(" ")
    lines: list[str] = []
    line = f"{name}: {words[0]}"
    if len(line) > FOLD_AT and words[0]:  # a long first word gets its own line too
        lines.append(f"{name}:")
        line = " " + words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > FOLD_AT:
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


class RawMessage:
    """Header fields plus body; edits keep every byte they do not touch."""

    def __init__(self, fields: list[Field], body: bytes) -> None:
        self.fields = fields
        self.body = body

    @classmethod
    def parse(cls, raw: bytes) -> RawMessage:
        """Parse ``raw`` (CRLF or LF line endings).

        Raises:
            MessageError: no header block, or a malformed header line.
        """
        data = to_crlf(raw)
        if not data.strip():
            raise MessageError("the message is empty")
        if data.startswith(CRLF):
            raise MessageError("the message has no header block")
        split = data.find(b"\r\n\r\n")
        if split < 0:
            block, body = data, b""
        else:
            block, body = data[: split + 2], data[split + 4 :]
        if b"\r" in block.replace(CRLF, b""):
            raise MessageError("the header block holds a bare CR")
        if body.count(b"\r") != body.count(CRLF):
            body = _LINE_END.sub(CRLF, body)
        if body and not body.endswith(CRLF):
            # SMTP clients end the data with CRLF anyway; adding it here keeps the signed body
            # and the delivered body the same (canonicalisers disagree about a last line
            # without CRLF).
            body += CRLF
        return cls(parse_fields(block), body)

    def copy(self) -> RawMessage:
        """A copy whose header list can be edited on its own (fields and body are immutable)."""
        return RawMessage(list(self.fields), self.body)

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def get_all(self, name: str) -> list[str]:
        """Unfolded values of every field called ``name``, in order."""
        key = name.lower()
        return [f.value for f in self.fields if f.key == key]

    def get(self, name: str) -> str | None:
        """Unfolded value of the first field called ``name``."""
        key = name.lower()
        for f in self.fields:
            if f.key == key:
                return f.value
        return None

    def has(self, name: str) -> bool:
        """True when a field called ``name`` exists."""
        key = name.lower()
        return any(f.key == key for f in self.fields)

    def remove(self, names: Iterable[str]) -> int:
        """Remove every field with one of ``names``; returns how many were removed."""
        keys = {n.lower() for n in names}
        kept = [f for f in self.fields if f.key not in keys]
        removed = len(self.fields) - len(kept)
        self.fields = kept
        return removed

    def append(self, name: str, value: str) -> None:
        """Add ``name: value`` (folded) at the end of the header block."""
        self.fields.append(Field(name, fold(name, value)))

    def append_folded(self, name: str, folded: str) -> None:
        """Add a field whose value is already folded with CRLF (e.g. RFC 2047 encoded-words)."""
        self.fields.append(Field(name, f"{name}: {folded}\r\n".encode("ascii")))

    def prepend_raw(self, name: str, raw: bytes) -> None:
        """Add an already formatted field (e.g. a DKIM-Signature) at the top."""
        self.fields.insert(0, Field(name, raw))

    def header_message(self, names: Iterable[str]) -> Message:
        """A compat32 :class:`email.message.Message` holding only the fields ``names``.

        For the address helpers of :mod:`email.utils` and :mod:`common.submission`, which take a
        ``Message``; no body is parsed.
        """
        keys = {n.lower() for n in names}
        msg = Message()
        for f in self.fields:
            if f.key in keys:
                msg[f.name] = f.value
        return msg

    def header_bytes(self) -> bytes:
        """The header block (without the empty line that ends it)."""
        return b"".join(f.raw for f in self.fields)

    def to_bytes(self) -> bytes:
        """The whole message."""
        return self.header_bytes() + CRLF + self.body
