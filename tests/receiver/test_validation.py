"""Every validation rule refuses at the end of DATA with its own reply; nothing is queued.

Cases are files under tests/data/receiver/reject/: a ``rule:`` line (the metric label), a
``reply:`` line (the start of the expected SMTP reply), ``---``, then the message.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from devtools import testing
from tests.receiver.conftest import DATA, P0, P1, RunningReceiver, message, reply_of

pytestmark = pytest.mark.redis

CASES = sorted((DATA / "reject").glob("*.eml"))
SENDER = f"app@{testing.SENDER_DOMAIN}"


def _case(path: Path) -> tuple[str, str, bytes]:
    head, _, body = path.read_bytes().partition(b"\n---\n")
    fields = dict(line.split(": ", 1) for line in head.decode().splitlines())
    return fields["rule"], fields["reply"], body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _data_reply(receiver: RunningReceiver, raw: bytes) -> str:
    with receiver.authenticated() as client:
        client.mail(SENDER)
        client.rcpt("someone@dest.test")
        code, text = client.data(raw)
        # The session stays usable after a rejection.
        assert client.noop()[0] == 250
    return f"{code} {text.decode()}"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_rule_rejects_with_its_own_reply(fresh: RunningReceiver, path: Path) -> None:
    rule, expected, raw = _case(path)
    before = fresh.metric(f'mailer_receiver_rejections_total{{rule="{rule}"}}')
    reply = _data_reply(fresh, raw)
    assert reply.startswith(expected), reply
    assert fresh.metric(f'mailer_receiver_rejections_total{{rule="{rule}"}}') == before + 1
    assert fresh.queued(P0) == [] and fresh.queued(P1) == []


def test_rejection_replies_differ_per_rule() -> None:
    # "Its own message": no two rules share a reply text.
    replies: dict[str, set[str]] = {}
    for path in CASES:
        rule, expected, _ = _case(path)
        replies.setdefault(rule, set()).add(expected)
    texts = [min(r, key=len) for r in replies.values()]
    assert len(texts) == len(set(texts)) == len(replies) >= 9


def test_empty_message_is_rejected(fresh: RunningReceiver) -> None:
    assert _data_reply(fresh, b"").startswith("554 5.6.0 the message is empty")


def test_size_limit_is_announced_and_enforced(fresh: RunningReceiver) -> None:
    # SIZE in EHLO; MAIL with a SIZE over the limit and DATA over the limit both get 552 5.3.4.
    with fresh.authenticated() as client:
        assert client.esmtp_features["size"] == "100000"
        code, text = client.mail(SENDER, options=["SIZE=200000"])
        assert code == 552 and text.startswith(b"5.3.4 "), text
        client.rset()
        client.mail(SENDER)
        client.rcpt("someone@dest.test")
        big = message(body=(b"y" * 98 + b"\r\n") * 1200)
        code, text = client.data(big)
        assert code == 552 and text.startswith(b"5.3.4 Message too big for system"), text
        # The session goes on, and a message under the limit passes.
        client.sendmail(SENDER, ["someone@dest.test"], message(uuid="small1"))
    assert [e.uuid for e in fresh.queued(P1)] == ["small1"]


def test_long_body_line_is_accepted_and_normalised(fresh: RunningReceiver) -> None:
    # Body lines over 998 octets are accepted (the Transformer re-encodes them, as over HTTP);
    # a bare LF and a bare CR in the body are queued as CRLF.
    body = b"z" * 5000 + b"\r\nbare LF\nbare CR\rend\r\n"
    assert _data_reply(fresh, message(body=body)).startswith("250 2.0.0")
    [entry] = fresh.queued(P1)
    assert entry.raw == message(body=b"z" * 5000 + b"\r\nbare LF\r\nbare CR\r\nend\r\n")


def test_long_header_line_is_refused(fresh: RunningReceiver) -> None:
    reply = _data_reply(fresh, message(extra="X-Long: " + "h" * 1000 + "\r\n"))
    assert reply.startswith("554 5.6.3 header line 5 is longer than 998 octets"), reply
    assert fresh.queued(P1) == []


def test_recipient_syntax_is_checked_but_envelope_is_not_used(fresh: RunningReceiver) -> None:
    # RCPT needs local@domain; otherwise the envelope decides nothing (To/Cc do).
    with fresh.authenticated() as client:
        client.mail("whoever@anywhere.test")
        code, text = client.rcpt("postmaster")
        assert code == 501 and text.startswith(b"5.1.3"), text
        code, text = client.rcpt("<a@b@c.test>")
        assert code in (501, 553), text
        assert client.rcpt("envelope-only@elsewhere.test")[0] == 250
        code, _ = client.data(message(uuid="env1", to="header@dest.test"))
        assert code == 250
    [entry] = fresh.queued(P1)
    assert entry.uuid == "env1"


def test_data_without_rcpt_and_nested_mail(fresh: RunningReceiver) -> None:
    with fresh.authenticated() as client:
        code, text = client.docmd("DATA")
        assert code == 503 and text.startswith(b"5.5.1"), text
        client.mail(SENDER)
        code, text = client.mail(SENDER)
        assert code == 503 and text.startswith(b"5.5.1"), text


def test_rejected_message_can_be_fixed_and_resent(fresh: RunningReceiver) -> None:
    with fresh.authenticated() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(SENDER, ["someone@dest.test"], message(uuid="Bad-Uuid"))
        assert reply_of(info.value).startswith("554 5.6.0 X-Uuid must match")
        client.sendmail(SENDER, ["someone@dest.test"], message(uuid="good1"))
    assert [e.uuid for e in fresh.queued(P1)] == ["good1"]
