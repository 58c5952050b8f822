"""RFC 8058 one-click unsubscribe, in-process against the real test Redis: per recipient, once, rate-limited."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import redis

from common import binding
from common.addressing import AddressSigner
from common.events import make_event_id
from common.queue import QueueSettings
from tests.httpreceiver.conftest import EVENTS, AppUnderTest, backends_on, entries, redis_down

pytestmark = pytest.mark.redis

SIGNER = AddressSigner(b"test-address-secret-0123456789abcdef")  # common-config.address-secret of the test config
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def sent(client: redis.Redis, uuid: str, *recipients: str, stream_id: str | None = "spring") -> list[str]:
    """Record a message as the Transformer does; the one-click tokens of its recipients."""
    pipe = client.pipeline(transaction=True)
    binding.record_write(uuid, recipients, stream_id, "example.test", 3600).write(pipe)
    pipe.execute()
    return [SIGNER.unsubscribe_token(uuid, rcpt) for rcpt in recipients]


def events(app: AppUnderTest) -> list[dict[str, object]]:
    return [json.loads(fields[b"data"]) for fields in entries(app.redis, EVENTS)]


def test_one_click_post_queues_an_unsubscribe_event_for_that_recipient(hr: AppUnderTest) -> None:
    [token] = sent(hr.redis, "abc123", "Alice@Dest.test")
    resp = hr.client.post(f"/unsubscribe/{token}", data=ONE_CLICK)  # application/x-www-form-urlencoded
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    assert "unsubscribed" in resp.get_data(as_text=True)
    assert "Location" not in resp.headers
    [event] = events(hr)
    assert event["event"] == "unsubscribe"
    assert event["uuid"] == "abc123"
    assert event["recipient"] == "Alice@Dest.test"
    assert event["stream_id"] == "spring"
    assert event["event_id"] == make_event_id("unsubscribe", "abc123", "alice@dest.test")
    assert event["source"] == "one-click"
    assert isinstance(event["timestamp"], int)
    assert hr.metric("mailer_httpreceiver_unsubscribes_total", {"outcome": "accepted"}) == 1


def test_to_and_cc_recipients_unsubscribe_separately(hr: AppUnderTest) -> None:
    # One message to To + Cc: each copy has its own token; one recipient never unsubscribes another.
    to_token, cc_token = sent(hr.redis, "tocc1", "to@dest.test", "cc@dest.test")
    assert to_token != cc_token
    assert hr.client.post(f"/unsubscribe/{cc_token}", data=ONE_CLICK).status_code == 200
    assert [e["recipient"] for e in events(hr)] == ["cc@dest.test"]
    assert hr.client.post(f"/unsubscribe/{to_token}", data=ONE_CLICK).status_code == 200
    assert [e["recipient"] for e in events(hr)] == ["cc@dest.test", "to@dest.test"]


def test_a_token_posted_300_times_emits_one_event(hr: AppUnderTest) -> None:
    [token] = sent(hr.redis, "repeat1", "bob@dest.test")
    answers = {hr.client.post(f"/unsubscribe/{token}", data=ONE_CLICK).status_code for _ in range(300)}
    assert answers <= {200, 429}
    [event] = events(hr)
    assert event["event_id"] == make_event_id("unsubscribe", "repeat1", "bob@dest.test")
    assert hr.metric("mailer_httpreceiver_unsubscribes_total", {"outcome": "accepted"}) == 1


def test_floods_are_rate_limited_but_a_genuine_first_click_is_not(make_app: Callable[..., AppUnderTest]) -> None:
    app = make_app({"unsubscribe-rate-limit": 5})
    forged = AddressSigner(b"another secret").unsubscribe_token("flood", "x@dest.test")
    codes = [app.client.post(f"/unsubscribe/{forged}", data=ONE_CLICK).status_code for _ in range(8)]
    assert codes == [404] * 5 + [429] * 3
    [token] = sent(app.redis, "other1", "carol@dest.test")
    app.redis.delete("IB:httpreceiver:unsubscribe-rate:127.0.0.1")  # another minute
    assert app.client.post(f"/unsubscribe/{token}", data=ONE_CLICK).status_code == 200
    assert len(events(app)) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"List-Unsubscribe": "One-Click"}, "content_type": "multipart/form-data"},
        {"data": b"List-Unsubscribe=One-Click", "content_type": "text/plain"},
    ],
    ids=["multipart", "raw-body"],
)
def test_other_post_encodings_are_accepted(hr: AppUnderTest, body: dict[str, object]) -> None:
    [token] = sent(hr.redis, "enc1", "dan@dest.test")
    assert hr.client.post(f"/unsubscribe/{token}", **body).status_code == 200
    assert len(events(hr)) == 1


def _forgeries() -> list[str]:
    good = SIGNER.unsubscribe_token("abc123", "alice@dest.test")
    return [
        good[:-1] + ("a" if good[-1] != "a" else "b"),  # tag changed
        AddressSigner(b"another secret").unsubscribe_token("abc123", "alice@dest.test"),
        SIGNER.unsubscribe_token("abc123", "mallory@evil.test"),  # a recipient the message never had
        SIGNER.unsubscribe_token("other9", "alice@dest.test"),  # tag of another uuid (no record)
        good.replace("abc123", "abc124"),  # Alice's tag on another uuid
        "abc123",
        "abc123-" + "z" * 10,
        "../../etc/passwd",
    ]


@pytest.mark.parametrize(
    "index",
    range(8),
    ids=[
        "tampered-tag",
        "other-secret",
        "other-recipient",
        "other-uuid",
        "moved-tag",
        "no-tag",
        "bad-alphabet",
        "path",
    ],
)
def test_forged_token_is_404_and_queues_nothing(hr: AppUnderTest, index: int) -> None:
    sent(hr.redis, "abc123", "alice@dest.test")
    token = _forgeries()[index]
    assert hr.client.post(f"/unsubscribe/{token}", data=ONE_CLICK).status_code == 404
    assert hr.client.get(f"/unsubscribe/{token}").status_code == 404
    assert hr.redis.xlen(EVENTS) == 0


def test_get_shows_a_form_that_posts_one_click_and_does_not_unsubscribe(hr: AppUnderTest) -> None:
    # Link scanners fetch URLs: GET must never unsubscribe.
    [token] = sent(hr.redis, "page1", "erin@dest.test")
    resp = hr.client.get(f"/unsubscribe/{token}")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert '<form method="post">' in html
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in html
    assert "<button" in html
    assert resp.headers["Cache-Control"] == "no-store"
    assert hr.redis.xlen(EVENTS) == 0


def test_post_without_one_click_field_is_400(hr: AppUnderTest) -> None:
    [token] = sent(hr.redis, "nofield", "fay@dest.test")
    assert hr.client.post(f"/unsubscribe/{token}", data={"other": "x"}).status_code == 400
    assert hr.client.post(f"/unsubscribe/{token}").status_code == 400
    assert hr.redis.xlen(EVENTS) == 0


def test_event_queue_unavailable_gives_503_so_the_click_is_not_lost(make_app: Callable[..., AppUnderTest]) -> None:
    app = make_app(backends=backends_on(redis_down(), QueueSettings()))
    resp = app.client.post(f"/unsubscribe/{SIGNER.unsubscribe_token('down1', 'gus@dest.test')}", data=ONE_CLICK)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    assert app.metric("mailer_httpreceiver_unsubscribes_total", {"outcome": "unavailable"}) == 1


def test_event_queue_limit_does_not_refuse_unsubscribes(make_app: Callable[..., AppUnderTest]) -> None:
    # Unsubscribes are a legal duty: the back-pressure limit (meant for bulk mail) does not apply.
    app = make_app(global_override={"reliable-queue": {"max-queue-length": 1}})
    for i in range(3):
        [token] = sent(app.redis, f"lim{i}", "hal@dest.test")
        assert app.client.post(f"/unsubscribe/{token}", data=ONE_CLICK).status_code == 200
    assert app.redis.xlen(EVENTS) == 3


def test_secret_kept_in_redis_is_used_when_not_configured(make_app: Callable[..., AppUnderTest]) -> None:
    # Without common-config.address-secret every service shares the secret stored in Redis.
    app = make_app(customer_override={"common-config": {"address-secret": None}})
    app.redis.set("IB:address-secret", "stored-secret")
    sent(app.redis, "s1", "ivy@dest.test")
    good = AddressSigner(b"stored-secret").unsubscribe_token("s1", "ivy@dest.test")
    assert app.client.post(f"/unsubscribe/{good}", data=ONE_CLICK).status_code == 200
    assert (
        app.client.post(f"/unsubscribe/{SIGNER.unsubscribe_token('s1', 'ivy@dest.test')}", data=ONE_CLICK).status_code
        == 404
    )
