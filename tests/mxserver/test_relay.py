"""Never a relay: only our tagged addresses, FBL mailboxes and postmaster are accepted (swaks).

swaks is a real, independent SMTP client; every refused address must get a ``550`` at RCPT
(``5.7.1`` for relaying and forged tags, ``5.1.1`` for unknown local parts) and nothing may
reach Redis or the eml directory.  A tagged address is refused as forged when the record of its
uuid exists and no recorded recipient is the one its tag is bound to.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from common.binding import Sent
from devtools import mxcorpus
from devtools.testing import RETURN_PATH_DOMAIN
from mxserver.recipients import RecipientPolicy
from tests.mxserver.conftest import CORPUS, SIGNER, RunningMx, bounce_address, record, unsub_address

SWAKS = shutil.which("swaks")
UUID = "9c4e1a7b2d3f5e60d001"
READER = "reader@example.org"
SENT = {UUID: [READER], "abc123": [READER]}

REFUSED = [
    ("victim@gmail.com", "relay"),
    ("postmaster@example.org", "relay"),
    (f"bounce-x@{RETURN_PATH_DOMAIN}.evil.example", "relay"),
    (f"someone@sub.{RETURN_PATH_DOMAIN}", "relay"),
    (f"random.user@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"victim%gmail.com@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"abuse@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"bounce-9c4e1a7b2d3f5e60d001@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"bounce-{UUID}-aaaaaaaaaa@{RETURN_PATH_DOMAIN}", "forged"),
    (f"unsub-{UUID}-aaaaaaaaaa@{RETURN_PATH_DOMAIN}", "forged"),
    # A genuine tag of another uuid, pasted onto this one.
    (bounce_address("otheruuid", READER).replace("otheruuid", UUID), "forged"),
    # A genuine tag of this uuid for a recipient it was not sent to.
    (bounce_address(UUID, "someone.else@example.org"), "forged"),
    # A genuine bounce tag used as an unsubscribe tag (the kind is part of the HMAC).
    (bounce_address("abc123", READER).replace("bounce-", "unsub-"), "forged"),
]
ACCEPTED = [
    (bounce_address("abc123", READER), "bounce"),
    (unsub_address("abc123", READER), "unsub"),
    (bounce_address("abc123", READER).upper(), "bounce"),
    # No record (expired, or never written): accepted, the content decides at DATA.
    (f"bounce-norecord1-aaaaaaaaaa@{RETURN_PATH_DOMAIN}", "bounce"),
    (f"fbl@{RETURN_PATH_DOMAIN}", "abuse"),
    (f"postmaster@{RETURN_PATH_DOMAIN}", "postmaster"),
    ("Postmaster", "postmaster"),
]


@pytest.fixture(scope="module")
def policy() -> RecipientPolicy:
    return RecipientPolicy(
        SIGNER, frozenset({RETURN_PATH_DOMAIN}), frozenset({f"fbl@{RETURN_PATH_DOMAIN}", "fbl@example.com"})
    )


def _decide(policy: RecipientPolicy, address: str):
    decision = policy.check(address)
    if decision.tagged is not None:
        sent = [Sent(r, None, None) for r in SENT.get(decision.tagged.uuid, [])]
        decision = policy.check_record(address, decision, sent)
    return decision


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_policy_refuses(policy: RecipientPolicy, address: str, reason: str) -> None:
    decision = _decide(policy, address)
    assert decision.refused == reason
    assert decision.accepted is None
    assert decision.reply.startswith("550 5.1.1 " if reason == "unknown" else "550 5.7.1 ")


@pytest.mark.parametrize(("address", "kind"), ACCEPTED)
def test_policy_accepts(policy: RecipientPolicy, address: str, kind: str) -> None:
    decision = _decide(policy, address)
    assert decision.accepted == kind
    assert decision.reply.startswith("250 ")


def test_policy_accepts_abuse_mailbox_on_any_domain(policy: RecipientPolicy) -> None:
    # abuse.yahoo.to may be on the customer's main domain, not a return-path domain.
    assert policy.check("FBL@example.com").accepted == "abuse"


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    assert SWAKS, "swaks is not installed (apt-get install swaks)"
    return subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--helo", "client.test", "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.redis
def test_open_relay_attempts_are_refused_by_swaks(mx: RunningMx, redis_client: redis.Redis) -> None:
    # Each address of REFUSED, sent with a full message: 550 at RCPT, nothing stored.
    record(redis_client, SENT)
    for address, reason in REFUSED:
        result = swaks(mx.port, "--from", f"spammer@{RETURN_PATH_DOMAIN}", "--to", address)
        assert result.returncode == 24, result.stdout  # swaks: no recipient accepted
        code = "5.1.1" if reason == "unknown" else "5.7.1"
        assert f"<** 550 {code} <{address}>" in result.stdout, result.stdout
        assert " -> DATA" not in result.stdout
    assert redis_client.xlen("EVENT_QUEUE") == 0
    assert not list(mx.eml_dir.glob("*.eml"))
    rejected = "mailer_mxserver_rejected_recipients_total"
    total = sum(mx.metric(rejected, reason=r) for r in ("relay", "unknown", "forged"))
    assert total == len(REFUSED)
    assert mx.metric("mailer_mxserver_rejected_recipients_total", reason="forged") == 5


@pytest.mark.redis
def test_mixed_recipients_only_ours_are_taken(mx: RunningMx, redis_client: redis.Redis, tmp_path: Path) -> None:
    # One transaction with a foreign and a tagged recipient: the foreign one is refused, the mail
    # is accepted for ours only (and classified as for ours).
    case = mxcorpus.load(CORPUS / "dsn/postfix-user-unknown.eml")
    record(redis_client, case.records)
    path = tmp_path / "dsn.eml"
    path.write_bytes(case.raw)
    result = swaks(mx.port, "--from", "<>", "--to", f"victim@gmail.com,{case.rcpt[0]}", "--data", f"@{path}")
    assert "<** 550 5.7.1 <victim@gmail.com>" in result.stdout
    assert "<~  250 2.0.0 OK bounce" in result.stdout or "<-  250 2.0.0 OK bounce" in result.stdout, result.stdout
    assert redis_client.xlen("EVENT_QUEUE") == 1


@pytest.mark.redis
def test_swaks_delivers_to_each_accepted_address(mx: RunningMx, redis_client: redis.Redis, tmp_path: Path) -> None:
    # Every ACCEPTED address takes a whole message over SMTP.
    record(redis_client, SENT)
    body = tmp_path / "hello.eml"
    body.write_text("From: someone@example.org\nSubject: hello\n\nhello\n")
    for address, _ in ACCEPTED:
        result = swaks(mx.port, "--from", "someone@example.org", "--to", address, "--data", f"@{body}")
        assert result.returncode == 0, result.stdout
    # The unsubscribe address yields an event (for the bound recipient, whoever wrote); the rest
    # is kept (a "hello" is no report).
    assert redis_client.xlen("EVENT_QUEUE") == 1
    assert len(list(mx.eml_dir.glob("*.eml"))) == len(ACCEPTED) - 1
