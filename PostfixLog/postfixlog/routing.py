"""Per-message routing: the header that sends each injected message through its provider's transport.

PostfixLog adds ``X-IB-Route: <provider>`` (``<provider> utf8`` for mail that needs SMTPUTF8) as
the *last* header of every message it hands to Postfix.  Postfix' header_checks
(:func:`postfixlog.rules.render_header_checks`) turn it into ``FILTER ib_<provider>:`` -- the
provider's transport, with its limits, to the recipient domain's MX hosts (or the sandbox
nexthop) -- and the Postfix SMTP client removes it on the way out (``smtp_header_checks``), so
it never reaches a receiver.  Being the last header, its FILTER wins over the one an 8-bit
header triggers (header_checks: the last FILTER counts).

Each recipient is its own transaction, so a message carries exactly one route.  Any
``X-IB-Route`` the customer's message already had is removed first (it must not choose a
transport), and :func:`strip_route` removes PostfixLog's own when a queued message goes back to
Redis.  The header is not signed (DKIM ``h=`` never lists it): adding and removing it changes
no signature.
"""

from __future__ import annotations

import re
from typing import Final

ROUTE_HEADER: Final = "X-IB-Route"
_FIELD: Final = re.compile(rb"^x-ib-route[ \t]*:", re.IGNORECASE)


def _split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block with its last line end, the blank line, body); no blank line: all header."""
    crlf, lf = raw.find(b"\r\n\r\n"), raw.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return raw[: crlf + 2], b"\r\n", raw[crlf + 4 :]
    if lf >= 0:
        return raw[: lf + 1], b"\n", raw[lf + 2 :]
    if raw and not raw.endswith(b"\n"):
        raw += b"\r\n"
    return raw, b"", b""


def strip_route(raw: bytes) -> bytes:
    """``raw`` without any ``X-IB-Route`` header field (continuation lines included)."""
    header, blank, body = _split(raw)
    if b"x-ib-route" not in header.lower():
        return raw
    kept: list[bytes] = []
    dropping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = bool(_FIELD.match(line))
        if not dropping:
            kept.append(line)
    return b"".join(kept) + blank + body


def add_route(raw: bytes, route: str, *, utf8: bool) -> bytes:
    """``raw`` with ``X-IB-Route: <route>[ utf8]`` as its last header field."""
    header, blank, body = _split(strip_route(raw))
    eol = b"\n" if blank == b"\n" else b"\r\n"
    value = f"{ROUTE_HEADER}: {route}{' utf8' if utf8 else ''}".encode("ascii")
    return header + value + eol + blank + body


def needs_utf8_route(raw: bytes, smtputf8: bool) -> bool:
    """True when the message goes through the provider's SMTPUTF8 twin transport.

    The Transformer says so (``meta["smtputf8"]``); raw 8-bit bytes in the header mean the same
    (Postfix' 8-bit header_checks rule would otherwise have routed it to ``smtputf8``).
    """
    if smtputf8:
        return True
    header, _, _ = _split(raw)
    return not header.isascii()
