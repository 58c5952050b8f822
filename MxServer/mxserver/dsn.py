"""RFC 3464 delivery status notifications: one :class:`Failure` per failed or delayed recipient.

Part of the pure classification phase (:mod:`mxserver.analysis`).  A DSN is
``multipart/report; report-type=delivery-status`` whose ``message/delivery-status`` part
(``message/global-delivery-status`` for RFC 6533) holds one per-message block and one block
per recipient::

    Reporting-MTA: dns; mx.example.org

    Final-Recipient: rfc822; jane@example.org
    Action: failed
    Status: 5.1.1
    Remote-MTA: dns; mx1.example.org
    Diagnostic-Code: smtp; 550 5.1.1 <jane@example.org>: Recipient address rejected: User unknown

``Action: failed`` becomes a bounce, ``Action: delayed`` a deferral; ``delivered``, ``relayed``
and ``expanded`` are not failures and are skipped.

Real DSNs bend the format, so the fields are read as a stream of ``Name: value`` lines rather
than as MIME blocks: a new recipient starts where a recipient field repeats, whether or not a
blank line separates the blocks; fields that a broken part put into the part's own headers are
read too; and when the status part cannot be found at all (a boundary that does not match the
body, no boundary parameter, no MIME parts), :func:`scrape` reads the same fields from the
whole body.  Addresses keep their quotes, and RFC 2047 encoded-words in them are decoded.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from typing import Final, Literal

from mxserver import mime

Action = Literal["failed", "delayed"]

STATUS_TYPES: Final = frozenset(("message/delivery-status", "message/global-delivery-status"))
REPORT_TYPES: Final = frozenset(("delivery-status", "global-delivery-status"))

#: Fields of RFC 3464 (and the common extensions) that this parser reads.
PER_MESSAGE: Final = frozenset(
    ("reporting-mta", "received-from-mta", "arrival-date", "original-envelope-id", "x-postfix-sender", "dsn-gateway")
)
PER_RECIPIENT: Final = frozenset(
    (
        "original-recipient",
        "final-recipient",
        "action",
        "status",
        "remote-mta",
        "diagnostic-code",
        "last-attempt-date",
        "will-retry-until",
        "x-actual-recipient",
        "x-display-name",
    )
)
_RECIPIENT_START: Final = frozenset(("original-recipient", "final-recipient"))
_FIELD_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9-]{0,40})[ \t]*:[ \t]*(.*)$")
_STATUS_RE: Final = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_TYPE_PREFIX_RE: Final = re.compile(r"^\s*[A-Za-z][A-Za-z0-9-]{0,30}\s*;\s*")
_IP_RE: Final = re.compile(r"\[(?:IPv6:)?([0-9a-fA-F:.]{3,45})\]|(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
_HOST_IP_RE: Final = re.compile(
    r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,10}\.?\s?\[(?:IPv6:)?([0-9a-fA-F:.]{3,45})\]"
)
_CONTINUATION_RE: Final = re.compile(r"(?<![\w.-])([245]\d\d)[- ]([245]\.\d{1,3}\.\d{1,3})[ \t]+")
_SPACE_RE: Final = re.compile(r"\s+")
_SCRAPE_START_RE: Final = re.compile(r"^(?:Reporting-MTA|Original-Recipient|Final-Recipient)[ \t]*:", re.M | re.I)
MAX_REASON: Final = 1000
MAX_RECIPIENTS: Final = 200


@dataclass(frozen=True)
class Failure:
    """One recipient that was not delivered (or not yet)."""

    #: The address the report names (Final-Recipient, else Original-Recipient), decoded.
    final_recipient: str | None
    action: Action
    status: str | None
    diagnostic: str
    original_recipient: str | None = None
    remote_mta: str | None = None
    ip: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every address the block names for this recipient."""
        return tuple(a for a in (self.final_recipient, self.original_recipient) if a)


@dataclass(frozen=True)
class Report:
    """A parsed DSN: its per-message fields and its failed or delayed recipients."""

    reporting_mta: str | None
    failures: tuple[Failure, ...]
    #: Recipient blocks of any action (delivered and relayed ones included).
    blocks: int
    #: True when the fields were scraped from the body (the status part was unusable).
    scraped: bool = False


def is_dsn(msg: Message) -> bool:
    """True for a delivery status notification (by report type or by its status part)."""
    if mime.content_type(msg) == "multipart/report" and mime.param(msg, "report-type") in REPORT_TYPES:
        return True
    return mime.find_part(msg, STATUS_TYPES) is not None


def declared_dsn(msg: Message) -> bool:
    """True when the top-level header declares a DSN (whatever the body looks like)."""
    ctype = mime.header(msg, "Content-Type").lower()
    return "multipart/report" in ctype and "delivery-status" in ctype


def parse(msg: Message, raw: bytes = b"") -> Report | None:
    """The recipients of a DSN; None when ``msg`` has no usable delivery-status fields.

    ``raw`` (the whole mail) is read when the MIME structure hides the status part.
    """
    part = mime.find_part(msg, STATUS_TYPES)
    if part is not None:
        pairs = header_pairs(part) + field_pairs(status_text(part))
        report = _report(pairs, scraped=False)
        if report.blocks:
            return report
    if is_dsn(msg) or declared_dsn(msg):
        return scrape(_body_text(msg)) or scrape(_raw_body(raw))
    return None


def scrape(text: str) -> Report | None:
    """DSN fields read from free text (a report whose MIME structure is broken)."""
    match = _SCRAPE_START_RE.search(text)
    if match is None:
        return None
    report = _report(field_pairs(text[match.start() :]), scraped=True)
    return report if report.blocks else None


def header_pairs(part: Message) -> list[tuple[str, str]]:
    """DSN fields a broken part carries in its own header (no blank line after Content-Type)."""
    return [(name.lower(), mime.header(part, name)) for name in part if name.lower() in PER_RECIPIENT | PER_MESSAGE]


def status_text(part: Message) -> str:
    """The text of a delivery-status part, however the parser split it."""
    payload = part.get_payload()
    cte = mime.header(part, "Content-Transfer-Encoding").strip().lower()
    if isinstance(payload, list) and cte in ("base64", "quoted-printable"):
        # Not allowed for message/* types, yet sent: the parser split encoded text into "blocks".
        encoded = mime.payload_bytes(part)
        try:
            if cte == "base64":
                letters = re.sub(rb"[^A-Za-z0-9+/=]", b"", encoded)
                data = base64.b64decode(letters + b"=" * (-len(letters) % 4))
            else:
                data = quopri.decodestring(encoded)
        except (binascii.Error, ValueError):
            return ""
        return data.decode("utf-8", "replace")
    if isinstance(payload, list):
        # The parser split message/delivery-status into one "message" per block.
        chunks = []
        for block in payload:
            if isinstance(block, Message):
                chunks.append(mime.headers_text(block))
                if isinstance(block.get_payload(), str):
                    # Raw bytes (get_payload() would turn 8-bit UTF-8 into U+FFFD).
                    chunks.append(mime.payload_bytes(block).decode("utf-8", "replace"))
        return "\n\n".join(chunks)
    return mime.part_text(part)


def field_pairs(text: str) -> list[tuple[str, str]]:
    """``(name, value)`` of every DSN field line in ``text``, continuation lines joined."""
    pairs: list[tuple[str, str]] = []
    last_known = False
    for line in text[: mime.MAX_TEXT].replace("\r\n", "\n").split("\n"):
        if line[:1] in (" ", "\t") and line.strip():
            if last_known and pairs:
                name, value = pairs[-1]
                pairs[-1] = (name, f"{value} {line.strip()}")
            continue
        last_known = False
        match = _FIELD_RE.match(line)
        if match is None:
            continue
        name = match.group(1).lower()
        if name in PER_RECIPIENT or name in PER_MESSAGE:
            pairs.append((name, match.group(2).strip()))
            last_known = True
    return pairs


def _report(pairs: Iterable[tuple[str, str]], *, scraped: bool) -> Report:
    per_message: dict[str, str] = {}
    records: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for name, value in pairs:
        if name in PER_MESSAGE:
            per_message.setdefault(name, value)
            continue
        if current is None or _starts_next_block(name, current):
            if len(records) >= MAX_RECIPIENTS:
                break
            current = {}
            records.append(current)
        current.setdefault(name, value)
    failures = [f for f in (_failure(r) for r in records) if f is not None]
    reporting = strip_type(per_message.get("reporting-mta", "")) or None
    blocks = sum(1 for r in records if _RECIPIENT_START & set(r) or "action" in r)
    return Report(reporting, tuple(failures), blocks, scraped)


def _starts_next_block(name: str, current: dict[str, str]) -> bool:
    """Whether field ``name`` begins the next recipient's block rather than continuing ``current``.

    Blank lines between blocks are not needed, and fields may come in any order within a block
    (some MTAs write Action before Final-Recipient, or Original- after Final-Recipient): a field
    that repeats starts the next block (Action or Status only once the block names its
    recipient), and so does a recipient field that comes after the block's recipient *and* an
    Action or Status given after that recipient.
    """
    has_recipient = not _RECIPIENT_START.isdisjoint(current)
    if name in current:
        return name in _RECIPIENT_START or (name in ("action", "status") and has_recipient)
    if name not in _RECIPIENT_START or not has_recipient:
        return False
    order = list(current)
    first_recipient = min(order.index(k) for k in _RECIPIENT_START if k in current)
    return any(k in current and order.index(k) > first_recipient for k in ("action", "status"))


def _failure(block: dict[str, str]) -> Failure | None:
    if "action" not in block and not (_RECIPIENT_START & set(block)):
        return None
    words = block.get("action", "").lower().split()
    action = words[0].strip(";,.") if words else ""
    status = find_status(block.get("status", ""))
    if action not in ("failed", "delayed"):
        # A missing Action with a failure status still means failed (sloppy MTAs).
        if action or status is None or status[0] == "2":
            return None
        action = "failed" if status[0] == "5" else "delayed"
    final = address(block.get("final-recipient", ""))
    original = address(block.get("original-recipient", ""))
    diagnostic = clean_reason(strip_type(block.get("diagnostic-code", "")))
    remote = strip_type(block.get("remote-mta", "")) or None
    return Failure(
        final_recipient=final or original,
        action="failed" if action == "failed" else "delayed",
        status=status,
        diagnostic=diagnostic,
        original_recipient=original if original and final and original.lower() != final.lower() else None,
        remote_mta=remote,
        ip=find_ip(remote or "") or host_ip(diagnostic),
    )


def _body_text(msg: Message) -> str:
    """The whole body as text: every leaf of the report, or the unparsed body."""
    texts = []
    for part in mime.leaves(msg):
        texts.append(mime.headers_text(part) if part is not msg else "")
        texts.append(mime.part_text(part))
    return "\n".join(texts)


def _raw_body(raw: bytes) -> str:
    """The body of the raw mail (after the first blank line), as text."""
    text = raw[: mime.MAX_TEXT * 4].decode("utf-8", "replace").replace("\r\n", "\n")
    _, _, body = text.partition("\n\n")
    return body


def address(value: str) -> str | None:
    """The address of a DSN recipient field: type prefix removed, quotes kept, encoded-words decoded."""
    text = mime.decode_words(strip_type(value)).strip()
    if text.startswith("<") and ">" in text:
        text = text[1 : text.index(">")]
    text = text.strip().strip("<>").strip()
    return text if "@" in text and len(text) <= 320 else None


def strip_type(value: str) -> str:
    """A DSN field without its type prefix (``smtp; 550 …`` -> ``550 …``)."""
    return _TYPE_PREFIX_RE.sub("", value, count=1).strip()


def clean_reason(text: str) -> str:
    """One line; multi-line SMTP replies lose their repeated ``550-5.1.1`` prefixes."""
    text = _SPACE_RE.sub(" ", text).strip()
    seen: set[tuple[str, str]] = set()

    def drop_repeat(match: re.Match[str]) -> str:
        key = (match.group(1), match.group(2))
        if key in seen:
            return ""
        seen.add(key)
        return match.group(0)

    text = _CONTINUATION_RE.sub(drop_repeat, text)
    return text[:MAX_REASON]


def find_status(text: str) -> str | None:
    """The first enhanced status code (``5.1.1``) in ``text``."""
    match = _STATUS_RE.search(text)
    return ".".join(match.groups()) if match else None


def find_ip(text: str) -> str | None:
    """The first IP literal (``[192.0.2.1]`` or a bare dotted quad) in ``text`` (a Remote-MTA)."""
    match = _IP_RE.search(text)
    return (match.group(1) or match.group(2)) if match else None


def host_ip(text: str) -> str | None:
    """The IP of the first ``host.name[192.0.2.1]`` in ``text`` (a remote server, not ours)."""
    match = _HOST_IP_RE.search(text)
    return match.group(1) if match else None
