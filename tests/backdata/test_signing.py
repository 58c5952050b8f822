"""Standard Webhooks signatures verify with the independent ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import os
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from backdata.signing import Signer, batch_id, query_hash
from devtools.servers import wait_until


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def test_signature_verifies_and_detects_tampering() -> None:
    secret = _secret()
    body = '[{"event":"delivered","uuid":"ü1"}]'.encode()
    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": ""}
    headers["webhook-signature"] = Signer([secret]).signature("msg_1", ts, body)
    assert Webhook(secret).verify(body, headers) == [{"event": "delivered", "uuid": "ü1"}]
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace(b"delivered", b"bounce"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(_secret()).verify(body, headers)


def test_rotation_carries_both_signatures() -> None:
    new, old = _secret(), _secret()
    body = b"[]"
    ts = int(time.time())
    signature = Signer([new, old]).signature("msg_2", ts, body)
    assert len(signature.split(" ")) == 2
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(ts), "webhook-signature": signature}
    Webhook(new).verify(body, headers)
    Webhook(old).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(_secret()).verify(body, headers)


def test_secret_without_prefix_matches_the_reference() -> None:
    raw = base64.b64encode(os.urandom(24)).decode()
    ts = 1_800_000_000
    assert Signer([raw]).signature("m", ts, b"x") == Signer(["whsec_" + raw]).signature("m", ts, b"x")


def test_batch_id_is_stable_and_depends_on_the_events() -> None:
    assert batch_id(["a", "b"]) == batch_id(["a", "b"])
    assert batch_id(["a", "b"]) != batch_id(["a", "c"])


def test_bounce_manager_hash_is_keyed_and_binds_the_body() -> None:
    h = query_hash("apa", "1", 1700000000, b"[]")
    assert len(h) == 64
    assert h != query_hash("apb", "1", 1700000000, b"[]")
    assert h != query_hash("apa", "1", 1700000000, b"[{}]")
    assert h != query_hash("apa", "1", 1700000001, b"[]")


@pytest.mark.redis
@pytest.mark.parametrize("rotation", [False, True], ids=["one-secret", "rotation"])
def test_posts_verify_end_to_end(start_backdata, bd, webhook, rotation: bool) -> None:
    # Real POSTs from BackData, checked by the reference implementation; the first attempt
    # fails so a retried request (new timestamp, same id) is verified too.
    new, old = _secret(), _secret()
    section = {"webhook_secret": new, **({"webhook_secret_previous": old} if rotation else {})}
    statuses = iter([500])
    webhook.set_responder(lambda _: (next(statuses, 200), {}, 0.0))
    sent = bd.enqueue(bd.events(5))
    start_backdata(**section)
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    assert len(webhook.requests) == 2
    for request in webhook.requests:
        Webhook(new).verify(request.body, request.headers)
        if rotation:
            Webhook(old).verify(request.body, request.headers)
        else:
            with pytest.raises(WebhookVerificationError):
                Webhook(old).verify(request.body, request.headers)
    assert webhook.requests[0].headers["webhook-id"] == webhook.requests[1].headers["webhook-id"]


@pytest.mark.redis
def test_unsigned_without_secret(start_backdata, bd, webhook) -> None:
    sent = bd.enqueue(bd.events(1))
    start_backdata()
    wait_until(lambda: sent <= bd.received_ids(webhook), 10)
    headers = webhook.requests[0].headers
    assert "webhook-signature" not in headers
    assert headers["webhook-id"].startswith("msg_")
    assert headers["Content-Type"] == "application/json; charset=utf-8"
