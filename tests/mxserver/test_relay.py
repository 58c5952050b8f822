"""Never a relay: only our tagged addresses, FBL mailboxes and postmaster are accepted (swaks).

swaks is a real, independent SMTP client; every refused address must get ``550 5.7.1`` at RCPT
and nothing may reach Redis or the eml directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from common.addressing import AddressSigner
from devtools.testing import RETURN_PATH_DOMAIN
from mxserver.attribution import Attributor
from mxserver.recipients import RecipientPolicy
from tests.mxserver.conftest import CORPUS, RunningMx, bounce_address, unsub_address

SWAKS = shutil.which("swaks")

REFUSED = [
    ("victim@gmail.com", "relay"),
    ("postmaster@example.org", "relay"),
    (f"bounce-x@{RETURN_PATH_DOMAIN}.evil.example", "relay"),
    (f"someone@sub.{RETURN_PATH_DOMAIN}", "relay"),
    (f"random.user@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"victim%gmail.com@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"abuse@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"bounce-9c4e1a7b2d3f5e60d001@{RETURN_PATH_DOMAIN}", "unknown"),
    (f"bounce-9c4e1a7b2d3f5e60d001-aaaaaaaaaa@{RETURN_PATH_DOMAIN}", "forged"),
    (f"unsub-9c4e1a7b2d3f5e60d001-aaaaaaaaaa@{RETURN_PATH_DOMAIN}", "forged"),
    # A genuine tag of another uuid, pasted onto this one.
    (bounce_address("otheruuid").replace("otheruuid", "9c4e1a7b2d3f5e60d001"), "forged"),
    # A genuine bounce tag used as an unsubscribe tag (the kind is part of the HMAC).
    (bounce_address("abc123").replace("bounce-", "unsub-"), "forged"),
]
ACCEPTED = [
    (bounce_address("abc123"), "bounce"),
    (unsub_address("abc123"), "unsub"),
    (bounce_address("abc123").upper(), "bounce"),
    (f"fbl@{RETURN_PATH_DOMAIN}", "abuse"),
    (f"postmaster@{RETURN_PATH_DOMAIN}", "postmaster"),
    ("Postmaster", "postmaster"),
]


@pytest.fixture(scope="module")
def policy() -> RecipientPolicy:
    attributor = Attributor(AddressSigner(b"test-address-secret-0123456789abcdef"), frozenset({RETURN_PATH_DOMAIN}))
    return RecipientPolicy(attributor, frozenset({f"fbl@{RETURN_PATH_DOMAIN}", "fbl@example.com"}))


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_policy_refuses(policy: RecipientPolicy, address: str, reason: str) -> None:
    decision = policy.check(address)
    assert decision.refused == reason
    assert decision.accepted is None
    assert decision.reply.startswith("550 5.7.1 ")


@pytest.mark.parametrize(("address", "kind"), ACCEPTED)
def test_policy_accepts(policy: RecipientPolicy, address: str, kind: str) -> None:
    decision = policy.check(address)
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
    # Each address of REFUSED, sent with a full message: 550 5.7.1 at RCPT, nothing stored.
    for address, _ in REFUSED:
        result = swaks(mx.port, "--from", f"spammer@{RETURN_PATH_DOMAIN}", "--to", address)
        assert result.returncode == 24, result.stdout  # swaks: no recipient accepted
        assert f"<** 550 5.7.1 <{address}>" in result.stdout, result.stdout
        assert " -> DATA" not in result.stdout
    assert redis_client.xlen("EVENT_QUEUE") == 0
    assert not list(mx.eml_dir.glob("*.eml"))
    total = sum(mx.metric("mxserver_rejected_recipients_total", reason=r) for r in ("relay", "unknown", "forged"))
    assert total == len(REFUSED)
    assert mx.metric("mxserver_rejected_recipients_total", reason="forged") == 4


@pytest.mark.redis
def test_mixed_recipients_only_ours_are_taken(mx: RunningMx, redis_client: redis.Redis) -> None:
    # One transaction with a foreign and a tagged recipient: the foreign one is refused, the mail
    # is accepted for ours only (and classified as for ours).
    path = CORPUS / "dsn/postfix-user-unknown.eml"
    rcpt = json.loads((CORPUS / "dsn/postfix-user-unknown.expected.json").read_text())["rcpt"][0]
    result = swaks(mx.port, "--from", "<>", "--to", f"victim@gmail.com,{rcpt}", "--data", f"@{path}")
    assert "<** 550 5.7.1 <victim@gmail.com>" in result.stdout
    assert "<~  250 2.0.0 OK bounce" in result.stdout or "<-  250 2.0.0 OK bounce" in result.stdout, result.stdout
    assert redis_client.xlen("EVENT_QUEUE") == 1


@pytest.mark.redis
def test_swaks_delivers_to_each_accepted_address(mx: RunningMx, redis_client: redis.Redis, tmp_path: Path) -> None:
    # Every ACCEPTED address takes a whole message over SMTP.
    body = tmp_path / "hello.eml"
    body.write_text("From: someone@example.org\nSubject: hello\n\nhello\n")
    for address, _ in ACCEPTED:
        result = swaks(mx.port, "--from", "someone@example.org", "--to", address, "--data", f"@{body}")
        assert result.returncode == 0, result.stdout
    # The unsubscribe address yields an event; the rest is kept (a "hello" is no report).
    assert redis_client.xlen("EVENT_QUEUE") == 1
    assert len(list(mx.eml_dir.glob("*.eml"))) == len(ACCEPTED) - 1
