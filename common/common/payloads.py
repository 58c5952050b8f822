"""Typed payloads of the mail streams (style anchor C6); encoding lives here and nowhere else.

``SubmittedMail`` travels Receiver/HttpReceiver -> Transformer on the P0/P1 streams;
``OutboundMail`` travels Transformer -> PostfixLog on ``INCOMING-TO-POSTFIX``.  The envelope
is in stream fields, never in headers of the message, so nothing internal can leak into
delivered mail.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.errors import PermanentError

Fields = dict[str, bytes | str]
RawFields = Mapping[bytes, bytes]

VERSION = "1"


def _text(fields: RawFields, name: str, *, required: bool = True) -> str | None:
    value = fields.get(name.encode())
    if value is None:
        if required:
            raise PermanentError(f"queue entry has no {name!r} field")
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise PermanentError(f"queue entry field {name!r} is not UTF-8") from None


def _float(fields: RawFields, name: str) -> float:
    text = _text(fields, name)
    try:
        return float(text or "0")
    except ValueError:
        raise PermanentError(f"queue entry field {name!r} is not a number") from None


@dataclass(frozen=True)
class SubmittedMail:
    """One message exactly as a client submitted it (``raw`` is byte-identical)."""

    raw: bytes
    uuid: str
    priority: int
    via: str
    submitted_at: float

    def to_fields(self) -> Fields:
        """Stream fields of this entry."""
        return {
            "v": VERSION,
            "raw": self.raw,
            "uuid": self.uuid,
            "priority": str(self.priority),
            "via": self.via,
            "ts": repr(self.submitted_at),
        }

    @classmethod
    def from_fields(cls, fields: RawFields) -> SubmittedMail:
        """Decode a stream entry.

        Raises:
            PermanentError: the entry is malformed.
        """
        raw = fields.get(b"raw")
        if raw is None:
            raise PermanentError("queue entry has no 'raw' field")
        priority_text = _text(fields, "priority", required=False) or "1"
        if priority_text not in ("0", "1"):
            raise PermanentError(f"queue entry has priority {priority_text!r}")
        return cls(
            raw=raw,
            uuid=_text(fields, "uuid") or "",
            priority=int(priority_text),
            via=_text(fields, "via", required=False) or "unknown",
            submitted_at=_float(fields, "ts"),
        )


@dataclass(frozen=True)
class OutboundMail:
    """A transformed, signed message and its envelope, ready for Postfix."""

    raw: bytes
    uuid: str
    mail_from: str
    recipients: tuple[str, ...]
    from_domain: str
    stream_id: str | None = None
    submitted_at: float = 0.0
    meta: Mapping[str, str] = field(default_factory=dict)

    def to_fields(self) -> Fields:
        """Stream fields of this entry."""
        fields: Fields = {
            "v": VERSION,
            "raw": self.raw,
            "uuid": self.uuid,
            "mail_from": self.mail_from,
            "rcpts": json.dumps(list(self.recipients)),
            "from_domain": self.from_domain,
            "ts": repr(self.submitted_at),
        }
        if self.stream_id is not None:
            fields["stream_id"] = self.stream_id
        if self.meta:
            fields["meta"] = json.dumps(dict(self.meta), sort_keys=True)
        return fields

    @classmethod
    def from_fields(cls, fields: RawFields) -> OutboundMail:
        """Decode a stream entry.

        Raises:
            PermanentError: the entry is malformed.
        """
        raw = fields.get(b"raw")
        if raw is None:
            raise PermanentError("queue entry has no 'raw' field")
        try:
            rcpts = json.loads(_text(fields, "rcpts") or "[]")
            meta = json.loads(_text(fields, "meta", required=False) or "{}")
        except json.JSONDecodeError as exc:
            raise PermanentError(f"queue entry has malformed JSON: {exc}") from None
        if not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts):
            raise PermanentError("queue entry field 'rcpts' is not a list of addresses")
        if not isinstance(meta, dict):
            raise PermanentError("queue entry field 'meta' is not an object")
        return cls(
            raw=raw,
            uuid=_text(fields, "uuid") or "",
            mail_from=_text(fields, "mail_from") or "",
            recipients=tuple(rcpts),
            from_domain=_text(fields, "from_domain") or "",
            stream_id=_text(fields, "stream_id", required=False),
            submitted_at=_float(fields, "ts"),
            meta={str(k): str(v) for k, v in meta.items()},
        )
