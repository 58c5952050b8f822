"""Amazon SES notifications that arrive by mail: bounces, complaints and delivery delays as JSON.

Part of the pure classification phase (:mod:`mxserver.analysis`).  A customer who also sends
through Amazon SES (or relays through it) may point SES' notifications at our MX, either
directly or through an SNS "email" subscription.  The body is JSON -- the notification itself,
or an SNS envelope whose ``Message`` is the notification as an escaped string -- possibly
followed by SNS' plain-text footer::

    {"notificationType": "Bounce",
     "bounce": {"bounceType": "Permanent", "bouncedRecipients": [{"emailAddress": "a@example.org",
                "action": "failed", "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 …"}]},
     "mail": {"source": "bounce-…@bounces.example.com", "headers": [{"name": "Message-ID", …}]}}

``Bounce`` and ``Complaint`` notifications (``notificationType``) and ``Bounce``,
``Complaint`` and ``DeliveryDelay`` events (``eventType``, SES event publishing) are read.  The
addresses they name are information: the tags in ``mail.source`` and ``mail.headers`` say which
of our messages, and recipient, it is about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.message import Message
from typing import Any, Final

from mxserver import mime

#: Characters of body text read as JSON (a notification is a few KB).
MAX_JSON: Final = 256 * 1024


@dataclass(frozen=True)
class Recipient:
    """One recipient of a notification."""

    address: str | None
    status: str | None = None
    diagnostic: str = ""
    action: str | None = None


@dataclass(frozen=True)
class Notification:
    """One SES notification."""

    kind: str  # "bounce", "complaint" or "delay"
    recipients: tuple[Recipient, ...]
    #: bounceType Permanent/Transient (bounces), complaintFeedbackType (complaints).
    permanent: bool | None = None
    subtype: str = ""
    feedback_type: str = "abuse"


def parse(msg: Message) -> Notification | None:
    """The SES notification in ``msg``'s body; None when there is none."""
    if mime.content_type(msg) not in ("text/plain", "application/json"):
        return None
    text = mime.part_text(msg)[:MAX_JSON]
    data = _json(text)
    if data is None:
        return None
    if isinstance(data.get("Message"), str) and data.get("Type") == "Notification":
        data = _json(data["Message"])
        if data is None:
            return None
    return _notification(data)


def _json(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0 or text[:start].strip():
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _notification(data: dict[str, Any]) -> Notification | None:
    kind = str(data.get("notificationType") or data.get("eventType") or "")
    if kind == "Bounce":
        bounce = _dict(data.get("bounce"))
        bounce_type = str(bounce.get("bounceType", ""))
        recipients = tuple(_recipient(r) for r in _list(bounce.get("bouncedRecipients")))
        permanent = {"Permanent": True, "Transient": False}.get(bounce_type)
        return Notification("bounce", recipients, permanent, str(bounce.get("bounceSubType", "")))
    if kind == "Complaint":
        complaint = _dict(data.get("complaint"))
        recipients = tuple(_recipient(r) for r in _list(complaint.get("complainedRecipients")))
        feedback = str(complaint.get("complaintFeedbackType") or "abuse").lower()
        return Notification("complaint", recipients, feedback_type=feedback)
    if kind == "DeliveryDelay":
        delay = _dict(data.get("deliveryDelay"))
        recipients = tuple(_recipient(r) for r in _list(delay.get("delayedRecipients")))
        return Notification("delay", recipients, False, str(delay.get("delayType", "")))
    return None


def _recipient(item: Any) -> Recipient:
    entry = _dict(item)
    address = entry.get("emailAddress")
    return Recipient(
        address=str(address).strip().strip("<>") if isinstance(address, str) and "@" in address else None,
        status=str(entry["status"]) if isinstance(entry.get("status"), str) else None,
        diagnostic=str(entry.get("diagnosticCode") or ""),
        action=str(entry["action"]).lower() if isinstance(entry.get("action"), str) else None,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value[:200] if isinstance(value, list) else []
