"""The SMTP client's protocol against a scripted loopback server: what it sends, and how a
connection that breaks before or after the end of the message is reported."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from postfixlog.smtpclient import Exchange, Job, Message, SmtpPool, SmtpSession, SmtpUnavailable, SmtpUncertain

EHLO = b"250-peer.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-XFORWARD IDENT\r\n250-8BITMIME\r\n250 DSN\r\n"


class ScriptedServer:
    """Accepts connections and plays ``mode`` on each: ok | drop-after-dot | drop-before-data | refuse."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        buf = b""

        def until(marker: bytes) -> bytes:
            nonlocal buf
            while marker not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError
                buf += chunk
            head, _, buf = buf.partition(marker)
            return head + marker

        with conn:
            try:
                conn.sendall(b"220 peer.test ESMTP\r\n")
                until(b"\r\n")
                conn.sendall(EHLO)
                while True:
                    commands = until(b"DATA\r\n")
                    self.received.append(commands)
                    if self.mode == "drop-before-data":
                        return
                    if self.mode == "refuse":
                        conn.sendall(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n")
                        until(b"RSET\r\n")
                        conn.sendall(b"250 ok\r\n")
                        continue
                    conn.sendall(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go ahead\r\n")
                    self.received.append(until(b"\r\n.\r\n"))
                    if self.mode == "drop-after-dot":
                        return
                    conn.sendall(b"250 2.0.0 Ok: queued as 4jZAAAAAAAzBCD\r\n")
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    running = ScriptedServer(request.param)
    yield running
    running.close()


MESSAGE = Message.prepare(b"Subject: t\n\n.hidden dot\nbody\n")


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_transaction_is_pipelined_with_dsn_envid_and_xforward(server: ScriptedServer) -> None:
    session = SmtpSession("127.0.0.1", server.port, local_hostname="client.test", timeout_s=5)
    result = session.send("bounce-u1-t@b.test", "rcpt@d.test", MESSAGE, envid="u1", ident="tok1")
    session.close()
    assert result.outcome == "accepted"
    assert result.queue_id == "4jZAAAAAAAzBCD"
    commands, data = server.received[0], server.received[1]
    assert commands == (
        b"XFORWARD IDENT=tok1\r\nMAIL FROM:<bounce-u1-t@b.test> SIZE=33 ENVID=u1\r\n"
        b"RCPT TO:<rcpt@d.test> NOTIFY=NEVER\r\nDATA\r\n"
    )
    assert data == b"Subject: t\r\n\r\n..hidden dot\r\nbody\r\n.\r\n"


@pytest.mark.parametrize("server", ["drop-after-dot"], indirect=True)
def test_connection_lost_after_the_dot_is_uncertain(server: ScriptedServer) -> None:
    # The server may have queued it: the caller must check before sending again.
    session = SmtpSession("127.0.0.1", server.port, local_hostname="client.test", timeout_s=5)
    with pytest.raises(SmtpUncertain):
        session.send("a@b.test", "c@d.test", MESSAGE, envid="u", ident="t")
    pool = SmtpPool("127.0.0.1", server.port, size=2, local_hostname="client.test", timeout_s=5)
    jobs = [Job(i, "a@b.test", "c@d.test", MESSAGE, "u", f"t{i}") for i in range(3)]
    pool.send_all(jobs)
    pool.close()
    assert all(isinstance(job.error, SmtpUncertain) for job in jobs)


@pytest.mark.parametrize("server", ["drop-before-data"], indirect=True)
def test_connection_lost_before_the_message_is_unavailable(server: ScriptedServer) -> None:
    # Nothing can have been queued: safe to send again.
    pool = SmtpPool("127.0.0.1", server.port, size=2, local_hostname="client.test", timeout_s=5)
    jobs = [Job(i, "a@b.test", "c@d.test", MESSAGE, "u", f"t{i}") for i in range(3)]
    pool.send_all(jobs)
    pool.close()
    assert all(isinstance(job.error, SmtpUnavailable) for job in jobs)


@pytest.mark.parametrize("server", ["refuse"], indirect=True)
def test_refused_recipient_resets_and_the_connection_is_reused(server: ScriptedServer) -> None:
    pool = SmtpPool("127.0.0.1", server.port, size=1, local_hostname="client.test", timeout_s=5)
    jobs = [Job(i, "a@b.test", f"r{i}@d.test", MESSAGE, "u", f"t{i}") for i in range(3)]
    pool.send_all(jobs)
    assert pool.slots[0].session.transactions == 3
    pool.close()
    for job in jobs:
        assert job.error is None and job.result is not None
        assert job.result.outcome == "rejected"
        assert job.result.stage == "RCPT"
        assert job.result.reply.code == 550


def test_nobody_listening_fails_every_job_at_once() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    pool = SmtpPool("127.0.0.1", port, size=4, local_hostname="client.test", timeout_s=5)
    jobs = [Job(i, "a@b.test", "c@d.test", MESSAGE, "u", f"t{i}") for i in range(10)]
    pool.send_all(jobs)
    pool.close()
    holder.close()
    assert all(isinstance(job.error, SmtpUnavailable) for job in jobs)


def test_message_preparation() -> None:
    assert Message.prepare(b"a\nb").wire == b"a\r\nb\r\n.\r\n"
    assert Message.prepare(b".x\r\ny").wire == b"..x\r\ny\r\n.\r\n"
    crlf = b"H: v\r\n\r\nline\r\n"
    assert Message.prepare(crlf).wire == crlf + b".\r\n"
    assert Message.prepare("é\r\n".encode()).eight_bit


@pytest.mark.parametrize(
    ("raw", "smtputf8", "extensions", "mail_from", "expected"),
    [
        (b"H: v\r\n\r\nascii\r\n", False, {"8BITMIME", "SMTPUTF8"}, "a@b.test", []),
        ("H: v\r\n\r\né\r\n".encode(), False, {"8BITMIME", "SMTPUTF8"}, "a@b.test", ["BODY=8BITMIME"]),
        (
            "H: zoë@d.test\r\n\r\né\r\n".encode(),
            True,
            {"8BITMIME", "SMTPUTF8"},
            "a@b.test",
            ["BODY=8BITMIME", "SMTPUTF8"],
        ),
        (b"H: v\r\n\r\nascii\r\n", False, {"8BITMIME", "SMTPUTF8"}, "zoë@b.test", ["SMTPUTF8"]),
        ("H: zoë@d.test\r\n\r\né\r\n".encode(), True, set(), "a@b.test", []),
    ],
)
def test_mail_from_asks_for_8bitmime_and_smtputf8_when_needed(
    raw: bytes, smtputf8: bool, extensions: set[str], mail_from: str, expected: list[str]
) -> None:
    # SMTPUTF8 when the Transformer says the message needs it (or the envelope is not ASCII),
    # BODY=8BITMIME for 8-bit bytes; only what the server offers.
    message = Message.prepare(raw, smtputf8=smtputf8)
    exchange = Exchange(extensions, mail_from, "c@d.test", message, envid="u", ident=None)
    mail = next(line for line in exchange.start().decode().split("\r\n") if line.startswith("MAIL FROM:"))
    params = [p for p in mail.split()[2:] if not p.startswith("SIZE=")]
    assert params == expected
