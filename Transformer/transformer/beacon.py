"""Open-tracking beacon: an ``<img>`` inserted into every text/html part, before signing.

The MIME tree is walked on the raw bytes (multipart at any depth).  Each text/html part that
is not an attachment is decoded from its own Content-Transfer-Encoding (base64,
quoted-printable, 7bit/8bit/binary), gets the tag before its last ``</body>`` (or at the end
when there is none), and is encoded again in the same encoding.  Every other byte of the
message -- other parts, boundaries, preamble, epilogue, part headers -- is kept as it was.
(The original replaced the payload but kept the old encoding header, corrupting base64 and
quoted-printable parts, and skipped nested multiparts.)
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import Final
from urllib.parse import quote

from transformer.message import CRLF, Field, MessageError, parse_fields, to_crlf

log = logging.getLogger(__name__)

_PLACEHOLDER: Final = re.compile(r"\{\{\s*(stream-id|streamid|uuid)\s*\}\}")
_MAX_DEPTH: Final = 20


def beacon_url(template: str, *, uuid: str, stream_id: str | None) -> str:
    """The pixel URL for one message (values percent-encoded; a missing stream id is empty)."""
    values = {"uuid": uuid, "stream-id": stream_id or "", "streamid": stream_id or ""}
    return _PLACEHOLDER.sub(lambda m: quote(values[m.group(1)], safe=""), template)


def image_tag(url: str) -> bytes:
    """The tag the original inserted, with the URL HTML-escaped."""
    return f'<img width="1" height="1" border="0" alt="" src="{html.escape(url)}">'.encode("ascii")


@dataclass
class BeaconResult:
    """What :func:`insert_beacon` did."""

    body: bytes
    inserted: int = 0
    warnings: list[str] = field(default_factory=list)


def insert_beacon(fields: list[Field], body: bytes, tag: bytes) -> BeaconResult:
    """Insert ``tag`` into every text/html part of a message with header ``fields``."""
    result = BeaconResult(body)
    result.body = _entity(fields, body, tag, result, depth=0)
    return result


def _content_headers(fields: list[Field]) -> Message:
    msg = Message()
    for f in fields:
        if f.key in ("content-type", "content-transfer-encoding", "content-disposition"):
            msg[f.name] = f.value
    return msg


def _entity(fields: list[Field], body: bytes, tag: bytes, result: BeaconResult, depth: int) -> bytes:
    headers = _content_headers(fields)
    ctype = headers.get_content_type()
    if ctype.startswith("multipart/"):
        if depth >= _MAX_DEPTH:
            result.warnings.append(f"MIME nesting deeper than {_MAX_DEPTH}; no beacon below")
            return body
        boundary = headers.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            result.warnings.append(f"{ctype} without a boundary; no beacon inside")
            return body
        return _multipart(body, boundary, tag, result, depth)
    if ctype != "text/html":
        return body
    disposition = str(headers.get("Content-Disposition", "")).split(";", 1)[0].strip().lower()
    if disposition == "attachment":
        return body
    changed = _html_part(headers, body, tag, result)
    if changed is None:
        return body
    result.inserted += 1
    return changed


def _multipart(body: bytes, boundary: str, tag: bytes, result: BeaconResult, depth: int) -> bytes:
    """Rewrite the parts between ``--boundary`` lines; everything else is copied."""
    pieces: list[bytes] = []
    copied = 0
    part_start: int | None = None
    for start, end, close in _delimiters(body, b"--" + boundary.encode("utf-8", "surrogateescape")):
        if part_start is not None:
            part = body[part_start:start]
            new = _part(part, tag, result, depth)
            if new is not part:
                pieces.append(body[copied:part_start])
                pieces.append(new)
                copied = start
        if close:  # the rest is the epilogue
            break
        part_start = end + 2 if body.startswith(CRLF, end) else end
    if not pieces:
        return body
    pieces.append(body[copied:])
    return b"".join(pieces)


def _delimiters(body: bytes, marker: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_close) of each delimiter line; start includes the CRLF before it.

    A plain ``find`` loop: a regular expression that anchors the boundary at a line start has
    no literal prefix to search for and scans 10 KB bodies several times slower.
    """
    pos = 0
    size = len(body)
    while True:
        i = body.find(marker, pos)
        if i < 0:
            return
        pos = i + 1
        if i and not body.startswith(CRLF, i - 2):
            continue  # not at the start of a line
        after = i + len(marker)
        close = body.startswith(b"--", after)
        eol = body.find(CRLF, after)
        eol = size if eol < 0 else eol
        if body[after + 2 if close else after : eol].strip(b" \t"):
            continue  # a longer word that starts with the boundary
        yield (i - 2 if i else 0), eol, close
        pos = eol


def _part(part: bytes, tag: bytes, result: BeaconResult, depth: int) -> bytes:
    if part.startswith(CRLF):
        fields: list[Field] = []
        head_len = 2
    else:
        split = part.find(b"\r\n\r\n")
        if split < 0:
            return part  # headers only, no content
        try:
            fields = parse_fields(part[: split + 2])
        except MessageError as exc:
            result.warnings.append(f"malformed MIME part headers ({exc}); no beacon in it")
            return part
        head_len = split + 4
    content = part[head_len:]
    new = _entity(fields, content, tag, result, depth + 1)
    return part if new is content else part[:head_len] + new


def _html_part(headers: Message, payload: bytes, tag: bytes, result: BeaconResult) -> bytes | None:
    cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    charset = headers.get_content_charset() or "us-ascii"
    if cte not in _CODECS and cte not in ("7bit", "8bit", "binary"):
        result.warnings.append(f"text/html part with Content-Transfer-Encoding {cte!r}; no beacon in it")
        return None
    try:
        if cte in _CODECS:
            decode, encode = _CODECS[cte]
            changed = _insert(decode(payload), tag, charset)
            if changed is not None:
                # Same layout as before: the CRLF ending the content belongs to the boundary.
                changed = encode(changed).rstrip(b"\r\n") + (CRLF if payload.endswith(CRLF) else b"")
        else:
            changed = _insert(payload, tag, charset)
    except ValueError as exc:  # binascii.Error and UnicodeError are ValueErrors
        result.warnings.append(f"text/html part is not valid {cte} / {charset} ({exc}); no beacon in it")
        return None
    if changed is None:
        result.warnings.append(f"text/html part in unknown charset {charset!r}; no beacon in it")
    return changed


def _insert(data: bytes, tag: bytes, charset: str) -> bytes | None:
    """``data`` with ``tag`` before the last ``</body``, else at the end; None for unknown charsets.

    In ASCII-compatible charsets (UTF-8, ISO-8859-*, Windows-125x...) this works on the bytes,
    so even invalid byte sequences survive unchanged; others (UTF-16...) are decoded first.
    """
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return None
    if "</body>".encode(name) == b"</body>":
        return _insert_at(data, data.lower().rfind(b"</body"), tag)
    text = data.decode(name, "surrogatepass")
    pos = text.lower().rfind("</body")
    if pos < 0:
        pos = len(text.rstrip("\r\n"))
    return (text[:pos] + tag.decode("ascii") + text[pos:]).encode(name, "surrogatepass")


def _insert_at(data: bytes, pos: int, tag: bytes) -> bytes:
    if pos < 0:
        pos = len(data.rstrip(b"\r\n"))
    return data[:pos] + tag + data[pos:]


def _b64_decode(payload: bytes) -> bytes:
    return base64.b64decode(b"".join(payload.split()), validate=True)


def _b64_encode(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", CRLF)


def _qp_decode(payload: bytes) -> bytes:
    return binascii.a2b_qp(payload)


def _qp_encode(data: bytes) -> bytes:
    return to_crlf(binascii.b2a_qp(to_crlf(data), quotetabs=False, istext=True, header=False))


_CODECS: Final[dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]] = {
    "base64": (_b64_decode, _b64_encode),
    "quoted-printable": (_qp_decode, _qp_encode),
}
