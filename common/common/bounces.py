"""Bounce classification shared by PostfixLog (Postfix' status lines) and MxServer (DSNs).

One fixed taxonomy (DESIGN §5), the ``classification`` field of ``bounce`` and ``deferred``
events:

====================  ===========================================================  ========
classification        meaning                                                      suppress
====================  ===========================================================  ========
user-unknown          the mailbox does not exist (5.1.1, 5.1.10, "no such user")   yes
mailbox-disabled      the mailbox exists but is disabled or inactive (5.2.1)       yes
moved                 the address moved, no forwarding (5.1.6)                     yes
host-unknown          the domain does not exist, has no MX or a null MX (5.1.2)    yes
mailbox-full          over quota (4.2.2 / 5.2.2)                                   no
message-too-large     over the receiver's size limit (5.3.4, 5.2.3)                no
blocked               sender IP or domain blocked: blocklists, reputation          no
spam-content          the content was judged spam, phishing or a virus             no
auth-failure          SPF, DKIM or DMARC failed (5.7.20-5.7.27)                    no
policy                other policy rejections (relaying denied, 5.7.x)             no
rate-limited          too many messages or connections, try later (4.7.28)         no
expired               undelivered within the queue lifetime (4.4.7)                no
network               connection refused or timed out, TLS failure (4.4.1)         no
sender-rejected       our envelope sender or From domain was refused ("Sender      no
                      address rejected", "Unroutable sender address", 5.1.7,
                      5.1.8, a list refusing posts of non-members): says nothing
                      about the recipient
smtputf8-unsupported  the message needs SMTPUTF8 (a non-ASCII local part) and the  no
                      receiver does not offer it (5.6.7; Postfix: "SMTPUTF8 is
                      required, but was not offered by host")
autoreply             an out-of-office or other automatic reply (MxServer)         no
other                 anything else                                                no
====================  ===========================================================  ========

``suppress`` is true only for a *permanent* failure (5xx, or no route at all) whose
classification says the address itself is dead; blocks, policy and content rejections are
never suppressing, even when they are 5xx.

``type`` keeps the original's meaning: ``hard`` for 5xx, ``soft`` for 4xx, ``unroutable`` when
there was no SMTP reply and the domain cannot be reached (DNS failure, null MX, connection
timed out), ``autoreply`` for automatic replies.

How a reason is read -- the rules, text before status, generic wordings that yield to the
status -- is :mod:`common.bouncerules` and its data file ``common/bounce-rules.yaml``; this
module holds the taxonomy and the reply parsing both build on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

BounceType = Literal["hard", "soft", "unroutable", "autoreply"]

CLASSIFICATIONS: Final = (
    "user-unknown",
    "mailbox-disabled",
    "moved",
    "host-unknown",
    "mailbox-full",
    "message-too-large",
    "blocked",
    "spam-content",
    "auth-failure",
    "policy",
    "rate-limited",
    "expired",
    "network",
    "sender-rejected",
    "smtputf8-unsupported",
    "autoreply",
    "other",
)
DEAD_ADDRESS: Final = frozenset(("user-unknown", "mailbox-disabled", "moved", "host-unknown"))

#: Failure replies only: a 2xx reply or 2.x.x status quoted in a transcript ("250 2.1.0 Ok") says
#: nothing about why delivery failed.
_CODE_RE: Final = re.compile(r"(?<![\d.:])([45]\d\d)(?:[ -]|:\s|$)")
_STATUS_RE: Final = re.compile(r"(?<![\d.])([45])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@dataclass(frozen=True)
class Verdict:
    """The classification of one failure."""

    classification: str
    suppress: bool
    type: BounceType
    status: str | None = None
    code: int | None = None


def parse_reply(text: str) -> tuple[int | None, str | None]:
    """(SMTP failure reply code, enhanced status) found in a reply or diagnostic text (4xx/5xx only)."""
    code_match = _CODE_RE.search(text)
    status_match = _STATUS_RE.search(text)
    code = int(code_match.group(1)) if code_match else None
    status = ".".join(status_match.groups()) if status_match else None
    return code, status
