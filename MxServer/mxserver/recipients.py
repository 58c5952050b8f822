"""Who the MX accepts mail for (RCPT TO): never a relay, only addresses this installation owns.

Accepted:

* tagged bounce and unsubscribe addresses (``bounce-U-T@`` / ``unsub-U-T@``) on a configured
  return-path domain -- unless the Transformer's record of uuid ``U`` exists and none of its
  recipients is the one the tag ``T`` is bound to (then the tag is forged or damaged, and the
  address is refused).  Without a record (expired, or Redis unreachable) the address is
  accepted and the mail's own content decides at DATA (:mod:`mxserver.verification`);
* the configured abuse/FBL mailboxes (``mxserver.abuse``), whatever their domain;
* ``postmaster@<return-path domain>`` and the bare ``postmaster`` (RFC 5321 §4.5.1).

Refused: any other domain (``550 5.7.1`` relaying denied), any other local part of a
return-path domain (``550 5.1.1``), and tagged addresses whose tag does not verify against the
record (``550 5.7.1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from common import smtpreplies as replies
from common.addressing import AddressSigner, Tagged, parse_address
from common.binding import Sent, resolve

Reason = Literal["relay", "forged", "unknown"]
Accepted = Literal["bounce", "unsub", "abuse", "postmaster"]

#: RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
MAX_RECIPIENTS: Final = 100


@dataclass(frozen=True)
class Decision:
    """The answer to one RCPT TO (before the record check of a tagged address)."""

    reply: str
    accepted: Accepted | None = None
    refused: Reason | None = None
    #: The tagged parts, for an address that still needs its record checked.
    tagged: Tagged | None = None


@dataclass(frozen=True)
class RecipientPolicy:
    """Applies the rules of the module docstring."""

    signer: AddressSigner
    return_path_domains: frozenset[str]
    abuse_addresses: frozenset[str]

    def check(self, address: str) -> Decision:
        """Accept or refuse ``address`` by its shape (as given in RCPT TO, without angle brackets)."""
        addr = address.strip().strip("<>")
        lower = addr.lower()
        if lower == "postmaster":
            return Decision(replies.MX_RECIPIENT_OK, accepted="postmaster")
        if lower in self.abuse_addresses:
            return Decision(replies.MX_RECIPIENT_OK, accepted="abuse")
        local, _, domain = lower.rpartition("@")
        if domain.rstrip(".") not in self.return_path_domains:
            return Decision(replies.mx_relay_denied(addr), refused="relay")
        if local == "postmaster":
            return Decision(replies.MX_RECIPIENT_OK, accepted="postmaster")
        tagged = parse_address(lower)
        if tagged is not None:
            kind: Accepted = "bounce" if tagged.kind == "bounce" else "unsub"
            return Decision(replies.MX_RECIPIENT_OK, accepted=kind, tagged=tagged)
        return Decision(replies.mx_unknown_address(addr), refused="unknown")

    def check_record(self, address: str, decision: Decision, record: Sequence[Sent]) -> Decision:
        """A tagged address against the record of its uuid (an empty record: no verdict yet)."""
        if decision.tagged is None or not record:
            return decision
        if resolve(self.signer, decision.tagged, record) is None:
            return Decision(replies.mx_invalid_tag(address.strip().strip("<>")), refused="forged")
        return decision
