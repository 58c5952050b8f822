"""RFC 8058 one-click unsubscribe, in-process against the real test Redis."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from common.addressing import AddressSigner
from common.config.base import RedisServer
from common.events import make_event_id
from common.queue import Queues, QueueSettings, connect
from devtools.servers import free_port
from tests.httpreceiver.conftest import EVENTS, AppUnderTest, entries

pytestmark = pytest.mark.redis

SIGNER = AddressSigner(b"test-address-secret")  # common-config.address-secret of the test config
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def events(app: AppUnderTest) -> list[dict[str, object]]:
    return [json.loads(fields[b"data"]) for fields in entries(app.redis, EVENTS)]


def test_one_click_post_queues_an_unsubscribe_event(hr: AppUnderTest) -> None:
    token = SIGNER.unsubscribe_token("abc123")
    resp = hr.client.post(f"/unsubscribe/{token}", data=ONE_CLICK)  # application/x-www-form-urlencoded
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    assert "unsubscribed" in resp.get_data(as_text=True)
    assert "Location" not in resp.headers
    [event] = events(hr)
    assert event["event"] == "unsubscribe"
    assert event["uuid"] == "abc123"
    assert event["event_id"] == make_event_id("unsubscribe", "abc123")
    assert event["source"] == "one-click"
    assert isinstance(event["timestamp"], int)
    assert hr.metric("mailer_httpreceiver_unsubscribes_total", {"outcome": "accepted"}) == 1


def test_repeated_clicks_carry_the_same_event_id(hr: AppUnderTest) -> None:
    # The customer de-duplicates on event_id; a second click must not look like a new event.
    token = SIGNER.unsubscribe_token("repeat1")
    for _ in range(2):
        assert hr.client.post(f"/unsubscribe/{token}", data=ONE_CLICK).status_code == 200
    ids = {e["event_id"] for e in events(hr)}
    assert ids == {make_event_id("unsubscribe", "repeat1")}


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"List-Unsubscribe": "One-Click"}, "content_type": "multipart/form-data"},
        {"data": b"List-Unsubscribe=One-Click", "content_type": "text/plain"},
    ],
    ids=["multipart", "raw-body"],
)
def test_other_post_encodings_are_accepted(hr: AppUnderTest, body: dict[str, object]) -> None:
    token = SIGNER.unsubscribe_token("enc1")
    assert hr.client.post(f"/unsubscribe/{token}", **body).status_code == 200
    assert len(events(hr)) == 1


@pytest.mark.parametrize(
    "token",
    [
        SIGNER.unsubscribe_token("abc123")[:-1] + "a",  # tag changed
        AddressSigner(b"another secret").unsubscribe_token("abc123"),
        "abc123",
        "abc123-" + "z" * 10,
        "../../etc/passwd",
    ],
    ids=["tampered-tag", "other-secret", "no-tag", "bad-alphabet", "path"],
)
def test_forged_token_is_404_and_queues_nothing(hr: AppUnderTest, token: str) -> None:
    assert hr.client.post(f"/unsubscribe/{token}", data=ONE_CLICK).status_code == 404
    assert hr.client.get(f"/unsubscribe/{token}").status_code == 404
    assert hr.redis.xlen(EVENTS) == 0


def test_get_shows_a_form_that_posts_one_click_and_does_not_unsubscribe(hr: AppUnderTest) -> None:
    # Link scanners fetch URLs: GET must never unsubscribe.
    token = SIGNER.unsubscribe_token("page1")
    resp = hr.client.get(f"/unsubscribe/{token}")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert '<form method="post">' in html
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in html
    assert "<button" in html
    assert resp.headers["Cache-Control"] == "no-store"
    assert hr.redis.xlen(EVENTS) == 0


def test_post_without_one_click_field_is_400(hr: AppUnderTest) -> None:
    token = SIGNER.unsubscribe_token("nofield")
    assert hr.client.post(f"/unsubscribe/{token}", data={"other": "x"}).status_code == 400
    assert hr.client.post(f"/unsubscribe/{token}").status_code == 400
    assert hr.redis.xlen(EVENTS) == 0


def test_event_queue_unavailable_gives_503_so_the_click_is_not_lost(make_app: Callable[..., AppUnderTest]) -> None:
    down = Queues(connect(RedisServer(hostname="127.0.0.1", port=free_port(), socket_timeout=1)), QueueSettings())
    app = make_app(queues=down)
    resp = app.client.post(f"/unsubscribe/{SIGNER.unsubscribe_token('down1')}", data=ONE_CLICK)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    assert app.metric("mailer_httpreceiver_unsubscribes_total", {"outcome": "unavailable"}) == 1


def test_event_queue_limit_does_not_refuse_unsubscribes(make_app: Callable[..., AppUnderTest]) -> None:
    # Unsubscribes are a legal duty: the back-pressure limit (meant for bulk mail) does not apply.
    app = make_app(global_override={"reliable-queue": {"max-queue-length": 1}})
    for i in range(3):
        resp = app.client.post(f"/unsubscribe/{SIGNER.unsubscribe_token(f'lim{i}')}", data=ONE_CLICK)
        assert resp.status_code == 200
    assert app.redis.xlen(EVENTS) == 3


def test_secret_kept_in_redis_is_used_when_not_configured(make_app: Callable[..., AppUnderTest]) -> None:
    # Without common-config.address-secret every service shares the secret stored in Redis.
    app = make_app(customer_override={"common-config": {"address-secret": None}})
    app.redis.set("IB:address-secret", "stored-secret")
    good = AddressSigner(b"stored-secret").unsubscribe_token("s1")
    assert app.client.post(f"/unsubscribe/{good}", data=ONE_CLICK).status_code == 200
    assert app.client.post(f"/unsubscribe/{SIGNER.unsubscribe_token('s1')}", data=ONE_CLICK).status_code == 404
