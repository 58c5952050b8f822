"""Finding our tagged values in a received mail (pure: shapes only, no secret, no I/O).

Every recipient copy the Transformer sends carries tags bound by HMAC to (uuid, recipient)
(:mod:`common.addressing`): the return path ``bounce-U-T@D``, the unsubscribe address
``unsub-U-T@D``, the one-click token ``U-T`` in the https ``List-Unsubscribe`` URL and the
Message-ID ``<U.T.S@D>``.  A report about one of our messages quotes some of them: the
envelope recipient (the return path or unsubscribe address the report was sent to), the
returned original's headers (Return-Path, Message-ID, List-Unsubscribe), the report's text
(Postfix' ``X-Postfix-Sender``, a reply quoting our sender address), Amazon SES JSON
(``mail.source``, ``mail.headers``).

:func:`find` collects every value with the right shape on one of our return-path domains --
in headers and in text, in the report and in attached messages -- as :class:`Found` items.
Whether a tag is genuine, and for which recipient, is decided later, in the event loop, by
:mod:`mxserver.verification` (HMAC over the Transformer's record of what it sent).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Final, Literal

from common.addressing import Tagged, parse_address, parse_message_id, parse_token
from mxserver import mime

Source = Literal["envelope", "report"]

#: Bytes of the raw mail scanned (tags sit in headers, near the top of the returned original).
MAX_SCAN: Final = 2 * 1024 * 1024
#: Distinct tagged values kept per mail (a genuine report has a handful).
MAX_FOUND: Final = 64

#: The local part of a tagged address or Message-ID, right before "@<one of our domains>".
_LOCAL_RE: Final = re.compile(
    r"(?:^|[^\w.+-])((?:bounce|unsub)-[a-z0-9]{1,46}-[a-z2-7]{10}|[a-z0-9]{1,46}\.[a-z2-7]{10}\.[a-z2-7]{6,32})$"
)
#: A one-click token as a URL path segment or query value (``…/unsubscribe/U-T``).
_TOKEN_RE: Final = re.compile(r"[/=]([a-z0-9]{1,46}-[a-z2-7]{10})(?![a-z0-9@.-])")
#: Characters before "@" looked at (the longest local part is 46 + 1 + 10 + 1 + 32).
_LOOKBACK: Final = 100


@dataclass(frozen=True)
class Found:
    """One tagged value and where it was found."""

    tagged: Tagged
    source: Source

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, uuid, tag): the same value found twice is one."""
        return (self.tagged.kind, self.tagged.uuid, self.tagged.tag)


def envelope(recipients: Sequence[str], domains: frozenset[str]) -> list[Found]:
    """Tagged envelope recipients (RCPT TO) on one of ``domains``."""
    out: list[Found] = []
    for rcpt in recipients:
        tagged = parse_address(rcpt)
        if tagged is not None and tagged.domain in domains:
            out.append(Found(tagged, "envelope"))
    return out


def in_texts(texts: Iterable[str], domains: frozenset[str]) -> list[Found]:
    """Tagged values with the right shape, on one of ``domains`` (tokens carry no domain).

    Addresses and Message-IDs are found from their domain ("@" + a return-path domain, a plain
    substring search), then the local part before it is checked: linear, whatever the text.
    """
    out: dict[tuple[str, str, str], Found] = {}
    for text in texts:
        lower = text.lower()
        for domain in domains:
            for local in _locals_before(lower, "@" + domain):
                value = f"{local}@{domain}"
                tagged = parse_message_id(value) if "." in local else parse_address(value)
                if tagged is not None:
                    out.setdefault((tagged.kind, tagged.uuid, tagged.tag), Found(tagged, "report"))
        for match in _TOKEN_RE.finditer(lower):
            tagged = parse_token(match.group(1))
            if tagged is not None:
                out.setdefault((tagged.kind, tagged.uuid, tagged.tag), Found(tagged, "report"))
        if len(out) >= MAX_FOUND:
            break
    return list(out.values())[:MAX_FOUND]


def _locals_before(text: str, needle: str) -> list[str]:
    """Local parts of tagged shape right before each ``needle`` ("@domain") that ends the domain."""
    found: list[str] = []
    start = 0
    while len(found) < MAX_FOUND:
        at = text.find(needle, start)
        if at < 0:
            break
        start = at + 1
        end = at + len(needle)
        following = text[end : end + 2]
        if (
            following[:1].isalnum()
            or following[:1] in ("-", "_")
            or (following[:1] == "." and following[1:2].isalnum())
        ):
            continue  # a longer domain (…example.test.evil.example)
        match = _LOCAL_RE.search(text, max(0, at - _LOOKBACK), at)
        if match is not None:
            found.append(match.group(1))
    return found


def texts_of(msg: Message, raw: bytes) -> list[str]:
    """What :func:`find` scans: the raw mail, then every decoded header and text part.

    The raw bytes cover what the parser may have lost (broken MIME, a quoted original); the
    decoded texts cover transfer encodings (quoted-printable soft breaks, base64) and
    encoded-words.
    """
    texts = [raw[:MAX_SCAN].decode("utf-8", "replace")]
    for part in mime.all_leaves(msg):
        ctype = mime.content_type(part)
        if ctype.startswith("text/") or ctype in mime.ORIGINAL_TYPES:
            texts.append(mime.part_text(part))
    return texts


def find(msg: Message, raw: bytes, domains: frozenset[str]) -> list[Found]:
    """Every tagged value in the mail (not the envelope), on one of ``domains``."""
    return in_texts(texts_of(msg, raw), domains)
