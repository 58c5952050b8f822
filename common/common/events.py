"""The event record every service emits and BackData posts to the customer's webhook.

Shape (DESIGN §5): the original's fields -- ``event``, ``uuid``, ``timestamp``, ``ip``,
``reason``, ``type`` (hard|soft|unroutable|autoreply), ``email`` (spam-report), ``msg`` and
``service`` (error) -- plus ``event_id``, ``recipient``, ``stream_id``, ``status`` (enhanced
status code), ``classification`` (see :mod:`common.bounces`) and ``suppress``; ``suppressed``
(the Transformer did not send to a recipient on the suppression list, :mod:`common.suppression`)
carries ``reason`` (the list's reason), ``since`` and ``scope``.

Every field of every type is published as a JSON Schema (``common/common/contracts/``); the
tests hold every event the stack produces to it.

``fd`` (the From domain) is internal: BackData uses it for the bounce manager and strips it,
with every other name in :data:`INTERNAL_FIELDS`, before posting.

Event queue entries carry the JSON in one field, ``data``.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from common.bounces import BounceType
from common.errors import PermanentError

EventKind = Literal["delivered", "bounce", "deferred", "unsubscribe", "spam-report", "error", "suppressed"]
EVENT_KINDS: Final[frozenset[str]] = frozenset(
    ("delivered", "bounce", "deferred", "unsubscribe", "spam-report", "error", "suppressed")
)

#: Fields that never reach the customer.
INTERNAL_FIELDS: Final = frozenset(("fd", "rcpt"))

#: The published JSON Schema of every event type (one ``oneOf`` over ``$defs.<type>``).
SCHEMA_PATH: Final = Path(__file__).with_name("contracts") / "events.schema.json"


def make_event_id(*parts: str) -> str:
    """A stable id: the same parts give the same id, so a re-emitted event can be de-duplicated.

    Without parts a random id is returned (for events that can only be produced once).
    """
    if not parts:
        return uuidlib.uuid4().hex
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    return digest[:32]


@dataclass(frozen=True)
class Event:
    """One event; fields that are None are omitted from the JSON (``uuid`` is always present)."""

    event: EventKind
    uuid: str | None
    event_id: str = field(default_factory=make_event_id)
    timestamp: int = field(default_factory=lambda: int(time.time()))
    recipient: str | None = None
    stream_id: str | None = None
    ip: str | None = None
    type: BounceType | None = None
    reason: str | None = None
    status: str | None = None
    classification: str | None = None
    suppress: bool | None = None
    email: str | None = None
    msg: str | None = None
    service: str | None = None
    fd: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The full record, internal fields included (what travels on the event queue)."""
        out: dict[str, Any] = {"event": self.event, "event_id": self.event_id, "uuid": self.uuid}
        for name in (
            "timestamp",
            "recipient",
            "stream_id",
            "ip",
            "type",
            "reason",
            "status",
            "classification",
            "suppress",
            "email",
            "msg",
            "service",
            "fd",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def to_json(self) -> bytes:
        """Compact JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    def to_fields(self) -> dict[str, bytes | str]:
        """Event-queue entry fields."""
        return {"data": self.to_json()}


def public(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as the customer sees it: internal fields removed."""
    return {k: v for k, v in record.items() if k not in INTERNAL_FIELDS}


def decode_event(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """The event record of an event-queue entry.

    Raises:
        PermanentError: the entry is not a JSON object with an ``event`` field.
    """
    data = fields.get(b"data")
    if data is None:
        raise PermanentError("event entry has no 'data' field")
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PermanentError(f"event entry is not JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        raise PermanentError("event entry is not an object with an 'event' field")
    return record


def error_event(service: str, msg: str, *, uuid: str | None = None, **extra: Any) -> Event:
    """An ``error`` event (the original's shape: ``msg``, ``service``, ``uuid``)."""
    return Event(event="error", uuid=uuid, service=service, msg=msg, extra=extra)
