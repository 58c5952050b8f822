"""The SMTP protocol object of one submission connection (on :class:`common.smtpserver.BaseSMTP`).

What it adds to the shared base (connection and session limits, shutdown, enhanced replies):

* AUTH is required for MAIL/RCPT/DATA (``530 5.7.0``) unless the client's address is in
  ``receiver.trusted-networks``; aiosmtpd's own ``auth_required`` cannot make that exception.
* DATA is read in large pieces rather than line by line (:func:`read_data`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Sequence
from typing import Any, Final, cast

from aiosmtpd.smtp import MISSING, SMTP, Session

from common import smtpreplies as replies
from common.smtpserver import BaseSMTP, Sessions, same_help

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TERMINATOR: Final = b"\r\n.\r\n"


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


def is_trusted(peer_ip: str, networks: Sequence[Network]) -> bool:
    """True when ``peer_ip`` lies in one of ``networks``."""
    if not networks or not peer_ip:
        return False
    return _in_networks(peer_ip, tuple(networks))


@functools.lru_cache(maxsize=4096)
def _in_networks(peer_ip: str, networks: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


class SubmissionSMTP(BaseSMTP):
    """One submission connection."""

    def __init__(
        self,
        handler: Any,
        *,
        sessions: Sessions,
        trusted_networks: Sequence[Network],
        max_auth_failures: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, sessions=sessions, **kwargs)
        self._trusted_networks = trusted_networks
        self._max_auth_failures = max_auth_failures

    def _create_session(self) -> SubmissionSession:
        return SubmissionSession(self.loop)

    @property
    def state(self) -> SubmissionSession:
        """The current session with the Receiver's fields."""
        # A cast, not an assert: aiosmtpd's constructor reads every attribute (inspect.getmembers)
        # before a session exists.
        return cast(SubmissionSession, self.session)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection and classify its peer (STARTTLS calls this a second time)."""
        super().connection_made(transport)
        if self.session is not None:
            self.state.peer_ip = self.peer_ip
            self.state.trusted = is_trusted(self.peer_ip, self._trusted_networks)

    async def check_auth_needed(self, caller_method: str) -> bool:
        """Require AUTH, except for clients in ``trusted-networks``."""
        if self.state.authenticated or self.state.trusted:
            return False
        await self.push(replies.AUTH_REQUIRED)
        return True

    @same_help(SMTP.smtp_AUTH)
    async def smtp_AUTH(self, arg: str) -> None:
        """AUTH, closing the connection after too many failures in one session."""
        await super().smtp_AUTH(arg)
        if self.state.auth_failures >= self._max_auth_failures and self.transport is not None:
            self.transport.close()

    @same_help(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        """DATA, read in large pieces (aiosmtpd reads line by line); same replies and checks.

        A stopping process (or an expired session) closes the session right after the reply.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push(replies.DATA_SYNTAX)
            return
        self._in_data = True
        try:
            await self.push(replies.START_DATA)
            try:
                wire = await read_data(self._reader, self.data_size_limit)
            except asyncio.CancelledError:
                self._writer.close()  # the connection was lost during DATA
                raise
            status: Any
            if wire is None:
                status = replies.message_too_big(self.data_size_limit)
            else:
                content = unstuff(wire)
                self.envelope.content = self.envelope.original_content = content
                status = await self._call_handler_hook("DATA")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(replies.OK if status is MISSING else status)
        finally:
            self._in_data = False
        self.transaction_done()


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
