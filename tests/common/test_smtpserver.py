"""The SMTP server base of Receiver and MxServer: connection caps, timeouts, budgets, drain."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common.smtpserver import REFUSED_BUSY, REFUSED_PER_IP, BaseSMTP, Limits, Sessions


class Accepting:
    """A handler that accepts everything (DATA included)."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


class Server:
    """A BaseSMTP server on a free loopback port, its loop in a thread."""

    def __init__(self, limits: Limits) -> None:
        self.refused: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.sessions: Sessions | None = None
        self.limits = limits
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        self.sessions = Sessions(self.limits, on_refused=self.refused.append)
        sessions = self.sessions
        return await asyncio.get_running_loop().create_server(
            lambda: BaseSMTP(Accepting(), sessions=sessions, hostname="mx.test"), host="0.0.0.0", port=0
        )

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10, source_address=(source, 0))
        return sock

    def drain(self, grace_s: float = 2.0) -> int:
        assert self.sessions is not None
        return asyncio.run_coroutine_threadsafe(self.sessions.drain([self.server], grace_s), self.loop).result(20)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _stop(self) -> None:
        """Close the listener and every session, and let their tasks finish (no pending tasks left)."""
        self.server.close()
        if self.sessions is not None:
            self.sessions.abort_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=2)


@pytest.fixture
def start() -> Iterator[Any]:
    servers: list[Server] = []

    def make(**limits: Any) -> Server:
        server = Server(Limits(**limits))
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def line(sock: socket.socket) -> bytes:
    """One reply (the last line of a multi-line one), read byte by byte so nothing after it is consumed."""
    data = b""
    while True:
        byte = sock.recv(1)
        if not byte:
            return data
        data += byte
        if data.endswith(b"\r\n"):
            if len(data) < 4 or data[3:4] != b"-":
                return data
            data = b""


def test_per_address_cap_refuses_only_that_address(start) -> None:
    # 3 sessions from 127.0.0.2 fill its share; a 4th gets 421 4.7.0, another address is served.
    server = start(max_connections=100, max_connections_per_ip=3)
    held = [server.connect("127.0.0.2") for _ in range(3)]
    for sock in held:
        assert line(sock).startswith(b"220")
    extra = server.connect("127.0.0.2")
    assert line(extra).startswith(b"421 4.7.0 Too many connections from your address")
    other = server.connect("127.0.0.3")
    assert line(other).startswith(b"220")
    assert server.refused == [REFUSED_PER_IP]
    held[0].close()
    deadline = time.monotonic() + 5
    while True:  # the freed slot is usable again
        again = server.connect("127.0.0.2")
        reply = line(again)
        if reply.startswith(b"220") or time.monotonic() > deadline:
            break
        again.close()
    assert reply.startswith(b"220")


def test_global_cap(start) -> None:
    server = start(max_connections=2, max_connections_per_ip=10)
    a, b = server.connect("127.0.0.2"), server.connect("127.0.0.3")
    assert line(a).startswith(b"220") and line(b).startswith(b"220")
    assert line(server.connect("127.0.0.4")).startswith(b"421 4.7.0 Too many connections")
    assert server.refused == [REFUSED_BUSY]


def test_idle_timeout_says_421(start) -> None:
    server = start(idle_timeout_s=0.5)
    sock = server.connect()
    assert line(sock).startswith(b"220")
    assert line(sock).startswith(b"421 4.4.2")


@pytest.mark.slow
def test_noop_loop_cannot_renew_the_session_forever(start) -> None:
    # The idle timer restarts with every command; the total session length does not.
    server = start(idle_timeout_s=1.0, max_session_s=1.5)
    sock = server.connect()
    assert line(sock).startswith(b"220")
    started = time.monotonic()
    reply = b""
    while time.monotonic() - started < 5:
        sock.sendall(b"NOOP\r\n")
        reply = line(sock)
        if not reply.startswith(b"250"):
            break
        time.sleep(0.2)  # a client pacing its NOOPs, well inside the idle timeout
    assert reply.startswith(b"421 4.4.2"), reply
    assert 1.4 < time.monotonic() - started < 3


def test_noop_budget(start) -> None:
    server = start()
    sock = server.connect()
    assert line(sock).startswith(b"220")
    replies = []
    for _ in range(60):
        sock.sendall(b"NOOP\r\n")
        replies.append(line(sock))
        if not replies[-1].startswith(b"250"):
            break
    assert replies[-1].startswith(b"421 4.7.0"), replies[-1]
    assert len(replies) == 51


def test_busy_process_shortens_the_idle_timeout(start) -> None:
    # More than half the slots in use: idle sessions get busy-idle-timeout, not idle-timeout.
    server = start(max_connections=4, idle_timeout_s=30, busy_idle_timeout_s=0.5)
    socks = [server.connect(f"127.0.0.{i}") for i in range(2, 5)]
    for sock in socks:
        assert line(sock).startswith(b"220")
    socks[2].sendall(b"NOOP\r\n")  # a command while busy: the next wait is the short one
    assert line(socks[2]).startswith(b"250")
    started = time.monotonic()
    assert line(socks[2]).startswith(b"421 4.4.2")
    assert time.monotonic() - started < 5


def test_becoming_busy_shortens_the_wait_of_sessions_already_idle(start) -> None:
    # Silent connections opened while there was room must not keep their long idle timeout
    # once the process is busy (else they hold half the slots for idle-timeout-seconds).
    server = start(max_connections=4, idle_timeout_s=30, busy_idle_timeout_s=0.5)
    early = [server.connect(f"127.0.0.{i}") for i in range(2, 4)]  # 2 of 4: not busy yet
    for sock in early:
        assert line(sock).startswith(b"220")
    late = server.connect("127.0.0.4")  # 3 of 4: busy
    assert line(late).startswith(b"220")
    started = time.monotonic()
    for sock in early:
        assert line(sock).startswith(b"421 4.4.2")
    assert time.monotonic() - started < 5


def test_drain_answers_421_to_idle_sessions_and_finishes_transactions(start) -> None:
    server = start()
    idle, busy = server.connect("127.0.0.2"), server.connect("127.0.0.3")
    assert line(idle).startswith(b"220") and line(busy).startswith(b"220")
    for command in (b"EHLO client.test", b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>"):
        busy.sendall(command + b"\r\n")
        assert line(busy).startswith(b"250")
    result: list[int] = []
    draining = threading.Thread(target=lambda: result.append(server.drain(grace_s=5)))
    draining.start()
    assert line(idle).startswith(b"421 4.3.2")
    busy.sendall(b"DATA\r\n")
    assert line(busy).startswith(b"354")
    busy.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert line(busy).startswith(b"250")
    assert line(busy).startswith(b"421 4.3.2")  # closed right after its transaction
    draining.join(10)
    assert result == [0]


def test_many_messages_in_one_session(start) -> None:
    # Only commands that change nothing have small budgets: a client may send many messages.
    server = start()
    sock = server.connect()
    assert line(sock).startswith(b"220")
    sock.sendall(b"EHLO client.test\r\n")
    assert line(sock).startswith(b"250")
    for _ in range(60):
        for command in (b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>", b"DATA"):
            sock.sendall(command + b"\r\n")
            reply = line(sock)
            assert reply[:1] in (b"2", b"3"), reply
        sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert line(sock).startswith(b"250")


def test_every_command_without_its_own_budget_gets_the_large_one() -> None:
    # aiosmtpd looks the default up with .get("*", 20): MAIL, RCPT and DATA must not stop at 20.
    from common.smtpserver import OTHER_COMMAND_BUDGET, call_limits

    limits = call_limits()
    assert limits.get("*", 20) == OTHER_COMMAND_BUDGET
    assert limits["NOOP"] == 50 and limits.get("MAIL", limits["*"]) == OTHER_COMMAND_BUDGET


class CountingSMTP(BaseSMTP):
    """BaseSMTP that records every write to its connection (one entry per write call)."""

    writes: list[bytes]

    def connection_made(self, transport: Any) -> None:
        self.writes = []
        write = transport.write

        def counted(data: bytes) -> None:
            self.writes.append(bytes(data))
            write(data)

        transport.write = counted
        super().connection_made(transport)


def counting_server(start: Any) -> tuple[Server, list[CountingSMTP]]:
    server = start()
    made: list[CountingSMTP] = []

    async def swap() -> None:
        sessions = server.sessions

        def factory() -> CountingSMTP:
            made.append(CountingSMTP(Accepting(), sessions=sessions, hostname="mx.test"))
            return made[-1]

        server.server.close()
        server.server = await asyncio.get_running_loop().create_server(factory, host="127.0.0.1", port=0)

    asyncio.run_coroutine_threadsafe(swap(), server.loop).result(10)
    server.port = server.server.sockets[0].getsockname()[1]
    return server, made


class Client:
    """A raw SMTP client that reads whole replies (multi-line ones as one)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stream = sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, count: int) -> list[bytes]:
        out = []
        for _ in range(count):
            lines = [self.stream.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(self.stream.readline())
            out.append(b"".join(lines))
        return out

    def greeted(self) -> bytes:
        """The greeting and the EHLO reply; returns the latter."""
        assert self.replies(1)[0].startswith(b"220")
        self.send(b"EHLO client.test\r\n")
        return self.replies(1)[0]


def test_ehlo_offers_pipelining_and_is_answered_in_one_write(start) -> None:
    server, made = counting_server(start)
    ehlo = Client(server.connect()).greeted()
    lines = ehlo.splitlines()
    assert b"250-PIPELINING" in lines and b"250-ENHANCEDSTATUSCODES" in lines and lines[-1] == b"250 HELP"
    assert made[0].writes[1] == ehlo  # the greeting was the first write, the whole EHLO reply the second


def test_a_pipelined_group_is_answered_in_order_and_in_one_write(start) -> None:
    # RFC 2920: MAIL, RCPT and RSET replies wait for the reply to the group's last command.
    server, made = counting_server(start)
    client = Client(server.connect())
    client.greeted()
    client.send(
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nRCPT bogus\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"
    )
    group = client.replies(5)
    assert [r[:3] for r in group] == [b"250", b"250", b"501", b"250", b"354"], group
    assert made[0].writes[-1] == b"".join(group)
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    rest = client.replies(4)
    assert [r[:3] for r in rest] == [b"250", b"250", b"250", b"221"], rest


def test_a_reply_never_waits_for_a_command_that_is_not_complete(start) -> None:
    # A client may send part of its next line and wait: the reply it needs goes out at once.
    server, _ = counting_server(start)
    client = Client(server.connect())
    client.greeted()
    client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@exa")
    assert client.replies(1)[0].startswith(b"250 ")
    client.send(b"mple.test>\r\n")
    assert client.replies(1)[0].startswith(b"250 ")


def test_help_lists_the_commands_this_server_overrides(start) -> None:
    client = Client(start().connect())
    client.greeted()
    client.send(b"HELP\r\nHELP MAIL\r\n")
    listing, mail = client.replies(2)
    for command in (b"HELO", b"EHLO", b"MAIL", b"RCPT", b"RSET", b"DATA"):
        assert command in listing.split(), listing
    assert b"Syntax: MAIL FROM:" in mail


def test_a_client_that_pipelines_without_reading_gets_its_replies_in_bounded_writes(start) -> None:
    # Held replies go out every MAX_HELD_REPLIES lines, so flow control still stops a client
    # that keeps sending without reading.
    from common.smtpserver import MAX_HELD_REPLIES

    server, made = counting_server(start)
    client = Client(server.connect())
    client.greeted()
    count = 3 * MAX_HELD_REPLIES + 5
    client.send(b"RSET\r\n" * count)
    assert all(r.startswith(b"250 ") for r in client.replies(count))
    sizes = [w.count(b"\r\n") for w in made[0].writes[2:]]
    assert sum(sizes) == count and max(sizes) <= MAX_HELD_REPLIES, sizes
