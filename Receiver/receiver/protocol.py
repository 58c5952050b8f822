"""The SMTP protocol object of one client connection (an aiosmtpd ``SMTP`` subclass).

What it adds to aiosmtpd:

* AUTH is required for MAIL/RCPT/DATA (``530 5.7.0``) unless the client's address is in
  ``receiver.trusted-networks``; aiosmtpd's own ``auth_required`` cannot make that exception.
* Replies carry enhanced status codes where aiosmtpd has none (size limit -> ``552 5.3.4``)
  and are always sent as plain ASCII lines.
* Every connection is registered in a :class:`Sessions` set so a stopping process can close
  idle sessions at once (``421 4.3.2``) and let transactions in progress finish.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Any, Final, cast

from aiosmtpd.smtp import MISSING, SMTP, Session

from common.authguard import client_key

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TERMINATOR: Final = b"\r\n.\r\n"
#: ``<local@domain> [params]`` with nothing unusual (no quotes, route, literal or comment).
_SIMPLE_PATH: Final = re.compile(r"\s*<([^\s<>()\[\]\\,;:@\"]+@[^\s<>()\[\]\\,;:@\"]+)>(.*)\Z", re.DOTALL)
SHUTDOWN_REPLY: Final = b"421 4.3.2 Service shutting down, try again later\r\n"
AUTH_LIMIT_REPLY: Final = "421 4.7.0 Too many failed AUTH attempts, closing connection"


class SubmissionSession(Session):
    """aiosmtpd's session plus what the Receiver tracks per connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.peer_ip = ""
        self.trusted = False
        self.auth_failures = 0

    # aiosmtpd logs a deprecation warning on every use of this attribute; it is set on every
    # successful AUTH, so keep it quiet.
    @property
    def login_data(self) -> Any:
        """Login name of the authenticated user (aiosmtpd's legacy attribute)."""
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class Sessions:
    """The open connections of one process, and whether the process is stopping."""

    def __init__(self) -> None:
        self.open: set[SubmissionSMTP] = set()
        self.stopping = False
        self.empty = asyncio.Event()
        self.empty.set()

    def add(self, protocol: SubmissionSMTP) -> None:
        """Register a new connection."""
        self.open.add(protocol)
        self.empty.clear()

    def discard(self, protocol: SubmissionSMTP) -> None:
        """Forget a closed connection."""
        self.open.discard(protocol)
        if not self.open:
            self.empty.set()

    def close_idle(self) -> int:
        """Close every session not inside a mail transaction; returns how many are still working."""
        for protocol in list(self.open):
            protocol.close_if_idle()
        return sum(1 for protocol in self.open if not protocol.closing)

    def abort_all(self) -> int:
        """Cut every remaining connection; returns how many were still working (not closing)."""
        working = sum(1 for protocol in self.open if not protocol.closing)
        for protocol in list(self.open):
            protocol.close_now()
            protocol.abort()
        return working


_HOOK_NAMES: dict[tuple[str, tuple[str, ...]], list[str]] = {}


def hook_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """Attribute names of ``cls`` that start with one of ``prefixes`` (what aiosmtpd scans for)."""
    key = (f"{cls.__module__}.{cls.__qualname__}", prefixes)
    names = _HOOK_NAMES.get(key)
    if names is None:
        names = sorted({name for klass in cls.__mro__ for name in vars(klass) if name.startswith(prefixes)})
        _HOOK_NAMES[key] = names
    return names


def is_trusted(peer_ip: str, networks: Sequence[Network]) -> bool:
    """True when ``peer_ip`` lies in one of ``networks``."""
    if not networks or not peer_ip:
        return False
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


class SubmissionSMTP(SMTP):
    """One client connection."""

    def __init__(
        self,
        handler: Any,
        *,
        sessions: Sessions,
        trusted_networks: Sequence[Network],
        max_auth_failures: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        # aiosmtpd keeps these limits in a class attribute shared by all connections.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._sessions = sessions
        self._trusted_networks = trusted_networks
        self._max_auth_failures = max_auth_failures
        self._rewrites = _rewrites(self.data_size_limit)
        self._in_data = False

    def __dir__(self) -> list[str]:
        """Only the names aiosmtpd looks up by prefix (``smtp_*``, ``auth_*``).

        aiosmtpd scans ``dir()`` of the protocol (and of the handler) with
        ``inspect.getmembers`` for every new connection; listing the ~150 inherited attributes
        cost about a tenth of the CPU spent per message.
        """
        return hook_names(type(self), ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Address and parameters of MAIL/RCPT; plain ``<local@domain>`` without the email parser."""
        match = _SIMPLE_PATH.match(arg) if arg else None
        if match is not None:
            return match.group(1), match.group(2).lstrip()
        address, rest = super()._getaddr(arg)
        return address, rest

    def _create_session(self) -> SubmissionSession:
        return SubmissionSession(self.loop)

    @property
    def state(self) -> SubmissionSession:
        """The current session with the Receiver's fields."""
        # A cast, not an assert: aiosmtpd's constructor reads every attribute (inspect.getmembers)
        # before a session exists.
        return cast(SubmissionSession, self.session)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection and classify its peer (STARTTLS calls this a second time)."""
        upgrading = self.transport is not None and self._original_transport is not None
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        peer_ip = client_key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        self.state.peer_ip = peer_ip
        self.state.trusted = is_trusted(peer_ip, self._trusted_networks)
        if not upgrading:
            self._sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the connection."""
        self._sessions.discard(self)
        super().connection_lost(error)

    async def check_auth_needed(self, caller_method: str) -> bool:
        """Require AUTH, except for clients in ``trusted-networks``."""
        if self.state.authenticated or self.state.trusted:
            return False
        await self.push("530 5.7.0 Authentication required")
        return True

    async def push(self, status: str | bytes) -> None:
        """Send one reply line: enhanced codes added, always ASCII, never a stray CR/LF."""
        if isinstance(status, str):
            status = self._rewrites.get(status, status)
            status = status.replace("\r", " ").replace("\n", " ").encode("ascii", errors="replace")
        await super().push(status)

    async def smtp_AUTH(self, arg: str) -> None:
        """AUTH, closing the connection after too many failures in one session."""
        await super().smtp_AUTH(arg)
        if self.state.auth_failures >= self._max_auth_failures and self.transport is not None:
            self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read in large pieces (aiosmtpd reads line by line); same replies and checks.

        A stopping process closes the session right after the reply.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self._in_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                wire = await read_data(self._reader, self.data_size_limit)
            except asyncio.CancelledError:
                self._writer.close()  # the connection was lost during DATA
                raise
            status: Any
            if wire is None:
                status = f"552 5.3.4 Message too big for system (limit {self.data_size_limit} bytes)"
            else:
                content = unstuff(wire)
                self.envelope.content = self.envelope.original_content = content
                status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            self._in_data = False
        if self._sessions.stopping:
            self.close_if_idle()

    def close_if_idle(self) -> None:
        """Say ``421`` and close, unless a mail transaction is in progress."""
        in_transaction = self.envelope is not None and self.envelope.mail_from is not None
        if not (self._in_data or in_transaction):
            self.close_now()

    def close_now(self) -> None:
        """Say ``421`` and close the connection."""
        if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
            self.transport.write(SHUTDOWN_REPLY)
            self.transport.close()

    @property
    def closing(self) -> bool:
        """True once the connection is being closed (a TLS close can wait for the client)."""
        return self.transport is None or self.transport.is_closing()

    def abort(self) -> None:
        """Drop the connection now, TLS close handshake or not."""
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()


async def read_data(reader: asyncio.StreamReader, limit: int | None = None) -> bytes | None:
    """Read DATA up to the terminating ``CRLF.CRLF``; the wire bytes before its final ``.CRLF``.

    The data starts right after the CRLF of the DATA command, so a first line of ``.`` ends an
    empty message.  The few bytes that could complete a terminator together with that CRLF are
    read one at a time; after that ``readuntil`` finds the terminator in large pieces (its
    ``LimitOverrunError`` keeps the last bytes buffered, so no terminator is split between two
    pieces).  Nothing after the terminator is consumed.  Returns None when the data exceeded
    ``limit`` bytes (it is read to the end and discarded).
    """
    pieces: list[bytes] = []
    size = 0
    tail = b"\r\n"  # what precedes the data: the end of the DATA command line
    while tail:
        byte = await reader.readexactly(1)
        pieces.append(byte)
        size += 1
        tail = _terminator_prefix(tail + byte)
        if tail == TERMINATOR:
            return b"".join(pieces)[:-3]
    while True:
        try:
            piece = await reader.readuntil(TERMINATOR)
            done = True
        except asyncio.LimitOverrunError as exc:
            piece = await reader.readexactly(exc.consumed)
            done = False
        size += len(piece)
        if limit and size > limit + len(TERMINATOR):
            pieces.clear()  # keep reading to the terminator, keep nothing
        else:
            pieces.append(piece)
        if done:
            break
    if limit and size > limit + len(TERMINATOR):
        return None
    return b"".join(pieces)[:-3]  # keep the CRLF that ends the last line, drop ".CRLF"


def _terminator_prefix(data: bytes) -> bytes:
    """The longest suffix of ``data`` that starts the terminator (or is the whole terminator)."""
    for k in range(min(len(data), len(TERMINATOR)), 0, -1):
        if TERMINATOR.startswith(data[-k:]):
            return data[-k:]
    return b""


def unstuff(wire: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 4.5.2): remove the leading dot of every line that has one."""
    return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:]


def _rewrites(size_limit: int | None) -> dict[str, str]:
    """Replies of aiosmtpd that lack an enhanced status code, and what to say instead."""
    limit = f" (limit {size_limit} bytes)" if size_limit else ""
    return {
        "552 Error: message size exceeds fixed maximum message size": (
            f"552 5.3.4 Message size exceeds fixed maximum message size{limit}"
        ),
        "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
        "221 Bye": "221 2.0.0 Bye",
        "250 OK": "250 2.0.0 OK",
        "503 Already authenticated": "503 5.5.1 Already authenticated",
        "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
        "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    }
