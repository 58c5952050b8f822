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

Text patterns are tried first (enhanced status codes are often generic, e.g. every Microsoft
rejection is 5.7.1 or 5.5.0), then the status code, then the reply's class.  Generic wordings
that some servers also put in front of blocks ("Recipient address rejected", "mailbox
unavailable") count as user-unknown only when no block, content or rate pattern matched.
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


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(alternatives), re.IGNORECASE)


#: (classification, pattern) -- first match wins, so specific patterns come first.
#: (MxServer reads reports with its own, operator-extensible rule file, mxserver/bounce-rules.yaml,
#: over the same taxonomy.)
#: "Recipient address rejected" and its kin: a dead address unless the status says otherwise.
GENERIC_REJECTION: Final = _rx(r"recipient (?:address )?rejected", r"mailbox unavailable", r"undeliverable address")

TEXT_RULES: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    (
        # About our envelope sender, not the recipient: before every recipient wording.
        "sender-rejected",
        _rx(
            r"sender address rejected",
            r"unroutable sender",
            r"sender verify failed",
            r"domain of sender address",
            r"\bsender (?:denied|rejected)",
        ),
    ),
    (
        # Before user-unknown ("non-ASCII address ... not permitted") and network.
        "smtputf8-unsupported",
        _rx(
            r"SMTPUTF8 is required",
            r"SMTPUTF8 (?:is )?not (?:supported|offered|enabled|available)",
            r"does not support SMTPUTF8",
            r"non-ASCII (?:addresses|address|characters) (?:are )?not (?:permitted|allowed|supported)",
            r"UTF-?8 (?:addresses|address|headers?) (?:are )?not (?:permitted|allowed|supported)",
        ),
    ),
    (
        "host-unknown",
        _rx(
            r"null ?MX",
            r"does not accept mail",
            r"indicated no SMTP service",
            r"host or domain name not found",
            r"name service error",
            r"domain (?:name )?(?:not found|does not exist|doesn't exist)",
            r"no (?:MX|mail exchanger)(?: (?:record|host)s?)? (?:found|for)",
            r"(?<![@\w.-])(?:[a-z0-9-]+\.)+[a-z]{2,63}\.? does not exist",
            r"unroutable",
            r"unrouteable",
            r"NXDOMAIN",
            r"no such domain",
            r"domain (?:is )?invalid",
            r"host not found",
        ),
    ),
    (
        "mailbox-disabled",
        _rx(
            r"(?:account|mailbox|user|address)[^.;]{0,40}\b(?:is )?"
            r"(?:disabled|inactive|deactivated|suspended|locked|no longer active|not active)",
            r"\bdisabled (?:account|mailbox|recipient)",
            r"inactive (?:e-?mail )?(?:account|mailbox|user|recipient|address)",
            r"mailbox (?:is )?(?:disabled|unavailable due to inactivity)",
            r"account (?:has been|is) (?:closed|terminated)",
            r"mailbox (?:is )?frozen",
            r"recipient(?:'s)? account is (?:blocked|frozen|locked|suspended)",
        ),
    ),
    ("moved", _rx(r"\bhas moved\b", r"\bmoved\b[^.;]{0,30}\bno forwarding", r"address (?:has )?changed")),
    (
        "mailbox-full",
        _rx(
            r"over ?quota",
            r"quota (?:exceeded|full)",
            r"exceeded (?:its|the|their)? ?(?:storage|quota)",
            r"mailbox (?:is )?full",
            r"mailbox size limit",
            r"insufficient (?:system )?storage",
            r"out of storage",
            r"user is over",
            r"mail ?box (?:has )?exceeded",
            r"full mailbox",
            r"\bOverQuota\b",
            r"storage (?:space|quota)",
        ),
    ),
    (
        "message-too-large",
        _rx(
            r"message (?:is )?too (?:large|big)",
            r"message size exceeds",
            r"size exceeds",
            r"too large",
            r"exceeds (?:the )?(?:maximum|size)",
            r"message length exceeds",
            r"size limit",
        ),
    ),
    (
        "user-unknown",
        _rx(
            r"user(?:name)? (?:is )?unknown",
            r"unknown (?:user|recipient|mailbox|local ?part|address)",
            r"no such (?:user|mailbox|recipient|address|person)",
            r"(?:user|recipient|mailbox|address) not found",
            r"mailbox (?:does not|doesn't) exist",
            r"(?:account|address|user|recipient|mailbox)[^.;]{0,50}"
            r"(?:does not|doesn't|did not) exist",
            r"not a valid (?:mailbox|recipient|user)",
            r"invalid (?:recipient|mailbox|address|user)",
            r"recipient address rejected: access denied",
            r"not listed in (?:the )?(?:[\w&]+ ){0,4}(?:directory|address book)",
            r"RecipientNotFound",
            r"bad destination (?:mailbox|system) address",
            r"no mailbox",
            r"doesn't have an? \S+ account",
            r"unknown or illegal alias",
            r"not our customer",
            r"addressee unknown",
            r"user doesn't exist",
        ),
    ),
    (
        "auth-failure",
        _rx(
            r"\bDMARC\b",
            r"\bSPF\b",
            r"\bDKIM\b",
            r"unauthenticated (?:email|mail|sender)",
            r"not (?:properly )?authenticated",
            r"does not have authentication information",
            r"fails? to pass authentication",
            r"sender (?:address )?verification",
        ),
    ),
    # "Relay access denied" is about the destination, not about our reputation; a message that
    # breaks the format rules is policy even when the reply adds "blocked".
    (
        "policy",
        _rx(
            r"relay(?:ing)? (?:access )?(?:denied|not permitted)",
            r"not RFC ?5322 compliant",
            r"not (?:RFC|standards?)[- ]compliant",
            r"duplicate header",
            r"multiple (?:From|Subject|Date|To|Message-ID) headers",
        ),
    ),
    (
        # Content verdicts that also say "blocked"/"rejected": the content is what matters.
        "spam-content",
        _rx(
            r"blocked because (?:of )?(?:its|the) content",
            r"contains? (?:a )?(?:virus|malware)",
            r"(?:classified|identified|detected|marked) as (?:spam|junk|phishing)",
            r"spam (?:content|message|detected)",
        ),
    ),
    (
        "blocked",
        _rx(
            r"spamhaus",
            r"spamcop",
            r"barracuda",
            r"sorbs",
            r"black ?list",
            r"block ?list",
            r"\bRBL\b",
            r"\bDNSBL\b",
            r"\blisted\b",
            r"\bblocked\b",
            r"\bbanned\b",
            r"reputation",
            r"\bS3150\b",
            r"access denied",
            r"client host rejected",
            r"IP (?:address )?rejected",
            r"\bTSS0[1-9]\b",
            r"sender (?:ip|domain) (?:is )?(?:blocked|rejected)",
            r"\bPTR\b",
            r"reverse (?:DNS|lookup|DNS lookup)",
            r"\brDNS\b",
            r"messages from \[?[0-9a-f.:]+\]? weren't sent",
        ),
    ),
    (
        "rate-limited",
        _rx(
            r"receiving mail (?:at a rate|too quickly)",
            r"rate ?limit",
            r"too many (?:messages|connections|recipients|emails|mails)",
            r"throttl",
            r"temporarily deferred",
            r"unusual rate",
            r"try (?:again )?later",
            r"exceeded (?:the )?[a-z ]*limit",
            r"sending limit",
            r"too much mail",
            r"\bTS0[1-4]\b",
            r"grey ?list",
            r"gray ?list",
            r"slow down",
            r"4\.7\.28",
        ),
    ),
    (
        "spam-content",
        _rx(
            r"\bspam\b",
            r"junk",
            r"phish",
            r"virus",
            r"malware",
            r"content (?:rejected|filter)",
            r"message content",
            r"suspicious",
            r"bulk mail",
            r"unsolicited",
            r"spam ?signature",
        ),
    ),
    (
        # Generic wordings that also front policy rejections: only when nothing above matched,
        # and only when the status is not about something else (see _beyond_the_address).
        "user-unknown",
        GENERIC_REJECTION,
    ),
    (
        "network",
        _rx(
            r"hop count exceeded",
            r"mail (?:forwarding )?loop",
            r"too many hops",
            r"connection (?:timed out|refused|reset)",
            r"lost connection",
            r"conversation with \S+ timed out",
            r"\bTLS\b",
            r"handshake",
            r"network is unreachable",
            r"no route to host",
            r"timed out",
            r"connect to \S+: ",
        ),
    ),
    (
        "policy",
        _rx(
            r"relay(?:ing)? (?:access )?(?:denied|not permitted)",
            r"\bpolicy\b",
            r"not permitted",
            r"administrative prohibition",
            r"\bdenied\b",
            r"\brejected\b",
            r"not allowed",
        ),
    ),
)

#: Enhanced status code (subject.detail, after the class digit) -> classification.
STATUS_RULES: Final[dict[str, str]] = {
    "1.0": "user-unknown",
    "1.1": "user-unknown",
    "1.3": "user-unknown",
    "1.10": "user-unknown",
    "1.2": "host-unknown",
    "1.6": "moved",
    "2.1": "mailbox-disabled",
    "2.2": "mailbox-full",
    "2.3": "message-too-large",
    "3.4": "message-too-large",
    "4.4": "host-unknown",
    "4.1": "network",
    "4.2": "network",
    "4.7": "expired",
    "6.7": "smtputf8-unsupported",
    "6.8": "smtputf8-unsupported",
    "6.9": "smtputf8-unsupported",
    "7.1": "policy",
    "7.28": "rate-limited",
    "1.7": "sender-rejected",
    "1.8": "sender-rejected",
}
_AUTH_DETAILS: Final = frozenset(str(n) for n in range(20, 28))

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


def classify(
    text: str,
    *,
    code: int | None = None,
    status: str | None = None,
    expired: bool = False,
) -> Verdict:
    """Classify a failure from its reply text and, when known, reply code and enhanced status.

    Missing ``code``/``status`` are looked for in ``text``.  ``expired`` marks a message that
    ran out of queue lifetime (Postfix' ``status=expired``).
    """
    found_code, found_status = parse_reply(text)
    code = code if code is not None else found_code
    status = status or found_status
    classification = _by_text(text, status) or _by_status(status) or by_subject(status)
    if expired:
        classification = "expired"
    bounce_type = _type(code, status, classification, expired, text)
    suppress = bounce_type in ("hard", "unroutable") and classification in DEAD_ADDRESS
    return Verdict(classification, suppress, bounce_type, status, code)


def _by_text(text: str, status: str | None) -> str | None:
    for classification, pattern in TEXT_RULES:
        if pattern.search(text):
            if pattern is GENERIC_REJECTION and beyond_the_address(status):
                return None
            return classification
    return None


#: Status subjects (RFC 3463) that say a failure is not about the address or the mailbox:
#: mail system (3), network and routing (4), content (6), security or policy (7).  Not protocol
#: (5): Microsoft answers a missing mailbox with 5.5.0 "Requested action not taken: mailbox
#: unavailable".
_NOT_THE_ADDRESS: Final = frozenset("3467")


def beyond_the_address(status: str | None) -> bool:
    """True for an enhanced status about something other than the address or the mailbox.

    A generic wording ("Recipient address rejected: …") then tells nothing about the
    recipient: 5.7.26 "Recipient address rejected: Multiple authentication checks failed" is an
    authentication failure, not a dead address.
    """
    return status is not None and status.split(".")[1] in _NOT_THE_ADDRESS


def by_subject(status: str | None) -> str:
    """The classification of a status no entry names: security or policy (X.7.Y), else other."""
    return "policy" if status is not None and status.split(".")[1] == "7" else "other"


def _by_status(status: str | None) -> str | None:
    if not status:
        return None
    _, subject, detail = status.split(".")
    if subject == "7" and detail in _AUTH_DETAILS:
        return "auth-failure"
    return STATUS_RULES.get(f"{subject}.{detail}")


#: No route to the destination at all (the original's ``unroutable``), as opposed to a
#: connection that broke after the remote server answered (``lost connection``: soft).
_NO_ROUTE: Final = re.compile(
    r"connect to |connection refused|connection timed out|no route to host|network is unreachable",
    re.IGNORECASE,
)


def _type(code: int | None, status: str | None, classification: str, expired: bool, text: str) -> BounceType:
    klass = str(code)[0] if code is not None else (status[0] if status else None)
    if klass == "5":
        return "hard"
    if klass == "4" or expired:
        return "soft"
    if classification == "host-unknown" or (classification == "network" and _NO_ROUTE.search(text)):
        return "unroutable"
    if classification == "network":
        return "soft"
    return "soft" if klass is None and classification == "other" else "hard"
