"""Shaping rules (shipped file + customer overrides), provider resolution by MX, the routing header."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.config.postfixlog import Shaping
from common.errors import ConfigError
from devtools import testing
from devtools.dnsserver import DnsServer
from postfixlog.providers import FAILURE_TTL_S, ProviderResolver
from postfixlog.routing import add_route, needs_utf8_route, strip_route
from postfixlog.rules import SHIPPED, load_rules

CUSTOMER = Path("/configs/inboxbooster-mailer-customer.yaml")


def _rules(**overrides: Any) -> Any:
    return load_rules(Shaping(**overrides), CUSTOMER)


def _problems(**overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        _rules(**overrides)
    return raised.value.problems


# -- the rules ------------------------------------------------------------------------------------


def test_shipped_rules_cover_the_big_providers_and_keep_the_slow_transport() -> None:
    rules = _rules()
    assert {"google", "yahoo", "microsoft", "apple", "gmx-webde", "orange", "free", "laposte", "yandex", "mailru",
            "comcast"} <= set(rules.providers)  # fmt: skip
    orange = rules.limits("orange")
    assert (orange.connections, orange.recipients_per_message, orange.rate_delay, orange.failed_cohort_limit) == (
        3,
        20,
        "5s",
        10,
    )
    # Keys a provider leaves out come from the default rule; unknown domains get the default.
    assert orange.messages_per_connection == rules.default.messages_per_connection
    assert rules.limits("example.org") is rules.default
    assert rules.route("example.org") == "default" and rules.route("google") == "google"


@pytest.mark.parametrize(
    ("provider", "reply", "kind"),
    [
        ("google", "host gmail-smtp-in.l.google.com said: 421 4.7.28 Gmail has detected an unusual rate", "slow"),
        ("yahoo", "host mta7.am0.yahoodns.net said: 421 4.7.0 [TSS04] Messages temporarily deferred", "stop"),
        ("yahoo", "host mta7.am0.yahoodns.net said: 421 4.7.0 [TSS01] Messages temporarily deferred", "slow"),
        ("microsoft", "said: 451 4.7.650 The mail server has been temporarily rate limited", "slow"),
        ("microsoft", "said: 550 5.7.1 Unfortunately, messages weren't sent (S3150)", "stop"),
        ("example.org", "said: 554 5.7.1 Service unavailable; blocked using zen.spamhaus.org", "stop"),
        ("example.org", "said: 421 4.7.0 too many messages, slow down", "slow"),
        ("example.org", "said: 550 5.1.1 user unknown", None),
        ("example.org", "said: 450 4.2.0 mailbox busy", None),
    ],
)
def test_replies_are_classified_per_provider(provider: str, reply: str, kind: str | None) -> None:
    assert _rules().limits(provider).classify(reply) == kind


def test_customer_overrides_merge_key_by_key() -> None:
    rules = _rules(
        default={"connections": 7},
        backoff={"threshold": 2},
        providers={
            "google": {"connections": 3},
            "orange": None,  # removed: orange.fr is then a provider of its own
            "newbie": {"domains": ["newbie.example"], "rate-per-minute": 30},
        },
        warmup={"example.com": {"start": "2026-12-01", "daily": [100, 200]}},
    )
    assert rules.limits("google").connections == 3
    assert rules.limits("google").messages_per_connection == 50  # the shipped value stays
    assert rules.limits("yahoo").connections == 10
    assert rules.default.connections == 7
    assert "orange" not in rules.providers
    assert rules.limits("newbie").rate_per_minute == 30
    assert rules.backoff.threshold == 2 and rules.backoff.pause_seconds == 300
    ramp = rules.warmup["example.com"]
    assert [ramp.limit(datetime.date(2026, 12, d)) for d in (1, 2, 3)] == [100, 200, None]


def test_customer_mistakes_name_the_customer_file_and_key() -> None:
    problems = _problems(
        providers={"google": {"connections": "ten", "slow-down": ["(("]}},
        backoff={"threshold": 0, "bogus": 1},
    )
    text = "\n".join(problems)
    assert f"{CUSTOMER}: postfixlog.shaping.providers.google.connections: input should be a valid integer" in text
    assert f"{CUSTOMER}: postfixlog.shaping.providers.google.slow-down: not a regular expression: '(('" in text
    assert f"{CUSTOMER}: postfixlog.shaping.backoff.threshold: input should be greater than or equal to 1" in text
    assert f"{CUSTOMER}: postfixlog.shaping.backoff.bogus: unknown key" in text
    assert _problems(providers={"nomx": {"connections": 2}}) == [
        f"{CUSTOMER}: postfixlog.shaping.providers: nomx: give mx patterns or domains (or both)"
    ]
    assert "is not a provider name" in _problems(providers={"Bad Name": {"domains": ["x.test"]}})[0]


def test_mistakes_in_a_rules_file_name_that_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(SHIPPED.read_text().replace("  connections: 20\n", "  connections: -1\n", 1))
    with pytest.raises(ConfigError) as raised:
        _rules(rules_file=path)
    assert raised.value.problems == [f"{path}: default.connections: input should be greater than or equal to 1"]
    path.write_text("default: {connections: 3}\n")
    with pytest.raises(ConfigError, match="default: every provider's fallback needs messages-per-connection"):
        _rules(rules_file=path)


def test_check_config_reports_shaping_mistakes(tmp_path: Path, customer_dict: dict[str, Any]) -> None:
    bad = testing.merge(customer_dict, {"postfixlog": {"shaping": {"providers": {"google": {"stop": ["[unclosed"]}}}}})
    gpath, cpath = testing.write_configs(tmp_path / "cfg", bad)
    refused = subprocess.run(
        testing.service_command("postfixlog", gpath, cpath, "--check-config"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert f"{cpath}: postfixlog.shaping.providers.google.stop: not a regular expression" in refused.stderr


# -- providers by MX ------------------------------------------------------------------------------

RECORDS = {
    ("workspace.test", "MX"): ["10 alt1.aspmx.l.google.com", "1 aspmx.l.google.com"],
    ("yahoo-hosted.test", "MX"): ["5 mta6.am0.yahoodns.net"],
    ("mixed.test", "MX"): ["10 mx.own.test", "20 backup.outlook.com"],
    ("own.test", "MX"): ["10 mx.own.test"],
    ("nullmx.test", "MX"): ["0 ."],
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns() -> Any:
    with DnsServer(RECORDS, ttl=120) as server:
        yield server


def test_the_mx_hosts_name_the_provider(dns: DnsServer) -> None:
    resolver = ProviderResolver(_rules(), nameservers=[dns.address], timeout_s=2)
    found = resolver.providers(["Workspace.TEST", "yahoo-hosted.test", "mixed.test", "own.test", "nullmx.test",
                                "nosuch.test", "gmail.com"])  # fmt: skip
    assert found == {
        "workspace.test": "google",
        "yahoo-hosted.test": "yahoo",
        "mixed.test": "microsoft",  # the first MX host that matches a provider, by preference
        "own.test": "own.test",
        "nullmx.test": "nullmx.test",
        "nosuch.test": "nosuch.test",
        "gmail.com": "google",  # listed: no lookup
    }
    assert ("gmail.com", "MX") not in dns.queries
    resolver.close()


def test_answers_are_cached_for_their_ttl_in_a_bounded_cache(dns: DnsServer) -> None:
    clock = Clock()
    resolver = ProviderResolver(_rules(), nameservers=[dns.address], timeout_s=2, cache_size=2, clock=clock)
    resolver.resolver.cache = None  # count our own cache's hits, not dnspython's
    assert resolver.provider("workspace.test") == "google"
    clock.now += 100  # within the TTL (120 s)
    assert resolver.provider("workspace.test") == "google"
    assert dns.queries.count(("workspace.test", "MX")) == 1
    clock.now += 30  # past it
    assert resolver.provider("workspace.test") == "google"
    assert dns.queries.count(("workspace.test", "MX")) == 2
    resolver.providers(["own.test", "yahoo-hosted.test"])  # two more: the oldest goes
    assert len(resolver._cache) == 2 and "workspace.test" not in resolver._cache
    resolver.close()


def test_a_failed_lookup_falls_back_to_the_domain_for_a_while() -> None:
    clock = Clock()
    # Nothing answers DNS on this loopback address: the lookup times out.
    resolver = ProviderResolver(_rules(), nameservers=["127.53.254.254"], timeout_s=0.3, clock=clock)
    assert resolver.provider("workspace.test") == "workspace.test"
    assert resolver._cache["workspace.test"] == ("workspace.test", clock.now + FAILURE_TTL_S)
    resolver.close()


def test_no_dns_in_the_sandbox() -> None:
    resolver = ProviderResolver(_rules(), use_dns=False)
    assert resolver.providers(["gmail.com", "workspace.test"]) == {
        "gmail.com": "google",
        "workspace.test": "workspace.test",
    }
    resolver.close()


# -- the routing header ---------------------------------------------------------------------------


def test_route_header_is_last_and_replaces_any_the_message_had() -> None:
    raw = b"From: a@b.test\r\nX-IB-Route: google\r\n  continued\r\nTo: c@d.test\r\n\r\nbody\r\nX-IB-Route: x\r\n"
    routed = add_route(raw, "yahoo", utf8=False)
    assert routed == b"From: a@b.test\r\nTo: c@d.test\r\nX-IB-Route: yahoo\r\n\r\nbody\r\nX-IB-Route: x\r\n"
    assert strip_route(routed) == b"From: a@b.test\r\nTo: c@d.test\r\n\r\nbody\r\nX-IB-Route: x\r\n"
    # postcat's LF line ends (the requeue) and a message without a body.
    assert strip_route(b"A: 1\nX-IB-Route: yahoo utf8\n\nbody\n") == b"A: 1\n\nbody\n"
    assert add_route(b"Subject: x", "default", utf8=True) == b"Subject: x\r\nX-IB-Route: default utf8\r\n"
    plain = b"Subject: x\r\n\r\nbody\r\n"
    assert strip_route(plain) is plain


def test_mail_that_needs_smtputf8_takes_the_twin_transport() -> None:
    assert needs_utf8_route(b"Subject: x\r\n\r\n\xc3\xa9", smtputf8=True)
    assert needs_utf8_route("To: jörg@example.test\r\n\r\nx".encode(), smtputf8=False)
    assert not needs_utf8_route(b"Subject: x\r\n\r\n\xc3\xa9 8-bit body only", smtputf8=False)
