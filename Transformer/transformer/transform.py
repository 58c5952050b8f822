"""Turn one submitted message into a signed outbound message and its envelope.

Per message (DESIGN §4), parsing it once:

1. the From domain selects the domain profile (key, selector, return-path domain);
2. routing and internal headers are removed: ``X-Uuid``, ``X-Stream-Id``, ``X-Priority``,
   ``X-ReturnPathIb``, ``X-RecipientIb`` (the original's), ``Bcc`` (never delivered, must not
   be shown to the other recipients) and ``Return-Path`` (written by the final MTA);
3. ``Date`` is added when absent (a client's Date is kept); ``X-Mailer``, ``Feedback-ID`` and
   ``email-headers.inject`` headers are added, replacing any the client sent;
4. the beacon goes into every text/html part (when the domain has a ``beacon-url``);
5. the wire form is decided (:mod:`transformer.wire`): 8-bit parts and long lines re-encoded,
   raw UTF-8 headers encoded, so no MTA after us changes a byte;
6. then, for each recipient of To/Cc, one copy: its own ``Message-ID`` (``<uuid.tag.suffix@
   return-path-domain>``), ``List-Unsubscribe`` (https one-click URL when configured, plus the
   tagged mailto) and, with the https URL, ``List-Unsubscribe-Post``, its own return path; the
   customer's own DKIM-Signature stays only if our edits left what it covers unchanged
   (:mod:`transformer.customersig`); our DKIM signatures are added last (the body hash is
   computed once).  Every tag is bound to (uuid, recipient) (:mod:`common.addressing`), so a
   report about one copy names exactly one recipient.

The envelope -- tagged return path, the recipient, uuid, stream id, priority and whether the
message needs SMTPUTF8 (``meta["smtputf8"] == "yes"``) -- travels in the
:class:`~common.payloads.OutboundMail` fields, never in headers.  With the copies goes the
record of who the message was sent to (:func:`common.binding.record_write`), in the same
MULTI/EXEC.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime
from typing import Final

from common import binding
from common.addressing import AddressSigner, valid_uuid
from common.errors import PermanentError
from common.payloads import OutboundMail, SubmittedMail
from common.queue import HashWrite
from common.submission import getaddresses, recipients
from transformer import beacon, customersig, wire
from transformer.message import MessageError, RawMessage
from transformer.settings import DomainProfile, Settings

log = logging.getLogger(__name__)

#: Removed from every message: routing headers and internal headers of the original.
INTERNAL_HEADERS: Final = ("x-uuid", "x-stream-id", "x-priority", "x-returnpathib", "x-recipientib")
#: Removed because they must not reach recipients or are written by the final MTA.
STRIPPED_HEADERS: Final = ("bcc", "return-path")
#: Replaced by the Transformer's own.
REPLACED_HEADERS: Final = ("message-id", "feedback-id", "list-unsubscribe", "list-unsubscribe-post")

_TOKEN: Final = re.compile(r"\{\{\s*token\s*\}\}")
_INJECT_PLACEHOLDER: Final = re.compile(r"\{\{\s*(uuid|stream-id|from-domain|return-path-domain)\s*\}\}")


def printable(text: str) -> str:
    """``text`` with undecodable bytes (kept as surrogates by the parser) shown as U+FFFD.

    Values that leave the message -- envelope fields, event texts -- must be valid UTF-8.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Unprocessable(PermanentError):
    """The message can never be sent as it is; carries what is known about it for the event."""

    def __init__(self, reason: str, *, uuid: str | None = None, stream_id: str | None = None) -> None:
        super().__init__(reason)
        self.uuid = uuid
        self.stream_id = stream_id


@dataclass(frozen=True)
class Transformed:
    """The signed copies of a message (one per recipient sent to) and what happened on the way."""

    mails: tuple[OutboundMail, ...]
    record: HashWrite
    warnings: tuple[str, ...]
    beacons: int
    sign_seconds: float
    wire_form: wire.WireReport = field(default_factory=wire.WireReport)
    customer_signatures: tuple[customersig.Verdict, ...] = ()
    uuid: str = ""
    stream_id: str | None = None
    from_domain: str = ""

    @property
    def mail(self) -> OutboundMail:
        """The first recipient's copy (there is none when every recipient was suppressed).

        Raises:
            IndexError: no copy was made.
        """
        return self.mails[0]


@dataclass(frozen=True)
class Prepared:
    """A parsed and edited message before its per-recipient copies are signed."""

    submitted: SubmittedMail
    msg: RawMessage
    as_sent: customersig.Snapshot
    profile: DomainProfile
    uuid: str
    stream_id: str | None
    recipients: tuple[str, ...]
    warnings: tuple[str, ...]
    beacons: int
    wire_form: wire.WireReport


class MessageTransformer:
    """Applies :mod:`transformer.transform`'s steps with one configuration."""

    def __init__(
        self,
        settings: Settings,
        addresses: AddressSigner,
        clock: Callable[[], float] = time.time,
        *,
        binding_ttl_s: int = 30 * 86400,
        nonce: Callable[[], bytes] | None = None,
    ):
        self.settings = settings
        self.addresses = addresses
        self.clock = clock
        self.binding_ttl_s = binding_ttl_s
        #: Random part of each Message-ID (None: fresh random bytes; fixed by the golden tests).
        self.nonce = nonce
        removed = [*INTERNAL_HEADERS, *STRIPPED_HEADERS, *REPLACED_HEADERS]
        removed.extend(name.lower() for name, _ in settings.inject)
        if settings.x_mailer is not None:
            removed.append("x-mailer")
        self._removed = frozenset(removed)

    def transform(self, submitted: SubmittedMail) -> Transformed:
        """Transform and sign one message: a copy for every recipient.

        Raises:
            Unprocessable: see :meth:`prepare`.
        """
        return self.sign(self.prepare(submitted))

    def prepare(self, submitted: SubmittedMail) -> Prepared:
        """Every step but the per-recipient copies (so the caller can check its recipients first).

        Raises:
            Unprocessable: the message cannot be parsed, has no usable X-Uuid, From address,
                configured From domain or recipient, or no wire form that survives every hop.
        """
        fallback_uuid = submitted.uuid if valid_uuid(submitted.uuid) else None
        try:
            msg = RawMessage.parse(submitted.raw)
        except MessageError as exc:
            raise Unprocessable(f"unparsable message: {exc}", uuid=fallback_uuid) from None
        as_sent = customersig.Snapshot.of(msg)
        uuid = msg.get("X-Uuid")
        stream_id = printable(msg.get("X-Stream-Id") or "") or None
        if uuid is None:
            raise Unprocessable("X-Uuid missing", uuid=fallback_uuid, stream_id=stream_id)
        if not valid_uuid(uuid):
            raise Unprocessable(
                "X-Uuid is not [a-z0-9]+ of at most 46 characters", uuid=fallback_uuid, stream_id=stream_id
            )
        profile = self._profile(msg, uuid, stream_id)
        # An address with bytes that are not UTF-8 cannot be delivered (nor encoded for Redis);
        # a non-ASCII domain travels as its A-label (wire.py writes the headers the same way).
        found = recipients(msg.header_message(("To", "Cc")))
        rcpts = tuple(dict.fromkeys(wire.ascii_domain(r) for r in found if printable(r) == r))
        if not rcpts:
            raise Unprocessable("To and Cc hold no valid recipient address", uuid=uuid, stream_id=stream_id)

        warnings = self._edit_headers(msg, profile, uuid, stream_id)
        beacons = 0
        if profile.beacon_url is not None:
            beacons = self._insert_beacon(msg, profile.beacon_url, uuid, stream_id, warnings)
        try:
            report = wire.make_wire_safe(msg)
        except wire.WireError as exc:
            raise Unprocessable(str(exc), uuid=uuid, stream_id=stream_id) from None
        return Prepared(submitted, msg, as_sent, profile, uuid, stream_id, rcpts, tuple(warnings), beacons, report)

    def sign(self, prepared: Prepared, skip: Container[str] = ()) -> Transformed:
        """The signed copies of a prepared message, for every recipient not in ``skip``."""
        msg, profile, uuid, stream_id = prepared.msg, prepared.profile, prepared.uuid, prepared.stream_id
        rcpts = tuple(r for r in prepared.recipients if r not in skip)
        started = time.perf_counter()
        copies = []
        if rcpts:
            body_hash = profile.signer.body_hash(msg.body)
            report = prepared.wire_form
            meta = {"priority": str(prepared.submitted.priority), **({"smtputf8": "yes"} if report.smtputf8 else {})}
            copies = [
                self._copy(msg, prepared.as_sent, profile, uuid, stream_id, rcpt, body_hash, prepared.submitted, meta)
                for rcpt in rcpts
            ]
        sign_seconds = time.perf_counter() - started
        record = binding.record_write(uuid, rcpts, stream_id, profile.domain, self.binding_ttl_s)
        mails = tuple(mail for mail, _ in copies)
        verdicts = copies[0][1] if copies else ()  # the same for every copy: they differ only in headers we write
        return Transformed(
            mails,
            record,
            prepared.warnings,
            prepared.beacons,
            sign_seconds,
            prepared.wire_form,
            verdicts,
            uuid=uuid,
            stream_id=stream_id,
            from_domain=profile.domain,
        )

    def _copy(
        self,
        msg: RawMessage,
        as_sent: customersig.Snapshot,
        profile: DomainProfile,
        uuid: str,
        stream_id: str | None,
        rcpt: str,
        body_hash: str,
        submitted: SubmittedMail,
        meta: dict[str, str],
    ) -> tuple[OutboundMail, tuple[customersig.Verdict, ...]]:
        """The copy for one recipient: its tagged headers, its signatures, its return path."""
        rp_domain = profile.return_path_domain
        copy = msg.copy()
        nonce = None if self.nonce is None else self.nonce()
        message_id = self.addresses.message_id(uuid, rcpt, rp_domain, now=self.clock(), nonce=nonce)
        # One word: never folded (a folded Message-ID confuses some receivers' parsers).
        copy.append_folded("Message-ID", message_id)
        unsubscribe = [f"<mailto:{self.addresses.unsubscribe_address(uuid, rcpt, rp_domain)}>"]
        if profile.unsubscribe_url is not None:
            token = self.addresses.unsubscribe_token(uuid, rcpt)
            unsubscribe.insert(0, "<" + _TOKEN.sub(token, profile.unsubscribe_url) + ">")
        copy.append("List-Unsubscribe", ", ".join(unsubscribe))
        if profile.unsubscribe_url is not None:
            copy.append("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
        verdicts = tuple(customersig.review(as_sent, copy))
        profile.signer.sign(copy, body_hash=body_hash)
        mail = OutboundMail(
            raw=copy.to_bytes(),
            uuid=uuid,
            mail_from=self.addresses.return_path(uuid, rcpt, rp_domain),
            recipients=(rcpt,),
            from_domain=profile.domain,
            stream_id=stream_id,
            submitted_at=submitted.submitted_at,
            meta=meta,
        )
        return mail, verdicts

    def _profile(self, msg: RawMessage, uuid: str, stream_id: str | None) -> DomainProfile:
        addresses = [a for _, a in getaddresses(msg.get_all("From")) if "@" in a]
        if not addresses:
            raise Unprocessable("From header is missing or has no address", uuid=uuid, stream_id=stream_id)
        domain = printable(addresses[0].rpartition("@")[2].strip().lower().rstrip("."))
        profile = self.settings.profiles.get(domain)
        if profile is None:
            raise Unprocessable(
                f"From domain {domain} is not configured (transformer.domain-settings)",
                uuid=uuid,
                stream_id=stream_id,
            )
        return profile

    def _edit_headers(self, msg: RawMessage, profile: DomainProfile, uuid: str, stream_id: str | None) -> list[str]:
        warnings: list[str] = []
        if msg.has("List-Unsubscribe"):
            warnings.append("replaced the client's List-Unsubscribe with the signed one")
        msg.remove(self._removed)
        rp_domain = profile.return_path_domain
        if not msg.has("Date"):
            msg.append("Date", format_datetime(datetime.fromtimestamp(self.clock(), UTC)))
        if self.settings.x_mailer is not None:
            msg.append("X-Mailer", self.settings.x_mailer)
        fb = self.settings.feedback
        campaign = stream_id or fb.campaign_id or ""
        msg.append("Feedback-ID", f"{campaign}:{uuid}:{fb.mail_type or ''}:{fb.sender_id or ''}")
        values = {"uuid": uuid, "stream-id": stream_id or "", "from-domain": rp_domain, "return-path-domain": rp_domain}
        for name, template in self.settings.inject:
            value = _INJECT_PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
            if value.isascii():
                msg.append(name, value)
            else:  # RFC 2047: raw UTF-8 in a header needs SMTPUTF8 end to end
                msg.append_folded(name, Header(value, "utf-8", header_name=name).encode(linesep="\r\n"))
        return warnings

    @staticmethod
    def _insert_beacon(msg: RawMessage, template: str, uuid: str, stream_id: str | None, warnings: list[str]) -> int:
        ctype = (msg.get("Content-Type") or "text/plain").lower()
        if not (ctype.startswith("multipart/") or ctype.startswith("text/html")):
            return 0
        tag = beacon.image_tag(beacon.beacon_url(template, uuid=uuid, stream_id=stream_id))
        result = beacon.insert_beacon(msg.fields, msg.body, tag)
        msg.body = result.body
        warnings.extend(result.warnings)
        return result.inserted
