"""Remote asynchronous bounces come back (issue 14.1), and our own Postfix' bounces count once.

PostfixLog injects every recipient with ``NOTIFY=NEVER`` (our Postfix sends no bounce mail; its
log reports).  Our Postfix must not pass that request to remote servers that offer DSN
(``smtp_discard_ehlo_keywords = dsn`` in PostfixLog's main.cf), or a server that accepts a
message and fails it later stays silent.  Here a sink that advertises DSN records every MAIL
and RCPT command it receives; then, on the running stack, a remote bounce of a delivered
message reaches the webhook as exactly one ``bounce`` event, and a bounce written by our own
Postfix (forced by injecting without NOTIFY=NEVER) yields no second event.
"""

from __future__ import annotations

import asyncio
import email
import json
import shutil
import smtplib
import tempfile
import threading
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from devtools import testing
from devtools.servers import free_port, wait_until
from devtools.sink import Received
from devtools.stack import Stack
from postfixlog.instance import PostfixInstance

pytestmark = [pytest.mark.e2e, pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

DSN_PARAMETERS = ("NOTIFY=", "ORCPT=", "ENVID=", "RET=")


class DsnSink:
    """A minimal SMTP server that offers DSN and records every command line (accepts all mail)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.commands: list[str] = []
        self.messages = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dsn-sink", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> DsnSink:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", self.port), self._loop
        )
        self._server = future.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 dsn-sink.test ESMTP\r\n")
        while line := await reader.readline():
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(command)
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                writer.write(b"250-dsn-sink.test\r\n250-DSN\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n")
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                self.messages += 1
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
def postfix_dir() -> Iterator[Path]:
    """A short, world-traversable directory for a Postfix instance (user postfix must enter it)."""
    path = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def relay_one(postfix_dir: Path, main_cf: dict[str, str | int | bool]) -> list[str]:
    """Inject one message as PostfixLog does (ENVID, NOTIFY=NEVER); the sink's MAIL/RCPT lines."""
    with DsnSink() as sink:
        instance = PostfixInstance(
            postfix_dir / "pf", smtpd_port=free_port(), nexthop=f"[127.0.0.1]:{sink.port}", main_cf=main_cf
        )
        instance.start()
        try:
            with smtplib.SMTP("127.0.0.1", instance.smtpd_port, local_hostname="postfixlog.test", timeout=30) as client:
                client.ehlo()
                client.mail(f"bounce-abc-aaaaaaaaaa@{testing.RETURN_PATH_DOMAIN}", ["ENVID=abc", "RET=HDRS"])
                code, _ = client.rcpt("reader@dest.test", ["NOTIFY=NEVER", "ORCPT=rfc822;reader@dest.test"])
                assert code == 250
                assert client.data(b"From: a@example.test\r\nSubject: hi\r\n\r\nhello\r\n")[0] == 250
            wait_until(lambda: sink.messages == 1, 60, what="the message at the DSN sink")
        finally:
            instance.stop()
        return [c for c in sink.commands if c.upper().startswith(("MAIL", "RCPT"))]


def test_our_postfix_passes_no_dsn_request_to_a_remote_server(postfix_dir: Path) -> None:
    commands = relay_one(postfix_dir, {})
    assert len(commands) == 2, commands
    for parameter in DSN_PARAMETERS:
        assert not any(parameter in c.upper() for c in commands), commands
    # Control: with Postfix' default (offered DSN is used) the same sink sees the request, so
    # the assertion above can fail.
    commands = relay_one(postfix_dir, {"smtp_discard_ehlo_keywords": ""})
    assert any("NOTIFY=NEVER" in c.upper() for c in commands), commands


# -- on the running stack ------------------------------------------------------------------------


def _message(uuid: str, to: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Shop <news@{testing.SENDER_DOMAIN}>"
    msg["To"] = to
    msg["Subject"] = "Your order has shipped"
    msg["X-Uuid"] = uuid
    msg.set_content("Hello,\nyour order is on its way.\n")
    return msg.as_bytes()


def _submit(stack: Stack, raw: bytes) -> None:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the local stack uses a self-signed certificate
    with smtplib.SMTP("127.0.0.1", stack.ports["receiver"], local_hostname="app.test", timeout=30) as client:
        client.starttls(context=context)
        client.login(testing.RECEIVER_USER, testing.RECEIVER_PASSWORD)
        client.sendmail("ignored@app.test", ["ignored@app.test"], raw)


def _copy(stack: Stack, predicate: Any, what: str) -> Received:
    wait_until(lambda: any(predicate(m) for m in stack.sink.messages), timeout_s=90, what=what)
    found: Received = next(m for m in stack.sink.messages if predicate(m))
    return found


def _remote_dsn(copy: Received) -> bytes:
    """What the recipient's server sends later, to the return path the sink saw."""
    original = email.message_from_bytes(copy.data)
    headers = "".join(f"{name}: {original[name]}\r\n" for name in ("Return-Path", "From", "To", "Message-ID"))
    return (
        f"From: MAILER-DAEMON@dest.test\r\nTo: {copy.mail_from}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <remote-dsn-1@mx.dest.test>\r\nMIME-Version: 1.0\r\nAuto-Submitted: auto-replied\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nThe mailbox was closed after your message was accepted.\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {copy.rcpt}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Remote-MTA: dns; store.dest.test\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{copy.rcpt}>: mailbox closed\r\n\r\n"
        f"--b1\r\nContent-Type: text/rfc822-headers\r\n\r\nReturn-Path: <{copy.mail_from}>\r\n{headers}\r\n--b1--\r\n"
    ).encode()


def _to_mx(stack: Stack, rcpt: str, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", stack.ports["mxserver"], local_hostname="mx.dest.test", timeout=30) as client:
        client.ehlo()
        client.mail("<>")
        assert client.rcpt(rcpt)[0] == 250
        return client.data(raw)


def _mx_metric(stack: Stack, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ports['mxserver-metrics']}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _bounces(stack: Stack, uuid: str) -> list[dict[str, Any]]:
    return [e for e in stack.webhook.events if e.get("uuid") == uuid and e["event"] == "bounce"]


def test_a_remote_async_bounce_is_one_event_and_our_own_bounce_none(stack: Stack) -> None:
    uuid = uuidlib.uuid4().hex[:20]
    _submit(stack, _message(uuid, "late.failure@dest.test"))
    copy = _copy(stack, lambda m: m.rcpt == "late.failure@dest.test", "the delivered copy")
    wait_until(lambda: any(e.get("uuid") == uuid and e["event"] == "delivered" for e in stack.webhook.events), 60)
    # 1. The remote server fails the accepted message later and bounces to our return path.
    code, reply = _to_mx(stack, copy.mail_from, _remote_dsn(copy))
    assert (code, reply) == (250, b"2.0.0 OK bounce")
    wait_until(lambda: bool(_bounces(stack, uuid)), 60, what="the bounce at the webhook")
    (event,) = _bounces(stack, uuid)
    assert (event["recipient"], event["type"], event["classification"], event["suppress"]) == (
        "late.failure@dest.test",
        "hard",
        "user-unknown",
        True,
    )
    assert event["verified"] is True and event["final_recipient"] == "late.failure@dest.test"
    # The same report again (the remote MTA retried after losing our 250): the same event id.
    assert _to_mx(stack, copy.mail_from, _remote_dsn(copy))[0] == 250
    wait_until(lambda: len(_bounces(stack, uuid)) == 2, 60, what="the redelivered report")
    assert len({e["event_id"] for e in _bounces(stack, uuid)}) == 1
    # 2. Our own Postfix writes a bounce (injected without NOTIFY=NEVER, to a recipient the
    #    internet refuses): it goes to the return path; at our MX it is our own report.
    before = _mx_metric(stack, "mailer_mxserver_own_reports_total")
    with smtplib.SMTP("127.0.0.1", stack.ports["postfix"], local_hostname="forced.test", timeout=30) as client:
        client.sendmail(copy.mail_from, ["bounce-forced@dest.test"], copy.data)
    own = _copy(stack, lambda m: m.rcpt == copy.mail_from and m.mail_from in ("", "<>"), "our Postfix' bounce")
    assert b"Reporting-MTA: dns; mta.example.test" in own.data
    code, reply = _to_mx(stack, copy.mail_from, own.data)
    assert (code, reply) == (250, b"2.0.0 OK own-report")
    wait_until(lambda: _mx_metric(stack, "mailer_mxserver_own_reports_total") == before + 1, 30)
    mx_events = [e for e in stack.webhook.events if e.get("uuid") == uuid and "verified" in e]
    assert len({e["event_id"] for e in mx_events}) == 1, json.dumps(mx_events)
