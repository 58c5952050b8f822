"""The customer's own DKIM-Signature: kept only when our changes leave what it covers unchanged.

Sits in the Transformer between the last edit of the message (header edits, beacon, wire form)
and our own signing (:mod:`transformer.transform`).  A DKIM-Signature the customer sent covers
the header fields named in its ``h=`` and the body (up to ``l=`` octets), canonicalised by its
``c=``.  We replace Message-ID and List-Unsubscribe, remove X-Uuid, may encode headers and
re-encode body parts: a signature over any of that would reach the receiver broken and count
against the customer's domain.

So, per customer signature, the canonical form of every field it covers (instances chosen as a
verifier chooses them, RFC 6376 §5.4.2; a name we added where there was none counts as a
change) and of the body are compared before and after our edits.  Equal everywhere: the
signature still verifies as well as it did on arrival, and it is kept.  Otherwise it is
removed (logged at INFO by the handler with the uuid, counted in
``mailer_transformer_customer_signatures_total{outcome="removed"}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from transformer.message import CRLF, Field, RawMessage
from transformer.signer import relaxed_body, relaxed_header

_WSP: Final = re.compile(r"\s+")


@dataclass(frozen=True)
class Snapshot:
    """The message as the customer sent it (fields and body), taken before any edit."""

    fields: tuple[Field, ...]
    body: bytes

    @classmethod
    def of(cls, message: RawMessage) -> Snapshot:
        """Snapshot ``message`` (cheap: fields are never changed in place, bytes are immutable)."""
        return cls(tuple(message.fields), message.body)


@dataclass(frozen=True)
class Verdict:
    """What happened to one customer signature."""

    domain: str
    kept: bool
    reason: str


def review(before: Snapshot, message: RawMessage) -> list[Verdict]:
    """Keep or remove each customer DKIM-Signature of ``message`` (edited, not yet signed by us)."""
    verdicts: list[Verdict] = []
    removed: list[Field] = []
    for f in message.fields:
        if f.key != "dkim-signature":
            continue
        tags = signature_tags(f.raw)
        domain = tags.get("d", "?")
        reason = _change(tags, before, message)
        verdicts.append(Verdict(domain, reason is None, reason or "nothing it covers changed"))
        if reason is not None:
            removed.append(f)
    if removed:
        message.fields = [f for f in message.fields if not any(f is r for r in removed)]
    return verdicts


def signature_tags(raw: bytes) -> dict[str, str]:
    """The tags of a DKIM-Signature field (white space removed from every value)."""
    value = raw.partition(b":")[2].decode("ascii", "replace")
    tags: dict[str, str] = {}
    for item in value.split(";"):
        name, eq, tag_value = item.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), _WSP.sub("", tag_value))
    return tags


def _change(tags: dict[str, str], before: Snapshot, message: RawMessage) -> str | None:
    """What our edits changed among what a signature with ``tags`` covers; None when nothing."""
    header_c, _, body_c = tags.get("c", "simple/simple").lower().partition("/")
    body_c = body_c or "simple"
    names = [n.strip().lower() for n in tags.get("h", "").split(":") if n.strip()]
    old = _covered(before.fields, names, header_c)
    new = _covered(tuple(message.fields), names, header_c)
    for name, old_value, new_value in zip(names, old, new, strict=True):
        if old_value != new_value:
            return f"header {name} changed"
    limit = tags.get("l")
    old_body = _body(before.body, body_c, limit)
    if old_body is None or old_body != _body(message.body, body_c, limit):
        return "body changed"
    return None


def _covered(fields: tuple[Field, ...], names: list[str], canon: str) -> list[bytes | None]:
    """Canonical field for each name of ``h=``: instances bottom-up, None when none is left."""
    by_name: dict[str, list[bytes]] = {}
    for f in fields:
        by_name.setdefault(f.key, []).append(f.raw)
    out: list[bytes | None] = []
    for name in names:
        instances = by_name.get(name)
        raw = instances.pop() if instances else None
        out.append(None if raw is None else (relaxed_header(raw) if canon == "relaxed" else raw))
    return out


def _body(body: bytes, canon: str, limit: str | None) -> bytes | None:
    """The canonical body (truncated to ``l=``); None for an ``l=`` that is not a number."""
    if canon == "relaxed":
        data = relaxed_body(body)
    else:  # simple: trailing empty lines removed, at least one CRLF (RFC 6376 §3.4.3)
        data = body
        while data.endswith(CRLF + CRLF):
            data = data[:-2]
        if not data.endswith(CRLF):
            data += CRLF
    if limit is None:
        return data
    if not limit.isdigit():
        return None
    return data[: int(limit)]
