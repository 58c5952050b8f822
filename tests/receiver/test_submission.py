"""Accepted submissions: real clients, and the queued bytes are exactly what was sent."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest

from devtools import testing
from devtools.servers import wait_until
from tests.receiver.conftest import (
    CLIENT_NAME,
    DATA,
    HASHED_PASSWORD,
    HASHED_USER,
    P0,
    P1,
    PASSWORD,
    USER,
    RunningReceiver,
    client_tls,
    message,
)

pytestmark = pytest.mark.redis

SENDER = f"app@{testing.SENDER_DOMAIN}"


def test_starttls_auth_plain_is_queued_byte_identical(fresh: RunningReceiver) -> None:
    # The 250 comes after the entry is in Redis, and the entry holds the DATA bytes exactly
    # (after dot-unstuffing: smtplib stuffs the lines that start with a dot).
    raw = message(body=b"Hello.\r\n.leading dot\r\n..two dots\r\n.\r\nlast line without dot\r\n")
    with fresh.authenticated() as client:
        assert client.docmd("NOOP")[0] == 250
        refused = client.sendmail(SENDER, ["someone@dest.test"], raw)
        assert refused == {}
    [entry] = fresh.queued(P1)
    assert entry.raw == raw
    assert (entry.uuid, entry.priority, entry.via) == ("abc123", 1, "smtp")
    assert fresh.queued(P0) == []


def test_auth_login_and_hashed_password(fresh: RunningReceiver) -> None:
    # AUTH LOGIN works as well as PLAIN, and an account whose password is stored as a
    # pbkdf2_sha256 hash can log in (twice: the second check comes from the cache).
    for _ in range(2):
        with fresh.smtp() as client:
            client.ehlo()
            client.starttls(context=client_tls())
            client.ehlo()
            client.user, client.password = HASHED_USER, HASHED_PASSWORD
            code, text = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            assert (code, text) == (235, b"2.7.0 Authentication successful")
            client.sendmail(SENDER, ["someone@dest.test"], message())
    assert len(fresh.queued(P1)) == 2


def test_priority_zero_goes_to_the_primary_queue(fresh: RunningReceiver) -> None:
    raw = message(extra="X-Priority: 0\r\n")
    with fresh.authenticated() as client:
        client.sendmail(SENDER, ["someone@dest.test"], raw)
    [entry] = fresh.queued(P0)
    assert (entry.raw, entry.priority) == (raw, 0)
    assert fresh.queued(P1) == []


def test_reply_names_the_uuid_and_log_has_no_addresses(fresh: RunningReceiver) -> None:
    with fresh.authenticated() as client:
        client.mail(SENDER)
        client.rcpt("someone@dest.test")
        code, text = client.data(message(uuid="logcheck1", to="secret.person@dest.test"))
    assert (code, text) == (250, b"2.0.0 Ok: queued as logcheck1")
    wait_until(lambda: "accepted logcheck1 into IB-MAIL-QUEUE-P1" in fresh.log(), what="the accept log line")
    assert "secret.person" not in fresh.log()
    assert PASSWORD not in fresh.log()


def test_8bitmime_body_is_queued_byte_identical(fresh: RunningReceiver) -> None:
    body = "Grüße aus Köln – 8-bit UTF-8\r\n".encode() + b"latin-1 \xe9t\xe9\r\n"
    raw = message(extra="MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n", body=body)
    with fresh.authenticated() as client:
        assert client.has_extn("8bitmime")
        client.sendmail(SENDER, ["someone@dest.test"], raw, mail_options=["BODY=8BITMIME"])
    [entry] = fresh.queued(P1)
    assert entry.raw == raw


def test_smtputf8_addresses_and_headers_are_queued_byte_identical(fresh: RunningReceiver) -> None:
    raw = (
        "From: Jörg <jörg@example.test>\r\nTo: Zoë <zoë@bücher.test>\r\nSubject: Grüße\r\n"
        "X-Uuid: utf8mail\r\n\r\nHällo\r\n"
    ).encode()
    with fresh.authenticated() as client:
        assert client.has_extn("smtputf8")
        refused = client.sendmail("jörg@example.test", ["zoë@bücher.test"], raw, mail_options=["SMTPUTF8"])
        assert refused == {}
    [entry] = fresh.queued(P1)
    assert entry.raw == raw
    assert entry.uuid == "utf8mail"


def test_implicit_tls_port(fresh: RunningReceiver) -> None:
    # RFC 8314 port: encrypted from the first byte, AUTH offered at once, no STARTTLS.
    with fresh.implicit_tls() as client:
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        client.login(USER, PASSWORD)
        client.sendmail(SENDER, ["someone@dest.test"], message(uuid="tls465"))
    assert [e.uuid for e in fresh.queued(P1)] == ["tls465"]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
def test_swaks_submission(fresh: RunningReceiver, tmp_path: Path, pipelining: bool) -> None:
    # swaks (Perl, Net::SSLeay): STARTTLS + AUTH PLAIN, the message from a file; with
    # --pipeline it sends MAIL, RCPT and DATA at once (RFC 2920) and then reads the replies.
    eml = tmp_path / "swaks.eml"
    # swaks sends the file's lines with CRLF and then CRLF.CRLF, so the file has no final newline.
    eml.write_bytes(message(uuid="swaks1", body=b"Sent by swaks.").replace(b"\r\n", b"\n"))
    command = ["swaks", "--server", f"127.0.0.1:{fresh.port}", "--helo", CLIENT_NAME, "--tls"]
    command += ["--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD]
    command += ["--from", SENDER, "--to", "someone@dest.test", "--data", str(eml)]
    command += ["--pipeline"] if pipelining else []
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as swaks1" in result.stdout
    if pipelining:  # the three commands went out before the first of their replies came back
        lines = result.stdout.splitlines()
        sent = [i for i, line in enumerate(lines) if line.lstrip().startswith(("~> MAIL", "~> RCPT", "~> DATA"))]
        first_reply = next(i for i, line in enumerate(lines) if i > sent[0] and line.lstrip().startswith("<~"))
        assert len(sent) == 3 and sent[-1] < first_reply, result.stdout
    [entry] = fresh.queued(P1)
    assert entry.raw == eml.read_bytes().replace(b"\n", b"\r\n") + b"\r\n"


def test_metrics_count_messages_recipients_and_rejections(fresh: RunningReceiver) -> None:
    before = fresh.metrics()
    with fresh.authenticated() as client:
        client.sendmail(SENDER, ["a@dest.test"], message(to="a@dest.test, b@dest.test", extra="Cc: c@dest.test\r\n"))
        with pytest.raises(smtplib.SMTPDataError):
            client.sendmail(SENDER, ["a@dest.test"], message(uuid="NOT-VALID"))
    after = fresh.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("nbr_emails_enqueued_total") == 1
    assert delta("nbr_recipients_total") == 3
    assert delta("nbr_dropped_emails_total") == 1
    assert delta('mailer_receiver_rejections_total{rule="x-uuid-malformed"}') == 1
    assert after["memory_usage_percent"] > 0
    assert fresh.http("/readyz") == (200, "ok\n")
    assert fresh.http("/healthz")[0] == 200


def test_data_corpus_files_are_accepted(fresh: RunningReceiver) -> None:
    # Every file under tests/data/receiver/accept/ is a valid submission queued unchanged.
    files = sorted((DATA / "accept").glob("*.eml"))
    assert files
    with fresh.authenticated() as client:
        for path in files:
            raw = path.read_bytes()
            options = ["SMTPUTF8", "BODY=8BITMIME"] if any(b > 127 for b in raw) else []
            client.sendmail(SENDER, ["someone@dest.test"], raw, mail_options=options)
    queued = {e.uuid: e.raw for e in fresh.queued(P1) + fresh.queued(P0)}
    assert len(queued) == len(files)
    for path in files:
        raw = path.read_bytes()
        uuid = next(line.split(b":", 1)[1].strip().decode() for line in raw.splitlines() if line.startswith(b"X-Uuid:"))
        assert queued[uuid] == raw, path.name
