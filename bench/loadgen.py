"""A small, fast SMTP load generator for the benchmarks (asyncio, PIPELINING, no TLS).

``smtp-source`` cannot give each message its own ``X-Uuid``, so the pipeline and chaos
benchmarks submit through this: N parallel sessions from a trusted network, each sending
MAIL/RCPT/DATA pipelined, retrying a message on any temporary failure or lost connection
(as a real MTA would) until it gets ``250``.  Only a ``250`` counts as accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Outcome:
    """What happened to the submitted messages."""

    accepted: dict[str, float] = field(default_factory=dict)  # uuid -> time of the 250
    attempts: int = 0
    retries: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # uuid -> permanent reply


def message(uuid: str, rcpt: str, size: int, sender: str) -> bytes:
    """A test message of about ``size`` bytes with its own X-Uuid."""
    head = (
        f"From: Bench <{sender}>\r\nTo: <{rcpt}>\r\nSubject: benchmark {uuid}\r\nX-Uuid: {uuid}\r\n"
        f"X-Stream-Id: bench\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def _dot_stuff(data: bytes) -> bytes:
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line.decode(errors="replace").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            break
    return int(lines[-1][:3]), " | ".join(lines)


async def _transaction(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rcpt: str, data: bytes
) -> tuple[int, str]:
    """One pipelined MAIL/RCPT/DATA transaction; returns the final reply."""
    writer.write(f"MAIL FROM:<loadgen@client.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    replies = [await asyncio.wait_for(_reply(reader), 30) for _ in range(3)]
    if replies[2][0] == 354:
        writer.write(_dot_stuff(data) + b".\r\n")
        return await asyncio.wait_for(_reply(reader), 60)
    writer.write(b"RSET\r\n")
    await asyncio.wait_for(_reply(reader), 30)
    return next(r for r in replies if r[0] >= 400)


async def _session(
    host: str,
    port: int,
    work: asyncio.Queue[tuple[str, str, bytes]],
    outcome: Outcome,
    deadline: float,
    pace: Callable[[], asyncio.Future[None]] | None,
    on_accept: Callable[[str, float], None] | None,
) -> None:
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.2)
            continue
        try:
            code, _ = await asyncio.wait_for(_reply(reader), 10)
            if code != 220:
                raise ConnectionError(f"banner {code}")
            writer.write(b"EHLO loadgen.test\r\n")
            await _reply(reader)
            while time.monotonic() < deadline:
                try:
                    uuid, rcpt, data = work.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if pace is not None:
                    await pace()
                outcome.attempts += 1
                try:
                    code, text = await _transaction(reader, writer, rcpt, data)
                except (ConnectionError, OSError, TimeoutError) as exc:
                    work.put_nowait((uuid, rcpt, data))  # no 250 seen: the client tries again
                    outcome.retries += 1
                    raise ConnectionError("retry on a new connection") from exc
                if code == 250:
                    now = time.monotonic()
                    outcome.accepted.setdefault(uuid, now)
                    if on_accept is not None:
                        on_accept(uuid, now)
                elif code // 100 == 5:
                    outcome.rejected[uuid] = text
                else:
                    work.put_nowait((uuid, rcpt, data))
                    outcome.retries += 1
        except (ConnectionError, OSError, TimeoutError, ValueError):
            await asyncio.sleep(0.1)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()


def submit(
    host: str,
    port: int,
    messages: list[tuple[str, str, bytes]],
    *,
    sessions: int = 20,
    rate: float | None = None,
    timeout_s: float = 600.0,
    on_accept: Callable[[str, float], None] | None = None,
) -> Outcome:
    """Submit ``(uuid, rcpt, bytes)`` messages; blocks until all are accepted or the timeout."""

    async def run() -> Outcome:
        work: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        for item in messages:
            work.put_nowait(item)
        outcome = Outcome()
        deadline = time.monotonic() + timeout_s
        pace = _pacer(rate) if rate else None
        while not work.empty() and time.monotonic() < deadline:
            await asyncio.gather(
                *(_session(host, port, work, outcome, deadline, pace, on_accept) for _ in range(sessions))
            )
        return outcome

    return asyncio.run(run())


def _pacer(rate: float) -> Callable[[], asyncio.Future[None]]:
    interval = 1.0 / rate
    state = {"next": time.monotonic()}

    def pace() -> asyncio.Future[None]:
        now = time.monotonic()
        wait = max(0.0, state["next"] - now)
        state["next"] = max(state["next"], now) + interval
        return asyncio.ensure_future(asyncio.sleep(wait))

    return pace
