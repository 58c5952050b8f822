"""Bounces that are not RFC 3464: the plain-text formats of common MTAs and providers.

Many systems still send (or also send) human-readable non-delivery reports without a
machine-readable ``message/delivery-status`` part: classic Exim, qmail, Yahoo, Lotus Domino,
old Exchange, GroupWise, MDaemon, OpenSMTPD, Mimecast, plain-text Sendmail and Postfix…

Recognition needs two things: the message looks like a bounce (``X-Failed-Recipients``, a
bounce subject in one of many languages, or a mail-system sender whose text uses a known MTA
wording or states a failure reason -- an SMTP reply or a wording of the bounce rules) and at
least one recipient or reason can be read from the text.  Extraction is line based and shared by
every format: each candidate address (quoted local parts kept, encoded-words decoded) starts a
window of following lines (until a blank line or the next candidate); the window, or else the
nearest line that carries an SMTP reply or a known reason, is the reason.  Gmail's "The response
was:" paragraph and a later mention of the address with a reply code (Exchange's "Diagnostic
information for administrators") are preferred; Exim's "(generated from …)" names an alias.
:data:`FORMATS` only names the MTA (for the event's ``report`` field) and adds nothing
format-specific beyond that, which keeps unknown variants working.

Part of MxServer's pure classification phase (:mod:`mxserver.analysis`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Final

from common import bounces
from common.bouncerules import Rules, shipped
from mxserver import mime
from mxserver.dsn import Action, clean_reason, host_ip


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(alternatives), re.IGNORECASE)


#: (name, wording that identifies the MTA) -- checked in order against the report text.
FORMATS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("yahoo", _rx(r"Sorry, we were unable to deliver your message to the following address")),
    ("qmail", _rx(r"This is the qmail-send program", r"I'm afraid I wasn't able to deliver your message")),
    (
        "exim",
        _rx(
            r"This message was created automatically by mail delivery software",
            r"A message that you sent could not be delivered to one or more of\s+its\s+recipients",
            r"has not yet been delivered to one or more of its\s+recipients",
        ),
    ),
    ("postfix", _rx(r"This is the mail system at host", r"This is the Postfix program")),
    (
        "sendmail",
        _rx(
            r"The original message was received at",
            r"-+\s*The following addresses had (?:permanent fatal|transient non-fatal) errors",
            r"-+\s*Transcript of session follows",
        ),
    ),
    (
        "exchange",
        _rx(
            r"Your message did not reach some or all of the intended recipients",
            r"The following recipient\(s\) (?:cannot|could not) be reached",
            r"Delivery has failed to these recipients or groups",
            r"Your message (?:to \S+ )?(?:wasn't|couldn't be) delivered",
        ),
    ),
    ("domino", _rx(r"was not delivered to:", r"Domino Directory", r"Lotus Notes")),
    ("groupwise", _rx(r"The message that you sent was undeliverable to the following", r"GroupWise")),
    ("mdaemon", _rx(r"PERMANENT fatal delivery errors", r"MDaemon")),
    (
        "opensmtpd",
        _rx(
            r"This is the MAILER-DAEMON, please DO NOT REPLY",
            r"An error has occurred while attempting to deliver a message for\s+the following list",
        ),
    ),
    ("mimecast", _rx(r"mimecast", r"The reason for the problem:")),
    (
        "gmail",
        _rx(
            r"Google tried to deliver your message",
            r"Delivery to the following recipient failed permanently",
            r"There was a temporary problem delivering your message",
        ),
    ),
    ("barracuda", _rx(r"Barracuda")),
    ("trend-micro-imss", _rx(r"InterScan Messaging Security Suite", r"InterScan (?:NT|Notification)")),
    ("dragonfly", _rx(r"This is the DragonFly Mail Agent")),
    # au/KDDI's notices: "Your mail sent on: … Could not be delivered to: <…> As their mailbox is full."
    ("kddi", _rx(r"Could not be delivered to:\s*<[^>\s]+@")),
    ("yandex", _rx(r"Message was not delivered", r"Сообщение не доставлено", r"Yandex")),
)

BOUNCE_SUBJECT: Final = _rx(
    r"undeliver",
    r"undelivered",
    r"delivery (?:status notification|failure|failed|has failed|problem|notification|incomplete)",
    r"mail delivery (?:failed|failure|problem|error)",
    r"failure notice",
    r"returned mail",
    r"non[- ]?deliver",
    r"not (?:been )?delivered",
    r"could(?: not|n't) be delivered",
    r"wasn't delivered",
    r"delayed mail",
    r"delivery delayed",
    r"warning: (?:message|could not send)",
    r"mail system error",
    r"returned to sender",
    r"message status - undeliverable",
    r"permanent delivery failure",
    r"unzustellbar",
    r"nicht zustellbar",
    r"non recapitabile",
    r"non remis",
    r"no se (?:pudo|puede) entregar",
    r"onbestelbaar",
    r"niedostarczaln",
    r"недоставлен",
    r"не доставлено",
    r"Échec de (?:la )?(?:remise|distribution)",
    r"non (?:délivré|distribué|remis)",
    r"mail failed",
    r"returning (?:message )?to sender",
    r"配信エラー",
    r"配信不能",
    r"未送達",
    r"送信エラー",
    r"退信",
    r"投递失败",
    r"邮件退回",
)
_REPLY_PREFIX: Final = _rx(r"^\s*(?:re|fw|fwd|aw|wg|sv|vs|tr|rif|antw|odp|ответ)\s*(?:\[\d+\])?\s*:")
DAEMON_LOCALS: Final = frozenset(
    ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "mailer_daemon", "mdaemon", "mail.daemon")
)
_DAEMON_NAME: Final = _rx(
    r"mail delivery (?:system|subsystem|service)",
    r"mail administrator",
    r"mailer[- ]daemon",
    r"postmaster",
    r"microsoft outlook",
    r"system administrator",
)
_DELAY: Final = _rx(
    r"\bdelay(?:ed)?\b",
    r"has not (?:yet )?been delivered",
    r"will (?:continue to |keep )?(?:try|retry)",
    r"will be retried",
    r"still (?:trying|being retried)",
    r"delivery attempts will continue",
    r"could not (?:be delivered|send message) for (?:the )?past",
    r"temporary problem delivering",
)
_PERMANENT: Final = _rx(
    r"permanent(?:ly)? (?:error|fatal|failure|failed)",
    r"failed permanently",
    r"I've given up",
    r"giving up on",
    r"has been rejected",
    r"could not be delivered to one or more",
    r"undeliverable to the following",
    r"was not delivered to:",
    r"PERMANENT fatal",
)
_ORIGINAL_MARKER: Final = _rx(
    r"^\s*-+\s*This is a copy of (?:the|your) message",
    r"^\s*-+\s*Below this line is a copy of the message",
    r"^\s*-+\s*(?:Original|Unsent) message(?: follows)?\s*-*",
    r"^\s*-+\s*Original message follows",
    r"^\s*Possibly truncated original message follows",
    r"^\s*Original message headers:",
    r"^\s*Below is a copy of the original message",
    r"^\s*The original message (?:headers )?(?:was|were|is) (?:included|attached) (?:below|as attachment)",
    r"^(?:Return-Path|Received|DKIM-Signature|ARC-Seal):[ \t]",
)
_ID_LINE: Final = re.compile(
    r"(?i:^\s*(?:Message-ID|In-Reply-To|References|Reporting-MTA|Arrival-Date)\b)"
    # A transcript's MAIL command names our sender, not a recipient ("In: MAIL FROM:<…>", or the
    # command folded onto an indented "FROM:<…>" line).
    r"|(?i:\bMAIL\s+FROM:)|^\s+FROM:\s*<"
)
MAX_WINDOW: Final = 8
#: Addresses read from one report (each of our copies has one recipient; a report about more
#: is a list expansion at most, and thousands are an attack).
MAX_CANDIDATES: Final = 100
#: Characters of the report's own text read for recipients and reasons (reports are short).
MAX_REGION: Final = 64 * 1024


@dataclass(frozen=True)
class TextFailure:
    """One failed (or delayed) recipient of a plain-text bounce."""

    #: The address as the text names it (None when the text names none).
    final_recipient: str | None
    action: Action
    status: str | None
    #: The reason: the SMTP reply, or the sentence that explains the failure.
    diagnostic: str
    #: The text around the address (read by the rules when the reason says nothing).
    context: str = ""
    ip: str | None = None
    #: Other names of the recipient (Exim's "generated from" address of a forward).
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The address the text names, if any, then its aliases."""
        return ((self.final_recipient,) if self.final_recipient else ()) + self.aliases


@dataclass(frozen=True)
class TextBounce:
    """A recognised plain-text bounce."""

    report: str
    failures: list[TextFailure]


def looks_like_bounce(msg: Message, text: str, rules: Rules | None = None) -> bool:
    """True when the message presents itself as a non-delivery report.

    ``X-Failed-Recipients``, a bounce subject, a known MTA wording with the returned message
    attached, or a mail-system sender (``MAILER-DAEMON``, ``postmaster``, "Mail Delivery System")
    whose text uses a known MTA wording or states a failure reason (an SMTP reply, or a wording
    of the bounce rules).
    """
    if mime.has_header(msg, "X-Failed-Recipients"):
        return True
    subject = mime.header(msg, "Subject")
    if subject and not _REPLY_PREFIX.search(subject) and BOUNCE_SUBJECT.search(subject):
        return True
    known_wording = format_name(text) != "generic"
    if known_wording and mime.original_message(msg) is not None:
        return True  # a known MTA's wording with the returned message attached (au/KDDI's no-reply@)
    if not daemon_sender(msg):
        return False
    if known_wording:
        return True
    reader = _Reader(rules)
    return any(reader.carries(line) for line in report_region(text)[:5000].split("\n") if line.strip())


def daemon_sender(msg: Message) -> bool:
    """True when the From header is a mail system (MAILER-DAEMON, postmaster, Mail Delivery System…)."""
    sender = mime.header(msg, "From")
    address = (mime.first_address(sender) or "").lower()
    return address.partition("@")[0] in DAEMON_LOCALS or bool(_DAEMON_NAME.search(sender))


def forward_subject(subject: str) -> bool:
    """True for a forwarded bounce's subject (``Fwd: Undelivered Mail…``, ``WG: Unzustellbar…``)."""
    match = _REPLY_PREFIX.search(subject)
    return match is not None and bool(BOUNCE_SUBJECT.search(subject[match.end() :]))


def format_name(text: str) -> str:
    """The MTA whose wording the report uses ('generic' when none is known)."""
    head = text[:20_000]
    for name, pattern in FORMATS:
        if pattern.search(head):
            return name
    return "generic"


def report_region(text: str) -> str:
    """The report's own text: everything before the quoted original message."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i >= 2 and _ORIGINAL_MARKER.search(line):
            return "\n".join(lines[:i])
    return text


#: A quoted local part (``"john doe"@example.org``), which EMAIL_RE does not take.
_QUOTED_EMAIL_RE: Final = re.compile(
    r'("[^"\r\n]{1,64}"@[^\W_](?:[\w-]{0,61}[^\W_])?(?:\.[^\W_](?:[\w-]{0,61}[^\W_])?){1,8})'
)


def addresses_in(line: str) -> list[str]:
    """Addresses written in a line of text: quoted local parts kept, encoded-words decoded."""
    found = [m.group(1) for m in _QUOTED_EMAIL_RE.finditer(line)]
    rest = _QUOTED_EMAIL_RE.sub(" ", line)
    for match in mime.EMAIL_RE.finditer(rest):
        addr = match.group(1).strip(".'")
        found.append(mime.decode_words(addr) if "=?" in addr else addr)
    return found


#: Words before an address that make it a contact, not a recipient ("please contact <support@…>",
#: "forward this email to abuse@…").
_CONTACT_RE: Final = re.compile(
    r"\b(?:contact|forward (?:this|the) (?:e-?mail|message|mail) to|write to|send (?:\w+ ){0,3}to|e-?mail us at"
    r"|assistance|questions)\b[^@]{0,20}$",
    re.IGNORECASE,
)


def _candidates(lines: Sequence[str], excluded: set[str], preferred: Sequence[str]) -> list[tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}
    contacts: set[str] = set()
    for i, line in enumerate(lines):
        if _ID_LINE.search(line):
            continue
        for addr in addresses_in(line):
            key = addr.lower()
            if key in excluded or key.partition("@")[0] in DAEMON_LOCALS:
                continue
            before = line[: max(line.lower().find(key), 0)][-80:]
            if _CONTACT_RE.search(before):
                contacts.add(key)
            found.setdefault(key, (addr, i))
    for key in contacts.difference(a.lower() for a in preferred):
        found.pop(key, None)
    if preferred:
        chosen = []
        for address in preferred[:MAX_CANDIDATES]:
            addr, at = found.get(address.lower(), (address, -1))
            chosen.append((addr, at))
        return chosen
    return list(found.values())[:MAX_CANDIDATES]


def _window(lines: Sequence[str], start: int, others: set[str]) -> list[str]:
    window = [lines[start]]
    for line in lines[start + 1 : start + 1 + MAX_WINDOW]:
        if not line.strip() or line.lstrip().startswith("---"):
            break
        if "@" in line and any(a.lower() in others for a in addresses_in(line)):
            break  # the next recipient's block
        window.append(line)
    return window


def _carries_reason(text: str, rules: Rules | None = None) -> bool:
    code, status = bounces.parse_reply(text)
    if code is not None or status is not None:
        return True
    return (rules or shipped()).rule_for(text) is not None


def _has_code(text: str) -> bool:
    code, status = bounces.parse_reply(text)
    return code is not None or status is not None


@dataclass(frozen=True)
class _Reader:
    """Reason finding with one rule set (a line "carries a reason" when a rule knows it)."""

    rules: Rules | None

    def carries(self, text: str) -> bool:
        return _carries_reason(text, self.rules)

    def reason_near(self, lines: Sequence[str], start: int) -> tuple[int, str] | None:
        """(index, text) of the nearest reason after ``start`` (then before it).

        Lines with an SMTP reply or enhanced status code win over lines that only use a known
        wording; the reason continues on the indented lines that follow it.
        """
        start = max(start, 0)
        order = list(range(start, len(lines))) + list(range(0, start))
        found = next((i for i in order if _has_code(lines[i])), None)
        if found is None:
            found = next((i for i in order if lines[i].strip() and self.carries(lines[i])), None)
        if found is None:
            return None
        follow = [lines[found]]
        for nxt in lines[found + 1 : found + 4]:
            if not nxt.strip() or not (nxt.startswith((" ", "\t")) or _has_code(nxt)):
                break
            follow.append(nxt)
        return found, " ".join(follow)

    def reason_for(self, lines: Sequence[str], start: int, address: str, others: set[str]) -> tuple[str, str]:
        """(reason, context) for the candidate at line ``start``; context also holds the host name."""
        if start < 0:
            near = self.reason_near(lines, 0)
            return (near[1], near[1]) if near else ("", "")
        window = _window(lines, start, others)
        context = " ".join(window)
        remainder = re.sub(re.escape(address), "", window[0], flags=re.I).strip(" \t<>:'\"()-")
        if remainder and self.carries(remainder):
            return context, context
        for i, line in enumerate(window[1:], start=1):
            if self.carries(line):
                return " ".join(window[i:]), context
        near = self.reason_near(lines, start + 1)
        if near is None:
            return context, context
        index, reason = near
        return reason, " ".join(lines[start : index + 1]) if index >= start else f"{context} {reason}"

    def tidy(self, reason: str) -> str:
        """The reason from its SMTP reply code on when what precedes it says nothing ("said: 550 …").

        A dangling ")" (Sendmail's ``(reason: …)``) is dropped.
        """
        match = _LEAD_CODE.search(reason)
        if match is not None and match.start() <= 80 and not self.carries(reason[: match.start()]):
            reason = reason[match.start() :]
        if reason.endswith(")") and reason.count(")") > reason.count("("):
            reason = reason[:-1].rstrip()
        return reason


def parse(
    msg: Message,
    text: str,
    excluded: Iterable[str] = (),
    ours: Callable[[str], bool] = lambda _address: False,
    rules: Rules | None = None,
) -> TextBounce | None:
    """The failures of a plain-text bounce; None when ``msg`` is not recognisably one.

    ``excluded`` are addresses that are never the failed recipient (our own return path,
    the original sender…), as are those ``ours`` says belong to us; addresses on
    ``mailer-daemon``/``postmaster`` are skipped too.
    """
    if not looks_like_bounce(msg, text, rules):
        return None
    reader = _Reader(rules)
    region = report_region(text)[:MAX_REGION]
    lines = region.split("\n")
    skip = {a.lower() for a in excluded}
    skip.update(a.lower() for a in mime.addresses(mime.header(msg, "From")))
    skip.update(a.lower() for a in mime.addresses(mime.header(msg, "To")))
    preferred: list[str] = []
    for value in mime.header_values(msg, "X-Failed-Recipients"):
        preferred.extend(a for a in addresses_in(value) if a.lower() not in skip and not ours(a))
    candidates = [(a, i) for a, i in _candidates(lines, skip, preferred) if not ours(a)]
    subject = mime.header(msg, "Subject")
    head = f"{subject}\n{region[:3000]}"
    delayed = bool(_DELAY.search(head)) and not _PERMANENT.search(head)
    failures: list[TextFailure] = []
    others = {addr.lower() for addr, _ in candidates}
    response = _response(lines)
    for address, start in candidates:
        rest = others - {address.lower()}
        reason, context = _best_reason(reader, lines, address, start, rest)
        if response and not _has_code(reason):
            reason, context = response, f"{context} {response}"
        aliases = tuple(m.group(1) for m in _GENERATED_FROM.finditer(context))
        failures.append(_failure(address, reader.tidy(clean_reason(reason)), delayed, context, aliases))
    if not failures:
        fallback = reader.reason_near(lines, 0)
        if fallback is None:
            return None
        failures.append(_failure(None, reader.tidy(clean_reason(fallback[1])), delayed, fallback[1]))
    report = format_name(region)
    if report == "generic" and not any(reader.carries(f.diagnostic) for f in failures):
        return None  # a bounce-like subject without a known wording or any reason: a human wrote it
    return TextBounce(report, failures)


_LEAD_CODE: Final = re.compile(r"(?<![\w.])[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}\b)?")


_GENERATED_FROM: Final = re.compile(r"\(generated from ([^\s()<>]+@[^\s()<>]+)\)", re.IGNORECASE)
_RESPONSE_RE: Final = re.compile(r"^\s*The (?:response|error) (?:was|that the other server returned was):?\s*$", re.I)


def _response(lines: Sequence[str]) -> str:
    """The paragraph after Gmail's "The response was:" (the remote server's own words)."""
    for i, line in enumerate(lines):
        if _RESPONSE_RE.match(line):
            paragraph: list[str] = []
            for nxt in lines[i + 1 : i + 1 + MAX_WINDOW]:
                if not nxt.strip():
                    if paragraph:
                        break
                    continue
                paragraph.append(nxt.strip())
            return " ".join(paragraph)
    return ""


def _best_reason(reader: _Reader, lines: Sequence[str], address: str, start: int, others: set[str]) -> tuple[str, str]:
    """The reason at the address' first mention, or at a later one that carries an SMTP reply.

    Exchange names each recipient twice: with a sentence for people, then with the reply code
    under "Diagnostic information for administrators".
    """
    first = reader.reason_for(lines, start, address, others)
    if start < 0 or _has_code(first[0]):
        return first
    wanted = address.lower()
    for i in range(start + 1, len(lines)):
        if wanted in lines[i].lower():
            later = reader.reason_for(lines, i, address, others)
            if _has_code(later[0]):
                return later[0], f"{first[1]} {later[1]}"
    return first


def _failure(
    address: str | None, reason: str, delayed: bool, context: str, aliases: tuple[str, ...] = ()
) -> TextFailure:
    return TextFailure(
        final_recipient=address,
        action="delayed" if delayed else "failed",
        status=bounces.parse_reply(reason)[1],
        diagnostic=reason,
        context=context,
        ip=host_ip(context),
        aliases=aliases,
    )
