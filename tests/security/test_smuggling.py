"""SMTP smuggling: a second transaction hidden in DATA behind a non-standard end-of-data.

An attacker ends the data with a sequence some servers take for ``<CRLF>.<CRLF>`` (``<LF>.<LF>``,
``<LF>.<CRLF>``, ``<CR>.<CR>`` …) and writes MAIL / RCPT / DATA of a second message after it.
Both SMTP doors must take only ``<CRLF>.<CRLF>`` as the end of data: the smuggled commands stay
content of the first message (or the message is refused), never a second transaction; no event
or queued message is ever about the smuggled recipient.  After the
real end of data, an unknown command must get its own ``500``: had the server run the smuggled
commands, their replies would come first.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import redis

from devtools import testing
from devtools.servers import RedisProcess, wait_until
from tests.receiver.conftest import message, start_receiver
from tests.security.conftest import Mx, events, record, return_path
from tests.security.test_forgeries import dsn

#: End-of-data look-alikes (RFC 5321 allows only CRLF.CRLF).
ENDINGS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
}
FIRST_UUID, SMUGGLED_UUID = "1a2b3c4d5e6f7a8b9c0d", "9d8c7b6a5f4e3d2c1b0a"
FIRST, SMUGGLED = "first@example.net", "second@example.net"


def _unknown_command_is_next(client: smtplib.SMTP) -> None:
    code, text = client.docmd("XSMUGGLECHECK")
    assert code == 500, (code, text)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ENDINGS.values(), ids=ENDINGS.keys())
def test_the_receiver_runs_no_smuggled_transaction(tmp_path: Path, redis_server: RedisProcess, ending: bytes) -> None:
    redis.Redis(port=redis_server.port).flushall()
    receiver = start_receiver(tmp_path, redis_server.port)
    try:
        client = receiver.authenticated()
        sender = f"app@{testing.SENDER_DOMAIN}"
        client.mail(sender)
        client.rcpt("someone@dest.test")
        assert client.docmd("DATA")[0] == 354
        smuggled = (
            f"MAIL FROM:<{sender}>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n".encode()
            + message(uuid="smuggled1", to="victim@dest.test", body=b"Smuggled.\r\n")
            + b".\r\n"
        )
        client.send(message(uuid="first1", body=b"Hello.\r\n") + ending + smuggled + b"\r\n.\r\n")
        code, _ = client.getreply()
        _unknown_command_is_next(client)
        client.quit()
        queued = receiver.queued()
        assert [e.uuid for e in queued] == (["first1"] if code == 250 else []), code
        assert all(b"smuggled1" in e.raw for e in queued), "the smuggled text stays content of the first message"
    finally:
        receiver.stop()


@pytest.mark.parametrize("ending", ENDINGS.values(), ids=ENDINGS.keys())
def test_the_mx_runs_no_smuggled_transaction(mx: Mx, r: redis.Redis, ending: bytes) -> None:
    record(r, {FIRST_UUID: [FIRST], SMUGGLED_UUID: [SMUGGLED]})
    unverified = mx.metric("mailer_mxserver_unverified_total")
    first, second = return_path(FIRST_UUID, FIRST), return_path(SMUGGLED_UUID, SMUGGLED)
    report = dsn([FIRST]).replace(b"\n", b"\r\n")
    smuggled = f"MAIL FROM:<>\r\nRCPT TO:<{second}>\r\nDATA\r\n".encode() + dsn([SMUGGLED]).replace(b"\n", b"\r\n")
    with smtplib.SMTP(local_hostname="attacker.test", timeout=30) as client:
        client.connect("127.0.0.1", mx.port)
        client.ehlo()
        client.mail("<>")
        assert client.rcpt(first)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(report + ending + smuggled + b".\r\n")
        code, text = client.getreply()
        assert code == 250, (code, text)
        _unknown_command_is_next(client)
    # One mail was received. It carries two copies' tags (the smuggled text is its content), so
    # it may not verify; either way no event is about the smuggled recipient.
    wait_until(
        lambda: bool(events(r)) or mx.metric("mailer_mxserver_unverified_total") > unverified,
        timeout_s=20,
        what="the mail to be classified",
    )
    assert {e["recipient"] for e in events(r)} <= {FIRST}
