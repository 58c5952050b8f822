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

Run it alone: ``python -m devtools.sink --listen 127.0.0.1:2526 --maildir run/sink``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import signal
import threading
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


@dataclass
class SinkHandler:
    """aiosmtpd handler applying the rules at RCPT time."""

    rules: list[Rule]
    maildir: Path | None = None
    messages: list[Received] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    on_message: Callable[[Received], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Answer the recipient by the first matching rule; accept it otherwise."""
        local = address.rpartition("@")[0].lower()
        for pattern, reply in self.rules:
            if pattern.search(local):
                return reply.format(addr=address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Keep the message once per accepted recipient."""
        data = envelope.original_content or b""
        peer = str(session.peer[0]) if session.peer else ""
        for rcpt in envelope.rcpt_tos:
            item = Received(str(envelope.mail_from), rcpt, data, peer)
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
    ) -> None:
        if maildir is not None:
            maildir.mkdir(parents=True, exist_ok=True)
        self.handler = SinkHandler(compile_rules(rules), maildir)
        if port == 0:
            from devtools.servers import free_port

            port = free_port(host)
        self.host, self.port = host, port
        self.controller = Controller(
            self.handler,
            hostname=host,
            port=port,
            server_hostname=hostname,
            data_size_limit=64 * 1024 * 1024,
            enable_SMTPUTF8=True,
            decode_data=False,
        )

    @property
    def messages(self) -> list[Received]:
        """Accepted messages, in arrival order."""
        with self.handler.lock:
            return list(self.handler.messages)

    def start(self) -> Sink:
        """Start serving."""
        self.controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.controller.stop()

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a sink until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="SMTP sink with scripted replies per recipient")
    parser.add_argument("--listen", default="127.0.0.1:2526", help="host:port (loopback)")
    parser.add_argument("--maildir", type=Path, default=None, help="store accepted messages here")
    args = parser.parse_args(argv)
    logs.setup("sink")
    host, _, port = args.listen.rpartition(":")
    sink = Sink(host, int(port), maildir=args.maildir).start()
    log.info("sink listening on %s:%s", host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
