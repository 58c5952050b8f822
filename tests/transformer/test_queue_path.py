"""The Transformer's queue path against a real Redis: P0 first, atomic hand-off, error events."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from email.header import decode_header, make_header
from typing import Any

import pytest

from common import keys
from common.addressing import message_id_uuid
from common.config import Config
from common.events import decode_event
from common.payloads import OutboundMail, SubmittedMail
from common.queue import Queues
from common.service import Context
from devtools.servers import wait_until
from transformer.app import TransformerService
from transformer.handler import TransformHandler
from transformer.message import RawMessage

pytestmark = pytest.mark.redis

P0, P1, OUT, EVENTS = "IB-MAIL-QUEUE-P0", "IB-MAIL-QUEUE-P1", "INCOMING-TO-POSTFIX", "EVENT_QUEUE"


def _mail(uuid: str, priority: int, domain: str = "example.test") -> SubmittedMail:
    raw = (
        f"From: news@{domain}\r\nTo: a@dest.test\r\nCc: b@dest.test\r\nSubject: {uuid}\r\n"
        f"X-Uuid: {uuid}\r\nX-Stream-Id: stream-{uuid}\r\nX-Priority: {priority}\r\n\r\nbody\r\n"
    ).encode()
    return SubmittedMail(raw, uuid, priority, "smtp", 1700000000.5)


class Running:
    """The Transformer service as `transformer` builds it (common.service), run in a thread."""

    def __init__(self, config: Config) -> None:
        self.context = Context.create(config)
        self.registry, self.stopper = self.context.registry, self.context.stopper
        self.service = TransformerService(self.context, block_ms=100)
        self.thread = threading.Thread(target=self.service.run, daemon=True)

    @property
    def handler(self) -> TransformHandler:
        wait_until(lambda: self.service.handler is not None, timeout_s=10, what="handler built")
        assert self.service.handler is not None
        return self.service.handler

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0

    def metric_labels(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        self.stopper.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def running(make_config) -> Iterator[Running]:
    config = make_config(service="transformer")
    r = Running(config)
    yield r
    r.stop()


def _outputs(client: Any) -> list[OutboundMail]:
    return [OutboundMail.from_fields(fields) for _, fields in client.xrange(OUT)]


def test_priority_queue_is_served_first_and_handed_off(running: Running, queues: Queues, redis_client) -> None:
    # Entries waiting in both queues: every P0 message is handed off before any P1 message.
    queues.enqueue_many(P1, [_mail(f"low{i}", 1).to_fields() for i in range(5)])
    queues.enqueue_many(P0, [_mail(f"high{i}", 0).to_fields() for i in range(5)])
    running.thread.start()
    wait_until(lambda: redis_client.xlen(OUT) == 20, timeout_s=10, what="20 copies (two recipients each)")
    uuids = [m.uuid for m in _outputs(redis_client)]
    assert uuids[:10:2] == [f"high{i}" for i in range(5)] and uuids[:10] == [u for u in uuids[:10:2] for _ in (0, 1)]
    assert sorted(set(uuids[10:])) == [f"low{i}" for i in range(5)]
    wait_until(lambda: redis_client.xlen(P0) + redis_client.xlen(P1) == 0, what="inputs acknowledged and deleted")
    assert running.metric("transformer_polled_primary_total") == 5
    assert running.metric("transformer_polled_default_total") == 5
    assert running.metric("transformer_pushed_total") == 10
    assert running.metric("mailer_transformer_signing_seconds_count") == 10

    to_copy, cc_copy = _outputs(redis_client)[:2]
    out = RawMessage.parse(to_copy.raw)
    for name in ("X-Uuid", "X-Stream-Id", "X-Priority", "X-ReturnPathIb", "X-RecipientIb"):
        assert not out.has(name), name
    assert (to_copy.recipients, cc_copy.recipients) == (("a@dest.test",), ("b@dest.test",))
    assert to_copy.mail_from.startswith("bounce-high0-") and to_copy.mail_from.endswith("@bounces.example.test")
    assert to_copy.mail_from != cc_copy.mail_from
    assert (to_copy.stream_id, to_copy.from_domain, to_copy.submitted_at) == (
        "stream-high0",
        "example.test",
        1700000000.5,
    )
    message_id = out.get("Message-ID") or ""
    assert message_id_uuid(message_id, {"bounces.example.test"}) == "high0"
    assert re.fullmatch(r"<high0\.[a-z2-7]{10}\.[a-z2-7]{16}@bounces\.example\.test>", message_id), message_id
    assert redis_client.xlen(EVENTS) == 0
    # The record of who each message went to was written with the copies (same transaction).
    assert redis_client.hgetall("IB:sent:high0") == {
        b"a@dest.test": b"stream-high0\x1fexample.test",
        b"b@dest.test": b"stream-high0\x1fexample.test",
    }
    assert 0 < redis_client.ttl("IB:sent:high0") <= 30 * 86400


def test_unknown_domain_gives_error_event_and_dead_letter(running: Running, queues: Queues, redis_client) -> None:
    # Never silently dropped: the entry is in P1:dead with the reason and an error event carries its uuid.
    queues.enqueue(P1, _mail("stray1", 1, domain="unknown.test").to_fields())
    queues.enqueue(P1, {"uuid": "noraw1", "priority": "1", "ts": "1"})  # malformed entry
    queues.enqueue(P1, _mail("fine1", 1).to_fields())
    running.thread.start()
    wait_until(lambda: redis_client.xlen(keys.dead_letter(P1)) == 2 and redis_client.xlen(OUT) == 2, timeout_s=10)
    events = [decode_event(fields) for _, fields in redis_client.xrange(EVENTS)]
    assert [(e["event"], e["service"], e["uuid"]) for e in events] == [
        ("error", "transformer", "stray1"),
        ("error", "transformer", "noraw1"),
    ]
    assert "From domain unknown.test is not configured" in events[0]["msg"]
    assert events[0]["stream_id"] == "stream-stray1"
    assert "'raw'" in events[1]["msg"]
    dead = queues.dead_letters(P1)
    assert [d.fields[b"uuid"] for d in dead] == [b"stray1", b"noraw1"]
    assert b"not configured" in dead[0].fields[b"dl-reason"]
    assert [m.uuid for m in _outputs(redis_client)] == ["fine1", "fine1"]
    assert running.metric("mailer_transformer_failed_total") == 2
    assert redis_client.xlen(P1) == 0


def test_error_event_ids_are_stable(running: Running, queues: Queues, redis_client) -> None:
    # The event id is derived from the entry, so a re-emitted event can be de-duplicated.
    entry_id = queues.enqueue(P0, _mail("stray2", 0, domain="unknown.test").to_fields())
    running.thread.start()
    wait_until(lambda: redis_client.xlen(EVENTS) == 1)
    (event,) = [json.loads(fields[b"data"]) for _, fields in redis_client.xrange(EVENTS)]
    from common.events import make_event_id

    assert event["event_id"] == make_event_id("error", "transformer", P0, entry_id)


def test_undecodable_bytes_never_stop_the_worker(running: Running, queues: Queues, redis_client) -> None:
    # Latin-1 bytes in the From domain and X-Stream-Id: the error event and the envelope stay valid UTF-8.
    bad_domain = _mail("lat1", 1).raw.replace(b"news@example.test", b"news@exampl\xe9.test")
    bad_stream = _mail("lat2", 1).raw.replace(b"X-Stream-Id: stream-lat2", b"X-Stream-Id: caf\xe9")
    queues.enqueue(P1, SubmittedMail(bad_domain, "lat1", 1, "smtp", 1.0).to_fields())
    queues.enqueue(P1, SubmittedMail(bad_stream, "lat2", 1, "smtp", 1.0).to_fields())
    running.thread.start()
    wait_until(lambda: redis_client.xlen(EVENTS) == 1 and redis_client.xlen(OUT) == 2, timeout_s=10)
    (event,) = [decode_event(fields) for _, fields in redis_client.xrange(EVENTS)]
    assert event["uuid"] == "lat1" and "exampl\ufffd.test" in event["msg"]
    mail = _outputs(redis_client)[0]
    assert mail.stream_id == "caf\ufffd"
    # The wire form writes the non-ASCII Feedback-ID as RFC 2047 encoded-words.
    feedback = RawMessage.parse(mail.raw).get("Feedback-ID") or ""
    assert str(make_header(decode_header(feedback))).startswith("caf\ufffd:lat2:")
    assert mail.raw.isascii()
    assert running.thread.is_alive()


@pytest.mark.slow
def test_a_crashing_message_is_retried_then_dead_lettered_with_an_event(
    running: Running, queues: Queues, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unexpected error (a bug) uses up deliveries; at the cap the entry is dead-lettered
    # with an error event, and the worker keeps serving the others.
    running.thread.start()
    handler = running.handler
    original = handler.transformer.prepare

    def flaky(mail: SubmittedMail):
        if mail.uuid == "boom1":
            raise RuntimeError("simulated bug")
        return original(mail)

    monkeypatch.setattr(handler.transformer, "prepare", flaky)
    queues.enqueue(P1, _mail("boom1", 1).to_fields())
    wait_until(lambda: redis_client.xlen(keys.dead_letter(P1)) == 1, timeout_s=20, what="dead letter")
    (event,) = [decode_event(fields) for _, fields in redis_client.xrange(EVENTS)]
    assert event["uuid"] == "boom1" and "simulated bug" in event["msg"]
    queues.enqueue(P1, _mail("after1", 1).to_fields())
    wait_until(lambda: redis_client.xlen(OUT) == 2, timeout_s=10)
