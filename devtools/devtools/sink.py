"""An SMTP server that plays "the internet": it answers each recipient by a script.

The default script, by the recipient's local part:

=================  =============================================================
``bounce*``        ``550 5.1.1 <addr>: user unknown`` (not our tagged return paths: they take bounces)
``full*``          ``552 5.2.2 <addr>: mailbox full``
``block*``         ``554 5.7.1 <addr>: blocked using zen.spamhaus.org``
``defer*``         ``450 4.2.0 <addr>: mailbox busy, try later``
``ratelimit*``     ``421 4.7.28 <addr>: rate limited, try again later``
anything else      ``250`` (accepted; stored)
=================  =============================================================

Accepted messages are kept in memory (:attr:`Sink.messages`) and, with ``maildir``, written
one file per recipient to that directory (``<n>.eml`` with ``X-Sink-Rcpt``/``X-Sink-From``
lines first) so another process can count them.

Two more ways to play a real receiver: ``latency`` (min, max seconds) waits that long before
answering each message's DATA, as a remote server across the internet does (sessions wait in
parallel); ``throttle`` (count, window seconds, reply) answers RCPT with the reply (e.g. ``421
4.7.0 …``) once ``count`` recipients were accepted in the current window, as a provider that
rate-limits a sender does.  :attr:`SinkHandler.throttled` counts those answers.

The sink advertises 8BITMIME and SMTPUTF8, as most of today's receivers do.  With
``seven_bit_port`` it listens on a second port as an old receiver: that port advertises
neither, refuses ``BODY=8BITMIME`` and ``SMTPUTF8`` on MAIL (``555 5.5.4``) and any message
with 8-bit bytes (``554 5.6.1``), so a test sees at once whether something arrived that such a
receiver cannot take.  :attr:`Received.seven_bit` tells which port a message came through.

Run it alone: ``python -m devtools.sink --listen 127.0.0.1:2526 --maildir run/sink``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from common import logs

log = logging.getLogger(__name__)

Rule = tuple[re.Pattern[str], str]

DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    # (not our own tagged return paths bounce-<uuid>-<tag>@: a bounce sent to them is accepted)
    (r"^bounce(?!-[a-z0-9]{1,46}-[a-z2-7]{10}$)", "550 5.1.1 <{addr}>: user unknown"),
    (r"^full", "552 5.2.2 <{addr}>: mailbox full"),
    (r"^block", "554 5.7.1 <{addr}>: blocked using zen.spamhaus.org"),
    (r"^defer", "450 4.2.0 <{addr}>: mailbox busy, try later"),
    (r"^ratelimit", "421 4.7.28 <{addr}>: rate limited, try again later"),
)


@dataclass
class Received:
    """One accepted message as the sink saw it."""

    mail_from: str
    rcpt: str
    data: bytes
    peer: str
    seven_bit: bool = False
    mail_options: tuple[str, ...] = ()


@dataclass
class SinkHandler:
    """aiosmtpd handler applying the rules at RCPT time."""

    rules: list[Rule]
    maildir: Path | None = None
    messages: list[Received] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    on_message: Callable[[Received], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    seven_bit_ports: frozenset[int] = frozenset()
    #: (min, max) seconds to wait before answering DATA.
    latency: tuple[float, float] | None = None
    #: (count, window seconds, reply): refuse recipients beyond ``count`` per window.
    throttle: tuple[int, float, str] | None = None
    #: How many recipients ``throttle`` refused.
    throttled: int = 0
    _window: tuple[float, int] = (0.0, 0)

    def _seven_bit(self, server: SMTP) -> bool:
        """True when ``server`` is a connection to a port that plays an old, 7-bit-only receiver."""
        if not self.seven_bit_ports or server.transport is None:
            return False
        sockname = server.transport.get_extra_info("sockname")
        return isinstance(sockname, tuple) and sockname[1] in self.seven_bit_ports

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """The EHLO lines aiosmtpd made, without 8BITMIME and SMTPUTF8 on a 7-bit port."""
        session.host_name = hostname  # aiosmtpd leaves this to a handler that has the hook
        if not self._seven_bit(server):
            return responses
        return [line for line in responses if line[4:].upper() not in ("8BITMIME", "SMTPUTF8")]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        """Accept the sender; a 7-bit port refuses the extensions it does not offer."""
        if self._seven_bit(server):
            unsupported = [o for o in mail_options if o.upper() in ("BODY=8BITMIME", "SMTPUTF8")]
            if unsupported:
                return f"555 5.5.4 {' '.join(unsupported)} not supported (sink port without 8BITMIME/SMTPUTF8)"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Answer the recipient by the first matching rule; accept it otherwise."""
        local = address.rpartition("@")[0].lower()
        for pattern, reply in self.rules:
            if pattern.search(local):
                return reply.format(addr=address)
        if self.throttle is not None and not self._admit():
            return self.throttle[2].format(addr=address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    def _admit(self) -> bool:
        """Count one recipient in the current throttle window; False when over the limit."""
        assert self.throttle is not None
        count, window_s, _ = self.throttle
        now = time.monotonic()
        with self.lock:
            started, admitted = self._window
            if now - started >= window_s:
                started, admitted = now, 0
            if admitted >= count:
                self.throttled += 1
                self._window = (started, admitted)
                return False
            self._window = (started, admitted + 1)
            return True

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Keep the message once per accepted recipient."""
        data = envelope.original_content or b""
        peer = str(session.peer[0]) if session.peer else ""
        seven_bit = self._seven_bit(server)
        if seven_bit and not data.isascii():
            return "554 5.6.1 8-bit data without 8BITMIME (sink port without 8BITMIME)"
        if self.latency is not None:
            await asyncio.sleep(random.uniform(*self.latency))
        options = tuple(envelope.mail_options)
        for rcpt in envelope.rcpt_tos:
            item = Received(str(envelope.mail_from), rcpt, data, peer, seven_bit, options)
            with self.lock:
                self.messages.append(item)
                number = next(self.counter)
            if self.maildir is not None:
                self._store(number, item)
            if self.on_message is not None:
                self.on_message(item)
        return "250 2.0.0 queued as sink"

    def _store(self, number: int, item: Received) -> None:
        assert self.maildir is not None
        head = f"X-Sink-Rcpt: {item.rcpt}\r\nX-Sink-From: {item.mail_from}\r\n".encode()
        tmp = self.maildir / f".{os.getpid()}-{number}.tmp"
        tmp.write_bytes(head + item.data)
        tmp.rename(self.maildir / f"{os.getpid()}-{number}.eml")


def compile_rules(rules: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> list[Rule]:
    """Compile (local-part regex, reply) pairs."""
    return [(re.compile(p, re.IGNORECASE), reply) for p, reply in rules]


class Sink:
    """A running sink on ``host:port`` (in a background thread)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rules: tuple[tuple[str, str], ...] | list[tuple[str, str]] = DEFAULT_RULES,
        maildir: Path | None = None,
        hostname: str = "sink.test",
        seven_bit_port: int | None = None,
        latency: tuple[float, float] | None = None,
        throttle: tuple[int, float, str] | None = None,
    ) -> None:
        if maildir is not None:
            maildir.mkdir(parents=True, exist_ok=True)
        if port == 0:
            from devtools.servers import free_port

            port = free_port(host)
        ports = (port,) if seven_bit_port is None else (port, seven_bit_port)
        self.handler = SinkHandler(
            compile_rules(rules), maildir, seven_bit_ports=frozenset(ports[1:]), latency=latency, throttle=throttle
        )
        self.host, self.port = host, port
        self.seven_bit_port = seven_bit_port
        self.controllers = [
            Controller(
                self.handler,
                hostname=host,
                port=listen,
                server_hostname=hostname,
                data_size_limit=64 * 1024 * 1024,
                enable_SMTPUTF8=True,
                decode_data=False,
            )
            for listen in ports
        ]

    @property
    def messages(self) -> list[Received]:
        """Accepted messages, in arrival order."""
        with self.handler.lock:
            return list(self.handler.messages)

    def start(self) -> Sink:
        """Start serving (every port)."""
        for controller in self.controllers:
            controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        for controller in self.controllers:
            controller.stop()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a sink until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="SMTP sink with scripted replies per recipient")
    parser.add_argument("--listen", default="127.0.0.1:2526", help="host:port (loopback)")
    parser.add_argument("--maildir", type=Path, default=None, help="store accepted messages here")
    parser.add_argument("--seven-bit-port", type=int, default=None, help="also listen here without 8BITMIME/SMTPUTF8")
    parser.add_argument(
        "--latency-ms", default=None, help="MIN-MAX: wait this long before answering each DATA (e.g. 50-200)"
    )
    args = parser.parse_args(argv)
    logs.setup("sink")
    host, _, port = args.listen.rpartition(":")
    latency = None
    if args.latency_ms:
        low, _, high = args.latency_ms.partition("-")
        latency = (float(low) / 1000, float(high or low) / 1000)
    sink = Sink(host, int(port), maildir=args.maildir, seven_bit_port=args.seven_bit_port, latency=latency).start()
    log.info("sink listening on %s:%s", host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
