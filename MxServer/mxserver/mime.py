"""Defensive MIME reading for the classifier: any bytes in, plain strings out, nothing raised.

Mail arriving at a public MX is often malformed (broken encodings, unknown charsets, truncated
multiparts, bounces that quote half a message).  Everything here uses the ``compat32`` parser,
which records defects instead of raising, and catches the few narrow errors that decoding can
still produce (unknown charset, bad RFC 2047 words).  Scanned text is capped at
:data:`MAX_TEXT` characters so a huge message cannot make a regular expression slow.

Part of MxServer's pure classification phase (:mod:`mxserver.analysis`), run in worker
processes.
"""

from __future__ import annotations

import email
import email.header
import email.parser
import email.utils
import html
import re
from collections.abc import Iterator
from email.errors import HeaderParseError, MessageError
from email.message import Message
from email.policy import compat32
from typing import Final

#: Characters of body text looked at per message (reports put the facts at the top).
MAX_TEXT: Final = 128 * 1024
#: Nesting depth of multiparts followed (deeper parts are ignored).
MAX_DEPTH: Final = 12
#: Parts looked at per message (a report has a handful; thousands are an attack).
MAX_PARTS: Final = 500
#: ``multipart/*`` (and ``message/rfc822``) declarations beyond which the body is not parsed as MIME at all: the stdlib
#: parser recurses once per nesting level and raises RecursionError near 1000 levels, after
#: spending about a second; a genuine report never nests more than a few levels.
MAX_MULTIPARTS: Final = 64

ORIGINAL_TYPES: Final = frozenset(
    (
        "message/rfc822",
        "message/global",
        "text/rfc822-headers",
        "message/rfc822-headers",
        "message/global-headers",
    )
)

# Local part at most 64, labels at most 63: bounded, so scanning long text stays linear.
EMAIL_RE: Final = re.compile(
    r"(?<![\w.!#$%&'*+/=?^`{|}~-])"
    r"([\w!#$%&'*+/=?^`{|}~-][\w.!#$%&'*+/=?^`{|}~-]{0,63}"
    r"@[^\W_](?:[\w-]{0,61}[^\W_])?(?:\.[^\W_](?:[\w-]{0,61}[^\W_])?){1,8})"
)
_TAG_RE: Final = re.compile(r"<(?:script|style)\b.*?</(?:script|style)\s*>|<[^<>]{0,2000}>", re.I | re.S)
_BREAK_RE: Final = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d)\b[^<>]{0,200}>", re.I)
_SPACES_RE: Final = re.compile(r"[ \t]+")
_FOLD_RE: Final = re.compile(r"\r?\n[ \t]+")
_SURROGATE_RE: Final = re.compile("[\udc80-\udcff]")


_MULTIPART_DECL_RE: Final = re.compile(
    rb"content-type:[ \t]*(?:\r?\n[ \t]+)?(?:multipart/|message/(?:rfc822|global)\b)", re.IGNORECASE
)


_PART_HEADER_RE: Final = re.compile(rb"^content-type:", re.IGNORECASE | re.MULTILINE)


class FlatMessage(Message):
    """A message whose body was not parsed as MIME (too many multiparts): read as plain text."""


def parse(raw: bytes) -> Message:
    """The message of ``raw`` (``compat32``: defects are recorded, never raised).

    A body with more than :data:`MAX_MULTIPARTS` multipart declarations or :data:`MAX_PARTS`
    parts (or one the parser cannot handle without recursing too deep) is kept as one text
    part: a :class:`FlatMessage`.
    """
    head = raw[: 4 * 1024 * 1024]
    if len(_MULTIPART_DECL_RE.findall(head)) <= MAX_MULTIPARTS and len(_PART_HEADER_RE.findall(head)) <= MAX_PARTS:
        try:
            return email.message_from_bytes(raw, policy=compat32)
        except RecursionError:
            pass
    return flat(raw)


def flat(raw: bytes) -> Message:
    """``raw`` with its headers parsed and its body kept as one ``text/plain`` part."""
    msg = email.parser.BytesParser(FlatMessage, policy=compat32).parsebytes(raw, headersonly=True)
    del msg["Content-Type"]
    del msg["Content-Transfer-Encoding"]
    msg["Content-Type"] = "text/plain; charset=utf-8"
    return msg


def parse_headers(text: str) -> Message:
    """A header block (e.g. a ``text/rfc822-headers`` part) as a message without body."""
    return email.parser.Parser(policy=compat32).parsestr(text, headersonly=True)


def _to_text(value: object) -> str:
    """A header value as text; raw 8-bit bytes (SMTPUTF8 headers) are read as UTF-8."""
    if isinstance(value, email.header.Header):
        # compat32 wraps values holding raw 8-bit bytes in a Header of charset unknown-8bit.
        try:
            chunks = email.header.decode_header(value)
        except (HeaderParseError, ValueError, LookupError, UnicodeError):
            return unescape(str(value))
        return "".join(
            chunk.decode("utf-8" if charset in (None, "unknown-8bit") else charset, "replace")
            if isinstance(chunk, bytes)
            else chunk
            for chunk, charset in chunks
        )
    return unescape(value if isinstance(value, str) else str(value))


def unescape(text: str) -> str:
    """Text the parser read with ``surrogateescape`` (raw 8-bit bytes) as UTF-8."""
    if _SURROGATE_RE.search(text):
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def decode_words(value: str) -> str:
    """Unfold a header value and decode its RFC 2047 encoded words (best effort)."""
    value = _FOLD_RE.sub(" ", value)
    if "=?" not in value:
        return value.strip()
    try:
        parts = email.header.decode_header(value)
        out = []
        for chunk, charset in parts:
            if isinstance(chunk, bytes):
                try:
                    out.append(chunk.decode(charset or "ascii", "replace"))
                except LookupError:
                    out.append(chunk.decode("utf-8", "replace"))
            else:
                out.append(chunk)
        return "".join(out).strip()
    except (HeaderParseError, ValueError, LookupError, UnicodeError, AssertionError):
        return value.strip()


def header_values(msg: Message, name: str) -> list[str]:
    """Every value of header ``name``, decoded."""
    try:
        raw = msg.get_all(name) or []
    except (TypeError, ValueError):
        return []
    return [decode_words(_to_text(v)) for v in raw]


def header(msg: Message, name: str) -> str:
    """The first value of header ``name``, decoded ('' when absent)."""
    values = header_values(msg, name)
    return values[0] if values else ""


def has_header(msg: Message, name: str) -> bool:
    """True when ``msg`` has header ``name``."""
    return name in msg


def headers_text(msg: Message) -> str:
    """All headers of ``msg`` as one ``Name: value`` line each (decoded)."""
    lines = []
    for name, value in msg.items():
        lines.append(f"{name}: {decode_words(_to_text(value))}")
    return "\n".join(lines)


def addresses(value: str) -> list[str]:
    """The e-mail addresses in an address-list header value (or any text), in order."""
    if value.count("@") == 1:
        # One "@": the one address there is (the common case, and 10x faster than getaddresses).
        match = EMAIL_RE.search(value)
        return [match.group(1)] if match else []
    found: list[str] = []
    try:
        pairs = email.utils.getaddresses([value])
    except (ValueError, IndexError, TypeError, HeaderParseError):
        pairs = []
    for _, addr in pairs:
        addr = addr.strip().strip("<>")
        if "@" in addr and EMAIL_RE.fullmatch(addr) and addr not in found:
            found.append(addr)
    if not found:
        for match in EMAIL_RE.finditer(value[:MAX_TEXT]):
            if match.group(1) not in found:
                found.append(match.group(1))
    return found


def first_address(value: str) -> str | None:
    """The first address in ``value``, or None."""
    found = addresses(value)
    return found[0] if found else None


def content_type(part: Message) -> str:
    """``maintype/subtype`` in lower case (``text/plain`` when missing or invalid)."""
    try:
        return part.get_content_type().lower()
    except (ValueError, TypeError, AttributeError):
        return "text/plain"


def param(part: Message, name: str) -> str:
    """A Content-Type parameter, lower-cased ('' when absent)."""
    try:
        value = part.get_param(name)
    except (ValueError, TypeError, IndexError):
        return ""
    if isinstance(value, tuple):
        value = email.utils.collapse_rfc2231_value(value)
    return str(value).strip().lower() if value else ""


def children(part: Message) -> list[Message]:
    """Direct sub-parts of a multipart (an empty list otherwise)."""
    if not part.is_multipart():
        return []
    payload = part.get_payload()
    if not isinstance(payload, list):
        return []
    return [p for p in payload if isinstance(p, Message)]


def leaves(msg: Message, depth: int = 0) -> Iterator[Message]:
    """The report's own parts: walks multiparts but does not descend into attached messages.

    At most :data:`MAX_PARTS` parts, :data:`MAX_DEPTH` levels deep (iterative: no recursion).
    """
    stack: list[tuple[Message, int]] = [(msg, depth)]
    count = 0
    while stack and count < MAX_PARTS:
        part, level = stack.pop()
        count += 1
        if content_type(part).startswith("multipart/") and isinstance(part.get_payload(), list):
            if level < MAX_DEPTH:
                stack.extend((child, level + 1) for child in reversed(children(part)))
        else:
            yield part


def attached(part: Message) -> Message | None:
    """The message inside a ``message/rfc822`` (or ``message/global``) part, else None."""
    if content_type(part) not in ("message/rfc822", "message/global"):
        return None
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        return payload[0]
    return None


def all_leaves(msg: Message) -> Iterator[Message]:
    """Every leaf part, including those of attached messages (bounded like :func:`leaves`)."""
    queue: list[tuple[Message, int]] = [(msg, 0)]
    count = 0
    while queue and count < MAX_PARTS:
        current, level = queue.pop(0)
        for part in leaves(current):
            count += 1
            inner = attached(part)
            if inner is not None and level < MAX_DEPTH:
                queue.append((inner, level + 1))
            yield part
            if count >= MAX_PARTS:
                return


def payload_bytes(part: Message) -> bytes:
    """The decoded body of a leaf part (transfer encoding removed)."""
    try:
        data = part.get_payload(decode=True)
    except (ValueError, TypeError, AssertionError, MessageError):
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    if isinstance(raw, list):
        # message/* parts: the parser turned the body into messages; serialise them back.
        return b"\n\n".join(_flatten(m) for m in raw if isinstance(m, Message))
    return b""


def serialise(msg: Message) -> bytes:
    """``msg`` as bytes (best effort: headers only when it cannot be serialised)."""
    return _flatten(msg)


def _flatten(msg: Message) -> bytes:
    try:
        return msg.as_bytes(policy=compat32)
    except (ValueError, TypeError, LookupError, UnicodeError, MessageError, RecursionError, AttributeError):
        return headers_text(msg).encode("utf-8", "replace")


def part_text(part: Message) -> str:
    """The text of a leaf part in its declared charset (UTF-8 when unknown)."""
    data = payload_bytes(part)[: MAX_TEXT * 4]
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "utf-8"
    except (ValueError, TypeError, LookupError):
        charset = "utf-8"
    try:
        text = data.decode(charset, "replace")
    except (LookupError, ValueError):
        text = data.decode("utf-8", "replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")[:MAX_TEXT]


def html_to_text(markup: str) -> str:
    """Visible text of an HTML part (good enough for pattern matching)."""
    markup = _BREAK_RE.sub("\n", markup[:MAX_TEXT])
    text = html.unescape(_TAG_RE.sub(" ", markup))
    return "\n".join(_SPACES_RE.sub(" ", line).strip() for line in text.splitlines())


def body_text(msg: Message) -> str:
    """The human-readable text of the message itself (not of attached messages).

    text/plain parts are preferred; HTML is used only when there is no plain text.  A
    multipart whose boundary was never found is read as plain text (it is one).
    """
    plain: list[str] = []
    markup: list[str] = []
    for part in leaves(msg):
        ctype = content_type(part)
        if ctype == "text/plain" or ctype.startswith("multipart/"):
            plain.append(part_text(part))
        elif ctype == "text/html":
            markup.append(html_to_text(part_text(part)))
        if sum(map(len, plain)) > MAX_TEXT:
            break
    return "\n".join(plain or markup)[:MAX_TEXT]


def find_part(msg: Message, types: frozenset[str] | set[str]) -> Message | None:
    """The first of the report's own parts whose type is in ``types``."""
    for part in leaves(msg):
        if content_type(part) in types:
            return part
    return None


def original_message(msg: Message) -> Message | None:
    """The returned/reported original (headers at least) attached to a report, or None."""
    part = find_part(msg, ORIGINAL_TYPES)
    if part is None:
        return None
    ctype = content_type(part)
    if ctype in ("message/rfc822", "message/global"):
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            inner = payload[0]
            # A base64/quoted-printable message/rfc822 (not allowed, yet sent) parses as a body.
            if len(inner) or not isinstance(inner.get_payload(), str):
                return inner
        return parse_headers(payload_bytes(part).decode("utf-8", "replace"))
    return parse_headers(part_text(part))


_HEADER_START_RE: Final = re.compile(
    r"^(?:Return-Path|Received|DKIM-Signature|Message-ID|From|Date|To|Subject|MIME-Version"
    r"|X-[A-Za-z-]+|Content-Type|List-Unsubscribe):[ \t]",
    re.M | re.I,
)


_KEY_HEADER_RE: Final = re.compile(r"^(?:Message-ID|Return-Path|Received):", re.M | re.I)


def _quoted_header_block(text: str) -> tuple[int, str] | None:
    """Where the first quoted header block of ``text`` starts, and its text; None when there is none.

    A header block counts when it includes a Message-ID, Return-Path or Received line (40
    candidate starts are tried at most).
    """
    for tries, match in enumerate(_HEADER_START_RE.finditer(text)):
        if tries >= 40:
            break
        end = text.find("\n\n", match.start())
        head = text[match.start() : end if end >= 0 else len(text)]
        if _KEY_HEADER_RE.search(head):
            return match.start(), head
    return None


def inline_message(text: str) -> Message | None:
    """A whole message quoted inline (headers and body), or None.

    The first header block as :func:`quoted_original` finds it, parsed together with everything
    after it -- e.g. a bounce pasted into a plain-text mail after a line of dashes.
    """
    block = _quoted_header_block(text)
    return parse(text[block[0] :].encode("utf-8", "replace")) if block else None


def quoted_original(text: str) -> Message | None:
    """Headers of an original message quoted inline in a plain-text bounce, or None."""
    block = _quoted_header_block(text)
    return parse_headers(block[1] + "\n\n") if block else None
