"""The wire form of an outbound message, decided before it is signed (DESIGN §8).

Sits in the Transformer after the header edits and the beacon, right before DKIM signing
(:mod:`transformer.transform`): what it leaves is what Postfix sends and what the receiver
verifies, so no MTA after us needs to change a byte (our Postfix runs with
``disable_mime_output_conversion = yes``; without it, Postfix would turn 8-bit parts into
quoted-printable *after* we signed for a receiver without 8BITMIME).

The wire form is 7-bit clean, with lines of at most 998 octets and CRLF only, unless the
message needs SMTPUTF8:

* **headers**: raw UTF-8 in unstructured fields (Subject, ...) and in display names of the
  address fields (From, To, Cc, Reply-To, Sender) becomes RFC 2047 encoded-words, a non-ASCII
  MIME parameter (a file name) RFC 2231, a non-ASCII domain its IDNA A-label.  A non-ASCII
  *local part* cannot be encoded: only such a message **needs SMTPUTF8** -- it stays raw,
  PostfixLog asks Postfix for SMTPUTF8, and a receiver without it refuses the message
  (classification ``smtputf8-unsupported``);
* **body**: every leaf MIME part whose content is 8-bit or has a line over 998 octets is
  re-encoded -- ``text/*`` as quoted-printable, anything else (``message/*`` included) as
  base64 -- and its Content-Transfer-Encoding changed; a quoted-printable/base64 part with such
  lines is decoded and encoded again.  With SMTPUTF8 an 8-bit part may stay (such receivers
  have 8BITMIME), a long line is still re-encoded.  A message without MIME headers gets
  ``MIME-Version: 1.0`` and ``Content-Type: text/plain; charset=utf-8`` when its body has to be
  re-encoded;
* parts that are already clean are kept byte for byte: multiparts are split on their boundary
  lines here and only changed parts are rewritten (the ``email`` package only reads parameters,
  it never re-serialises a part).

A message that cannot be given a safe form (8-bit data in a multipart without a usable
boundary, a header line that cannot be folded under 998 octets) raises :class:`WireError`:
it is dead-lettered with an ``error`` event instead of being sent with a signature that breaks.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email.header import decode_header
from email.message import Message
from email.utils import encode_rfc2231, getaddresses
from typing import Final

from common.errors import PermanentError
from transformer.message import CRLF, MAX_LINE, Field, MessageError, RawMessage, fold, parse_fields

#: Address fields: display names are encoded, domains become A-labels, local parts decide SMTPUTF8.
ADDRESS_FIELDS: Final = frozenset(("from", "to", "cc", "reply-to", "sender", "resent-from", "resent-to", "resent-cc"))
#: Fields whose non-ASCII parameters are written the RFC 2231 way.
PARAMETER_FIELDS: Final = frozenset(("content-type", "content-disposition"))
_MAX_DEPTH: Final = 20
_PARAM: Final = re.compile(r';(\s*)([A-Za-z0-9!#$&+.^_`|~*\'-]+)(\s*=\s*)("(?:[^"\\]|\\.)*"|[^;]*)')
_RFC2231_CHUNK: Final = 60
#: Octets of UTF-8 per encoded-word: "=?utf-8?b?" + 60 base64 characters + "?=" is 72 <= 75.
_WORD_BYTES: Final = 45
_ENCODED_WORD: Final = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


class WireError(PermanentError):
    """The message cannot be given a wire form that survives every hop."""


@dataclass
class WireReport:
    """What :func:`make_wire_safe` did to one message."""

    smtputf8: bool = False
    body_parts: int = 0
    headers: int = 0


def clean(data: bytes, *, allow_8bit: bool = False) -> bool:
    """True when ``data`` may travel as it is: 7-bit (or 8-bit when allowed), no NUL, no long line."""
    if not allow_8bit and not data.isascii():
        return False
    return b"\0" not in data and not has_long_line(data)


#: Windows of :func:`has_long_line`: a line of more than MAX_LINE octets holds a whole window.
_WINDOW: Final = (MAX_LINE + 1) // 2 + 1
_STRIDE: Final = _WINDOW - 1


def has_long_line(data: bytes) -> bool:
    r"""True when a line of ``data`` (CRLF-separated) is longer than :data:`MAX_LINE` octets.

    A line of 999 octets or more contains a whole window of 500 octets starting at a multiple of
    499, which then holds no CRLF; so when every such window holds one, no line is too long --
    about twenty searches for 10 KB instead of splitting it into lines. A window without a CRLF
    (a long line, or one of 500-998 octets) leaves the answer to the split.  Not a regular
    expression: ``[^\r\n]{999}`` backtracks at every position (100x slower).
    """
    if len(data) <= MAX_LINE:
        return False
    if all(data.find(CRLF, start, start + _WINDOW) >= 0 for start in range(0, len(data), _STRIDE)):
        return False
    return max(map(len, data.split(CRLF))) > MAX_LINE


def make_wire_safe(msg: RawMessage) -> WireReport:
    """Give ``msg`` (CRLF, after every other edit) its wire form, in place.

    Raises:
        WireError: no safe wire form exists for it.
    """
    report = WireReport(smtputf8=needs_smtputf8(msg.fields))
    msg.fields = _encode_fields(msg.fields, report)
    result = _entity(msg.fields, msg.body, report, depth=0)
    if result is not None:
        fields, msg.body = result
        if not any(f.key == "mime-version" for f in fields):
            fields.append(Field("MIME-Version", b"MIME-Version: 1.0\r\n"))
        msg.fields = fields
    if not report.smtputf8 and not msg.header_bytes().isascii():
        raise WireError("a header field keeps 8-bit bytes that cannot be encoded")
    if not clean(msg.body, allow_8bit=report.smtputf8):
        raise WireError("the body keeps 8-bit data or a line over 998 octets")
    return report


def needs_smtputf8(fields: list[Field]) -> bool:
    """True when an address field holds a non-ASCII local part (nothing can encode it)."""
    for f in fields:
        if f.key in ADDRESS_FIELDS and not f.raw.isascii():
            for _, address in getaddresses([_text(f.value)]):
                if not address.rpartition("@")[0].isascii():
                    return True
    return False


def ascii_domain(address: str) -> str:
    """``address`` with a non-ASCII domain written as its IDNA A-label (kept when it has none)."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


# -- header fields -----------------------------------------------------------------------------


def _encode_fields(fields: list[Field], report: WireReport) -> list[Field]:
    """``fields`` with every non-ASCII or overlong field rewritten (others kept as they are)."""
    out: list[Field] = []
    for f in fields:
        new = f
        if not f.raw.isascii():
            new = _encode_field(f, report)
        if _too_long(new.raw):
            new = Field(new.name, fold(new.name, new.value))
            if _too_long(new.raw):
                raise WireError(f"the {f.name} header has a line over {MAX_LINE} octets that cannot be folded")
        if new is not f:
            report.headers += 1
        out.append(new)
    return out


def _too_long(raw: bytes) -> bool:
    return len(raw) > MAX_LINE and any(len(line) > MAX_LINE for line in raw.split(CRLF))


def _encode_field(f: Field, report: WireReport) -> Field:
    value = _text(f.value)
    if f.key in ADDRESS_FIELDS:
        encoded = _encode_addresses(value)
        if encoded is None:  # unparsable: only SMTPUTF8 can carry it as it is
            report.smtputf8 = True
            return f
        return Field(f.name, fold(f.name, encoded))
    if f.key in PARAMETER_FIELDS:
        params = _encode_parameters(value)
        if params is not None:
            return Field(f.name, fold(f.name, params))
    return Field(f.name, _encoded_words(f.name, decode_words(value)))


def _text(value: str) -> str:
    """A field value as text: bytes that are not UTF-8 (kept as surrogates) become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def decode_words(value: str) -> str:
    """``value`` with its RFC 2047 encoded-words decoded (white space between two dropped).

    Unlike :func:`email.header.make_header`, raw UTF-8 next to encoded-words is fine.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        if not (after_word and not between.strip(" \t")):
            out.append(between)
        try:
            [(data, charset)] = decode_header(match.group(0))
            out.append(data.decode(charset or "ascii", "replace") if isinstance(data, bytes) else data)
        except (LookupError, ValueError):  # unknown charset, bad base64: keep the word as it is
            out.append(match.group(0))
        pos = match.end()
        after_word = True
    out.append(value[pos:])
    return "".join(out)


def _encoded_words(name: str, text: str) -> bytes:
    """``name: text`` as RFC 2047 encoded-words (UTF-8, one per line), ending in CRLF."""
    return (f"{name}: " + "\r\n ".join(_words(text)) + "\r\n").encode("ascii")


def _words(text: str) -> list[str]:
    """``text`` as base64 encoded-words of at most 75 characters, never splitting a character.

    Written here rather than with :class:`email.header.Header`, which folds at every character
    ``str.splitlines`` knows (U+001E, U+0085, U+2028, ...) and so loses them.
    """
    words: list[str] = []
    chunk = b""
    for char in text:
        data = char.encode("utf-8")
        if len(chunk) + len(data) > _WORD_BYTES:
            words.append(_word(chunk))
            chunk = b""
        chunk += data
    words.append(_word(chunk))
    return words


def _word(data: bytes) -> str:
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


def _encode_addresses(value: str) -> str | None:
    """An address list with encoded display names and A-label domains; None if unparsable."""
    pairs = getaddresses([value])
    if not pairs or any(not address or "@" not in address for _, address in pairs):
        return None
    rendered = []
    for name, address in pairs:
        address = ascii_domain(address)
        if not name:
            rendered.append(address)
            continue
        name = decode_words(name)
        if name.isascii():
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            rendered.append(f'"{quoted}" <{address}>')
        else:
            rendered.append(" ".join(_words(name)) + f" <{address}>")
    return ", ".join(rendered)


def _encode_parameters(value: str) -> str | None:
    """Content-Type/-Disposition with non-ASCII parameter values in RFC 2231 form; None if not only those."""
    head, sep, _ = value.partition(";")
    if not head.isascii():
        return None

    def encode(match: re.Match[str]) -> str:
        space, pname, _, pvalue = match.groups()
        if pvalue.isascii():
            return match.group(0)
        text = pvalue.strip()
        if text.startswith('"') and text.endswith('"') and len(text) >= 2:
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        encoded = encode_rfc2231(text, "utf-8")  # utf-8''%C3%A9...
        if len(encoded) <= _RFC2231_CHUNK:
            return f";{space}{pname.rstrip('*')}*={encoded}"
        return ";" + ";".join(f" {pname.rstrip('*')}*{i}*={chunk}" for i, chunk in enumerate(_chunks(encoded)))

    rewritten = _PARAM.sub(encode, value)
    return rewritten if rewritten.isascii() and sep else None


def _chunks(encoded: str) -> list[str]:
    """``encoded`` in pieces of about 60 characters that never split a ``%XX`` escape."""
    pieces: list[str] = []
    start = 0
    while start < len(encoded):
        end = min(start + _RFC2231_CHUNK, len(encoded))
        percent = encoded.rfind("%", end - 2, end)
        if percent >= 0 and end < len(encoded):
            end = percent
        pieces.append(encoded[start:end])
        start = end
    return pieces


# -- body --------------------------------------------------------------------------------------


def _content_headers(fields: list[Field]) -> Message:
    msg = Message()
    for f in fields:
        if f.key in ("content-type", "content-transfer-encoding"):
            msg[f.name] = _text(f.value)
    return msg


def _entity(fields: list[Field], body: bytes, report: WireReport, depth: int) -> tuple[list[Field], bytes] | None:
    """New (fields, body) of an entity that must change, or None when it stays as it is."""
    headers = _content_headers(fields)
    ctype = headers.get_content_type()
    cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if ctype.startswith("multipart/"):
        boundary = headers.get_param("boundary")
        if isinstance(boundary, str) and boundary and depth < _MAX_DEPTH:
            new_body = _multipart(body, boundary, report, depth)
            if new_body is not None:
                if cte in ("8bit", "binary") and clean(new_body):
                    fields = _set_field(fields, "Content-Transfer-Encoding", "7bit")
                return fields, new_body
            return None
        if clean(body, allow_8bit=report.smtputf8):
            return None
        raise WireError(f"a {ctype} part without a usable boundary holds 8-bit data or a line over 998 octets")
    if cte in ("base64", "quoted-printable"):
        if clean(body):
            return None
        data = _b64_decode(body) if cte == "base64" else binascii.a2b_qp(body)
        encoding = cte
    elif clean(body, allow_8bit=report.smtputf8):
        return None
    else:
        data = body
        encoding = "quoted-printable" if ctype.startswith("text/") else "base64"
    report.body_parts += 1
    encoding, encoded = _encode(data, encoding)
    if depth == 0 and not any(f.key == "content-type" for f in fields):
        fields = _set_field(fields, "Content-Type", f"text/plain; charset={_charset_of(data)}")
    return _set_field(fields, "Content-Transfer-Encoding", encoding), encoded


def _charset_of(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown-8bit"
    return "utf-8"


def _set_field(fields: list[Field], name: str, value: str) -> list[Field]:
    """``fields`` with ``name: value`` in place of the first ``name`` field (others dropped), or added."""
    key = name.lower()
    new = Field(name, fold(name, value))
    out: list[Field] = []
    placed = False
    for f in fields:
        if f.key != key:
            out.append(f)
        elif not placed:
            out.append(new)
            placed = True
    if not placed:
        out.append(new)
    return out


def _encode(data: bytes, encoding: str) -> tuple[str, bytes]:
    """(encoding used, ``data`` encoded); ends with CRLF exactly when ``data`` does.

    Quoted-printable falls back to base64 when it would not give ``data`` back exactly (a CR
    or LF inside a line of a decoded part).
    """
    if encoding == "quoted-printable":
        encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
        if b"\n" not in data:  # binascii ends soft line breaks with LF when it saw no CRLF
            encoded = encoded.replace(b"\n", CRLF)
        if encoded.count(b"\n") == encoded.count(CRLF) and binascii.a2b_qp(encoded) == data:
            return encoding, encoded
    encoded = base64.encodebytes(data).replace(b"\n", CRLF).rstrip(b"\r\n")
    return "base64", encoded + CRLF if data.endswith(CRLF) else encoded


def _b64_decode(payload: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(payload.split()), validate=False)
    except binascii.Error as exc:
        raise WireError(f"a base64 part needs re-encoding but is not valid base64: {exc}") from None


def _multipart(body: bytes, boundary: str, report: WireReport, depth: int) -> bytes | None:
    """The multipart body with every unsafe part rewritten; None when nothing had to change."""
    marker = b"--" + boundary.encode("utf-8", "surrogateescape")
    spans = list(_delimiters(body, marker))
    if not spans:
        if clean(body, allow_8bit=report.smtputf8):
            return None
        raise WireError("a multipart part without its boundary holds 8-bit data or a line over 998 octets")
    pieces: list[bytes] = []
    changed = False
    preamble = body[: spans[0][0]]
    if not clean(preamble, allow_8bit=report.smtputf8):
        preamble, changed = b"", True  # ignored by every reader (RFC 2046 5.1.1)
        report.body_parts += 1
    pieces.append(preamble)
    end_of_last = len(body)
    for i, (start, end, close) in enumerate(spans):
        pieces.append(body[start:end])
        if close:
            end_of_last = end
            break
        part_start = end + 2 if body.startswith(CRLF, end) else end
        part_end = spans[i + 1][0] if i + 1 < len(spans) else len(body.rstrip(b"\r\n"))
        part_end = max(part_end, part_start)
        if part_start > end:
            pieces.append(CRLF)
        part = body[part_start:part_end]
        new = _part(part, report, depth)
        changed = changed or new is not part
        pieces.append(new)
        end_of_last = part_end
    epilogue = body[end_of_last:]
    if not clean(epilogue, allow_8bit=report.smtputf8):
        epilogue, changed = CRLF, True
        report.body_parts += 1
    pieces.append(epilogue)
    return b"".join(pieces) if changed else None


def _delimiters(body: bytes, marker: bytes) -> list[tuple[int, int, bool]]:
    """(start, end, is_close) of each delimiter line; start includes the CRLF before it."""
    found: list[tuple[int, int, bool]] = []
    pos = 0
    size = len(body)
    while True:
        i = body.find(marker, pos)
        if i < 0:
            return found
        pos = i + 1
        if i and not body.startswith(CRLF, i - 2):
            continue  # not at the start of a line
        after = i + len(marker)
        close = body.startswith(b"--", after)
        eol = body.find(CRLF, after)
        eol = size if eol < 0 else eol
        if body[after + 2 if close else after : eol].strip(b" \t"):
            continue  # a longer word that starts with the boundary
        found.append(((i - 2 if i else 0), eol, close))
        if close:
            return found
        pos = eol


def _part(part: bytes, report: WireReport, depth: int) -> bytes:
    """One body part (headers, empty line, content), rewritten when unsafe; ``part`` itself if not."""
    if part.startswith(CRLF):
        head, separator, content = b"", CRLF, part[2:]
    else:
        split = part.find(b"\r\n\r\n")
        if split < 0:  # headers only
            head, separator, content = part, b"", b""
        else:
            head, separator, content = part[: split + 2], CRLF, part[split + 4 :]
    try:
        fields = parse_fields(head)
    except MessageError as exc:
        if clean(part, allow_8bit=report.smtputf8):
            return part
        raise WireError(f"a MIME part that needs re-encoding has malformed headers ({exc})") from None
    new_fields = _encode_fields(fields, report)
    result = _entity(new_fields, content, report, depth + 1)
    if result is None and all(a is b for a, b in zip(new_fields, fields, strict=True)):
        return part
    if result is not None:
        new_fields, content = result
        separator = CRLF
    return b"".join(f.raw for f in new_fields) + separator + content
