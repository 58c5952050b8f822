"""PostfixLog end to end against real Redis, a real Postfix and a scripted SMTP sink."""

from __future__ import annotations

import email
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from common import bouncerules
from common.events import make_event_id
from common.lifecycle import Stopper
from common.metrics import Health
from common.payloads import OutboundMail
from common.queue import Queues
from devtools.dnsserver import dns_server
from devtools.servers import wait_until
from devtools.sink import Sink, compile_rules
from postfixlog import records
from postfixlog.instance import PostfixInstance
from postfixlog.records import Delivery
from postfixlog.service import PostfixLogService
from postfixlog.smtpclient import Message, SmtpSession

from .conftest import RunningService, events_of, outbound

pytestmark = [pytest.mark.postfix, pytest.mark.redis]

INCOMING = "INCOMING-TO-POSTFIX"


def _by_recipient(events: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {e["recipient"]: e for e in events if e["event"] == kind}


def test_outcomes_become_events(service_config, queues: Queues, redis_client: Any, sink: Sink) -> None:
    # 250 -> delivered (remote IP), 550 5.1.1 -> hard bounce, 450 4.2.0 -> deferred; one entry,
    # one transaction per recipient; the delivered copy carries nothing internal.
    mail = outbound("u1", ["ok1@dest.test", "bounce1@dest.test", "defer1@dest.test"])
    queues.enqueue(INCOMING, mail.to_fields())
    running = RunningService(service_config()).start()
    try:
        wait_until(
            lambda: {"delivered", "bounce", "deferred"} <= {e["event"] for e in events_of(redis_client)},
            30,
            what="delivered, bounce and deferred events",
        )
    finally:
        assert running.stop() == 0
    events = events_of(redis_client)
    delivered = _by_recipient(events, "delivered")["ok1@dest.test"]
    assert delivered["uuid"] == "u1"
    assert delivered["ip"] == "127.0.0.1"
    assert delivered["stream_id"] == "stream-1"
    assert delivered["fd"] == "example.test"
    bounce = _by_recipient(events, "bounce")["bounce1@dest.test"]
    assert bounce["type"] == "hard"
    assert bounce["status"] == "5.1.1"
    assert bounce["classification"] == "user-unknown"
    assert bounce["suppress"] is True
    assert "550 5.1.1" in bounce["reason"]
    deferred = _by_recipient(events, "deferred")["defer1@dest.test"]
    assert deferred["type"] == "soft"
    assert deferred["status"] == "4.2.0"
    assert deferred["suppress"] is False
    assert "450 4.2.0" in deferred["reason"]
    assert len({e["event_id"] for e in events}) == len(events)
    # The sink got exactly the one accepted copy, with the return path as MAIL FROM.
    assert [(m.rcpt, m.mail_from) for m in sink.messages] == [("ok1@dest.test", "bounce-u1-tag1@bounces.example.test")]
    delivered_copy = email.message_from_bytes(sink.messages[0].data)
    assert len(delivered_copy.get_all("Received") or []) == 1
    assert not [h for h in delivered_copy if h.lower().startswith("x-")]
    assert b"\r\n.leading dot line\r\n" in sink.messages[0].data
    # The entry was acknowledged and deleted; the deferred message was requeued on shutdown.
    entries = redis_client.xrange(INCOMING)
    assert len(entries) == 1
    assert entries[0][1][b"rcpts"] == b'["defer1@dest.test"]'


@pytest.mark.slow
def test_deferred_until_expired_becomes_expired_bounce(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # 450 on every attempt and a 4 s queue lifetime: deferred events, then one bounce
    # classified "expired" that carries the last deferral's reason; qmgr's message-level
    # "status=expired" line is what produces it.
    queues.enqueue(INCOMING, outbound("u2", ["defer2@dest.test"]).to_fields())
    running = RunningService(service_config({"maximal_queue_lifetime": "4s"})).start()
    try:
        wait_until(lambda: any(e["event"] == "bounce" for e in events_of(redis_client)), 40, what="the expiry bounce")
    finally:
        assert running.stop() == 0
    events = events_of(redis_client)
    deferred = [e for e in events if e["event"] == "deferred"]
    bounces = [e for e in events if e["event"] == "bounce"]
    assert len(deferred) >= 2
    assert len(bounces) == 1
    bounce = bounces[0]
    assert bounce["classification"] == "expired"
    assert bounce["type"] == "soft"
    assert bounce["suppress"] is False
    assert bounce["status"] == "4.2.0"
    assert "450 4.2.0" in bounce["reason"]
    assert bounce["recipient"] == "defer2@dest.test"
    assert bounce["ip"] == "127.0.0.1"
    assert events.index(bounce) == len(events) - 1
    assert sink.messages == []
    # Nothing left to requeue: Postfix gave the message up.
    assert redis_client.xlen(INCOMING) == 0


def test_connection_refused_is_unroutable(service_config, queues: Queues, redis_client: Any) -> None:
    # Nobody listens at the next hop: deferred events typed "unroutable" (no SMTP reply at all).
    # The port stays bound (not listening) so no other server can take it meanwhile.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    closed = holder.getsockname()[1]
    queues.enqueue(INCOMING, outbound("u3", ["someone@dest.test"]).to_fields())
    running = RunningService(service_config(nexthop=f"[127.0.0.1]:{closed}")).start()
    try:
        wait_until(lambda: any(e["event"] == "deferred" for e in events_of(redis_client)), 30, what="a deferred event")
    finally:
        assert running.stop() == 0
        holder.close()
    deferred = next(e for e in events_of(redis_client) if e["event"] == "deferred")
    assert deferred["type"] == "unroutable"
    assert deferred["classification"] == "network"
    assert "Connection refused" in deferred["reason"]
    assert deferred["status"] == "4.4.1"
    assert "ip" not in deferred or deferred["ip"] is None


def test_recipient_postfix_refuses_becomes_bounce(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # Postfix itself answers 5xx (message over its size limit): a bounce event, no retry, the
    # entry is acknowledged; the other entry is delivered normally.
    big = outbound("u4", ["big@dest.test"], body="x" * 5000)
    small = outbound("u5", ["small@dest.test"])
    queues.enqueue_many(INCOMING, [big.to_fields(), small.to_fields()])
    running = RunningService(service_config({"message_size_limit": 2000})).start()
    try:
        wait_until(lambda: len(events_of(redis_client)) >= 2, 30, what="two events")
    finally:
        assert running.stop() == 0
    events = {e["uuid"]: e for e in events_of(redis_client)}
    assert events["u4"]["event"] == "bounce"
    assert events["u4"]["type"] == "hard"
    assert events["u4"]["classification"] == "message-too-large"
    assert events["u4"]["suppress"] is False
    assert "552" in events["u4"]["reason"]
    assert events["u5"]["event"] == "delivered"
    assert redis_client.xlen(INCOMING) == 0
    assert [m.rcpt for m in sink.messages] == ["small@dest.test"]


def _without_first_received(data: bytes) -> bytes:
    assert data.startswith(b"Received:")
    lines = data.split(b"\r\n")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def test_the_customer_files_bounce_rules_read_postfix_failures_too(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # One rule set: a rule in common-config.bounce-rules classifies Postfix' own failures as it
    # does the MX's bounce mail. The shipped rules read this gateway's reply as policy (no
    # suppression); the operator knows it means a dead mailbox.
    reply = "550 5.7.1 ACME-GW: mailbox jdoe unknown"
    assert bouncerules.classify(reply).classification == "policy"
    rule = {"name": "acme-gateway", "classification": "user-unknown", "patterns": [r"ACME-GW: mailbox \w+ unknown"]}
    rule["examples"] = [reply]
    sink.handler.rules[:] = compile_rules([(r"^jdoe", reply)])
    queues.enqueue(INCOMING, outbound("u30", ["jdoe@dest.test"]).to_fields())
    running = RunningService(service_config(customer={"common-config": {"bounce-rules": [rule]}})).start()
    try:
        wait_until(lambda: bool(_by_recipient(events_of(redis_client), "bounce")), 30, what="the bounce event")
    finally:
        assert running.stop() == 0
    bounce = _by_recipient(events_of(redis_client), "bounce")["jdoe@dest.test"]
    assert (bounce["classification"], bounce["suppress"]) == ("user-unknown", True)
    assert running.service.injector.rules is running.service.bounce_rules  # Postfix' refusals too


def test_shutdown_requeues_deferred_mail_which_is_delivered_after_restart(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # SIGTERM with mail deferred inside Postfix: it goes back to INCOMING-TO-POSTFIX (envelope
    # and uuid kept, Postfix' own Received header removed), Postfix' queue is emptied, and the
    # next start delivers it exactly once, byte for byte as the Transformer produced it.
    sink.handler.rules[:] = compile_rules([(r"^later", "450 4.2.0 <{addr}>: try later")])
    mails = [outbound("u6", ["later1@dest.test", "later2@dest.test"]), outbound("u7", ["later3@dest.test"])]
    queues.enqueue_many(INCOMING, [m.to_fields() for m in mails])
    config = service_config()
    first = RunningService(config).start()
    try:
        wait_until(
            lambda: len({e["recipient"] for e in events_of(redis_client) if e["event"] == "deferred"}) == 3,
            30,
            what="three deferred recipients",
        )
    finally:
        assert first.stop() == 0
    instance = first.service.instance
    assert instance.queue_json() == []
    requeued = [OutboundMail.from_fields(f) for _, f in redis_client.xrange(INCOMING)]
    assert sorted(r for m in requeued for r in m.recipients) == [
        "later1@dest.test",
        "later2@dest.test",
        "later3@dest.test",
    ]
    for mail in requeued:
        assert mail.mail_from == f"bounce-{mail.uuid}-tag1@bounces.example.test"
        assert mail.stream_id == "stream-1"
        assert mail.from_domain == "example.test"
        assert mail.raw == next(m.raw for m in mails if m.uuid == mail.uuid)
    assert not redis_client.keys("IB:postfixlog:qid:*")
    # Drained completely: the instance retired itself (log moved aside, no state in Redis).
    assert not redis_client.exists(records.position_key(first.service.name))
    assert not redis_client.exists("IB:postfixlog:instances")
    assert instance.log_path.with_name("postfix.log.drained").exists()

    sink.handler.rules[:] = []
    second = RunningService(config).start()
    try:
        wait_until(lambda: len(sink.messages) == 3, 30, what="three deliveries after the restart")
        wait_until(
            lambda: len([e for e in events_of(redis_client) if e["event"] == "delivered"]) == 3,
            15,
            what="three delivered events",
        )
    finally:
        assert second.stop() == 0
    assert sorted(m.rcpt for m in sink.messages) == ["later1@dest.test", "later2@dest.test", "later3@dest.test"]
    for received in sink.messages:
        original = next(m.raw for m in mails if received.rcpt in m.recipients)
        assert _without_first_received(received.data) == original
        assert len(email.message_from_bytes(received.data).get_all("Received") or []) == 1
    assert redis_client.xlen(INCOMING) == 0
    assert instance.queue_json() == []


def test_shutdown_removes_but_never_requeues_a_recipient_whose_outcome_is_logged(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # Postfix logs a recipient's outcome, then marks it done in the queue file.  Stopped in
    # between, the message is still in its queue although its outcome is out (record "fin"):
    # shutdown removes it from Postfix and does not put it back in Redis, where it would be
    # delivered and reported a second time.  Here the record of a deferred message is marked
    # final by hand: the state such a stop leaves behind.
    sink.handler.rules[:] = compile_rules([(r"^later", "450 4.2.0 <{addr}>: try later")])
    queues.enqueue_many(INCOMING, [outbound(u, [f"later-{u}@dest.test"]).to_fields() for u in ("u20", "u21")])
    running = RunningService(service_config()).start()
    try:
        wait_until(
            lambda: len({e["recipient"] for e in events_of(redis_client) if e["event"] == "deferred"}) == 2,
            30,
            what="two deferred recipients",
        )
        finished = [
            key
            for key in redis_client.scan_iter(match="IB:postfixlog:qid:*")
            if (delivery := Delivery.from_hash(redis_client.hgetall(key))) and delivery.uuid == "u20"
        ]
        assert len(finished) == 1
        redis_client.hset(finished[0], "fin", "1")
    finally:
        assert running.stop() == 0
    assert running.service.instance.queue_json() == []
    requeued = [OutboundMail.from_fields(f) for _, f in redis_client.xrange(INCOMING)]
    assert [m.uuid for m in requeued] == ["u21"]
    report = running.service.requeuer.last_report
    assert report is not None and (report.requeued, report.finished, report.left) == (1, 1, 0)
    assert not redis_client.keys("IB:postfixlog:qid:*")


def test_redelivered_entry_skips_recipients_already_handled(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # Progress of an earlier attempt: ok1 was queued by Postfix, bad1 refused; only ok2 is sent
    # now, and the refusal's bounce event is emitted (once, with its stable id).
    entry_id = queues.enqueue(
        INCOMING, outbound("u8", ["ok1@dest.test", "bad1@dest.test", "ok2@dest.test"]).to_fields()
    )
    redis_client.hset(
        records.progress_key(entry_id),
        mapping={"ok1@dest.test": "q:4jZAAAAAAAzAAA", "bad1@dest.test": "r:550 5.1.3 Bad recipient address syntax"},
    )
    running = RunningService(service_config()).start()
    try:
        wait_until(lambda: redis_client.xlen(INCOMING) == 0, 30, what="the entry acknowledged")
        wait_until(lambda: len(events_of(redis_client)) == 2, 15, what="two events")
    finally:
        assert running.stop() == 0
    assert [m.rcpt for m in sink.messages] == ["ok2@dest.test"]
    events = {e["recipient"]: e for e in events_of(redis_client)}
    assert events["ok2@dest.test"]["event"] == "delivered"
    refused = events["bad1@dest.test"]
    assert refused["event"] == "bounce"
    assert refused["type"] == "hard"
    assert refused["status"] == "5.1.3"
    assert refused["event_id"] == make_event_id("postfixlog-refused", entry_id, "bad1@dest.test")
    assert not redis_client.exists(records.progress_key(entry_id))


def test_transaction_whose_answer_was_lost_is_not_sent_again(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # The previous process sent ok1 (token recorded) and died before reading Postfix' 250.
    # On redelivery the log follower's records show Postfix queued it: not sent a second time.
    mail = outbound("u9", ["ok1@dest.test", "ok2@dest.test"])
    entry_id = queues.enqueue(INCOMING, mail.to_fields())
    config = service_config()
    instance = PostfixInstance.from_config(config.customer.postfixlog)
    instance.start()
    try:
        token = "lostanswer01"
        delivery = Delivery(
            uuid="u9",
            recipient="ok1@dest.test",
            mail_from=mail.mail_from,
            from_domain="example.test",
            stream_id="stream-1",
            token=token,
        )
        redis_client.hset(records.tx_key(token), mapping=delivery.to_hash())
        redis_client.hset(records.progress_key(entry_id), "ok1@dest.test", f"t:{token}")
        session = SmtpSession("127.0.0.1", instance.smtpd_port, local_hostname="test.local")
        result = session.send(mail.mail_from, "ok1@dest.test", Message.prepare(mail.raw), envid="u9", ident=token)
        session.close()
        assert result.outcome == "accepted"
        wait_until(lambda: len(sink.messages) == 1, 15, what="the first copy")
    finally:
        instance.stop()
    running = RunningService(config).start()
    try:
        wait_until(lambda: redis_client.xlen(INCOMING) == 0, 30, what="the entry acknowledged")
        wait_until(lambda: len(events_of(redis_client)) == 2, 15, what="two delivered events")
    finally:
        assert running.stop() == 0
    assert sorted(m.rcpt for m in sink.messages) == ["ok1@dest.test", "ok2@dest.test"]
    assert {e["recipient"] for e in events_of(redis_client)} == {"ok1@dest.test", "ok2@dest.test"}


def test_unknown_domain_and_null_mx_are_unroutable_bounces(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # Real MX lookups, answered by a loopback DNS server: an unknown domain (NXDOMAIN) and a
    # domain with a null MX (RFC 7505) bounce at once as "unroutable", and their addresses are
    # suppressed.  Postfix runs with its own resolv.conf; nothing leaves the machine.
    with dns_server({("nullmx.test", "MX"): ["0 ."]}) as dns:
        # No sandbox: real routing with MX lookups, all answered by the test's DNS server.
        running = RunningService(service_config(sandbox={"enabled": False}))
        running.service.instance.dns_server = dns.address
        queues.enqueue_many(
            INCOMING,
            [outbound("d1", ["someone@nosuch.test"]).to_fields(), outbound("d2", ["x@nullmx.test"]).to_fields()],
        )
        running.start()
        try:
            wait_until(lambda: len(events_of(redis_client)) == 2, 30, what="two bounces")
        finally:
            assert running.stop() == 0
        assert ("nosuch.test", "MX") in dns.queries
    events = {e["uuid"]: e for e in events_of(redis_client)}
    for uuid, classification in (("d1", "host-unknown"), ("d2", "host-unknown")):
        bounce = events[uuid]
        assert bounce["event"] == "bounce"
        assert bounce["type"] == "unroutable"
        assert bounce["classification"] == classification
        assert bounce["suppress"] is True
        assert "ip" not in bounce
    assert "Host or domain name not found" in events["d1"]["reason"]
    assert events["d1"]["status"] == "5.4.4"
    assert "nullMX" in events["d2"]["reason"]
    assert sink.messages == []


def test_postfix_that_dies_is_restarted(service_config, queues: Queues, redis_client: Any, sink: Sink) -> None:
    # kill -9 of Postfix' master: PostfixLog starts it again and keeps delivering.
    running = RunningService(service_config()).start()
    try:
        instance = running.service.instance
        first_pid = instance.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        wait_until(
            lambda: instance.pid != first_pid and instance.running and instance.answers(),
            60,
            what="Postfix restarted",
        )
        queues.enqueue(INCOMING, outbound("r1", ["ok@dest.test"]).to_fields())
        wait_until(lambda: len(events_of(redis_client)) == 1, 30, what="a delivered event")
        assert running.service.metrics.postfix_restarts._value.get() == 1
    finally:
        assert running.stop() == 0
    assert [m.rcpt for m in sink.messages] == ["ok@dest.test"]


def test_unusable_instance_directory_ends_the_service_with_the_reason(
    service_config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest's tmp_path is private to root: Postfix could never use it; exit 1 at once, no retry loop.
    config = service_config(**{"instance-directory": str(tmp_path / "pf")})
    service = PostfixLogService(
        config, registry=CollectorRegistry(), health=Health(), stopper=Stopper(), name="test-postfixlog"
    )
    started = time.monotonic()
    assert service.run() == 1
    assert time.monotonic() - started < 10
    assert "user postfix cannot enter" in caplog.text
    assert not service.instance.running


def test_each_message_goes_through_its_providers_transport(
    service_config, queues: Queues, redis_client: Any, sink: Sink
) -> None:
    # Routing by provider in the sandbox: gmail.com is google (listed, no DNS), dest.test is a
    # provider of its own (ib_default); mail that needs SMTPUTF8 takes the twin transport that
    # opens a new connection; a routing header in the customer's message chooses nothing, and
    # no routing header reaches the receiver.
    plain = outbound("rt1", ["someone@gmail.com"])
    forged = outbound("rt2", ["ok@dest.test"])
    forged = OutboundMail(**{**forged.__dict__, "raw": b"X-IB-Route: google\r\n" + forged.raw})
    utf8 = outbound("rt3", ["ok3@dest.test"])
    utf8 = OutboundMail(
        **{
            **utf8.__dict__,
            "raw": utf8.raw.replace(b"Subject: test", "Subject: Grüße".encode()),
            "meta": {"smtputf8": "yes"},
        }
    )
    queues.enqueue_many(INCOMING, [m.to_fields() for m in (plain, forged, utf8)])
    running = RunningService(service_config()).start()
    try:
        wait_until(lambda: len(sink.messages) == 3, 30, what="three deliveries")
        wait_until(lambda: len(events_of(redis_client)) == 3, 15, what="three events")
    finally:
        assert running.stop() == 0
    for message in sink.messages:
        assert b"X-IB-Route" not in message.data, message.rcpt
    assert "SMTPUTF8" in next(m for m in sink.messages if m.rcpt == "ok3@dest.test").mail_options
    log_text = running.service.instance.log_path.with_name("postfix.log.drained").read_text()
    transports = {
        rcpt: line.split()[4].split("[")[0]
        for line in log_text.splitlines()
        if "status=sent" in line
        for rcpt in [line.split("to=<", 1)[1].split(">", 1)[0]]
    }
    assert transports == {
        "someone@gmail.com": "postfix/ib_google/smtp",
        "ok@dest.test": "postfix/ib_default/smtp",
        "ok3@dest.test": "postfix/ib_default_u8/smtp",
    }
    assert {e["recipient"]: e["event"] for e in events_of(redis_client)} == dict.fromkeys(transports, "delivered")
