"""Which sent message (uuid) a received report is about, and how sure we are.

Strongest first:

1. ``envelope``       -- the RCPT address is a genuine tagged bounce/unsubscribe address;
2. ``return-path``    -- a genuine tagged address inside the report (ARF ``Original-Mail-From``,
   the original's ``Return-Path`` or any of its headers, or the report text);
3. ``list-unsubscribe`` -- a genuine one-click token in the original's ``List-Unsubscribe``;
4. ``message-id``     -- the original's ``Message-ID`` is ours (``<uuid.suffix@return-path-domain>``,
   parsed by :func:`common.addressing.message_id_uuid`).  The
   uuid is in every sent message, so this one can be forged; it is only used for spam reports
   (the event says ``attribution: message-id``).

"Genuine" means the HMAC tag checks out (:class:`common.addressing.AddressSigner`) and the
domain is one of the configured return-path domains.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Final, Literal

from common.addressing import AddressSigner, Kind, message_id_uuid
from mxserver import mime

Source = Literal["envelope", "return-path", "list-unsubscribe", "message-id"]
VERIFIED: Final[frozenset[str]] = frozenset(("envelope", "return-path", "list-unsubscribe"))

_TAGGED_RE: Final = re.compile(r"(?:bounce|unsub)-[a-z0-9]{1,46}-[a-z2-7]{10}@[a-z0-9.-]{1,253}", re.I)
_TOKEN_RE: Final = re.compile(r"(?<![a-z0-9])[a-z0-9]{1,46}-[a-z2-7]{10}(?![a-z0-9])", re.I)


@dataclass(frozen=True)
class Attribution:
    """The uuid of the message a report is about, where it was found, and the address used."""

    uuid: str
    source: Source
    kind: Kind | None = None
    address: str | None = None

    @property
    def verified(self) -> bool:
        """True when the uuid was proven by an HMAC tag."""
        return self.source in VERIFIED


@dataclass(frozen=True)
class Attributor:
    """Finds uuids with the installation's signer and return-path domains."""

    signer: AddressSigner
    return_path_domains: frozenset[str]

    def tagged(self, address: str) -> tuple[Kind, str] | None:
        """(kind, uuid) of a genuine tagged address on one of our domains, else None."""
        addr = address.strip().strip("<>")
        domain = addr.rpartition("@")[2].lower().rstrip(".")
        if domain not in self.return_path_domains:
            return None
        return self.signer.parse_address(addr)

    def from_envelope(self, recipients: Sequence[str], kind: Kind | None = None) -> Attribution | None:
        """The first genuine tagged RCPT address (of ``kind`` when given)."""
        for rcpt in recipients:
            found = self.tagged(rcpt)
            if found is not None and (kind is None or found[0] == kind):
                return Attribution(found[1], "envelope", found[0], rcpt)
        return None

    def from_text(self, texts: Iterable[str]) -> Attribution | None:
        """The first genuine tagged address in any of ``texts`` (headers or report text)."""
        for text in texts:
            for match in _TAGGED_RE.finditer(text[: mime.MAX_TEXT]):
                found = self.tagged(match.group(0))
                if found is not None:
                    return Attribution(found[1], "return-path", found[0], match.group(0))
        return None

    def from_original(self, original: Message | None, *extra_texts: str) -> Attribution | None:
        """A verified uuid from a report's attached original and texts, else None."""
        texts = list(extra_texts)
        if original is not None:
            texts.insert(0, mime.header(original, "Return-Path"))
            texts.append(mime.headers_text(original))
        found = self.from_text(texts)
        if found is not None or original is None:
            return found
        for value in mime.header_values(original, "List-Unsubscribe"):
            for match in _TOKEN_RE.finditer(value):
                uuid = self.signer.parse_token(match.group(0))
                if uuid is not None:
                    return Attribution(uuid, "list-unsubscribe", "unsub")
        return None

    def from_message_id(self, *messages: Message | None, names: Sequence[str] = ("Message-ID",)) -> Attribution | None:
        """The uuid of one of our Message-IDs in the named headers (unverified)."""
        for msg in messages:
            if msg is None:
                continue
            for name in names:
                for value in mime.header_values(msg, name):
                    uuid = message_id_uuid(value, self.return_path_domains)
                    if uuid is not None:
                        return Attribution(uuid, "message-id")
        return None
