"""MxServer over real SMTP with a real Redis: acceptance, durability, limits, TLS, shutdown."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from common import binding, keys
from common.config import Config
from common.events import decode_event, public
from devtools import mxcorpus
from devtools.servers import RedisProcess, wait_until
from devtools.testing import RETURN_PATH_DOMAIN
from mxserver.analysis import Analysis
from tests.mxserver.conftest import CLASSIFIER, CORPUS, RunningMx, bounce_address, crlf, record, unsub_address

pytestmark = pytest.mark.redis

EVENT_QUEUE = "EVENT_QUEUE"


def events(client: redis.Redis) -> list[dict[str, Any]]:
    rows: Any = client.xrange(EVENT_QUEUE)
    return [decode_event(fields) for _, fields in rows]


def _hgetall(client: redis.Redis, key: str) -> dict[bytes, bytes]:
    found: Any = client.hgetall(key)
    return dict(found)


def corpus(name: str, client: redis.Redis | None = None) -> tuple[list[str], bytes]:
    """A corpus case's envelope and message; its records written to ``client`` when given."""
    case = mxcorpus.load(CORPUS / name)
    if client is not None:
        record(client, case.records)
    return case.rcpt, case.raw


def test_dsn_to_tagged_address_is_a_bounce_event_in_redis(mx: RunningMx, redis_client: redis.Redis) -> None:
    # 250 only once the bounce event is in the event stream.
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    code, text = mx.send(rcpts, raw)
    assert code == 250, text
    (event,) = events(redis_client)
    assert event["event"] == "bounce"
    assert event["uuid"] == "9c4e1a7b2d3f5e60d001"
    assert event["recipient"] == "jane.doe@example.org"
    assert event["stream_id"] == "spring" and event["fd"] == "example.test" and event["verified"] is True
    assert (event["type"], event["status"], event["classification"], event["suppress"]) == (
        "hard",
        "5.1.1",
        "user-unknown",
        True,
    )
    assert mx.metric("mailer_mxserver_received_bounce_total", report="dsn") == 1
    assert mx.metric("mailer_mxserver_events_total", event="bounce", type="hard") == 1
    assert not list(mx.eml_dir.iterdir())


def test_whole_corpus_through_smtp(mx: RunningMx, redis_client: redis.Redis) -> None:
    # Every corpus message over SMTP, with the records in Redis: the events written are those
    # the classifier gives (the corpus expectations), forged envelopes are refused at RCPT or
    # kept, and everything without an event except our own reports is kept in the eml store.
    want: list[dict[str, Any]] = []
    kept = refused = 0
    for case in mxcorpus.cases():
        record(redis_client, case.records)
        code, text = mx.send(case.rcpt, case.raw)
        if code == 550:
            assert case.kind == "unverified" and b"5.7.1" in text, case.name
            refused += 1
            continue
        assert code == 250, f"{case.name}: {code} {text!r}"
        stored = {u: binding.decode_record(_hgetall(redis_client, keys.sent_record(u))) for u in case.records}
        outcome = CLASSIFIER.classify(case.rcpt, case.raw, records=stored, now=0)
        want.extend(public(e.to_dict()) for e in outcome.events)
        kept += outcome.kept
    got = [public(e) for e in events(redis_client)]
    for record_ in want + got:
        record_.pop("timestamp")
    assert got == want
    assert len(got) == sum(len(c.expected["events"]) for c in mxcorpus.cases())
    assert len(list(mx.eml_dir.glob("*.eml"))) == kept
    assert mx.metric("mxserver_received_spam_total") >= 15
    assert mx.metric("mxserver_received_unsubscribe_total") >= 10
    assert mx.metric("mxserver_received_autoreply_total") >= 20
    assert mx.metric("mailer_mxserver_own_reports_total") == 5
    unverified = sum(
        mx.metric("mailer_mxserver_unverified_total", reason=r)
        for r in ("no-tag", "bad-tag", "conflicting-tags", "recipient-mismatch")
    )
    assert unverified + refused == sum(c.kind == "unverified" for c in mxcorpus.cases())


def test_unclassified_mail_is_kept_with_trace_headers(mx: RunningMx) -> None:
    # A human reply is written to the eml directory, with the envelope in trace headers.
    rcpts, raw = corpus("other/human-reply-to-bounce-address.eml")
    code, _ = mx.send(rcpts, raw, mail_from="helga.schmidt@example.org")
    assert code == 250
    (kept,) = mx.eml_dir.glob("*.eml")
    data = kept.read_bytes()
    assert data.startswith(b"Return-Path: <helga.schmidt@example.org>\r\nX-Original-To: " + rcpts[0].encode())
    assert b"by mx.example.test (mxserver) with ESMTP;" in data
    assert data.endswith(crlf(raw))
    assert mx.metric("mxserver_received_unclassified_total") == 1
    assert mx.metric("mailer_mxserver_eml_directory_files") == 1


def test_unsubscribe_and_spam_report_events(mx: RunningMx, redis_client: redis.Redis) -> None:
    # The two legally important events, from a mailto unsubscribe and a Yahoo ARF report.
    for name in ("unsubscribe/mailto-subject-unsubscribe.eml", "arf/yahoo-abuse.eml"):
        rcpts, raw = corpus(name, redis_client)
        assert mx.send(rcpts, raw, mail_from="someone@example.org")[0] == 250
    unsubscribe, spam = events(redis_client)
    assert (unsubscribe["event"], unsubscribe["uuid"], unsubscribe["recipient"]) == (
        "unsubscribe",
        "9c4e1a7b2d3f5e60b001",
        "reader.one@example.org",
    )
    assert (spam["event"], spam["uuid"], spam["recipient"], spam["email"], spam["feedback_type"]) == (
        "spam-report",
        "9c4e1a7b2d3f5e60f001",
        "reader.4711@yahoo.com",
        "reader.4711@yahoo.com",
        "abuse",
    )
    assert mx.metric("mxserver_received_unsubscribe_total") == 1
    assert mx.metric("mxserver_received_spam_total") == 1


def test_redelivered_report_has_the_same_event_id(mx: RunningMx, redis_client: redis.Redis) -> None:
    # A sending MTA that retries (e.g. after losing our 250) produces the same event id.
    rcpts, raw = corpus("dsn/gmail-no-such-user.eml", redis_client)
    assert mx.send(rcpts, raw)[0] == 250
    assert mx.send(rcpts, raw)[0] == 250
    first, second = events(redis_client)
    assert first["event_id"] == second["event_id"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    server = RedisProcess(tmp_path / "own-redis").start()
    yield server
    server.stop()


def test_redis_down_answers_451_and_recovers(
    own_redis: RedisProcess, mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]
) -> None:
    # No 250 without the event in Redis: Redis stopped -> 451 4.3.0; back -> 250 again.
    config = mx_config({"reliable-queue": {"redis": {"hostname": "127.0.0.1", "port": own_redis.port}}})
    mx = start_mx(config)
    client = redis.Redis(port=own_redis.port)
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", client)
    client.close()
    assert mx.send(rcpts, raw)[0] == 250
    own_redis.stop()
    code, text = mx.send(rcpts, raw)
    assert code == 451
    assert text.startswith(b"4.3.0")
    assert mx.metric("mailer_mxserver_temporary_failures_total", cause="redis") == 1
    # Unclassified mail needs no Redis: it is kept on disk and accepted.
    rcpts_h, raw_h = corpus("other/human-reply-to-bounce-address.eml")
    assert mx.send(rcpts_h, raw_h)[0] == 250
    own_redis.start()
    assert mx.send(rcpts, raw)[0] == 250
    client = redis.Redis(port=own_redis.port)
    assert client.xlen(EVENT_QUEUE) == 2  # the 451'd mail is retried by its sender, not kept by us
    client.close()


def test_size_limit(mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]) -> None:
    # SIZE is advertised; a declared or actual size over the limit gets 552.
    mx = start_mx(mx_config({"max-message-size": 2048}))
    with mx.smtp() as client:
        assert client.has_extn("size")
        assert client.esmtp_features["size"] == "2048"
        code, _ = client.mail("<>", ["SIZE=5000"])
        assert code == 552
        client.rset()
        assert client.mail("<>")[0] == 250
        assert client.rcpt(bounce_address("sizetest1", "a@example.org"))[0] == 250
        code, _ = client.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 40)
        assert code == 552
    assert not list(mx.eml_dir.glob("*.eml"))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "mx-cert.pem", directory / "mx-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_starttls_offered_only_with_a_certificate(
    tmp_path: Path, redis_client: redis.Redis, mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]
) -> None:
    # With tls-cert-file/tls-key-file STARTTLS is offered and works; without, it is not offered.
    plain = start_mx(mx_config())
    with plain.smtp() as client:
        assert not client.has_extn("starttls")
    cert, key = _self_signed(tmp_path)
    tls = start_mx(mx_config({"tls-cert-file": str(cert), "tls-key-file": str(key)}))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    with tls.smtp() as client:
        assert client.has_extn("starttls")
        assert client.starttls(context=context)[0] == 220
        client.ehlo()
        client.mail("<>")
        assert client.rcpt(rcpts[0])[0] == 250
        assert client.data(crlf(raw))[0] == 250
    assert redis_client.xlen(EVENT_QUEUE) == 1


def test_connection_limit(mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]) -> None:
    # Beyond max-connections a client gets 421 at once; a slot freed is usable again.
    mx = start_mx(mx_config({"max-connections": 2}))
    first, second = mx.smtp(), mx.smtp()
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", mx.port, local_hostname="client.test", timeout=5)
    assert refused.value.smtp_code == 421
    assert mx.metric("mailer_mxserver_connections_refused_total", reason="busy") == 1
    first.quit()
    wait_until(lambda: mx.metric("mailer_mxserver_sessions") == 1, 5, what="session closed")
    third = mx.smtp()
    assert third.noop()[0] == 250
    third.quit()
    second.quit()


def test_classifier_bug_keeps_the_mail(mx: RunningMx, redis_client: redis.Redis) -> None:
    # An exception in the classifier never loses a mail: it is kept as unclassified, with a warning.
    class Broken:
        async def analyse(self, recipients: Sequence[str], raw: bytes, client: str = "") -> Analysis:
            raise RuntimeError("bug")

    assert mx.server is not None and mx.server.handler is not None
    mx.server.handler.analyser = Broken()
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    assert mx.send(rcpts, raw)[0] == 250
    assert len(list(mx.eml_dir.glob("*.eml"))) == 1
    assert mx.metric("mxserver_warnings_total") == 1
    assert redis_client.xlen(EVENT_QUEUE) == 0


def test_a_mail_over_the_time_budget_is_kept_and_its_worker_replaced(
    redis_client: redis.Redis, mx_config: Callable[..., Config], start_mx: Callable[[Config], RunningMx]
) -> None:
    # A mail whose classification takes longer than classify-timeout-seconds: its worker is
    # killed and replaced, the mail kept as unclassified; the next mail is classified normally.
    mx = start_mx(mx_config({"classify-timeout-seconds": 0.05}))
    assert mx.server is not None and mx.server.pool is not None
    slow = b"From: MAILER-DAEMON@x.example\r\nSubject: Undelivered Mail\r\n\r\n" + b"550-5.1.1 x@y.z\r\n" * 200_000
    assert mx.send([f"postmaster@{RETURN_PATH_DOMAIN}"], slow)[0] == 250
    assert mx.metric("mailer_mxserver_classifier_workers_replaced_total", cause="overrun") == 1
    assert mx.server.pool.replaced == 1
    assert len(list(mx.eml_dir.glob("*.eml"))) == 1
    mx.server.pool.timeout_s = 30
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    assert mx.send(rcpts, raw)[0] == 250
    assert redis_client.xlen(EVENT_QUEUE) == 1


def test_a_forged_tag_is_refused_at_rcpt_when_the_record_exists(mx: RunningMx, redis_client: redis.Redis) -> None:
    # The record names who uuid U went to: a tag of U bound to anybody else is refused (550 5.7.1);
    # without a record the address is accepted and the content decides.
    record(redis_client, {"recorded1": ["a@example.org"]})
    with mx.smtp() as client:
        client.mail("<>")
        assert client.rcpt(bounce_address("recorded1", "a@example.org"))[0] == 250
        code, text = client.rcpt(bounce_address("recorded1", "victim@example.org"))
        assert (code, text[:5]) == (550, b"5.7.1")
        assert client.rcpt(bounce_address("norecord1", "victim@example.org"))[0] == 250
    assert mx.metric("mailer_mxserver_rejected_recipients_total", reason="forged") == 1


def test_unexpected_error_is_a_temporary_failure(mx: RunningMx, redis_client: redis.Redis) -> None:
    # aiosmtpd would answer 500 (permanent: the sender drops the report); we answer 451.
    class Exploding:
        async def enqueue_many(self, queue: str, batch: list[Any]) -> list[str]:
            raise ValueError("unexpected")

    assert mx.server is not None and mx.server.handler is not None
    mx.server.handler.queues = Exploding()  # type: ignore[assignment]
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    code, text = mx.send(rcpts, raw)
    assert (code, text[:5]) == (451, b"4.3.0")
    assert mx.metric("mxserver_warnings_total") == 1


def test_graceful_close_sends_421_to_idle_sessions(mx: RunningMx) -> None:
    # On shutdown an idle session is told 421 and closed; the port stops accepting.
    port = mx.port
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert client.recv(200).startswith(b"220 mx.example.test ESMTP")
    mx.stop()
    data = b""
    while chunk := client.recv(200):
        data += chunk
    assert data.startswith(b"421 4.3.2")
    client.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_unsubscribe_address_accepted_for_upper_case(mx: RunningMx, redis_client: redis.Redis) -> None:
    # Tags are case-insensitive; domains too (RFC 5321 local parts are case-sensitive, ours are not).
    record(redis_client, {"caseuuid1": ["Reader@Example.org"]})
    rcpt = unsub_address("caseuuid1", "reader@example.org").upper()
    code, _ = mx.send([rcpt], b"From: a@example.org\r\nSubject: unsubscribe\r\n\r\nplease\r\n")
    assert code == 250
    (event,) = events(redis_client)
    assert (event["event"], event["uuid"], event["recipient"]) == ("unsubscribe", "caseuuid1", "Reader@Example.org")
    assert RETURN_PATH_DOMAIN.upper() in rcpt


def test_secret_kept_in_redis_is_used_when_not_configured(
    redis_client: redis.Redis,
    make_config: Callable[..., Config],
    start_mx: Callable[[Config], RunningMx],
    tmp_path: Path,
) -> None:
    # Without common-config.address-secret every service shares the one in Redis (IB:address-secret).
    redis_client.set("IB:address-secret", b"test-address-secret-0123456789abcdef")
    config = make_config(
        {"common-config": {"address-secret": None}, "mxserver": {"eml-directory": str(tmp_path / "eml")}},
        service="mxserver",
    )
    assert config.customer.common_config.address_secret is None
    mx = start_mx(config)
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    assert mx.send(rcpts, raw)[0] == 250
    assert events(redis_client)[0]["uuid"] == "9c4e1a7b2d3f5e60d001"


def test_one_session_carries_many_mails(mx: RunningMx, redis_client: redis.Redis) -> None:
    # An MTA delivers many bounces over one session: MAIL/RCPT/DATA have no small per-session
    # budget (aiosmtpd's default is 20 per command unless told otherwise).
    rcpts, raw = corpus("dsn/postfix-user-unknown.eml", redis_client)
    with mx.smtp() as client:
        for _ in range(30):
            assert client.sendmail("", rcpts, crlf(raw)) == {}
    assert redis_client.xlen(EVENT_QUEUE) == 30
