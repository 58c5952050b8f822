"""The suppression list on a real Redis: feeding, merging, enforcement windows, one MGET per check."""

from __future__ import annotations

import time

import pytest
import redis

from common import keys
from common.suppression import (
    Entry,
    Filters,
    Policy,
    SuppressionList,
    SuppressionSettings,
    parse_record,
    reason_of,
)

pytestmark = pytest.mark.redis
DAY = 86400


def policies(**override: Policy) -> dict[str, Policy]:
    base = {
        "bounce": Policy(True, 30 * DAY, 90 * DAY),
        "spam-report": Policy(True, None, 3650 * DAY),
        "unsubscribe": Policy(True, None, 3650 * DAY),
        "manual": Policy(True, None, 3650 * DAY),
    }
    return {**base, **{k.replace("_", "-"): v for k, v in override.items()}}


@pytest.fixture
def lst(redis_client: redis.Redis) -> SuppressionList:
    return SuppressionList(redis_client, SuppressionSettings(policies=policies()))


def feed(lst: SuppressionList, reason: str, at: float, event_id: str | None, *, address: str = "Bob@Dest.test") -> int:
    pipe = lst.redis.pipeline(transaction=False)
    lst.feed(
        pipe, scope="example.test", address=address, reason=reason, at=at, event_id=event_id, uuid="u1", once_for_s=600
    )
    (written,) = pipe.execute()
    return int(written)


def test_an_event_feeds_once_and_later_events_move_last(lst: SuppressionList, redis_client: redis.Redis) -> None:
    assert feed(lst, "unsubscribe", 1000, "e1") == 1
    assert feed(lst, "unsubscribe", 1000, "e1") == 0  # the same event again (retried delivery)
    assert feed(lst, "unsubscribe", 500, "e0") == 1  # an older event: first moves back
    assert feed(lst, "unsubscribe", 2000, "e2") == 1
    (entry,) = lst.get("example.test", "bob@dest.test")
    assert (entry.address, entry.reason, entry.first, entry.last, entry.count) == (
        "bob@dest.test",
        "unsubscribe",
        500,
        2000,
        3,
    )
    assert entry.event_id == "e2" and entry.uuid == "u1"
    assert 3649 * DAY < redis_client.ttl(keys.suppression("unsubscribe", "example.test", "bob@dest.test")) <= 3650 * DAY


def test_a_deleted_entry_is_not_brought_back_by_the_same_event(lst: SuppressionList) -> None:
    feed(lst, "spam-report", 1000, "e1")
    assert lst.delete("example.test", "BOB@dest.test") == 1
    assert feed(lst, "spam-report", 1000, "e1") == 0
    assert lst.get("example.test", "bob@dest.test") == []
    assert feed(lst, "spam-report", 1100, "e2") == 1  # a new complaint does


def test_each_reason_is_its_own_entry_with_its_own_retention(lst: SuppressionList, redis_client: redis.Redis) -> None:
    now = time.time()
    feed(lst, "bounce", now, "b1")
    feed(lst, "unsubscribe", now, "u1")
    assert {e.reason for e in lst.get("example.test", "bob@dest.test")} == {"bounce", "unsubscribe"}
    assert redis_client.ttl(keys.suppression("bounce", "example.test", "bob@dest.test")) <= 90 * DAY
    assert lst.delete("example.test", "bob@dest.test", "bounce") == 1
    assert [e.reason for e in lst.get("example.test", "bob@dest.test")] == ["unsubscribe"]


def test_check_reads_every_recipient_in_one_mget_and_applies_the_windows(redis_client: redis.Redis) -> None:
    lst = SuppressionList(redis_client, SuppressionSettings(policies=policies(spam_report=Policy(False, None, DAY))))
    now = time.time()
    feed(lst, "bounce", now - 31 * DAY, "old", address="old@dest.test")  # outside enforce-days
    feed(lst, "bounce", now - 2 * DAY, "new", address="new@dest.test")
    feed(lst, "spam-report", now, "sr", address="complained@dest.test")  # not enforced by policy
    feed(lst, "bounce", now, "b", address="both@dest.test")
    feed(lst, "unsubscribe", now - 100, "u", address="both@dest.test")
    before = redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    found = lst.check(
        [
            ("example.test", a)
            for a in ("old@dest.test", "NEW@dest.test", "complained@dest.test", "both@dest.test", "x@y.z")
        ],
        now,
    )
    assert redis_client.info("commandstats")["cmdstat_mget"]["calls"] == before + 1
    assert set(found) == {("example.test", "new@dest.test"), ("example.test", "both@dest.test")}
    assert found[("example.test", "both@dest.test")].reason == "unsubscribe"  # precedence over bounce
    assert lst.check([("other.test", "new@dest.test")], now) == {}  # scoped per domain


def test_listing_filters_and_pages(lst: SuppressionList) -> None:
    for i in range(25):
        feed(lst, "unsubscribe" if i % 2 else "bounce", 1000 + i, f"e{i}", address=f"user{i}@dest.test")
    lst.put("other.test", "user1@dest.test", "manual")
    seen: list[Entry] = []
    cursor = None
    while True:
        page = lst.page(Filters(scope="example.test"), cursor, limit=5)
        seen += page.entries
        if page.cursor is None:
            break
        cursor = page.cursor
    assert len({(e.address, e.reason) for e in seen}) == 25
    unsubscribed = list(lst.iterate(Filters(reason="unsubscribe")))
    assert len(unsubscribed) == 12 and all(e.reason == "unsubscribe" for e in unsubscribed)
    assert {e.scope for e in lst.iterate(Filters(address="USER1@"))} == {"example.test", "other.test"}
    assert {e.address for e in lst.iterate(Filters(scope="example.test", since=1020))} == {
        f"user{i}@dest.test" for i in range(20, 25)
    }


def test_store_replaces_and_parse_record_checks(lst: SuppressionList) -> None:
    entry = parse_record(
        {"address": "<A@B.test>", "reason": "unsubscribe", "first": "10", "last": "20"}, "example.test"
    )
    assert (entry.scope, entry.address, entry.first, entry.last) == ("example.test", "a@b.test", 10, 20)
    assert lst.store([entry]) == 1
    (stored,) = lst.get("example.test", "a@b.test")
    assert (stored.first, stored.last, stored.count) == (10, 20, 1)
    for bad, why in (
        ({"address": "nobody"}, "not an address"),
        ({"address": "a@b.test", "reason": "whim"}, "reason"),
        ({"address": "a@b.test", "scope": "has space"}, "scope"),
        ({"address": "a@b.test", "last": "yesterday"}, "Unix seconds"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_record(bad, "example.test")


def test_which_events_feed_which_reason() -> None:
    assert reason_of({"event": "bounce", "suppress": True}) == "bounce"
    assert reason_of({"event": "bounce", "suppress": False}) is None
    assert reason_of({"event": "spam-report"}) == "spam-report"
    assert reason_of({"event": "unsubscribe"}) == "unsubscribe"
    assert reason_of({"event": "deferred", "suppress": True}) is None
    assert SuppressionSettings(scope="stream").scope_of("Example.TEST", "spring") == "spring"
    assert SuppressionSettings(scope="stream").scope_of("Example.TEST", None) == "example.test"
    assert SuppressionSettings().scope_of("Example.TEST", "spring") == "example.test"
