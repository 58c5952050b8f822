"""The SMTP server base of Receiver (submission) and MxServer (public MX), on aiosmtpd.

What both listeners need beyond aiosmtpd, written once:

* **Connection limits** (:class:`Sessions`): a global and a per-client-address cap; a client
  over either gets ``421 4.7.0`` at connect and is disconnected, counted by reason.
* **Session limits**: an idle timeout per command (shortened to ``busy-idle-timeout-seconds``
  while more than half of the connection slots are in use, as Postfix does under stress --
  also for the sessions already waiting when that happens), a
  total session length that no NOOP loop can renew (a transaction in progress is finished
  first), and per-command budgets for commands that do nothing (NOOP, RSET, HELP, VRFY, EXPN).
  Timeouts end with a ``421 4.4.2`` reply, not a silent close.
* **Shutdown** (:meth:`Sessions.drain`): stop accepting, answer ``421 4.3.2`` to idle
  sessions at once, let transactions in progress finish within the grace time, then cut what
  is left.
* Replies with enhanced status codes (aiosmtpd's own replies have none), always one ASCII line.
* PIPELINING (RFC 2920): advertised; the replies to MAIL, RCPT and RSET wait while the client
  has already sent the next command, and go out together with the reply to the last command
  of the group (as Postfix does), at most :data:`MAX_HELD_REPLIES` at a time; the EHLO reply
  goes out in one write, not one per line.
* Speed: aiosmtpd scans ``dir()`` of the protocol and the handler for hooks on every
  connection; here the protocol's command and AUTH tables are bound from a per-class list
  (:func:`hook_table`) instead, and the handler's scan lists only its hooks (:func:`hook_names`).
  The idle timer is re-armed lazily (one deadline per command, not a new timer), aiosmtpd's
  per-command log lines are not even prepared while its logger is quiet, and plain
  ``<local@domain>`` paths skip the e-mail address parser.

Private aiosmtpd names used here (``_getaddr``, ``_reset_timeout``, ``_timeout_cb``,
``_smtp_methods``, ``_auth_methods``, ``_handle_hooks``, ``sanitized_log``) are why ``aiosmtpd``
is pinned to the minor version tested (``common/pyproject.toml``).  Whether the client's next
command is already here is read from asyncio's ``StreamReader._buffer``; were
that attribute gone, no reply would wait (each would go out at once, as before pipelining).

Reply texts live in :mod:`common.smtpreplies`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, _AuthMechAttr

from common import smtpreplies as replies
from common.authguard import client_key
from common.config.base import SmtpLimits

log = logging.getLogger(__name__)

#: ``<local@domain> [params]`` with nothing unusual (no quotes, route, literal or comment).
_SIMPLE_PATH: Final = re.compile(r"\s*<([^\s<>()\[\]\\,;:@\"]+@[^\s<>()\[\]\\,;:@\"]+)>(.*)\Z", re.DOTALL)

#: Times a command that changes nothing may be sent in one session (aiosmtpd's call limits).
IDLE_COMMAND_BUDGET: Final[Mapping[str, int]] = {"NOOP": 50, "RSET": 1000, "HELP": 10, "VRFY": 10, "EXPN": 10}
#: Budget of every other command (MAIL/RCPT/DATA run once per message; keep it out of the way).
OTHER_COMMAND_BUDGET: Final = 1_000_000

#: Replies held for a pipelining client at most; then they go out and the write's flow control
#: applies, so a client that pipelines without reading cannot make the server buffer without end.
MAX_HELD_REPLIES: Final = 64

#: Why a connection was refused (metric label).
REFUSED_BUSY: Final = "busy"
REFUSED_PER_IP: Final = "per-ip"


@dataclass(frozen=True)
class Limits:
    """Connection and session limits of one process (from :class:`common.config.base.SmtpLimits`)."""

    max_connections: int = 500
    max_connections_per_ip: int = 20
    idle_timeout_s: float = 300.0
    busy_idle_timeout_s: float = 10.0
    max_session_s: float = 1800.0

    @classmethod
    def from_config(cls, section: SmtpLimits, processes: int = 1) -> Limits:
        """The limits of one of ``processes`` worker processes sharing the section's limits.

        The global cap is shared out; the per-address cap applies in each process (the kernel
        spreads one client's connections unevenly over the processes, so a share of it would
        refuse a legitimate client early).
        """
        share = max(processes, 1)
        return cls(
            max_connections=max(-(-section.max_connections // share), 1),
            max_connections_per_ip=section.max_connections_per_ip,
            idle_timeout_s=section.idle_timeout_seconds,
            busy_idle_timeout_s=section.busy_idle_timeout_seconds,
            max_session_s=section.max_session_seconds,
        )


@dataclass
class Sessions:
    """The open connections of one process, per client address, and whether it is stopping."""

    limits: Limits = field(default_factory=Limits)
    #: Called with a reason (:data:`REFUSED_BUSY`, :data:`REFUSED_PER_IP`) for each refused connection.
    on_refused: Callable[[str], None] = lambda _reason: None
    #: Called with the number of open sessions whenever it changes.
    on_count: Callable[[int], None] = lambda _count: None
    open: set[BaseSMTP] = field(default_factory=set)
    per_ip: collections.Counter[str] = field(default_factory=collections.Counter)
    stopping: bool = False

    def __post_init__(self) -> None:
        self.empty = asyncio.Event()
        self.empty.set()

    @property
    def busy(self) -> bool:
        """True while more than half of the connection slots are in use."""
        return 2 * len(self.open) > self.limits.max_connections

    def admit(self, protocol: BaseSMTP, peer_ip: str) -> str | None:
        """Register a new connection; the refusal reply (and nothing registered) when over a cap."""
        if len(self.open) >= self.limits.max_connections:
            self.on_refused(REFUSED_BUSY)
            return replies.TOO_MANY_CONNECTIONS
        if peer_ip and self.per_ip[peer_ip] >= self.limits.max_connections_per_ip:
            self.on_refused(REFUSED_PER_IP)
            log.info("refused a connection from %s: %d sessions open from that address", peer_ip, self.per_ip[peer_ip])
            return replies.TOO_MANY_FROM_ADDRESS
        was_busy = self.busy
        self.open.add(protocol)
        if peer_ip:
            self.per_ip[peer_ip] += 1
        if self.busy and not was_busy:
            # Sessions that connected while there was room (and have been silent since) would
            # keep their long idle timeout: shorten it now, or silent connections opened
            # before the rush hold half the slots for idle-timeout-seconds.
            for other in self.open:
                if other is not protocol and not other.in_transaction:
                    other.shorten_idle_timeout()
        self.empty.clear()
        self.on_count(len(self.open))
        return None

    def discard(self, protocol: BaseSMTP, peer_ip: str) -> None:
        """Forget a closed connection."""
        if protocol not in self.open:
            return
        self.open.discard(protocol)
        if peer_ip:
            self.per_ip[peer_ip] -= 1
            if self.per_ip[peer_ip] <= 0:
                del self.per_ip[peer_ip]
        if not self.open:
            self.empty.set()
        self.on_count(len(self.open))

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

    async def drain(self, servers: list[asyncio.Server], grace_s: float, flush_s: float = 1.0) -> int:
        """Graceful stop: no new connections, idle sessions closed, transactions finished.

        Transactions still running after ``grace_s`` are cut; returns how many were.  Closed
        sessions get ``flush_s`` to flush their last reply (a TLS close may wait for a client
        that never answers).
        """
        self.stopping = True
        for server in servers:
            server.close()
        deadline = time.monotonic() + grace_s
        while self.close_idle() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.empty.wait(), timeout=0.05)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.empty.wait(), timeout=flush_s)
        working = self.abort_all()
        if working:
            log.warning("cut %d sessions still in a transaction after %.0fs", working, grace_s)
        await asyncio.sleep(0)
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


HookTable = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]
_HOOK_TABLES: dict[tuple[type, str], HookTable] = {}


def hook_table(cls: type, prefix: str = "smtp_") -> HookTable:
    """(name, attribute) pairs of a class's hooks, and of its AUTH methods.

    The names are the ones aiosmtpd derives: the command (``smtp_*`` of a protocol) or hook
    (``handle_*`` of a handler) without its prefix; the AUTH mechanism of an ``auth_*`` method
    (which may name it with ``@auth_mechanism``).
    """
    table = _HOOK_TABLES.get((cls, prefix))
    if table is None:
        hooks = tuple((name.replace(prefix, ""), name) for name in hook_names(cls, (prefix,)))
        mechanisms = tuple(
            (getattr(getattr(cls, name), "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")), name)
            for name in hook_names(cls, ("auth_",))
        )
        table = _HOOK_TABLES[cls, prefix] = hooks, mechanisms
    return table


_MAIL_LOG: Final = logging.getLogger("mail.log")
_sanitized_log: Final = aiosmtpd.smtp.sanitized_log


def _sanitized_log_if_enabled(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """The ``sanitized_log`` of aiosmtpd, skipped while its logger is quiet.

    aiosmtpd calls it twice per command line and it masks AUTH data in the arguments before
    the logger decides to drop the record; ``mail.log`` logs at WARNING here (common.logs).
    """
    if _MAIL_LOG.isEnabledFor(logging.INFO):
        _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled  # looked up at each call


class _NoHooks:
    """The handler aiosmtpd's constructor sees (:meth:`BaseSMTP._bind_hooks` binds the real one)."""

    def __dir__(self) -> list[str]:
        return []


_NO_HOOKS: Final = _NoHooks()


def _plain_handler(handler: Any) -> bool:
    """True when :func:`hook_table` finds all that aiosmtpd's scan of ``handler`` would.

    Not so for hooks set on the instance, nor for ``handle_EHLO``, whose signature aiosmtpd
    inspects: such a handler goes through aiosmtpd's own scan.
    """
    own = getattr(handler, "__dict__", {})
    return not hasattr(handler, "handle_EHLO") and not any(name.startswith(("handle_", "auth_")) for name in own)


F = TypeVar("F", bound=Callable[..., Any])


def same_help(command: Callable[..., Any]) -> Callable[[F], F]:
    """Give an overriding ``smtp_*`` method the HELP text of aiosmtpd's (``HELP`` lists it)."""

    def decorate(method: F) -> F:
        for name in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if hasattr(command, name):
                setattr(method, name, getattr(command, name))
        return method

    return decorate


def _groupable(command: Callable[[Any, str], Awaitable[None]]) -> Callable[[Any, str], Awaitable[None]]:
    """The ``command`` of aiosmtpd on :class:`BaseSMTP`, its reply allowed to wait for the next one's."""

    @same_help(command)
    async def answer(self: BaseSMTP, arg: str) -> None:
        self._groupable = True
        try:
            await command(self, arg)
        finally:
            self._groupable = False

    answer.__name__ = command.__name__
    answer.__doc__ = f"{command.__name__[5:]} as aiosmtpd answers it; the reply may wait for the next command's."
    return answer


def call_limits() -> dict[str, int]:
    """The ``command_call_limit`` of aiosmtpd: small budgets for commands that change nothing.

    aiosmtpd reads the budget of every other command from the ``"*"`` key (its default, 20,
    would end a session after 20 messages).
    """
    return {**IDLE_COMMAND_BUDGET, "*": OTHER_COMMAND_BUDGET}


@runtime_checkable
class Writable(Protocol):
    """A transport that writes and closes: asyncio's, or uvloop's.

    uvloop's transports are not registered as :class:`asyncio.WriteTransport` subclasses, so an
    ``isinstance`` test against that class would skip every plain-TCP connection under uvloop
    (no ``421`` at shutdown or idle timeout, no abort).
    """

    def write(self, data: bytes) -> None:
        """Queue ``data`` for sending."""
        ...

    def is_closing(self) -> bool:
        """True once closing."""
        ...

    def close(self) -> None:
        """Close after flushing."""
        ...

    def abort(self) -> None:
        """Close now, discarding what is buffered."""
        ...


class BaseSMTP(SMTP):
    """One client connection of Receiver or MxServer (see the module docstring)."""

    def __init__(self, handler: Any, *, sessions: Sessions, **kwargs: Any) -> None:
        kwargs.setdefault("timeout", sessions.limits.idle_timeout_s)
        kwargs.setdefault("command_call_limit", call_limits())
        fast = _plain_handler(handler)
        self._scanned = fast  # aiosmtpd's scan of dir() finds nothing of ours: _bind_hooks
        super().__init__(_NO_HOOKS if fast else handler, **kwargs)
        self._scanned = False
        if fast:
            self.event_handler = handler
            self._bind_hooks(handler, kwargs.get("auth_exclude_mechanism") or ())
        #: When the idle timer really expires (``_timeout_handle`` may fire earlier: it re-arms).
        self._idle_deadline = 0.0
        # aiosmtpd keeps these limits in a class attribute shared by all connections.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._sessions = sessions
        self._rewrites: Mapping[str, str] = replies.rewrites(self.data_size_limit)
        self._in_data = False
        self._admitted = False
        self._peer_ip = ""
        self._session_deadline: asyncio.TimerHandle | None = None
        self._expired = False
        #: True while answering HELO/EHLO: those lines carry no enhanced status (RFC 2034).
        self._greeting = False
        #: Reply lines not written yet (see :meth:`push`), and whether they must wait.
        self._replies: list[bytes] = []
        self._hold = False
        self._groupable = False

    def __dir__(self) -> list[str]:
        """Only the names aiosmtpd looks up by prefix (``smtp_*``, ``auth_*``).

        aiosmtpd scans ``dir()`` of the protocol (and of the handler) with
        ``inspect.getmembers`` for every new connection; listing the ~150 inherited attributes
        cost about a tenth of the CPU spent per message.  While aiosmtpd's constructor scans it,
        nothing: :meth:`_bind_hooks` builds the same tables from :func:`hook_table`.
        """
        if self.__dict__.get("_scanned"):
            return []
        return hook_names(type(self), ("smtp_", "auth_"))

    def _bind_hooks(self, handler: Any, excluded: Iterable[str]) -> None:
        """The hook tables aiosmtpd builds from ``dir()`` of the protocol and the handler.

        Its constructor got a handler without hooks and a protocol whose ``dir()`` was empty;
        the names come from :func:`hook_table` instead, bound here. As in aiosmtpd, an AUTH
        mechanism of the handler replaces the protocol's of the same name.
        """
        commands, mechanisms = hook_table(type(self))
        hooks, handler_mechanisms = hook_table(type(handler), "handle_")
        self._smtp_methods = {command: getattr(self, name) for command, name in commands}
        auth = {mechanism: _AuthMechAttr(getattr(self, name), True) for mechanism, name in mechanisms}
        auth.update((mechanism, _AuthMechAttr(getattr(handler, name), False)) for mechanism, name in handler_mechanisms)
        for mechanism in excluded:
            auth.pop(mechanism, None)
        self._auth_methods = auth
        self._handle_hooks = {hook: getattr(handler, name) for hook, name in hooks}

    @property
    def peer_ip(self) -> str:
        """The client's address (IPv4-mapped IPv6 as IPv4), or ``""`` when unknown."""
        return self._peer_ip

    # -- connection life cycle -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit or refuse a new connection; start the dialogue (STARTTLS calls this again)."""
        if self.transport is None and not self._admitted:
            peer = transport.get_extra_info("peername")
            self._peer_ip = client_key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
            refusal = self._sessions.admit(self, self._peer_ip)
            if refusal is not None:
                if isinstance(transport, Writable):
                    transport.write(f"{refusal}\r\n".encode())
                transport.close()
                return
            self._admitted = True
            self._session_deadline = asyncio.get_running_loop().call_later(
                self._sessions.limits.max_session_s, self._session_expired
            )
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the connection."""
        if not self._admitted:
            return  # refused at connect: aiosmtpd never started on it
        self._sessions.discard(self, self._peer_ip)
        if self._session_deadline is not None:
            self._session_deadline.cancel()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Idle timeout per command, shorter while the process is busy.

        Every command moves the deadline; the timer itself is only replaced when the deadline
        comes earlier than it. A timer that fires before the deadline re-arms for the rest
        (:meth:`_timeout_cb`), so a session costs one timer per idle period, not one per command.
        """
        if duration is None and self._sessions.busy:
            duration = self._sessions.limits.busy_idle_timeout_s
        duration = duration or self._timeout_duration
        self._idle_deadline = deadline = self.loop.time() + duration
        handle = self._timeout_handle
        if handle is not None:
            if handle.when() <= deadline and not handle.cancelled():
                return
            handle.cancel()
        self._timeout_handle = self.loop.call_later(duration, self._timeout_cb)

    def shorten_idle_timeout(self) -> None:
        """The process just became busy: wait at most ``busy-idle-timeout-seconds`` from now."""
        if self.transport is not None and self._timeout_handle is not None:
            remaining = self._idle_deadline - self.loop.time()
            if remaining > self._sessions.limits.busy_idle_timeout_s:
                self._reset_timeout(self._sessions.limits.busy_idle_timeout_s)

    def _timeout_cb(self) -> None:
        """Idle too long: say why, then close (aiosmtpd closes silently); early: wait on."""
        remaining = self._idle_deadline - self.loop.time()
        if remaining > 0:
            self._timeout_handle = self.loop.call_later(remaining, self._timeout_cb)
            return
        log.info("%s: idle timeout", self._peer_ip or "client")
        self._say_and_close(replies.IDLE_TIMEOUT)

    def _session_expired(self) -> None:
        """The session reached ``max-session-seconds``: close it, after a transaction in progress."""
        self._expired = True
        if not self.in_transaction:
            log.info("%s: session too long", self._peer_ip or "client")
            self._say_and_close(replies.SESSION_TOO_LONG)

    def _say_and_close(self, reply: str) -> None:
        transport: object = self.transport  # typed BaseTransport by aiosmtpd; see Writable
        if isinstance(transport, Writable) and not transport.is_closing():
            transport.write(b"".join(self._replies) + f"{reply}\r\n".encode())
            self._replies.clear()
            transport.close()

    # -- replies ---------------------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Address and parameters of MAIL/RCPT; plain ``<local@domain>`` without the email parser."""
        match = _SIMPLE_PATH.match(arg) if arg else None
        if match is not None:
            return match.group(1), match.group(2).lstrip()
        address, rest = super()._getaddr(arg)
        return address, rest

    async def push(self, status: str | bytes) -> None:
        """Send one reply line: enhanced codes added, always ASCII, never a stray CR/LF.

        The line waits (in order) while an EHLO reply is being put together, and after MAIL,
        RCPT or RSET while the client has already sent its next command (RFC 2920 pipelining:
        that command's reply is sure to follow, and carries this one along).
        """
        if isinstance(status, str):
            status = self._rewrites.get(status, status)
            if not (self._greeting and status.startswith("250")):
                status = replies.with_status(status)
            elif status == "250 HELP":  # the last EHLO line: what this server adds to aiosmtpd's
                self._replies.append(b"250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n")
            status = status.replace("\r", " ").replace("\n", " ").encode("ascii", errors="replace")
        self._replies.append(status + b"\r\n")
        if self._hold or (self._groupable and len(self._replies) < MAX_HELD_REPLIES and self._next_command_waiting()):
            return
        await self._flush_replies()

    def _next_command_waiting(self) -> bool:
        """True when a whole command line from the client is already buffered."""
        buffered: bytes | bytearray = getattr(self._reader, "_buffer", b"")
        return b"\n" in buffered

    async def _flush_replies(self) -> None:
        if self._replies:
            data = b"".join(self._replies)
            self._replies.clear()
            self._writer.write(data)
            await self._writer.drain()

    @contextlib.contextmanager
    def _answering_greeting(self) -> Iterator[None]:
        """While HELO/EHLO are answered: their 250 lines carry no enhanced status (RFC 2034)."""
        self._greeting = True
        try:
            yield
        finally:
            self._greeting = False

    @same_help(SMTP.smtp_HELO)
    async def smtp_HELO(self, hostname: str) -> None:
        """HELO as aiosmtpd answers it."""
        with self._answering_greeting():
            await super().smtp_HELO(hostname)

    @same_help(SMTP.smtp_EHLO)
    async def smtp_EHLO(self, hostname: str) -> None:
        """EHLO as aiosmtpd answers it, with PIPELINING and ENHANCEDSTATUSCODES, in one write."""
        with self._answering_greeting():
            self._hold = True
            try:
                await super().smtp_EHLO(hostname)
            finally:
                self._hold = False
        await self._flush_replies()

    # The commands that may stand anywhere in a pipelined group (RFC 2920 3.1).
    smtp_MAIL = _groupable(SMTP.smtp_MAIL)
    smtp_RCPT = _groupable(SMTP.smtp_RCPT)
    smtp_RSET = _groupable(SMTP.smtp_RSET)

    @same_help(SMTP.smtp_STARTTLS)
    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS (RFC 3207); inside TLS already it is refused, never nested."""
        transport = self.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            await self.push(replies.ALREADY_TLS)
            return
        await super().smtp_STARTTLS(arg)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any:
        """The AUTH challenge of aiosmtpd; an answer longer than a command line ends the session.

        aiosmtpd reads the answer with ``readline``, which raises when the line exceeds the
        reader's limit: that would be a ``451`` and a traceback for the client's own fault.
        """
        try:
            return await super().challenge_auth(challenge, encode_to_b64, log_client_response)
        except ValueError:
            log.info("%s: AUTH answer longer than a command line; closing", self._peer_ip or "client")
            self._say_and_close(replies.AUTH_LINE_TOO_LONG)
            return MISSING

    # -- transactions and shutdown ---------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True between MAIL and the end of DATA."""
        return self._in_data or (self.envelope is not None and self.envelope.mail_from is not None)

    @same_help(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str) -> None:
        """DATA as aiosmtpd reads it; then a stopping process or an expired session closes."""
        await super().smtp_DATA(arg)
        self.transaction_done()

    def transaction_done(self) -> None:
        """Call after each DATA reply: a stopping process or an expired session closes now."""
        if self._sessions.stopping:
            self.close_if_idle()
        elif self._expired:
            self._say_and_close(replies.SESSION_TOO_LONG)

    def close_if_idle(self) -> None:
        """Say ``421`` and close, unless a mail transaction is in progress."""
        if not self.in_transaction:
            self.close_now()

    def close_now(self) -> None:
        """Say ``421`` (shutting down) and close the connection."""
        self._say_and_close(replies.SHUTTING_DOWN)

    @property
    def closing(self) -> bool:
        """True once the connection is being closed (a TLS close can wait for the client)."""
        return self.transport is None or self.transport.is_closing()

    def abort(self) -> None:
        """Drop the connection now, TLS close handshake or not."""
        transports: tuple[object, ...] = (self.transport, self._original_transport)
        for transport in transports:
            if isinstance(transport, Writable):
                transport.abort()
