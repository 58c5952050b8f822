"""Who the MX accepts mail for (RCPT TO): never a relay, only addresses this installation owns.

Accepted:

* genuine tagged bounce and unsubscribe addresses on a configured return-path domain;
* the configured abuse/FBL mailboxes (``mxserver.abuse``), whatever their domain;
* ``postmaster@<return-path domain>`` and the bare ``postmaster`` (RFC 5321 §4.5.1).

Refused with ``550 5.7.1``: any other domain (relaying), any other local part, and addresses
that have the tagged shape but a wrong tag (forged or damaged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from common.addressing import looks_tagged
from mxserver.attribution import Attributor

Reason = Literal["relay", "forged", "unknown"]
Accepted = Literal["bounce", "unsub", "abuse", "postmaster"]

#: RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients per message.
MAX_RECIPIENTS: Final = 100


@dataclass(frozen=True)
class Decision:
    """The answer to one RCPT TO."""

    reply: str
    accepted: Accepted | None = None
    refused: Reason | None = None


@dataclass(frozen=True)
class RecipientPolicy:
    """Applies the rules of the module docstring."""

    attributor: Attributor
    abuse_addresses: frozenset[str]

    def check(self, address: str) -> Decision:
        """Accept or refuse ``address`` (as given in RCPT TO, without angle brackets)."""
        addr = address.strip().strip("<>")
        lower = addr.lower()
        if lower == "postmaster":
            return Decision("250 2.1.5 OK", accepted="postmaster")
        if lower in self.abuse_addresses:
            return Decision("250 2.1.5 OK", accepted="abuse")
        local, _, domain = lower.rpartition("@")
        if domain.rstrip(".") not in self.attributor.return_path_domains:
            return Decision(f"550 5.7.1 <{addr}>: Relay access denied", refused="relay")
        if local == "postmaster":
            return Decision("250 2.1.5 OK", accepted="postmaster")
        if looks_tagged(lower):
            found = self.attributor.tagged(lower)
            if found is None:
                return Decision(f"550 5.7.1 <{addr}>: Invalid address tag", refused="forged")
            return Decision("250 2.1.5 OK", accepted=found[0])
        return Decision(f"550 5.7.1 <{addr}>: No such address here", refused="unknown")
