"""A small pipelining SMTP client for handing messages to the local Postfix.

A transaction sends ``XFORWARD IDENT=<token>``, ``MAIL FROM`` (with ``ENVID`` and, when needed,
``BODY=8BITMIME`` -- the body has 8-bit bytes -- and ``SMTPUTF8`` -- the Transformer says the
message needs it, ``meta["smtputf8"]``, or the envelope is not ASCII; Postfix then refuses to
hand it to a receiver without SMTPUTF8 instead of sending it broken), one ``RCPT TO`` with
``NOTIFY=NEVER`` and ``DATA`` in one
write (RFC 2920 pipelining), then the message: two round trips per message.  The protocol
logic (:class:`Exchange`) does no I/O; it is driven either by :class:`SmtpSession` (one
blocking connection) or by :class:`SmtpPool` (several connections multiplexed in the calling
thread with ``selectors``: no threads, so no GIL hand-offs, for the injector's batches).

``XFORWARD IDENT`` makes Postfix log the token next to the queue id it assigns
(``client=…, orig_queue_id=<token>``), so the log follower can attribute every line of that
queue file to the message even before Postfix has answered ``250``.

Errors:

* :class:`SmtpUnavailable` -- no answer, connection lost or ``421`` *before* the end of the
  message was sent: nothing was queued, the transaction can simply be tried again;
* :class:`SmtpUncertain` -- the connection broke *after* the final dot was sent: Postfix may or
  may not have queued the message (the caller has to find out before sending it again).
"""

from __future__ import annotations

import contextlib
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from common.errors import TemporaryError

log = logging.getLogger(__name__)

MAX_REPLY_LINES: Final = 100
_QUEUED_AS: Final = re.compile(r"queued as ([0-9A-Za-z]+)")
_LINE_ENDS: Final = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT: Final = re.compile(rb"^\.", re.MULTILINE)
_XTEXT_PLAIN: Final = re.compile(r"[!-*,-<>-~]*")


class SmtpUnavailable(TemporaryError):
    """The server could not be reached or dropped the connection; nothing was queued."""


class SmtpUncertain(TemporaryError):
    """The connection broke after the message was sent: it may have been queued."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply (multi-line replies joined with spaces)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".replace("\n", " ")

    @property
    def permanent(self) -> bool:
        """5xx."""
        return 500 <= self.code < 600

    @property
    def positive(self) -> bool:
        """2xx or 3xx."""
        return 200 <= self.code < 400


@dataclass(frozen=True)
class Result:
    """Outcome of one transaction (one recipient)."""

    outcome: Literal["accepted", "rejected", "deferred"]
    reply: Reply
    stage: str
    queue_id: str | None = None


@dataclass(frozen=True)
class Message:
    """A message prepared once for SMTP: CRLF line ends, dot-stuffed, terminated."""

    wire: bytes
    eight_bit: bool
    size: int
    smtputf8: bool = False

    @classmethod
    def prepare(cls, raw: bytes, *, smtputf8: bool = False) -> Message:
        """Normalise line ends to CRLF and dot-stuff ``raw`` (``smtputf8``: it needs SMTPUTF8)."""
        crlf = raw.count(b"\r\n")
        # Fast path: the Transformer's output already has CRLF line ends only.
        body = raw if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf else _LINE_ENDS.sub(b"\r\n", raw)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        size = len(body)
        if body.startswith(b".") or b"\n." in body:
            body = _LEADING_DOT.sub(b"..", body)
        return cls(wire=body + b".\r\n", eight_bit=not body.isascii(), size=size, smtputf8=smtputf8)


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding (ENVID, XFORWARD values)."""
    if _XTEXT_PLAIN.fullmatch(value):
        return value
    out = []
    for ch in value:
        code = ord(ch)
        if 33 <= code <= 126 and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode())
    return "".join(out)


class Exchange:
    """One transaction's protocol state, without I/O.

    :meth:`start` gives the pipelined commands; every reply goes to :meth:`on_reply`, which
    returns the bytes to send next (the message, or ``RSET`` after a refusal).  ``result`` is
    set when the transaction is over; ``data_sent`` tells whether the whole message went out
    (from then on a broken connection leaves the outcome uncertain).
    """

    def __init__(
        self, extensions: set[str], mail_from: str, rcpt: str, message: Message, *, envid: str, ident: str | None
    ) -> None:
        self.message = message
        params = [f"SIZE={message.size}"]
        if message.eight_bit and "8BITMIME" in extensions:
            params.append("BODY=8BITMIME")
        if (message.smtputf8 or not (mail_from + rcpt).isascii()) and "SMTPUTF8" in extensions:
            params.append("SMTPUTF8")
        dsn = "DSN" in extensions
        if dsn:
            params.append(f"ENVID={xtext(envid)}")
        self.xforward = ident is not None and "XFORWARD" in extensions
        commands = [f"XFORWARD IDENT={xtext(ident or '')}\r\n"] if self.xforward else []
        commands.append(f"MAIL FROM:<{mail_from}> {' '.join(params)}\r\n")
        commands.append(f"RCPT TO:<{rcpt}>{' NOTIFY=NEVER' if dsn else ''}\r\n")
        commands.append("DATA\r\n")
        self.commands = "".join(commands).encode("utf-8")
        self.pending = len(commands)
        self.replies: list[Reply] = []
        self.failure: Result | None = None
        self.data_sent = False
        self.result: Result | None = None
        self.closing = False  # the server said 421: the connection ends with this transaction

    def start(self) -> bytes:
        """The pipelined commands."""
        return self.commands

    def on_reply(self, reply: Reply) -> bytes:
        """Take one reply; returns what to send next (may be empty)."""
        if reply.code == 421:
            self.closing = True
        if self.data_sent:
            return self._final(reply)
        if self.failure is not None:  # the reply to our RSET (or to the empty message)
            self.pending -= 1
            if self.pending == 0:
                self.result = self.failure
            return b""
        self.replies.append(reply)
        if len(self.replies) < self.pending:
            return b""
        return self._command_replies()

    def _command_replies(self) -> bytes:
        replies = self.replies
        if self.xforward and replies[0].code != 250:
            # The log follower then learns the queue id from the injector's record only.
            log.warning("Postfix refused XFORWARD (%s); check smtpd_authorized_xforward_hosts", replies[0])
        mail, rcpt, data = replies[-3:]
        for stage, reply in (("MAIL", mail), ("RCPT", rcpt), ("DATA", data)):
            if (stage == "DATA" and reply.code != 354) or (stage != "DATA" and not reply.positive):
                self.failure = _failed(stage, reply)
                break
        if self.failure is None:
            self.data_sent = True
            return self.message.wire
        if self.closing:
            self.result = self.failure
            return b""
        # Leave the server ready for the next transaction (DATA accepted despite a refused
        # recipient cannot happen with one recipient; close it with an empty message anyway).
        extra = b".\r\n" if data.code == 354 else b""
        self.pending = 2 if extra else 1
        return extra + b"RSET\r\n"

    def _final(self, reply: Reply) -> bytes:
        if reply.code == 250:
            match = _QUEUED_AS.search(reply.text)
            self.result = Result("accepted", reply, "END", match.group(1) if match else None)
        else:
            self.result = _failed("END", reply)
        return b""


def _failed(stage: str, reply: Reply) -> Result:
    outcome: Literal["rejected", "deferred"] = "rejected" if reply.permanent else "deferred"
    return Result(outcome, reply, stage)


class ReplyReader:
    """Splits received bytes into SMTP replies."""

    def __init__(self) -> None:
        self.buffer = b""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        """Complete replies in ``data`` (plus what was buffered).

        Raises:
            SmtpUnavailable: a malformed reply line.
        """
        self.buffer += data
        replies: list[Reply] = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                return replies
            raw, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if len(raw) < 4 or not raw[:3].isdigit():
                raise SmtpUnavailable(f"malformed SMTP reply {raw[:80]!r}")
            self._lines.append(raw[4:].decode("utf-8", "replace").rstrip("\r\n"))
            if raw[3:4] != b"-" or len(self._lines) >= MAX_REPLY_LINES:
                replies.append(Reply(int(raw[:3]), "\n".join(self._lines)))
                self._lines = []


class SmtpSession:
    """One connection to the local Postfix smtpd, reused for many transactions (blocking)."""

    def __init__(self, host: str, port: int, *, local_hostname: str, timeout_s: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout_s = timeout_s
        self.extensions: set[str] = set()
        self.transactions = 0
        self.sock: socket.socket | None = None
        self.reader = ReplyReader()
        self._replies: list[Reply] = []

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self.sock is not None

    def connect(self) -> None:
        """Open the connection, read the greeting and say EHLO.

        Raises:
            SmtpUnavailable: no 220 greeting or EHLO refused.
        """
        self.close()
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            greeting = self._reply()
            if greeting.code != 220:
                raise SmtpUnavailable(f"{self.host}:{self.port} greeted with {greeting}")
            self.sock.sendall(f"EHLO {self.local_hostname}\r\n".encode())
            ehlo = self._reply()
        except OSError as exc:
            self.close()
            raise SmtpUnavailable(f"cannot talk to Postfix at {self.host}:{self.port}: {exc}") from exc
        except SmtpUnavailable:
            self.close()
            raise
        if ehlo.code != 250:
            self.close()
            raise SmtpUnavailable(f"{self.host}:{self.port} refused EHLO: {ehlo}")
        self.extensions = {line.split()[0].upper() for line in ehlo.text.split("\n")[1:] if line.strip()}
        self.transactions = 0

    def close(self) -> None:
        """Close the connection (QUIT when it is still usable)."""
        if self.sock is None:
            return
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        finally:
            self.sock.close()
            self.sock = None
            self.reader = ReplyReader()
            self._replies = []

    def exchange(self, mail_from: str, rcpt: str, message: Message, *, envid: str, ident: str | None) -> Exchange:
        """A new transaction on this connection (not started)."""
        return Exchange(self.extensions, mail_from, rcpt, message, envid=envid, ident=ident)

    def send(self, mail_from: str, rcpt: str, message: Message, *, envid: str, ident: str | None) -> Result:
        """One transaction for one recipient.

        Raises:
            SmtpUnavailable: nothing was queued (connection failed before the end of the message).
            SmtpUncertain: the connection broke after the message was sent.
        """
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        exchange = self.exchange(mail_from, rcpt, message, envid=envid, ident=ident)
        try:
            out = exchange.start()
            while exchange.result is None:
                if out:
                    self.sock.sendall(out)
                out = exchange.on_reply(self._reply())
        except (OSError, SmtpUnavailable) as exc:
            self.close()
            if exchange.data_sent:
                raise SmtpUncertain(f"no reply after the end of the message: {exc}") from exc
            if isinstance(exc, SmtpUnavailable):
                raise
            raise SmtpUnavailable(f"connection to Postfix lost: {exc}") from exc
        self.transactions += 1
        if exchange.closing:
            self.close()
        return exchange.result

    def _reply(self) -> Reply:
        assert self.sock is not None
        while not self._replies:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SmtpUnavailable("Postfix closed the connection")
            self._replies.extend(self.reader.feed(chunk))
        return self._replies.pop(0)


@dataclass
class Job:
    """One transaction for :meth:`SmtpPool.send_all`; ``result`` or ``error`` is filled in."""

    key: Hashable
    mail_from: str
    rcpt: str
    message: Message
    envid: str
    ident: str | None
    result: Result | None = None
    error: SmtpUnavailable | SmtpUncertain | None = None


@dataclass
class _Slot:
    """A pool connection and what it is doing."""

    session: SmtpSession
    job: Job | None = None
    exchange: Exchange | None = None
    out: bytes = b""
    deadline: float = 0.0
    queued: list[Reply] = field(default_factory=list)


class SmtpPool:
    """``size`` connections to Postfix, driven together from the calling thread."""

    def __init__(self, host: str, port: int, *, size: int, local_hostname: str, timeout_s: float = 60.0) -> None:
        self.slots = [
            _Slot(SmtpSession(host, port, local_hostname=local_hostname, timeout_s=timeout_s)) for _ in range(size)
        ]
        self.timeout_s = timeout_s
        self._selector = selectors.DefaultSelector()
        self._reconnect = threading.Event()

    def request_reconnect(self) -> None:
        """Open new connections before the next jobs (thread-safe).

        After Postfix was restarted, smtpd processes of the old master may still serve our
        open connections while their log lines go nowhere; new connections reach new smtpd
        processes.
        """
        self._reconnect.set()

    def close(self) -> None:
        """Close every connection."""
        for slot in self.slots:
            self._forget(slot)
            slot.session.close()
        self._selector.close()

    def send_all(self, jobs: Sequence[Job]) -> None:
        """Run every job, ``size`` at a time; each gets ``result`` or ``error``."""
        if self._reconnect.is_set():
            self._reconnect.clear()
            for slot in self.slots:
                self._forget(slot)
                slot.session.close()
        todo = list(reversed(jobs))
        busy = sum(1 for slot in self.slots if todo and self._begin(slot, todo))
        while busy:
            for slot in self._ready():
                if self._advance(slot):
                    busy -= 1
                    if todo and self._begin(slot, todo):
                        busy += 1

    def _begin(self, slot: _Slot, todo: list[Job]) -> bool:
        """Start jobs on ``slot`` until one is in flight; False when none is.

        When Postfix cannot be reached every job left fails with that error (it is the local
        Postfix: the next connection would fail alike).
        """
        while todo:
            sock = slot.session.sock
            if sock is None:
                try:
                    slot.session.connect()
                except SmtpUnavailable as exc:
                    for job in todo:
                        job.error = exc
                    todo.clear()
                    return False
                sock = slot.session.sock
                assert sock is not None
                sock.setblocking(False)
            job = todo.pop()
            slot.job = job
            slot.exchange = slot.session.exchange(
                job.mail_from, job.rcpt, job.message, envid=job.envid, ident=job.ident
            )
            slot.out = slot.exchange.start()
            slot.deadline = time.monotonic() + self.timeout_s
            if not self._advance(slot):
                return True
        return False

    def _ready(self) -> list[_Slot]:
        busy = [s for s in self.slots if s.job is not None]
        timeout = max(min(s.deadline for s in busy) - time.monotonic(), 0.0)
        events = self._selector.select(timeout)
        ready = [key.data for key, _ in events]
        now = time.monotonic()
        ready += [s for s in busy if s.deadline <= now and s not in ready]
        return ready

    def _advance(self, slot: _Slot) -> bool:
        """Send and read whatever is possible now; True when the slot's job is finished."""
        assert slot.job is not None and slot.exchange is not None
        sock = slot.session.sock
        assert sock is not None
        try:
            if time.monotonic() > slot.deadline:
                raise TimeoutError(f"no answer from Postfix within {self.timeout_s:.0f}s")
            while slot.exchange.result is None:
                if slot.out:
                    try:
                        sent = sock.send(slot.out)
                    except BlockingIOError:
                        break
                    slot.out = slot.out[sent:]
                    if slot.out:
                        break  # socket buffer full: wait until writable
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    raise SmtpUnavailable("Postfix closed the connection")
                for reply in slot.session.reader.feed(chunk):
                    slot.out += slot.exchange.on_reply(reply)
                slot.deadline = time.monotonic() + self.timeout_s
        except (OSError, SmtpUnavailable) as exc:
            return self._fail(slot, exc)
        if slot.exchange.result is None:
            self._watch(slot)
            return False
        slot.job.result = slot.exchange.result
        slot.session.transactions += 1
        if slot.exchange.closing:
            self._forget(slot)
            slot.session.close()
        return self._done(slot)

    def _fail(self, slot: _Slot, exc: Exception) -> bool:
        assert slot.job is not None and slot.exchange is not None
        if slot.exchange.data_sent and not slot.out:
            slot.job.error = SmtpUncertain(f"no reply after the end of the message: {exc}")
        else:
            slot.job.error = SmtpUnavailable(f"connection to Postfix lost: {exc}")
        self._forget(slot)
        slot.session.close()
        return self._done(slot)

    def _done(self, slot: _Slot) -> bool:
        slot.job = None
        slot.exchange = None
        slot.out = b""
        return True

    def _watch(self, slot: _Slot) -> None:
        sock = slot.session.sock
        assert sock is not None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if slot.out else 0)
        try:
            self._selector.modify(sock, events, slot)
        except KeyError:
            self._selector.register(sock, events, slot)

    def _forget(self, slot: _Slot) -> None:
        sock = slot.session.sock
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
