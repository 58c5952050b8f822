"""RFC 3464 delivery status notifications: one :class:`Failure` per failed or delayed recipient.

A DSN is ``multipart/report; report-type=delivery-status`` whose ``message/delivery-status``
part (``message/global-delivery-status`` for RFC 6533) holds one per-message block and one block
per recipient::

    Reporting-MTA: dns; mx.example.org

    Final-Recipient: rfc822; jane@example.org
    Action: failed
    Status: 5.1.1
    Remote-MTA: dns; mx1.example.org
    Diagnostic-Code: smtp; 550 5.1.1 <jane@example.org>: Recipient address rejected: User unknown

``Action: failed`` becomes a bounce, ``Action: delayed`` a deferral; ``delivered``, ``relayed``
and ``expanded`` are not failures and are skipped.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from email.message import Message
from typing import Final, Literal

from mxserver import mime

Action = Literal["failed", "delayed"]

STATUS_TYPES: Final = frozenset(("message/delivery-status", "message/global-delivery-status"))

_STATUS_RE: Final = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_TYPE_PREFIX_RE: Final = re.compile(r"^\s*[A-Za-z][A-Za-z0-9-]{0,30}\s*;\s*")
_IP_RE: Final = re.compile(r"\[(?:IPv6:)?([0-9a-fA-F:.]{3,45})\]|(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
_HOST_IP_RE: Final = re.compile(
    r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,10}\.?\s?\[(?:IPv6:)?([0-9a-fA-F:.]{3,45})\]"
)
_CONTINUATION_RE: Final = re.compile(r"(?<![\w.-])([245]\d\d)[- ]([245]\.\d{1,3}\.\d{1,3})[ \t]+")
_SPACE_RE: Final = re.compile(r"\s+")
MAX_REASON: Final = 1000


@dataclass(frozen=True)
class Failure:
    """One recipient that was not delivered (or not yet)."""

    recipient: str | None
    action: Action
    status: str | None
    diagnostic: str
    remote_mta: str | None = None
    ip: str | None = None
    #: Final-Recipient when it differs from ``recipient`` (an alias or list expanded on the way).
    final_recipient: str | None = None


def is_dsn(msg: Message) -> bool:
    """True for a delivery status notification (by report type or by its status part)."""
    if mime.content_type(msg) == "multipart/report" and mime.param(msg, "report-type") in (
        "delivery-status",
        "global-delivery-status",
    ):
        return True
    return mime.find_part(msg, STATUS_TYPES) is not None


def status_blocks(part: Message) -> list[dict[str, str]]:
    """The field blocks of a delivery-status (or feedback-report) part, field names lower-cased."""
    payload = part.get_payload()
    cte = mime.header(part, "Content-Transfer-Encoding").lower()
    if isinstance(payload, list) and cte not in ("base64", "quoted-printable"):
        blocks = []
        for block in payload:
            if not isinstance(block, Message):
                continue
            blocks.append(_fields(block))
            # Only message/delivery-status is split into blocks by the parser; other types
            # (message/global-delivery-status) arrive as one "message" whose body holds the rest.
            rest = mime.payload_bytes(block) if isinstance(block.get_payload(), str) else b""
            if rest.strip():
                blocks.extend(_text_blocks(rest.decode("utf-8", "replace")))
        return blocks
    text = mime.payload_bytes(part).decode("utf-8", "replace")
    if cte == "base64" and isinstance(payload, list):
        # The parser split base64 text into "blocks"; undo that and decode.
        letters = re.sub(r"[^A-Za-z0-9+/=]", "", text)
        try:
            text = base64.b64decode(letters + "=" * (-len(letters) % 4)).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return []
    return _text_blocks(text)


def _text_blocks(text: str) -> list[dict[str, str]]:
    text = text.replace("\r\n", "\n")[: mime.MAX_TEXT]
    return [_fields(mime.parse_headers(b + "\n")) for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


def _fields(block: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in block.keys():  # noqa: SIM118 -- Message is not a dict; keys() keeps duplicates
        key = name.strip().lower()
        if key not in out:
            out[key] = mime.header(block, name)
    return out


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


def parse(msg: Message) -> list[Failure] | None:
    """Failures of a DSN; None when ``msg`` has no delivery-status part."""
    part = mime.find_part(msg, STATUS_TYPES)
    if part is None:
        return None
    failures: list[Failure] = []
    for block in status_blocks(part):
        if "action" not in block and "final-recipient" not in block:
            continue  # the per-message block
        action_words = block.get("action", "").lower().split()
        action = action_words[0] if action_words else ""
        status = find_status(block.get("status", ""))
        if action not in ("failed", "delayed"):
            # A missing Action with a failure status still means failed (sloppy MTAs).
            if action or status is None or status[0] == "2":
                continue
            action = "failed" if status[0] == "5" else "delayed"
        final = mime.first_address(strip_type(block.get("final-recipient", "")))
        recipient = mime.first_address(strip_type(block.get("original-recipient", ""))) or final
        diagnostic = clean_reason(strip_type(block.get("diagnostic-code", "")))
        remote = strip_type(block.get("remote-mta", "")) or None
        failures.append(
            Failure(
                recipient=recipient,
                action="failed" if action == "failed" else "delayed",
                status=status,
                diagnostic=diagnostic,
                remote_mta=remote,
                ip=find_ip(remote or "") or host_ip(diagnostic),
                final_recipient=final if final and recipient and final.lower() != recipient.lower() else None,
            )
        )
    return failures
