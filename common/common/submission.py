"""Validation of submitted messages, shared by Receiver (SMTP) and HttpReceiver (HTTP).

A message is accepted only when (DESIGN §4):

* it has exactly one ``From`` address and its domain is in ``transformer.domain-settings``;
* ``X-Uuid`` is present once and matches ``[a-z0-9]+`` (at most 46 characters, so the tagged
  return path fits RFC 5321's 64-octet local part);
* ``X-Priority`` is absent, ``0`` or ``1``;
* ``To``/``Cc`` hold at least one syntactically valid address.

Each failed rule is a :class:`Rejection` carrying the SMTP reply and the HTTP answer, so both
receivers say exactly which rule failed.  Only the header block is parsed; the body is queued
byte for byte.
"""

from __future__ import annotations

import email.parser
import email.policy
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from typing import Final

from common.addressing import MAX_UUID_LENGTH, valid_uuid

_ADDRESS_RE: Final = re.compile(r"^[^@\s<>,;]+@(?:[^@\s<>,;.]+\.)+[^@\s<>,;.]+$")
_PARSER: Final = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_HEADER_END: Final = re.compile(rb"\n\r?\n")


class Rejection(Exception):
    """A submitted message broke a rule; carries the SMTP and HTTP answers."""

    def __init__(self, rule: str, message: str, *, smtp_code: int = 554, status: str = "5.6.0") -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.smtp_code = smtp_code
        self.status = status

    @property
    def smtp_reply(self) -> str:
        """The full SMTP reply line, e.g. ``550 5.7.1 From domain x.test is not configured``."""
        return f"{self.smtp_code} {self.status} {self.message}"

    @property
    def http_status(self) -> int:
        """HTTP status for the same problem."""
        return 400


@dataclass(frozen=True)
class Submission:
    """What the receivers learn from a valid message's headers."""

    uuid: str
    priority: int
    from_address: str
    from_domain: str
    recipients: tuple[str, ...]
    stream_id: str | None


def parse_headers(raw: bytes) -> Message:
    """Parse only the header block of ``raw``.

    The parser is handed the bytes up to the first empty line: it would otherwise split the
    whole body into lines just to skip them (most of the CPU of a 10 KB submission).
    """
    if raw.startswith((b"\n", b"\r\n")):
        return _PARSER.parsebytes(b"", headersonly=True)
    end = _HEADER_END.search(raw)
    return _PARSER.parsebytes(raw if end is None else raw[: end.end()], headersonly=True)


def _single(msg: Message, name: str) -> str | None:
    values = msg.get_all(name) or []
    if len(values) > 1 and len({str(v).strip() for v in values}) > 1:
        raise Rejection(f"{name.lower()}-repeated", f"{name} header appears {len(values)} times with different values")
    return str(values[0]).strip() if values else None


def valid_address(address: str) -> bool:
    """Syntax check of a bare ``local@domain`` address (no DNS)."""
    return len(address) <= 254 and _ADDRESS_RE.match(address) is not None


def recipients(msg: Message) -> tuple[str, ...]:
    """Distinct valid addresses of the To and Cc headers, in order."""
    fields = [str(v) for name in ("To", "Cc") for v in (msg.get_all(name) or [])]
    seen: dict[str, None] = {}
    for _, address in getaddresses(fields):
        address = address.strip()
        if valid_address(address) and address.lower() not in {a.lower() for a in seen}:
            seen[address] = None
    return tuple(seen)


def validate(raw: bytes, is_configured_domain: Callable[[str], bool]) -> Submission:
    """Check a submitted message against the rules above.

    Raises:
        Rejection: the first rule the message breaks.
    """
    if not raw.strip():
        raise Rejection("empty", "the message is empty")
    msg = parse_headers(raw)
    if msg.defects and not msg.keys():
        raise Rejection("headers", "the message has no parsable header block")

    uuid = _single(msg, "X-Uuid")
    if uuid is None:
        raise Rejection("x-uuid-missing", "X-Uuid header is missing")
    if not valid_uuid(uuid):
        raise Rejection(
            "x-uuid-malformed",
            f"X-Uuid must match [a-z0-9]+ with at most {MAX_UUID_LENGTH} characters",
        )

    priority_text = _single(msg, "X-Priority")
    if priority_text is None or priority_text == "1":
        priority = 1
    elif priority_text == "0":
        priority = 0
    else:
        raise Rejection("x-priority", "X-Priority must be 0 (priority queue) or 1 (default queue)")

    from_fields = msg.get_all("From") or []
    from_addresses = [a for _, a in getaddresses([str(v) for v in from_fields]) if a]
    if not from_addresses:
        raise Rejection("from-missing", "From header is missing or has no address", smtp_code=550, status="5.1.7")
    if len(from_addresses) > 1:
        raise Rejection("from-multiple", "From header must hold exactly one address", smtp_code=550, status="5.1.7")
    from_address = from_addresses[0].strip()
    if not valid_address(from_address):
        raise Rejection("from-malformed", "From address is not valid", smtp_code=550, status="5.1.7")
    from_domain = from_address.rpartition("@")[2].lower().rstrip(".")
    if not is_configured_domain(from_domain):
        raise Rejection(
            "from-domain",
            f"From domain {from_domain} is not configured for sending (transformer.domain-settings)",
            smtp_code=550,
            status="5.7.1",
        )

    rcpts = recipients(msg)
    if not rcpts:
        raise Rejection("no-recipients", "To and Cc hold no valid recipient address", smtp_code=554, status="5.1.3")

    stream_id = _single(msg, "X-Stream-Id")
    return Submission(
        uuid=uuid,
        priority=priority,
        from_address=from_address,
        from_domain=from_domain,
        recipients=rcpts,
        stream_id=stream_id or None,
    )
