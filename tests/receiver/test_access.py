"""Who may submit: TLS before AUTH, AUTH before MAIL, no relaying, trusted networks, lockout."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import time

import pytest
import redis

from common.authguard import account_id, failures_key, lockout_key
from devtools import testing
from devtools.servers import wait_until
from tests.receiver.conftest import (
    CLIENT_NAME,
    HASHED_PASSWORD,
    HASHED_USER,
    P1,
    PASSWORD,
    TRUSTED_SOURCE,
    USER,
    RunningReceiver,
    client_tls,
    message,
)

pytestmark = pytest.mark.redis

SENDER = f"app@{testing.SENDER_DOMAIN}"
#: Envelopes an open relay would accept; without AUTH every one must be refused.
ENVELOPES = [
    (SENDER, "someone@dest.test"),
    ("anyone@external.test", "victim@external.test"),
    ("postmaster@receiver.test", "root@localhost.localdomain"),
    ("spoof@example.test", "user@[192.0.2.1]"),
    ("bounce@example.test", "@relay.test:user@external.test"),
    ("a@b.test", '"quoted local"@external.test'),
]


def test_auth_before_starttls_is_refused_and_not_offered(fresh: RunningReceiver) -> None:
    with fresh.smtp() as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {plain}")
        assert (code, text[:6]) == (538, b"5.7.11"), text
        code, text = client.docmd("AUTH", "LOGIN")
        assert code == 538


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "after-starttls"])
def test_mail_rcpt_data_before_auth_get_530(fresh: RunningReceiver, tls: bool) -> None:
    with fresh.smtp() as client:
        client.ehlo()
        if tls:
            client.starttls(context=client_tls())
            client.ehlo()
        for command, arg in (("MAIL", f"FROM:<{SENDER}>"), ("RCPT", "TO:<someone@dest.test>"), ("DATA", "")):
            code, text = client.docmd(command, arg)
            assert (code, text) == (530, b"5.7.0 Authentication required"), command
    assert fresh.queued(P1) == []


@pytest.mark.parametrize(("sender", "recipient"), ENVELOPES)
def test_no_relaying_without_auth(fresh: RunningReceiver, sender: str, recipient: str) -> None:
    # Any envelope, with or without TLS, with a complete message: nothing is accepted.
    for tls in (False, True):
        with fresh.smtp() as client:
            client.ehlo()
            if tls:
                client.starttls(context=client_tls())
                client.ehlo()
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                client.sendmail(sender, [recipient], message(to=recipient if "@" in recipient else "x@dest.test"))
            assert info.value.smtp_code == 530
    assert fresh.queued(P1) == []


def test_implicit_tls_port_also_requires_auth(fresh: RunningReceiver) -> None:
    with fresh.implicit_tls() as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail(SENDER, ["someone@dest.test"], message())
        assert info.value.smtp_code == 530
    assert fresh.queued(P1) == []


def test_raw_socket_pipelined_commands_without_auth(fresh: RunningReceiver) -> None:
    # A client that sends its commands without waiting for replies (pipelining) still gets 530s and
    # its message text is never taken as a message.
    with socket.create_connection(("127.0.0.1", fresh.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220")
        sock.sendall(
            b"EHLO x.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
            + message(uuid="pipelined")
            + b".\r\nQUIT\r\n"
        )
        replies = stream.read().decode(errors="replace")
    assert "530 5.7.0" in replies and "250 2.0.0" not in replies and "354" not in replies
    assert fresh.queued(P1) == []


def test_trusted_network_submits_without_auth(fresh: RunningReceiver) -> None:
    # 127.0.0.2 is in trusted-networks; 127.0.0.1 is not.
    with fresh.smtp(source=TRUSTED_SOURCE) as client:
        client.ehlo()
        client.sendmail(SENDER, ["someone@dest.test"], message(uuid="trusted1"))
    with fresh.smtp(source="127.0.0.1") as client, pytest.raises(smtplib.SMTPSenderRefused):
        client.ehlo()
        client.sendmail(SENDER, ["someone@dest.test"], message(uuid="untrusted1"))
    assert [e.uuid for e in fresh.queued(P1)] == ["trusted1"]


def test_trusted_client_still_gets_validation(fresh: RunningReceiver) -> None:
    with fresh.smtp(source=TRUSTED_SOURCE) as client:
        client.ehlo()
        client.mail(SENDER)
        client.rcpt("someone@dest.test")
        code, text = client.data(message(sender="app@not-configured.test"))
    assert code == 550 and text.startswith(b"5.7.1 From domain not-configured.test"), text


def test_wrong_password_gets_535_and_a_warning_count(fresh: RunningReceiver) -> None:
    before = fresh.metric("receiver_warnings_total")
    with fresh.smtp() as client:
        client.ehlo()
        client.starttls(context=client_tls())
        client.ehlo()
        for user, password in ((USER, "wrong"), ("nobody", PASSWORD)):
            plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            assert client.docmd("AUTH", f"PLAIN {plain}") == (535, b"5.7.8 Authentication credentials invalid")
    assert fresh.metric("receiver_warnings_total") == before + 2
    assert fresh.metric('mailer_receiver_auth_failures_total{reason="bad-credentials"}') >= 2
    assert "wrong" not in fresh.log()


def _attempt(receiver: RunningReceiver, password: str, source: str, user: str = USER) -> tuple[int, bytes]:
    with receiver.smtp(source=source) as client:
        client.ehlo()
        client.starttls(context=client_tls())
        client.ehlo()
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {plain}")


@pytest.mark.slow
def test_brute_force_lockout(fresh: RunningReceiver, redis_client: redis.Redis) -> None:
    # max-failures 3 within the window -> the address and the account get 454 4.7.0 for
    # lockout-seconds (2 s), even with the right password; another account from another address
    # is not affected; then the address may log in again.
    attacker = "127.0.0.3"
    started = time.monotonic()
    codes = [_attempt(fresh, f"guess{i}", attacker)[0] for i in range(3)]
    assert codes == [535, 535, 454]
    # Every failure was delayed (delay-seconds 0.05).
    assert time.monotonic() - started >= 0.15
    assert redis_client.exists(lockout_key("receiver", "ip", attacker))
    assert redis_client.exists(lockout_key("receiver", "user", account_id(USER)))
    assert not redis_client.exists(failures_key("receiver", "ip", attacker))
    code, text = _attempt(fresh, PASSWORD, attacker)
    assert code == 454 and text.startswith(b"4.7.0 Too many failed logins"), text
    assert _attempt(fresh, PASSWORD, "127.0.0.1")[0] == 454  # the account, from anywhere
    assert _attempt(fresh, HASHED_PASSWORD, "127.0.0.1", HASHED_USER)[0] == 235
    assert fresh.metric('mailer_receiver_auth_failures_total{reason="locked-out"}') >= 2
    wait_until(
        lambda: not redis_client.exists(lockout_key("receiver", "ip", attacker)),
        timeout_s=10,
        what="the lockout to expire",
    )
    assert _attempt(fresh, PASSWORD, attacker)[0] == 235


def test_too_many_failures_in_one_session_close_it(fresh: RunningReceiver) -> None:
    # Three failures in one session: 421 and the connection is closed (before the lockout
    # counter is reached for a different address mix).
    with fresh.smtp(source="127.0.0.4") as client:
        client.ehlo()
        client.starttls(context=client_tls())
        client.ehlo()
        replies = []
        for i in range(3):
            plain = base64.b64encode(f"\0{USER}\0bad{i}".encode()).decode()
            replies.append(client.docmd("AUTH", f"PLAIN {plain}")[0])
        assert replies[:2] == [535, 535] and replies[2] in (421, 454)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_a_successful_login_never_clears_failures(fresh: RunningReceiver, redis_client: redis.Redis) -> None:
    # One valid account must not let an attacker keep guessing another: a success returns only
    # its own reservation; the failures of the address and of the other account stay counted.
    source = "127.0.0.5"
    assert _attempt(fresh, "bad", source)[0] == 535
    assert _attempt(fresh, HASHED_PASSWORD, source, HASHED_USER)[0] == 235
    assert _attempt(fresh, PASSWORD, source)[0] == 235
    assert redis_client.get(failures_key("receiver", "ip", source)) == b"1"
    assert redis_client.get(failures_key("receiver", "user", account_id(USER))) == b"1"
    assert not redis_client.keys("IB:receiver:authflight:*")  # every reservation returned


def test_failed_tls_handshake_closes_only_that_connection(fresh: RunningReceiver) -> None:
    with socket.create_connection(("127.0.0.1", fresh.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220")
        sock.sendall(b"EHLO x.test\r\nSTARTTLS\r\n")
        while not (line := stream.readline()).startswith(b"220 "):
            assert line.startswith(b"250"), line
        assert line == b"220 2.0.0 Ready to start TLS\r\n"
        sock.sendall(b"this is not a TLS client hello\r\n" * 4)
        assert stream.read() == b""
    wait_until(lambda: "TLS handshake failed" in fresh.log(), what="the handshake failure log line")
    with fresh.authenticated() as client:
        assert client.noop() == (250, b"2.0.0 OK")


def test_greeting_and_ehlo_name(fresh: RunningReceiver) -> None:
    with fresh.smtp() as client:
        code, name = client.ehlo(CLIENT_NAME)
        assert code == 250 and name.startswith(b"receiver.test")
        assert client.has_extn("pipelining") is True  # RFC 2920 (common.smtpserver groups the replies)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_an_overlong_auth_answer_is_refused_and_ends_the_session(fresh: RunningReceiver, mechanism: str) -> None:
    # aiosmtpd reads the answer to a 334 challenge with readline(): a line over its limit used
    # to be a 451 and a traceback in the log for a client's own fault.
    with fresh.smtp() as client:
        client.ehlo()
        client.starttls(context=client_tls())
        client.ehlo()
        assert client.docmd("AUTH", mechanism)[0] == 334
        client.send(b"A" * 70_000 + b"\r\n")
        code, text = client.getreply()
        assert (code, text) == (500, b"5.5.6 Authentication exchange line is too long, closing connection")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert "Traceback" not in fresh.log_path.read_text()
    with fresh.authenticated() as client:  # the server is fine
        assert client.noop()[0] == 250


def test_starttls_inside_tls_is_refused(fresh: RunningReceiver) -> None:
    with fresh.smtp() as client:
        client.ehlo()
        client.starttls(context=client_tls())
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS") == (503, b"5.5.1 Already running TLS")
        assert client.noop()[0] == 250  # the session goes on, still in the one TLS layer
    with fresh.implicit_tls() as client:
        client.ehlo()
        assert client.docmd("STARTTLS") == (503, b"5.5.1 Already running TLS")


def test_every_reply_carries_an_enhanced_status_and_ehlo_says_so(fresh: RunningReceiver) -> None:
    # RFC 2034: ENHANCEDSTATUSCODES advertised, and then every reply but the greeting, HELO/EHLO
    # and 3xx continuations has one -- also aiosmtpd's own replies that name none.
    with fresh.smtp() as client:
        client.ehlo()
        assert client.has_extn("enhancedstatuscodes")
        replies = [
            client.docmd("BDAT", "10 LAST"),
            client.docmd("AUTH"),
            client.docmd("VRFY", "someone"),
            client.docmd("MAIL", "FROM:<a@b.test> BOGUS=1"),
            client.docmd("X" * 600),
        ]
    for code, text in replies:
        assert re.match(rb"[245]\.\d{1,3}\.\d{1,3} ", text), (code, text)


def test_auth_plain_may_name_only_the_users_own_identity(fresh: RunningReceiver) -> None:
    # RFC 4616 authzid: empty or the user's own name logs in; another name would be acting as
    # someone else, which no account may.
    for authzid, expected in (("", 235), (USER, 235), ("root", 535)):
        with fresh.smtp() as client:
            client.ehlo()
            client.starttls(context=client_tls())
            client.ehlo()
            blob = base64.b64encode(f"{authzid}\0{USER}\0{PASSWORD}".encode()).decode()
            code, text = client.docmd("AUTH", f"PLAIN {blob}")
            assert code == expected, (authzid, text)
    assert text == b"5.7.8 Acting as another identity (authzid) is not allowed"
