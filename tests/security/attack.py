"""Bounded attack clients for the security tests: SMTP AUTH guessers and slow HTTP clients.

Everything runs on loopback; a client plays another host by binding its socket to another
127.0.0.0/8 source address.  Every helper takes an explicit count and a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import statistics
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field


def client_tls() -> ssl.SSLContext:
    """A client context that accepts the servers' self-signed test certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def plain_blob(user: str, password: str) -> bytes:
    """The AUTH PLAIN initial response."""
    return base64.b64encode(f"\0{user}\0{password}".encode())


async def read_reply(reader: asyncio.StreamReader) -> str:
    """One (possibly multi-line) SMTP reply; its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line.decode(errors="replace").rstrip("\r\n")


@dataclass
class SmtpSession:
    """One implicit-TLS SMTP connection from a chosen source address, after EHLO."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int, source: str, timeout_s: float = 30) -> SmtpSession:
        """Connect (implicit TLS) from ``source`` and say EHLO."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_tls(), local_addr=(source, 0)), timeout_s
        )
        session = cls(reader, writer)
        banner = await asyncio.wait_for(read_reply(reader), timeout_s)
        if not banner.startswith("220"):
            writer.close()
            raise ConnectionError(banner)
        await session.command(b"EHLO client.test", timeout_s)
        return session

    async def command(self, line: bytes, timeout_s: float = 30) -> str:
        """Send one command; its reply."""
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await asyncio.wait_for(read_reply(self.reader), timeout_s)

    async def auth_plain(self, user: str, password: str, timeout_s: float = 30) -> str:
        """AUTH PLAIN with an initial response; the reply."""
        return await self.command(b"AUTH PLAIN " + plain_blob(user, password), timeout_s)

    async def close(self) -> None:
        """QUIT-less close."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@dataclass
class Tally:
    """Replies by code (``"235"``, ``"535"``, ``"454"``, ``"error"`` …)."""

    counts: dict[str, int] = field(default_factory=dict)
    #: The first reply of each code, for the report.
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reply: str) -> None:
        """Count one reply by its code."""
        code = reply[:3] if reply[:3].isdigit() else "error"
        self.counts[code] = self.counts.get(code, 0) + 1
        self.examples.setdefault(code, reply)


async def one_guess(port: int, source: str, user: str, password: str, sent: asyncio.Event | None = None) -> str:
    """Connect, EHLO, one AUTH PLAIN; the reply (``error: …`` when the connection failed)."""
    try:
        session = await SmtpSession.open(port, source)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return f"error: {exc}"
    try:
        session.writer.write(b"AUTH PLAIN " + plain_blob(user, password) + b"\r\n")
        await session.writer.drain()
        if sent is not None:
            sent.set()
        return await asyncio.wait_for(read_reply(session.reader), 60)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return f"error: {exc}"
    finally:
        await session.close()


def median_ms(samples: list[float]) -> float:
    """Median of durations in seconds, as milliseconds."""
    return statistics.median(samples) * 1000


async def timed(call: Awaitable[str]) -> tuple[float, str]:
    """(seconds, reply) of one awaited call."""
    started = time.perf_counter()
    reply = await call
    return time.perf_counter() - started, reply


def report(line: str) -> None:
    """A figure of the run (shown with ``pytest -s`` or ``-rP``)."""
    sys.stdout.write(line + "\n")
