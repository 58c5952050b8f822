"""The suppression list and message timelines over HTTP (same credentials as sending)."""

from __future__ import annotations

import json
import time

import pytest

from common import trace
from common.suppression import SuppressionList, SuppressionSettings
from common.trace import TraceSettings

from .conftest import AppUnderTest, backends_on, basic, redis_down

pytestmark = pytest.mark.redis
AUTH = {"Authorization": basic()}


def test_every_control_endpoint_needs_the_credentials(hr: AppUnderTest) -> None:
    for method, path in (
        ("GET", "/v1/suppressions"),
        ("GET", "/v1/suppressions/export"),
        ("POST", "/v1/suppressions/import"),
        ("GET", "/v1/suppressions/example.test/a@dest.test"),
        ("PUT", "/v1/suppressions/example.test/a@dest.test"),
        ("DELETE", "/v1/suppressions/example.test/a@dest.test"),
        ("GET", "/v1/messages/abc"),
    ):
        reply = hr.client.open(path, method=method)
        assert reply.status_code == 401, (method, path)
        assert reply.json is not None and reply.json["error"] == "unauthorized"
    wrong = hr.client.get("/v1/suppressions", headers={"Authorization": basic(password="wrong")})
    assert wrong.status_code == 401  # and counts towards the same lockout as /v1/mail/send
    assert hr.client.get("/v1/openapi.json").status_code == 200  # the contract is public


def test_put_get_list_delete_one_address(hr: AppUnderTest) -> None:
    url = "/v1/suppressions/example.test/Someone@Dest.test"
    assert hr.client.get(url, headers=AUTH).status_code == 404
    put = hr.client.put(url, headers=AUTH)
    assert put.status_code == 200
    assert put.json is not None
    assert (put.json["address"], put.json["reason"], put.json["enforced"]) == ("someone@dest.test", "manual", True)
    put = hr.client.put(url, headers=AUTH, data=json.dumps({"reason": "unsubscribe"}))
    assert put.status_code == 200 and put.json is not None and put.json["reason"] == "unsubscribe"
    got = hr.client.get(url, headers=AUTH).json
    assert got is not None and got["suppressed"] is True
    assert sorted(e["reason"] for e in got["entries"]) == ["manual", "unsubscribe"]
    listed = hr.client.get("/v1/suppressions?scope=example.test&reason=manual", headers=AUTH).json
    assert listed is not None and [e["address"] for e in listed["entries"]] == ["someone@dest.test"]
    assert listed["next_cursor"] is None
    assert hr.client.delete(url + "?reason=manual", headers=AUTH).json == {
        "scope": "example.test",
        "address": "someone@dest.test",
        "deleted": 1,
    }
    assert hr.client.delete(url, headers=AUTH).status_code == 200
    assert hr.client.delete(url, headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("PUT", "/v1/suppressions/example.test/not-an-address", None),
        ("PUT", "/v1/suppressions/example.test/a@dest.test", "{not json"),
        ("PUT", "/v1/suppressions/example.test/a@dest.test", "[" * 20_000),  # RecursionError in json
        ("PUT", "/v1/suppressions/example.test/a@dest.test", '{"reason": "whim"}'),
        ("PUT", "/v1/suppressions/example.test/a@dest.test", '{"reason": "manual", "extra": 1}'),
        ("GET", "/v1/suppressions?limit=0", None),
        ("GET", "/v1/suppressions?reason=whim", None),
        ("GET", "/v1/suppressions?cursor=abc", None),
        ("GET", "/v1/suppressions?since=yesterday", None),
        ("GET", "/v1/suppressions/export?format=xml", None),
        ("GET", "/v1/messages/NOT-A-UUID", None),
    ],
)
def test_bad_requests_say_what_is_wrong(hr: AppUnderTest, method: str, url: str, body: str | None) -> None:
    reply = hr.client.open(url, method=method, headers=AUTH, data=body)
    assert reply.status_code == 400
    assert reply.json is not None and reply.json["error"] == "bad-request" and reply.json["message"]


def test_export_and_import_round_trip_in_both_formats(hr: AppUnderTest) -> None:
    lst = SuppressionList(hr.redis, SuppressionSettings())
    lst.put("example.test", "a@dest.test", "unsubscribe", at=1700000000)
    lst.put("example.test", "b@dest.test", "bounce", at=time.time())
    csv_text = hr.client.get("/v1/suppressions/export?format=csv&scope=example.test", headers=AUTH)
    assert csv_text.status_code == 200 and csv_text.mimetype == "text/csv"
    lines = csv_text.get_data(as_text=True).splitlines()
    assert lines[0] == "scope,address,reason,first,last,event_id,uuid,count" and len(lines) == 3
    jsonl = hr.client.get("/v1/suppressions/export", headers=AUTH).get_data(as_text=True)
    assert sorted(json.loads(line)["address"] for line in jsonl.splitlines()) == ["a@dest.test", "b@dest.test"]
    hr.redis.flushall()
    reply = hr.client.post(
        "/v1/suppressions/import", headers={**AUTH, "Content-Type": "text/csv"}, data="\n".join(lines) + "\n"
    )
    assert reply.json == {"imported": 2, "rejected": 0, "errors": []}
    (entry,) = lst.get("example.test", "a@dest.test")
    assert (entry.reason, entry.first, entry.last) == ("unsubscribe", 1700000000, 1700000000)
    rows = '{"address": "c@dest.test"}\n\nnot json\n{"address": "nobody", "scope": "x.test"}\n'
    reply = hr.client.post(
        "/v1/suppressions/import?scope=other.test",
        headers={**AUTH, "Content-Type": "application/x-ndjson"},
        data=rows,
    )
    assert reply.status_code == 200 and reply.json is not None
    assert (reply.json["imported"], reply.json["rejected"]) == (1, 2)
    assert [e["line"] for e in reply.json["errors"]] == [3, 4]
    assert [e.reason for e in lst.get("other.test", "c@dest.test")] == ["manual"]
    deep = hr.client.post(
        "/v1/suppressions/import", headers={**AUTH, "Content-Type": "application/x-ndjson"}, data="[" * 20_000 + "\n"
    )
    assert deep.status_code == 400 and deep.json is not None
    assert deep.json["message"] == "no valid row; line 1: not JSON: nested too deeply"
    bad_type = hr.client.post("/v1/suppressions/import", headers={**AUTH, "Content-Type": "text/plain"}, data="x")
    assert bad_type.status_code == 415


def test_the_timeline_of_a_message_and_a_clear_404_for_an_unknown_one(hr: AppUnderTest) -> None:
    reply = hr.client.get("/v1/messages/nosuchmessage", headers=AUTH)
    assert reply.status_code == 404
    assert reply.json is not None and reply.json["error"] == "unknown-message"
    assert "nosuchmessage" in reply.json["message"] and "7 days" in reply.json["message"]
    sent = hr.client.post(
        "/v1/mail/send",
        headers={**AUTH, "Content-Type": "message/rfc822"},
        data=b"From: a@example.test\r\nTo: b@dest.test\r\nX-Uuid: traced1\r\nSubject: s\r\n\r\nbody\r\n",
    )
    assert sent.status_code == 200
    pipe = hr.redis.pipeline()
    trace.add_to(pipe, TraceSettings(), "traced1", trace.entry("signed", recipient="b@dest.test"))
    pipe.execute()
    got = hr.client.get("/v1/messages/traced1", headers=AUTH).json
    assert got is not None and got["uuid"] == "traced1"
    assert [(e["stage"], e.get("door")) for e in got["entries"]] == [("accepted", "http"), ("signed", None)]
    assert got["entries"][0]["queue"] == "IB-MAIL-QUEUE-P1" and got["entries"][0]["time"].endswith("Z")


def test_redis_down_is_a_503_with_retry_after(make_app) -> None:
    from common.queue import QueueSettings

    app = make_app(backends=backends_on(redis_down(), QueueSettings()))
    reply = app.client.get("/v1/suppressions", headers=AUTH)
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "5"
