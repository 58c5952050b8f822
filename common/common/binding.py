r"""Which recipient a report is about: the tag in it, and the platform's record of what it sent.

Every recipient copy the Transformer signs carries tags bound by HMAC to (uuid, recipient)
(:mod:`common.addressing`): its return path, unsubscribe address, one-click token and
Message-ID.  In the same MULTI/EXEC that hands the copies to PostfixLog the Transformer also
records who the message went to::

  IB:sent:<uuid>   HASH   recipient (as sent) -> "<stream id>\x1f<From domain>"
                          expires after ``common-config.binding-retention-days`` (default 30)

A report (bounce, spam report, unsubscribe) names a tag; :func:`resolve` finds the recipient
``R`` of the record for which ``HMAC(kind, uuid, R)`` equals the tag.  When the record has
expired, an address the report itself names is accepted only when its HMAC matches, so an old
genuine bounce still resolves, while a name an outsider writes into a report never does.  The
recipient of a customer event is always the bound one, never a name taken from the report.

Cost: one hash per message uuid, one field per recipient (``bench/transformer`` prints bytes
per recipient).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from common import keys
from common.addressing import AddressSigner, Kind, Tagged
from common.config import Config
from common.queue import HashWrite

#: Separator of the record value's parts (a character no address, stream id or domain holds).
SEP: Final = "\x1f"


@dataclass(frozen=True)
class Sent:
    """What the record says about one recipient of a message."""

    recipient: str
    stream_id: str | None
    from_domain: str | None


@dataclass(frozen=True)
class Binding:
    """A verified (uuid, recipient) and where the recipient came from (``record`` or ``report``)."""

    uuid: str
    recipient: str
    stream_id: str | None
    from_domain: str | None
    source: str


def record_write(
    uuid: str, recipients: Iterable[str], stream_id: str | None, from_domain: str, ttl_s: int
) -> HashWrite:
    """The write that records ``recipients`` of ``uuid`` (goes with the Transformer's hand-off)."""
    value = f"{stream_id or ''}{SEP}{from_domain}"
    return HashWrite(keys.sent_record(uuid), {recipient: value for recipient in recipients}, ttl_s)


def decode_record(raw: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]) -> list[Sent]:
    """The recipients of a record fetched with HGETALL."""
    out = []
    for name, value in raw.items():
        recipient = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        stream_id, _, from_domain = text.partition(SEP)
        out.append(Sent(recipient, stream_id or None, from_domain or None))
    return out


def retention_s(config: Config) -> int:
    """How long records are kept (``common-config.binding-retention-days``)."""
    return int(config.customer.common_config.binding_retention_days * 86400)


def resolve(signer: AddressSigner, tagged: Tagged, record: Iterable[Sent], named: Iterable[str] = ()) -> Binding | None:
    """The recipient ``tagged`` is bound to, or None when its tag verifies for nobody.

    ``record`` is what :func:`decode_record` read for ``tagged.uuid``; ``named`` are addresses
    the report names (used only when no recorded recipient matches, e.g. after the record
    expired, and only when their HMAC matches).
    """
    kind: Kind = tagged.kind
    for sent in record:
        if signer.verify(kind, tagged.uuid, tagged.tag, sent.recipient):
            return Binding(tagged.uuid, sent.recipient, sent.stream_id, sent.from_domain, "record")
    for address in named:
        if address and signer.verify(kind, tagged.uuid, tagged.tag, address):
            return Binding(tagged.uuid, address.strip().strip("<>"), None, None, "report")
    return None
