"""Every SMTP reply Receiver and MxServer send, as typed constants in one place.

Each reply carries an RFC 3463 enhanced status code.  Replies with a variable part are
functions.  Temporary failures (4xx) make the sending client keep the message and retry;
permanent ones (5xx) tell it the message will never be accepted as it is.
"""

from __future__ import annotations

import re
from typing import Final

# -- connection and session (both listeners) ---------------------------------------------------
TOO_MANY_CONNECTIONS: Final = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_ADDRESS: Final = "421 4.7.0 Too many connections from your address, try again later"
IDLE_TIMEOUT: Final = "421 4.4.2 Error: timeout exceeded"
SESSION_TOO_LONG: Final = "421 4.4.2 Error: session too long, please reconnect"
SHUTTING_DOWN: Final = "421 4.3.2 Service shutting down, try again later"
TLS_UNAVAILABLE: Final = "454 4.7.0 TLS not available due to temporary reason"
ALREADY_TLS: Final = "503 5.5.1 Already running TLS"
AUTH_LINE_TOO_LONG: Final = "500 5.5.6 Authentication exchange line is too long, closing connection"
INTERNAL_ERROR: Final = "451 4.3.0 Internal error, try again later"
OK: Final = "250 2.0.0 OK"

# -- submission (Receiver) ---------------------------------------------------------------------
AUTH_OK: Final = "235 2.7.0 Authentication successful"
AUTH_INVALID: Final = "535 5.7.8 Authentication credentials invalid"
AUTH_REQUIRED: Final = "530 5.7.0 Authentication required"
AUTH_TOO_MANY_IN_SESSION: Final = "421 4.7.0 Too many failed AUTH attempts, closing connection"
AUTH_UNAVAILABLE: Final = "454 4.7.0 Temporary authentication failure, try again later"
AUTH_BAD_BASE64: Final = "501 5.5.2 Cannot decode base64"
AUTH_BAD_PLAIN: Final = "501 5.5.2 Cannot split AUTH PLAIN value"
AUTH_OTHER_IDENTITY: Final = "535 5.7.8 Acting as another identity (authzid) is not allowed"
SENDER_OK: Final = "250 2.1.0 Ok"
RECIPIENT_OK: Final = "250 2.1.5 Ok"
RECIPIENT_SYNTAX: Final = "501 5.1.3 Bad recipient address syntax (need local-part@domain)"
NEED_RCPT: Final = "503 5.5.1 Error: need RCPT command"
DATA_SYNTAX: Final = "501 5.5.4 Syntax: DATA"
START_DATA: Final = "354 End data with <CR><LF>.<CR><LF>"
QUEUE_FULL: Final = "452 4.3.1 Mail queue is full, try again later"
QUEUE_UNAVAILABLE: Final = "451 4.3.0 Mail queue temporarily unavailable, try again later"


def auth_busy(seconds: str) -> str:
    """AUTH refused: the failures and logins in progress of this address or account reached the limit."""
    return f"454 4.7.0 Too many login attempts, try again in {seconds} seconds"


def auth_locked_out(seconds: str) -> str:
    """An address (or account) is locked out after too many failed logins."""
    return f"454 4.7.0 Too many failed logins, try again in {seconds} seconds"


def too_many_recipients(limit: int) -> str:
    """More RCPT commands than one message may have."""
    return f"452 4.5.3 Too many recipients (at most {limit} per message)"


def message_too_big(limit: int | None) -> str:
    """The message exceeds the SIZE limit."""
    return f"552 5.3.4 Message too big for system (limit {limit} bytes)"


def queued_as(uuid: str) -> str:
    """The message is durably queued."""
    return f"250 2.0.0 Ok: queued as {uuid}"


# -- public MX (MxServer) ----------------------------------------------------------------------
MX_RECIPIENT_OK: Final = "250 2.1.5 OK"
MX_TEMPORARY: Final = "451 4.3.0 Temporary failure, please try again later"
MX_EVENT_QUEUE_FULL: Final = "452 4.3.1 Event queue full, please try again later"
MX_DISK_UNAVAILABLE: Final = "451 4.3.0 Cannot store the message now, please try again later"
MX_TOO_MANY_RECIPIENTS: Final = "452 4.5.3 Too many recipients"


def mx_relay_denied(address: str) -> str:
    """A recipient on a domain we do not serve: we are not a relay."""
    return f"550 5.7.1 <{address}>: Relay access denied"


def mx_invalid_tag(address: str) -> str:
    """A tagged address whose tag does not verify (forged or damaged)."""
    return f"550 5.7.1 <{address}>: Invalid address tag"


def mx_unknown_address(address: str) -> str:
    """Any other local part of a return-path domain."""
    return f"550 5.1.1 <{address}>: No such address here"


def mx_accepted(kind: str) -> str:
    """The mail is classified and its outcome durable."""
    return f"250 2.0.0 OK {kind}"


def rewrites(size_limit: int | None) -> dict[str, str]:
    """Replies of aiosmtpd that lack an enhanced status code, and what to say instead."""
    limit = f" (limit {size_limit} bytes)" if size_limit else ""
    return {
        "552 Error: message size exceeds fixed maximum message size": (
            f"552 5.3.4 Message size exceeds fixed maximum message size{limit}"
        ),
        "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
        "221 Bye": "221 2.0.0 Bye",
        "250 OK": OK,
        "250 Ok": OK,
        "503 Already authenticated": "503 5.5.1 Already authenticated",
        "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
        "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
        "503 Error: send HELO first": "503 5.5.1 Error: send HELO first",
        "501 Syntax: NOOP": "501 5.5.4 Syntax: NOOP",
        "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    }


#: Enhanced status (RFC 3463) for a reply of aiosmtpd's that names none and is not in
#: :func:`rewrites` (e.g. ``500 Error: command "BDAT" not recognized``), by reply code.
_STATUS_OF_CODE: Final = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_STATUS: Final = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_status(reply: str) -> str:
    """``reply`` with an enhanced status after its code when it has none (RFC 2034).

    Not for the greeting, the answers to HELO/EHLO, or 3xx continuations (334, 354), which
    carry none by definition.
    """
    code = reply[:3]
    if reply[3:4] not in (" ", "-", "") or _HAS_STATUS.match(reply):
        return reply
    status = _STATUS_OF_CODE.get(code) or (f"{code[0]}.0.0" if code[:1] in ("2", "4", "5") else None)
    if status is None or code == "220":
        return reply
    return f"{code}{reply[3:4] or ' '}{status}{' ' + reply[4:] if reply[4:] else ''}"
