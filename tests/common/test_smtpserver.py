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


def test_the_idle_timer_moves_with_every_command_and_still_expires(start) -> None:
    # One timer per idle period: commands only move its deadline, an early timer re-arms.
    server = start(idle_timeout_s=0.5)
    sock = server.connect()
    assert line(sock).startswith(b"220")
    started = last = time.monotonic()
    while last - started < 1.2:  # well past the first timer, always inside 0.5 s
        time.sleep(0.15)  # the client's pace between commands, not a wait for a result
        sock.sendall(b"NOOP\r\n")
        assert line(sock).startswith(b"250"), "closed although a command came within the idle timeout"
        last = time.monotonic()
    assert line(sock) == b"421 4.4.2 Error: timeout exceeded\r\n"
    assert 0.45 < time.monotonic() - last < 2.0


def reference_tables(protocol: BaseSMTP, handler: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The hook tables as aiosmtpd's constructor builds them, from the full ``dir()`` of both."""

    def named(owner: Any, prefix: str) -> dict[str, Any]:
        names = [n for n in object.__dir__(owner) if n.startswith(prefix)]
        return {n.replace(prefix, ""): getattr(owner, n).__func__ for n in names}

    auth: dict[str, Any] = {}
    for owner in (protocol, handler):
        for name in sorted(object.__dir__(owner)):
            if name.startswith("auth_"):
                method = getattr(owner, name)
                mechanism = getattr(method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-"))
                auth[mechanism] = (method.__func__, owner is protocol)
    return named(protocol, "smtp_"), named(handler, "handle_"), auth


def bound_tables(protocol: BaseSMTP) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The tables the connection has, each method bound to this connection (or the handler)."""
    smtp: dict[str, Any] = protocol._smtp_methods
    hooks: dict[str, Any] = protocol._handle_hooks
    auth: dict[str, Any] = {k: (a.method, a.is_builtin) for k, a in protocol._auth_methods.items()}
    for method in (*smtp.values(), *(m for m, builtin in auth.values() if builtin)):
        assert method.__self__ is protocol
    for method in hooks.values():
        assert method.__self__ is protocol.event_handler
    return (
        {k: m.__func__ for k, m in smtp.items()},
        {k: m.__func__ for k, m in hooks.items()},
        {k: (m.__func__, builtin) for k, (m, builtin) in auth.items()},
    )


@pytest.mark.parametrize("service", ["receiver", "mxserver"])
def test_hook_tables_are_the_ones_aiosmtpd_builds(service: str) -> None:
    # aiosmtpd's constructor scans dir() of both objects for every connection; the base binds
    # the same tables from per-class lists. Same commands (HELP lists them), hooks, AUTH methods.
    from aiosmtpd.smtp import SMTP

    protocol_class: type[BaseSMTP]
    if service == "receiver":
        from receiver.handler import SubmissionHandler
        from receiver.protocol import SubmissionSMTP

        handler: Any = SubmissionHandler.__new__(SubmissionHandler)  # its hooks, none of its state
        protocol_class = SubmissionSMTP
        extra: dict[str, Any] = {"trusted_networks": (), "max_auth_failures": 3}
    else:
        from mxserver.handler import MxHandler
        from mxserver.server import MxSMTP

        handler, protocol_class, extra = MxHandler.__new__(MxHandler), MxSMTP, {}

    async def build(excluded: tuple[str, ...]) -> BaseSMTP:
        sessions = Sessions(Limits())
        return protocol_class(handler, sessions=sessions, hostname="mx.test", auth_exclude_mechanism=excluded, **extra)

    protocol = asyncio.run(build(()))
    assert protocol.event_handler is handler
    smtp, hooks, auth = bound_tables(protocol)
    assert (smtp, hooks, auth) == reference_tables(protocol, handler)
    assert {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "QUIT", "HELP"} <= set(smtp) and "DATA" in hooks
    assert smtp["DATA"] is protocol_class.smtp_DATA and smtp["NOOP"] is SMTP.smtp_NOOP
    without_login = asyncio.run(build(("LOGIN",)))
    assert bound_tables(without_login)[2] == {k: v for k, v in auth.items() if k != "LOGIN"}


def test_a_handler_with_hooks_of_its_own_is_scanned_by_aiosmtpd() -> None:
    # Hooks set on the instance, or handle_EHLO (whose signature aiosmtpd inspects), are not in
    # the per-class lists: such a handler takes aiosmtpd's own scan, and its hooks still apply.
    async def rcpt(server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        return "550 5.1.1 no"

    class WithEhlo(Accepting):
        async def handle_EHLO(self, server: Any, session: Any, envelope: Any, host: str, lines: list[str]) -> list[str]:
            return lines

    own = Accepting()
    own.handle_RCPT = rcpt  # type: ignore[attr-defined]

    async def build() -> list[BaseSMTP]:
        sessions = Sessions(Limits())
        return [BaseSMTP(handler, sessions=sessions, hostname="mx.test") for handler in (own, WithEhlo())]

    by_instance, with_ehlo = asyncio.run(build())
    assert by_instance._handle_hooks["RCPT"] is rcpt and "DATA" in by_instance._handle_hooks
    assert with_ehlo._ehlo_hook_ver == "new" and "EHLO" in with_ehlo._handle_hooks


def test_aiosmtpd_still_logs_each_command_with_auth_data_masked_when_its_logger_is_on(start, caplog) -> None:
    # Its per-command log lines are skipped while mail.log is quiet (the default); switched on,
    # they are written as aiosmtpd writes them, AUTH answers masked.
    import logging

    caplog.set_level(logging.INFO, logger="mail.log")
    server = start()
    client = Client(server.connect())
    client.greeted()
    client.send(b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n")
    client.replies(1)
    client.send(b"NOOP\r\n")
    assert client.replies(1)[0].startswith(b"250")
    texts = [r.getMessage() for r in caplog.records if r.name == "mail.log"]
    assert any("NOOP" in t for t in texts), texts
    assert not any("AHVzZXIAc2VjcmV0" in t for t in texts) and any("AUTH PLAIN ********" in t for t in texts)
