"""The intake rule of both doors: Receiver (SMTP ``handle_DATA``) and HttpReceiver (``POST``).

:func:`accept` runs before either door answers ``250``/``200`` and returns the bytes that are
queued, so both doors accept, normalise and refuse every message the same way (DESIGN §8):

* **line endings** (:func:`normalise`): CRLF is kept, a bare LF becomes CRLF, a bare CR in the
  body becomes CRLF, and a bare CR in the header block is refused (``bare-cr``): some programs
  read it as a line end, so ``X-Stream-Id: a<CR>X-Injected: yes`` would grow a header the
  customer never wrote;
* **header lines** longer than 998 octets are refused (``header-line-too-long``, RFC 5322
  §2.1.1): folding them would change what the customer wrote.  Body lines of any length are
  accepted: the Transformer re-encodes those parts (quoted-printable/base64) before signing;
* **header syntax** (``header-syntax``): every line of the header block is a field (``name:``)
  or the continuation of one -- the Transformer, and receivers, could not read it otherwise;
* **raw 8-bit header bytes** must be UTF-8 (``header-not-utf8``, RFC 6532);
* **NUL** is refused in every header field (``header-control-char``; RFC 5322 allows it nowhere,
  Postfix cuts a header at it, which would break the signature), and the header fields we read
  -- ``X-Uuid``, ``X-Priority``, ``X-Stream-Id``, ``From``, ``To``, ``Cc`` -- hold no control
  characters at all (other fields may: RFC 5322's obsolete syntax allows them);

then the message is accepted only when (DESIGN §4):

* it has exactly one ``From`` address and its domain is in ``transformer.domain-settings``;
* ``X-Uuid`` is present once and matches ``[a-z0-9]+`` (at most 46 characters, so the tagged
  return path fits RFC 5321's 64-octet local part);
* ``X-Priority`` is absent, ``0`` or ``1``;
* ``To``/``Cc`` hold at least one syntactically valid address.

Each failed rule is a :class:`Rejection` carrying the SMTP reply and the HTTP answer (whose JSON
body names the rule, the SMTP code and the enhanced status), so both doors say exactly which rule
failed, in the same words.  Only the header block is parsed; apart from its line endings the
body is queued byte for byte.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import Message
from typing import Any, Final, Protocol

from common.addressing import MAX_UUID_LENGTH, valid_uuid

_ADDRESS_RE: Final = re.compile(r"^[^@\s<>,;]+@(?:[^@\s<>,;.]+\.)+[^@\s<>,;.]+$")
_PARSER: Final = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_HEADER_END: Final = re.compile(rb"\n\r?\n")
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FIELD_NAME: Final = re.compile(rb"([!-9;-~]+)[ \t]*:")
_ATOM: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM: Final = rf"{_ATOM}(?:\.{_ATOM})*"
#: One address in its plainest forms, ``local@domain`` or ``Some Name <local@domain>``: ASCII
#: atoms only (no quotes, comments, escapes, groups, domain literals or dots in the name).
_FWS: Final = r"[ \t\r\n]"  # what email._parseaddr skips (not \f or \v: those are atom characters there)
_PLAIN_ADDRESS: Final = re.compile(
    rf"{_FWS}*(?:(?:((?:{_ATOM}{_FWS}+)*{_ATOM}){_FWS}*)?<({_DOT_ATOM}@{_DOT_ATOM})>|({_DOT_ATOM}@{_DOT_ATOM})){_FWS}*"
)
#: RFC 5322 §2.1.1: at most 998 octets per line, without its CRLF.
MAX_LINE: Final = 998
#: The header fields the platform reads: validated strictly.
READ_FIELDS: Final = frozenset((b"x-uuid", b"x-priority", b"x-stream-id", b"from", b"to", b"cc"))


class Rejection(Exception):
    """A submitted message broke a rule; carries the SMTP and HTTP answers."""

    def __init__(self, rule: str, message: str, *, smtp_code: int = 554, status: str = "5.6.0") -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.smtp_code = smtp_code
        self.status = status

    @property
    def smtp_reply(self) -> str:
        """The full SMTP reply line, e.g. ``550 5.7.1 From domain x.test is not configured``."""
        return f"{self.smtp_code} {self.status} {self.message}"

    @property
    def http_status(self) -> int:
        """HTTP status for the same problem."""
        return 400

    def details(self) -> dict[str, str | int]:
        """What the HTTP answer adds to ``error``/``message``: the SMTP door's code and status."""
        return {"smtp_code": self.smtp_code, "enhanced_status": self.status}


@dataclass(frozen=True)
class Submission:
    """What the receivers learn from a valid message's headers."""

    uuid: str
    priority: int
    from_address: str
    from_domain: str
    recipients: tuple[str, ...]
    stream_id: str | None


@dataclass(frozen=True)
class Accepted:
    """A message that passed the intake rule: the bytes to queue and what its headers say."""

    raw: bytes
    submission: Submission


def accept(raw: bytes, is_configured_domain: Callable[[str], bool]) -> Accepted:
    """The intake rule of both doors: normalise ``raw``, check it, return what to queue.

    Raises:
        Rejection: the first rule the message breaks.
    """
    if not raw.strip():
        raise Rejection("empty", "the message is empty")
    data = normalise(raw)
    head = data[: header_end(data)]
    check_header_block(head)
    return Accepted(data, validate(data, is_configured_domain))


def header_end(data: bytes) -> int:
    """Length of the header block of a CRLF message (up to and including the empty line)."""
    if data.startswith(b"\r\n"):
        return 0
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


def normalise(raw: bytes) -> bytes:
    """``raw`` with CRLF line endings only, ending in CRLF.

    Bare LF becomes CRLF everywhere; a bare CR becomes CRLF in the body and is refused in the
    header block (which ends at the first empty line, however its lines end).

    Raises:
        Rejection: ``bare-cr``, a bare CR in the header block.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf == raw.count(b"\n"):
        return raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    if raw.startswith((b"\n", b"\r\n")):
        head_len = 0
    else:
        end = _HEADER_END.search(raw)
        head_len = len(raw) if end is None else end.end()
    head = raw[:head_len]
    if b"\r" in head.replace(b"\r\n", b""):
        raise Rejection(
            "bare-cr",
            "the header block holds a CR that does not end a line (a bare CR): refused, "
            "receivers would read it as a line end",
        )
    data = _LINE_END.sub(b"\r\n", raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def check_header_block(head: bytes) -> None:
    """Rules on the raw header block of a normalised message (line length, syntax, UTF-8, controls).

    Raises:
        Rejection: ``header-line-too-long``, ``header-syntax``, ``header-not-utf8`` or
            ``header-control-char``.
    """
    lines = head.split(b"\r\n")
    if max(map(len, lines), default=0) > MAX_LINE:
        number = next(i for i, line in enumerate(lines, 1) if len(line) > MAX_LINE)
        raise Rejection(
            "header-line-too-long",
            f"header line {number} is longer than {MAX_LINE} octets (RFC 5322 2.1.1); fold it",
            status="5.6.3",
        )
    for number, line in enumerate(lines, 1):
        if not line:
            break  # the empty line that ends the block
        if line[:1] in (b" ", b"\t"):
            if number == 1:
                raise Rejection("header-syntax", "the header block starts with a continuation line", status="5.6.0")
        elif _FIELD_NAME.match(line) is None:
            raise Rejection("header-syntax", f"header line {number} is not a header field (no 'name:')", status="5.6.0")
    if not head.isascii():
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejection(
                "header-not-utf8", "the header block holds 8-bit bytes that are not UTF-8 (RFC 6532)"
            ) from None
    for name, value in _read_fields(head):
        if _CONTROL.search(value):
            raise Rejection("header-control-char", f"the {name} header holds a control character", status="5.6.0")
    if b"\0" in head:
        number = next(i for i, line in enumerate(lines, 1) if b"\0" in line)
        raise Rejection("header-control-char", f"header line {number} holds a NUL byte", status="5.6.0")


def _read_fields(head: bytes) -> list[tuple[str, bytes]]:
    """(name, unfolded value) of every field of :data:`READ_FIELDS` in a CRLF header block."""
    found: list[tuple[str, bytes]] = []
    name: bytes | None = None
    value: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            found.append((name.decode("ascii"), b"".join(value)))
        match = _FIELD_NAME.match(line)
        name = match.group(1) if match is not None and match.group(1).lower() in READ_FIELDS else None
        value = [line[match.end() :]] if match is not None else []
    return found


def parse_headers(raw: bytes) -> Message:
    """Parse only the header block of ``raw``.

    The parser is handed the bytes up to the first empty line: it would otherwise split the
    whole body into lines just to skip them (most of the CPU of a 10 KB submission).
    """
    if raw.startswith((b"\n", b"\r\n")):
        return _PARSER.parsebytes(b"", headersonly=True)
    end = _HEADER_END.search(raw)
    return _PARSER.parsebytes(raw if end is None else raw[: end.end()], headersonly=True)


class HeaderFields(Protocol):
    """What the rules read of a header block: :class:`email.message.Message` or :class:`PlainHeaders`."""

    def get_all(self, name: str) -> list[Any] | None:
        """Every value of the field ``name`` (case-insensitive), None when absent."""
        ...


_PLAIN_FIELD: Final = re.compile(r"[!-9;-~]+:")


class PlainHeaders:
    """The fields of a plain ASCII header block, as ``BytesHeaderParser`` (compat32) returns them."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self.fields = fields
        self.defects: list[Any] = []

    @classmethod
    def parse(cls, head: bytes) -> PlainHeaders | None:
        """The fields of a CRLF header block, or None when it is not plain.

        Plain: ASCII, every line a ``name:`` field (name of printable characters but ``:``) or
        a continuation (leading space or tab) of one, up to the first empty line.  Values are
        compat32's: folding kept, whitespace after the colon and the final line end removed.
        Anything else (8-bit bytes, a first line that is a continuation, a line that is neither,
        a ``From`` line) goes to the standard parser, whose defects the rules look at.
        """
        crlf = head.count(b"\r\n")
        if not head.isascii() or head.count(b"\r") != crlf or head.count(b"\n") != crlf:
            return None
        fields: list[tuple[str, str]] = []
        name: str | None = None
        value: list[str] = []
        for line in head.decode("ascii").split("\r\n"):
            if line[:1] in (" ", "\t"):
                if name is None:
                    return None
                value.append(line + "\r\n")
                continue
            if name is not None:
                fields.append((name, "".join(value).lstrip(" \t").rstrip("\r\n")))
                name = None
            if not line:
                break
            match = _PLAIN_FIELD.match(line)
            if match is None:
                return None
            name = line[: match.end() - 1]
            value = [line[match.end() :] + "\r\n"]
        else:
            if name is not None:  # no line end after the last field
                fields.append((name, "".join(value).lstrip(" \t").rstrip("\r\n")))
        return cls(fields)

    def get_all(self, name: str) -> list[Any] | None:
        """Every value of the field ``name`` (case-insensitive), None when absent."""
        lowered = name.lower()
        return [v for k, v in self.fields if k.lower() == lowered] or None

    def keys(self) -> list[str]:
        """The field names, in order."""
        return [k for k, _ in self.fields]


def read_headers(raw: bytes) -> Message | PlainHeaders:
    """The header fields of ``raw``: :class:`PlainHeaders` when plain, else :func:`parse_headers`.

    The standard parser was the largest part of the intake rule's CPU for a typical message.
    """
    plain = PlainHeaders.parse(raw[: header_end(raw)])
    return plain if plain is not None else parse_headers(raw)


def _single(msg: HeaderFields, name: str) -> str | None:
    values = msg.get_all(name) or []
    if len(values) > 1 and len({str(v).strip() for v in values}) > 1:
        raise Rejection(f"{name.lower()}-repeated", f"{name} header appears {len(values)} times with different values")
    return str(values[0]).strip() if values else None


def valid_address(address: str) -> bool:
    """Syntax check of a bare ``local@domain`` address (no DNS)."""
    return len(address) <= 254 and _ADDRESS_RE.match(address) is not None


def getaddresses(values: Iterable[Any]) -> list[tuple[str, str]]:
    """:func:`email.utils.getaddresses` of ``values`` (header values), fast for the plain forms.

    Lists of ``local@domain`` and ``Some Name <local@domain>`` (:data:`_PLAIN_ADDRESS`) are
    split here, with the same result; anything else (quotes, comments, groups, empty list
    elements, 8-bit text) goes to the standard library's parser.  Its tokenizer was the
    largest part of the Receiver's and the Transformer's non-crypto CPU per message.
    """
    texts = [str(v) for v in values]
    found: list[tuple[str, str]] = []
    for text in texts:
        for piece in text.split(","):
            match = _PLAIN_ADDRESS.fullmatch(piece)
            if match is None:
                return email.utils.getaddresses(texts)
            name, routed, bare = match.groups()
            found.append(("", bare) if bare is not None else (" ".join(name.split()) if name else "", routed))
    return found


def recipients(msg: HeaderFields) -> tuple[str, ...]:
    """Distinct valid addresses of the To and Cc headers, in order."""
    fields = [v for name in ("To", "Cc") for v in (msg.get_all(name) or [])]
    seen: dict[str, None] = {}
    lowered: set[str] = set()
    for _, address in getaddresses(fields):
        address = address.strip()
        if valid_address(address) and address.lower() not in lowered:
            seen[address] = None
            lowered.add(address.lower())
    return tuple(seen)


def validate(raw: bytes, is_configured_domain: Callable[[str], bool]) -> Submission:
    """Check a submitted message against the rules above.

    Raises:
        Rejection: the first rule the message breaks.
    """
    if not raw.strip():
        raise Rejection("empty", "the message is empty")
    msg = read_headers(raw)
    if msg.defects and not msg.keys():
        raise Rejection("headers", "the message has no parsable header block")

    uuid = _single(msg, "X-Uuid")
    if uuid is None:
        raise Rejection("x-uuid-missing", "X-Uuid header is missing")
    if not valid_uuid(uuid):
        raise Rejection(
            "x-uuid-malformed",
            f"X-Uuid must match [a-z0-9]+ with at most {MAX_UUID_LENGTH} characters",
        )

    priority_text = _single(msg, "X-Priority")
    if priority_text is None or priority_text == "1":
        priority = 1
    elif priority_text == "0":
        priority = 0
    else:
        raise Rejection("x-priority", "X-Priority must be 0 (priority queue) or 1 (default queue)")

    from_fields = msg.get_all("From") or []
    from_addresses = [a for _, a in getaddresses(from_fields) if a]
    if not from_addresses:
        raise Rejection("from-missing", "From header is missing or has no address", smtp_code=550, status="5.1.7")
    if len(from_addresses) > 1:
        raise Rejection("from-multiple", "From header must hold exactly one address", smtp_code=550, status="5.1.7")
    from_address = from_addresses[0].strip()
    if not valid_address(from_address):
        raise Rejection("from-malformed", "From address is not valid", smtp_code=550, status="5.1.7")
    from_domain = from_address.rpartition("@")[2].lower().rstrip(".")
    if not is_configured_domain(from_domain):
        raise Rejection(
            "from-domain",
            f"From domain {from_domain} is not configured for sending (transformer.domain-settings)",
            smtp_code=550,
            status="5.7.1",
        )

    rcpts = recipients(msg)
    if not rcpts:
        raise Rejection("no-recipients", "To and Cc hold no valid recipient address", smtp_code=554, status="5.1.3")

    stream_id = _single(msg, "X-Stream-Id")
    return Submission(
        uuid=uuid,
        priority=priority,
        from_address=from_address,
        from_domain=from_domain,
        recipients=rcpts,
        stream_id=stream_id or None,
    )
