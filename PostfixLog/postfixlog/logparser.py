"""Parse Postfix' maillog lines into typed records (pure functions, no I/O).

Lines PostfixLog acts on (queue id ``Q``, short hex or long ``enable_long_queue_ids`` form)::

  postfix/smtpd[…]: Q: client=localhost[127.0.0.1], orig_queue_id=<token>       -> Client
  postfix/qmgr[…]:  Q: from=<sender>, size=1234, nrcpt=1 (queue active)          -> From
  postfix/smtp[…]:  Q: to=<rcpt>, relay=h[ip]:25, delay=…, dsn=2.0.0, status=sent (…)  -> Status
  postfix/qmgr[…]:  Q: from=<sender>, status=expired, returned to sender         -> Expired
  postfix/qmgr[…]:  Q: removed                                                    -> Removed

Other lines with a queue id that Postfix writes routinely (``message-id=``, ``sender
non-delivery notification``, ``host … said: …`` details, TLS notes…) are ``Other``; lines that
do not look like Postfix' log at all, or queue-id lines of an unknown shape, are ``Unparsed``
(counted, never fatal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: ``Mon DD HH:MM:SS host program[pid]: message`` (also accepts an RFC 3339 time stamp).
_HEADER: Final = re.compile(
    r"^(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT\S+) \S+ "
    r"(?P<program>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?: (?P<message>.*)$"
)
#: Short ids are upper-case hex.  Long ids (``enable_long_queue_ids``) are the time in seconds
#: and microseconds in base 52 (digits and consonants, ``z`` included), the separator ``z``,
#: then the inode number in base 51 (no ``z``) -- e.g. ``4jZLBz5lN8zJFtX``.
_B52: Final = "0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z"
_B51: Final = "0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-y"
_QUEUE_ID: Final = re.compile(rf"^(?P<qid>[0-9A-F]{{6,20}}|[{_B52}]{{10,16}}z[{_B51}]{{1,12}}): (?P<body>.*)$")
_STATUS: Final = re.compile(
    r"^to=<(?P<rcpt>.*?)>, (?:orig_to=<.*?>, )?relay=(?P<relay>\S+?), (?:.*?, )?"
    r"dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), status=(?P<status>[a-z]+)(?: \((?P<text>.*)\))?$"
)
_EXPIRED: Final = re.compile(r"^from=<(?P<sender>.*?)>, status=(?:force-)?expired, (?P<text>.*)$")
_FROM: Final = re.compile(r"^from=<(?P<sender>.*?)>, size=\d+, nrcpt=\d+")
_CLIENT: Final = re.compile(r"^client=[^,]*(?:, .*?orig_queue_id=(?P<token>[^,\s]+))?")
_RELAY_IP: Final = re.compile(r"\[(?P<ip>[0-9A-Fa-f.:]+)\](?::\d+)?$")
#: Routine queue-id lines that carry nothing PostfixLog needs.
_ROUTINE: Final = re.compile(
    r"^(?:message-id=|sender non-delivery notification|sender delivery status notification|"
    r"host \S+ said: |lost connection |conversation with |enabling PIX|breaking line|"
    r"Cannot start TLS|TLS is required|warning: |reject: |discard: |hold: |redirect |filter: |"
    r"replace: |info: |uid=|resent-message-id=|placed on hold|released from hold|requeued$)"
)


@dataclass(frozen=True)
class Line:
    """A parsed line: ``kind`` says which fields matter."""

    kind: str  # client, from, status, expired, removed, other, unparsed
    raw: str
    program: str = ""
    queue_id: str | None = None
    token: str | None = None
    sender: str | None = None
    recipient: str | None = None
    relay: str | None = None
    ip: str | None = None
    dsn: str | None = None
    status: str | None = None
    text: str = ""


def parse(raw: str) -> Line:
    """Classify one log line (without its line end)."""
    header = _HEADER.match(raw)
    if header is None:
        return Line("unparsed", raw)
    program = header.group("program")
    message = header.group("message")
    qid_match = _QUEUE_ID.match(message)
    if qid_match is None:
        return Line("other", raw, program)
    qid, body = qid_match.group("qid"), qid_match.group("body")
    if body == "removed":
        return Line("removed", raw, program, qid)
    if match := _STATUS.match(body):
        relay = match.group("relay")
        ip_match = _RELAY_IP.search(relay)
        return Line(
            "status",
            raw,
            program,
            qid,
            recipient=match.group("rcpt"),
            relay=relay,
            ip=ip_match.group("ip") if ip_match and relay != "none" else None,
            dsn=match.group("dsn"),
            status=match.group("status"),
            text=match.group("text") or "",
        )
    if match := _EXPIRED.match(body):
        return Line("expired", raw, program, qid, sender=match.group("sender"), text=match.group("text"))
    if match := _FROM.match(body):
        return Line("from", raw, program, qid, sender=match.group("sender"))
    if match := _CLIENT.match(body):
        return Line("client", raw, program, qid, token=match.group("token"))
    if _ROUTINE.match(body):
        return Line("other", raw, program, qid)
    return Line("unparsed", raw, program, qid)
