"""POST /v1/mail/send rules, in-process (the worker's application) against the real test Redis."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio
import yaml
from werkzeug.middleware.proxy_fix import ProxyFix

from common import passwords
from common.authguard import lockout_key
from common.queue import QueueSettings
from devtools.servers import wait_until
from httpreceiver.front import client_address
from httpreceiver.idempotency import IdempotencyStore, fingerprint
from tests.httpreceiver.conftest import (
    P0,
    P1,
    PASSWORD,
    USER,
    AppUnderTest,
    backends_on,
    basic,
    entries,
    headers,
    message,
    redis_down,
)

pytestmark = pytest.mark.redis

DATA = Path(__file__).resolve().parents[1] / "data" / "httpreceiver"
CASES: list[dict[str, Any]] = yaml.safe_load((DATA / "cases.yaml").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_message_corpus(case: dict[str, Any], hr: AppUnderTest) -> None:
    # Each file is accepted into its queue byte for byte (line endings made CRLF), or refused
    # naming the rule it broke and what the SMTP door answers for it.
    raw = (DATA / "messages" / case["file"]).read_bytes()
    resp = hr.client.post("/v1/mail/send", data=raw, headers=headers())
    assert resp.status_code == case["status"], resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    if case["status"] == 200:
        assert body == {"uuid": case["uuid"], "queue": case["queue"]}
        [fields] = entries(hr.redis, case["queue"])
        assert fields[b"raw"] == raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert fields[b"uuid"] == case["uuid"].encode()
        assert fields[b"via"] == b"http"
        assert fields[b"priority"] == (b"0" if case["queue"] == P0 else b"1")
        assert hr.metric("nbr_emails_enqueued_total") == 1
        assert hr.metric("nbr_recipients_total") == case["recipients"]
    else:
        assert body["error"] == case["error"]
        assert body["message"]
        assert isinstance(body["smtp_code"], int) and re.fullmatch(r"5\.\d\.\d", body["enhanced_status"])
        if "smtp_code" in case:
            assert (body["smtp_code"], body["enhanced_status"]) == (case["smtp_code"], case["enhanced_status"])
        assert hr.redis.xlen(P0) + hr.redis.xlen(P1) == 0
        assert hr.metric("nbr_dropped_emails_total") == 1
        assert hr.metric("mailer_httpreceiver_rejections_total", {"rule": case["error"]}) == 1


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic(password="wrong"),
        basic(user="nobody"),
        "Basic not-base64!",
        "Basic " + "bm9jb2xvbg==",  # "nocolon"
        "Bearer some-key",  # no API keys configured
        "Digest username=app",
    ],
    ids=["none", "wrong-password", "unknown-user", "garbage", "no-colon", "bearer-not-configured", "digest"],
)
def test_bad_credentials_get_401_with_challenge(hr: AppUnderTest, authorization: str | None) -> None:
    hdrs = headers()
    hdrs.pop("Authorization")
    if authorization is not None:
        hdrs["Authorization"] = authorization
    resp = hr.client.post("/v1/mail/send", data=message(), headers=hdrs)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith('Basic realm="inboxbooster-mailer"')
    assert resp.get_json()["error"] == "unauthorized"
    assert hr.redis.xlen(P1) == 0
    assert (
        hr.metric(
            "mailer_httpreceiver_auth_failures_total",
            {"reason": "bad-credentials" if authorization else "no-credentials"},
        )
        == 1
    )


def test_auth_is_checked_before_anything_else(hr: AppUnderTest) -> None:
    # An anonymous client learns nothing: wrong type and huge size still give 401.
    resp = hr.client.post(
        "/v1/mail/send", data=b"x" * 2048, headers={"Content-Type": "text/plain", "Content-Length": "999999999"}
    )
    assert resp.status_code == 401


@pytest.mark.slow
def test_brute_force_lockout(make_app: Callable[..., AppUnderTest]) -> None:
    # Three wrong passwords from one address lock out the address and the account: 429 with
    # Retry-After, even with the right password; another account from another address is
    # unaffected; the lockout expires.
    second = {"username": "second", "password": "second password, long enough"}
    logins = [{"username": USER, "password": PASSWORD}, second]
    app = make_app(
        {"auth-lockout": {"max-failures": 3, "window-seconds": 60, "lockout-seconds": 2}, "auth-logins": logins}
    )
    attacker, other = {"REMOTE_ADDR": "127.0.0.7"}, {"REMOTE_ADDR": "127.0.0.8"}
    wrong = headers(Authorization=basic(password="guess"))
    for _ in range(3):
        assert app.client.post("/v1/mail/send", data=message(), headers=wrong, environ_base=attacker).status_code == 401
    resp = app.client.post("/v1/mail/send", data=message(), headers=headers(), environ_base=attacker)
    assert resp.status_code == 429
    assert resp.get_json()["error"] == "too-many-failed-logins"
    assert 1 <= int(resp.headers["Retry-After"]) <= 2
    assert app.redis.xlen(P1) == 0
    assert app.metric("mailer_httpreceiver_auth_failures_total", {"reason": "locked-out"}) == 1
    as_second = headers(Authorization=basic(second["username"], second["password"]))
    # The address is locked for every account, the account from every address.
    assert app.client.post("/v1/mail/send", data=message(), headers=as_second, environ_base=attacker).status_code == 429
    assert app.client.post("/v1/mail/send", data=message(), headers=headers(), environ_base=other).status_code == 429
    assert app.client.post("/v1/mail/send", data=message(), headers=as_second, environ_base=other).status_code == 200
    wait_until(
        lambda: (
            app.client.post("/v1/mail/send", data=message(), headers=headers(), environ_base=attacker).status_code
            == 200
        ),
        timeout_s=10,
        what="the lockout to expire",
    )


def test_lockout_set_by_another_process_applies_at_once(make_app: Callable[..., AppUnderTest]) -> None:
    # Credentials this process verified before skip the password check but never the guard: a
    # lockout another worker set applies to the very next request.
    app = make_app({"auth-lockout": {"max-failures": 5, "lockout-seconds": 60}})
    client_ip = {"REMOTE_ADDR": "127.0.0.10"}
    assert (
        app.client.post("/v1/mail/send", data=message(), headers=headers(), environ_base=client_ip).status_code == 200
    )
    app.redis.set(lockout_key("httpreceiver", "ip", "127.0.0.10"), 5, px=60_000)  # another worker locked it out
    assert (
        app.client.post("/v1/mail/send", data=message(), headers=headers(), environ_base=client_ip).status_code == 429
    )
    assert app.redis.xlen(P1) == 1


def test_login_guard_fails_closed_when_redis_is_unavailable(make_app: Callable[..., AppUnderTest]) -> None:
    # Without the counters no password is checked: 503 with Retry-After, not a login.
    app = make_app(backends=backends_on(redis_down(), QueueSettings()))
    resp = app.client.post("/v1/mail/send", data=message(), headers=headers())
    assert resp.status_code == 503
    assert resp.get_json()["error"] == "auth-unavailable"
    assert resp.headers["Retry-After"] == "5"
    assert app.metric("mailer_httpreceiver_auth_failures_total", {"reason": "unavailable"}) == 1


def test_lockout_uses_the_forwarded_address_behind_trusted_proxies(make_app: Callable[..., AppUnderTest]) -> None:
    # Behind one proxy, failures count against the client in X-Forwarded-For, not the proxy.
    app = make_app({"auth-lockout": {"max-failures": 2, "lockout-seconds": 60}, "trusted-proxy-hops": 1})
    proxy = {"REMOTE_ADDR": "127.0.0.9"}
    wrong = headers(Authorization=basic("nobody", "guess"), X_Forwarded_For="192.0.2.1")
    for _ in range(2):
        assert app.client.post("/v1/mail/send", data=message(), headers=wrong, environ_base=proxy).status_code == 401
    locked = headers(X_Forwarded_For="192.0.2.1")
    assert app.client.post("/v1/mail/send", data=message(), headers=locked, environ_base=proxy).status_code == 429
    fine = headers(X_Forwarded_For="198.51.100.2")
    assert app.client.post("/v1/mail/send", data=message(), headers=fine, environ_base=proxy).status_code == 200


def test_hashed_password_and_bearer_keys(make_app: Callable[..., AppUnderTest]) -> None:
    hashed = passwords.hash_password("s3cret", iterations=2000)
    app = make_app(
        {
            "auth-logins": [{"username": "hashed", "password": hashed}],
            "api-keys": ["key-one", passwords.hash_password("key-two", iterations=2000)],
        }
    )
    ok = [
        {"Authorization": basic("hashed", "s3cret")},
        {"Authorization": basic("hashed", "s3cret")},  # second time from the verification cache
        {"Authorization": "Bearer key-one"},
        {"Authorization": "bearer key-two"},
    ]
    for i, auth in enumerate(ok):
        resp = app.client.post("/v1/mail/send", data=message(f"u{i}"), headers={**headers(), **auth})
        assert resp.status_code == 200, auth
    for auth in ({"Authorization": basic("hashed", hashed)}, {"Authorization": "Bearer key-three"}):
        resp = app.client.post("/v1/mail/send", data=message("bad"), headers={**headers(), **auth})
        assert resp.status_code == 401
        assert "Bearer" in resp.headers["WWW-Authenticate"]
    assert app.redis.xlen(P1) == 4


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/octet-stream", 200),
        ("message/rfc822", 200),
        ("Message/RFC822; charset=utf-8", 200),
        ("text/plain", 415),
        ("application/json", 415),
        (None, 415),
    ],
)
def test_content_type(hr: AppUnderTest, content_type: str | None, status: int) -> None:
    hdrs = headers()
    hdrs.pop("Content-Type")
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    resp = hr.client.post("/v1/mail/send", data=message(), headers=hdrs)
    assert resp.status_code == status
    if status == 415:
        assert resp.get_json()["error"] == "content-type"
        assert hr.redis.xlen(P1) == 0


def test_size_limit_from_content_length(make_app: Callable[..., AppUnderTest]) -> None:
    app = make_app({"max-message-size": 4096})
    at_limit = message(body=b"x" * (4096 - len(message(body=b""))))
    assert len(at_limit) == 4096
    assert app.client.post("/v1/mail/send", data=at_limit, headers=headers()).status_code == 200
    resp = app.client.post("/v1/mail/send", data=at_limit + b"y", headers=headers())
    assert resp.status_code == 413
    assert resp.get_json()["error"] == "too-large"
    assert "4096" in resp.get_json()["message"]
    assert app.redis.xlen(P1) == 1


def test_size_limit_of_a_chunked_body(make_app: Callable[..., AppUnderTest]) -> None:
    # No Content-Length (chunked transfer): the body is cut at the limit while it is read.
    app = make_app({"max-message-size": 4096})
    body = message(body=b"x" * 8000)
    resp = app.client.post(
        "/v1/mail/send",
        input_stream=io.BytesIO(body),
        headers={**headers(), "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets it
    )
    assert resp.status_code == 413
    assert resp.get_json()["error"] == "too-large"
    assert app.redis.xlen(P1) == 0


def test_redis_down_gives_503_with_retry_after(make_app: Callable[..., AppUnderTest]) -> None:
    # A Redis address where nothing listens: connection refused, nothing can be queued (the
    # login guard is off here: with it on, the login is refused first, as the test above shows).
    app = make_app({"auth-lockout": {"lockout-seconds": 0}}, backends=backends_on(redis_down(), QueueSettings()))
    resp = app.client.post("/v1/mail/send", data=message(), headers=headers())
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "5"
    assert resp.get_json()["error"] == "queue-unavailable"
    assert app.metric("nbr_dropped_emails_total") == 1


def test_queue_over_its_limit_gives_503(make_app: Callable[..., AppUnderTest]) -> None:
    app = make_app(global_override={"reliable-queue": {"max-queue-length": 2}})
    codes = [app.client.post("/v1/mail/send", data=message(f"m{i}"), headers=headers()) for i in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 503, 503]
    assert codes[2].get_json()["error"] == "queue-full"
    assert codes[2].headers["Retry-After"] == "30"
    assert app.redis.xlen(P1) == 2


def test_idempotency_key_repeat_answers_first_and_queues_once(hr: AppUnderTest) -> None:
    first = hr.client.post("/v1/mail/send", data=message("once"), headers=headers(Idempotency_Key="k-1"))
    again = hr.client.post("/v1/mail/send", data=message("once"), headers=headers(Idempotency_Key="k-1"))
    assert first.status_code == again.status_code == 200
    assert first.get_json() == again.get_json() == {"uuid": "once", "queue": P1}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert hr.redis.xlen(P1) == 1
    assert hr.metric("mailer_httpreceiver_idempotent_replays_total") == 1
    ttl = hr.redis.ttl("IB:httpreceiver:idem:app:k-1")
    assert 86_000 < ttl <= 86_400


def test_idempotency_key_is_per_user(make_app: Callable[..., AppUnderTest]) -> None:
    app = make_app({"auth-logins": [{"username": "a", "password": "pa"}, {"username": "b", "password": "pb"}]})
    for user, password in (("a", "pa"), ("b", "pb")):
        hdrs = {**headers(Idempotency_Key="same"), "Authorization": basic(user, password)}
        resp = app.client.post("/v1/mail/send", data=message("x1"), headers=hdrs)
        assert resp.status_code == 200
        assert "Idempotent-Replayed" not in resp.headers
    assert app.redis.xlen(P1) == 2


def test_idempotency_key_reused_with_another_message_is_422(hr: AppUnderTest) -> None:
    assert hr.client.post("/v1/mail/send", data=message("a1"), headers=headers(Idempotency_Key="k")).status_code == 200
    resp = hr.client.post("/v1/mail/send", data=message("a2"), headers=headers(Idempotency_Key="k"))
    assert resp.status_code == 422
    assert resp.get_json()["error"] == "idempotency-key-reused"
    assert hr.redis.xlen(P1) == 1


def test_idempotency_key_in_progress_is_409(hr: AppUnderTest) -> None:
    # Another request holds the key (its reservation is in Redis) and has not finished.
    raw = message("busy")

    async def hold() -> None:
        client = redis.asyncio.Redis(port=hr.redis.connection_pool.connection_kwargs["port"])
        await IdempotencyStore(client, 86_400).reserve("app", "k-busy", fingerprint(raw), 200, {"uuid": "busy"})
        await client.aclose()

    asyncio.run(hold())
    resp = hr.client.post("/v1/mail/send", data=raw, headers=headers(Idempotency_Key="k-busy"))
    assert resp.status_code == 409
    assert resp.headers["Retry-After"] == "1"
    assert resp.get_json()["error"] == "idempotency-key-in-use"
    assert hr.redis.xlen(P1) == 0


def test_failed_submission_releases_its_idempotency_key(make_app: Callable[..., AppUnderTest]) -> None:
    # Queue full: 503, and the key is free again, so the client's retry is not refused as a repeat.
    app = make_app(global_override={"reliable-queue": {"max-queue-length": 1}})
    assert app.client.post("/v1/mail/send", data=message("fill"), headers=headers()).status_code == 200
    app.client.post("/v1/mail/send", data=message("fill2"), headers=headers())  # sees the queue full
    resp = app.client.post("/v1/mail/send", data=message("later"), headers=headers(Idempotency_Key="retry-me"))
    assert resp.status_code == 503
    assert not app.redis.exists("IB:httpreceiver:idem:app:retry-me")


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "caf\u00e9"], ids=["empty", "space", "long", "non-ascii"])
def test_malformed_idempotency_key_is_400(hr: AppUnderTest, key: str) -> None:
    hdrs = headers()
    hdrs["Idempotency-Key"] = key.encode().decode("latin-1")
    resp = hr.client.post("/v1/mail/send", data=message(), headers=hdrs)
    assert resp.status_code == 400
    assert resp.get_json()["error"] == "idempotency-key"


def test_idempotency_disabled_with_window_zero(make_app: Callable[..., AppUnderTest]) -> None:
    app = make_app({"idempotency-window-seconds": 0})
    for _ in range(2):
        resp = app.client.post("/v1/mail/send", data=message("d"), headers=headers(Idempotency_Key="k"))
        assert resp.status_code == 200
    assert app.redis.xlen(P1) == 2


def test_unknown_route_and_method_are_json(hr: AppUnderTest) -> None:
    resp = hr.client.get("/v1/mail/send", headers=headers())
    assert resp.status_code == 405
    assert resp.headers["Allow"]
    assert resp.get_json()["error"] == "method-not-allowed"
    resp = hr.client.get("/metrics")
    assert resp.status_code == 404
    assert json.loads(resp.get_data())["error"] == "not-found"
    assert hr.metric("mailer_httpreceiver_requests_total", {"endpoint": "other", "status": "404"}) == 1


def test_unexpected_error_is_500_json_and_an_error_event(hr: AppUnderTest) -> None:
    # A bug anywhere in a view: JSON 500, and an error event (service http-receiver) as the original.
    def boom() -> str:
        raise RuntimeError("bug in a view")

    hr.flask.add_url_rule("/boom", "boom", boom, methods=["POST"])
    resp = hr.client.post("/boom")
    assert resp.status_code == 500
    assert resp.get_json()["error"] == "internal-error"
    [fields] = entries(hr.redis, "EVENT_QUEUE")
    event = json.loads(fields[b"data"])
    assert (event["event"], event["service"], event["msg"]) == ("error", "http-receiver", "RuntimeError: bug in a view")


def test_unexpected_error_in_the_send_endpoint_is_500_json_and_an_error_event(
    hr: AppUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The send endpoint runs in the event loop, outside Flask: its bugs get the same answer.
    def broken(*_args: object) -> None:
        raise RuntimeError("bug in the intake")

    monkeypatch.setattr("httpreceiver.intake.accept", broken)
    resp = hr.client.post("/v1/mail/send", data=message(), headers=headers())
    assert resp.status_code == 500
    assert resp.get_json()["error"] == "internal-error"
    [fields] = entries(hr.redis, "EVENT_QUEUE")
    event = json.loads(fields[b"data"])
    assert (event["service"], event["msg"]) == ("http-receiver", "RuntimeError: bug in the intake")
    assert hr.metric("mailer_httpreceiver_requests_total", {"endpoint": "send", "status": "500"}) == 1
    assert hr.redis.xlen(P1) == 0


@pytest.mark.parametrize(
    ("hops", "forwarded", "expected"),
    [
        (0, "192.0.2.1", "127.0.0.9"),  # no trusted proxy: the header is the client's word, ignored
        (1, "192.0.2.1", "192.0.2.1"),
        (1, "203.0.113.5, 192.0.2.1", "192.0.2.1"),  # the client's own entry is not trusted
        (2, "203.0.113.5, 192.0.2.1", "203.0.113.5"),
        (2, "192.0.2.1", "127.0.0.9"),  # fewer entries than proxies: it bypassed one
        (1, None, "127.0.0.9"),
    ],
)
def test_client_address_as_proxyfix(hops: int, forwarded: str | None, expected: str) -> None:
    scope = {"client": ("127.0.0.9", 4000), "headers": []}
    found = client_address(scope, {} if forwarded is None else {"x-forwarded-for": forwarded}, hops)
    assert found == expected
    # werkzeug's ProxyFix, which the Flask endpoints use, gives the same address.
    environ: dict[str, Any] = {"REMOTE_ADDR": "127.0.0.9"}
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    seen: list[str] = []

    def app(env: dict[str, Any], _start: Any) -> list[bytes]:
        seen.append(env["REMOTE_ADDR"])
        return []

    ProxyFix(app, x_for=hops)(environ, cast(Any, None))
    assert seen == [expected]


@pytest.mark.parametrize("path", ["//v1/mail/send", "/v1//mail/send", "/v1/mail//send"])
def test_path_variants_flask_routes_to_the_send_endpoint_are_the_send_endpoint(hr: AppUnderTest, path: str) -> None:
    # werkzeug merges repeated slashes when it routes; the front does too, so such a path is a
    # submission like any other -- never a 500 and an error event for the customer.
    as_sent = {"PATH_INFO": path}  # as the request line says (the test client reads "//v1" as a host)
    ok = hr.client.post("/", data=message("slashes"), headers=headers(), environ_overrides=as_sent)
    assert ok.status_code == 200
    anonymous = {"Content-Type": "message/rfc822"}
    assert hr.client.post("/", data=message(), headers=anonymous, environ_overrides=as_sent).status_code == 401
    assert entries(hr.redis, "EVENT_QUEUE") == []
    assert [fields[b"uuid"] for fields in entries(hr.redis, P1)] == [b"slashes"]
