"""Provider-aware shaping end to end: real MX lookups, one sink per provider, automatic back-off.

A loopback DNS server gives the test domains of three providers MX hosts on loopback addresses
of their own, where three sinks listen on port 25; Postfix resolves them itself (its own
resolv.conf in a mount namespace) and PostfixLog resolves the same MX records to pick each
recipient's provider (``postfixlog.shaping.dns-servers``).  Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest

from common.queue import Queues
from devtools.dnsserver import DnsServer
from devtools.servers import wait_until
from devtools.sink import Sink

from .conftest import RunningService, events_of, outbound

pytestmark = [pytest.mark.postfix, pytest.mark.redis, pytest.mark.slow]

INCOMING = "INCOMING-TO-POSTFIX"
PROVIDERS = ("alpha", "beta", "gamma")
THROTTLE = "421 4.7.0 <{addr}>: too many messages from your IP, slow down"
#: alpha's sink takes this many recipients per window, then answers THROTTLE.
ALPHA_PER_WINDOW, ALPHA_WINDOW_S = 8, 4.0
PER_WAVE = 16
#: A deferred message must not be eligible again within a second: with minimal_backoff_time 1s,
#: qmgr can rescan it while the smtp process that deferred it still holds its lock ("skipped,
#: still being delivered"), and it then waits in the incoming queue until the next new mail.
SLOWER_RETRIES = {"minimal_backoff_time": "3s", "maximal_backoff_time": "4s"}


def _addresses() -> dict[str, str]:
    base = f"127.19.{os.getpid() % 250 + 1}"
    return {provider: f"{base}.{i + 1}" for i, provider in enumerate(PROVIDERS)}


def _dns_records(addresses: dict[str, str]) -> dict[tuple[str, str], list[str]]:
    # Each provider hosts two recipient domains on its MX hosts: the provider is found by the
    # MX host, whatever the domain's name.
    records: dict[tuple[str, str], list[str]] = {}
    for provider, address in addresses.items():
        for domain in (f"{provider}.test", f"customer-of-{provider}.test"):
            records[(domain, "MX")] = [f"10 mx1.{provider}-mail.test", f"20 mx2.{provider}-mail.test"]
        records[(f"mx1.{provider}-mail.test", "A")] = [address]
        records[(f"mx2.{provider}-mail.test", "A")] = [address]
    return records


def _shaping(dns: DnsServer) -> dict[str, Any]:
    return {
        "dns-servers": [dns.address],
        "providers": {p: {"mx": [f"*.{p}-mail.test"]} for p in PROVIDERS},
        "backoff": {
            "threshold": 3,
            "window-seconds": 10,
            "pause-seconds": 3,
            "max-pause-seconds": 6,
            "resume-rate-per-minute": 60,
            "ramp-step-seconds": 2,
            "ramp-steps": 3,
        },
    }


def _wave(tag: str) -> dict[str, list[Any]]:
    return {
        p: [
            outbound(f"{tag}{p}{i:03d}", [f"u{tag}{i}@{'' if i % 2 else 'customer-of-'}{p}.test"])
            for i in range(PER_WAVE)
        ]
        for p in PROVIDERS
    }


def _delivered(client: Any, uuids: set[str]) -> int:
    return sum(1 for e in events_of(client) if e["event"] == "delivered" and e["uuid"] in uuids)


def _sample(registry: Any, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.timeout(240)
def test_throttled_provider_is_paused_resumed_and_delivered(
    service_config, queues: Queues, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    addresses = _addresses()
    sinks = {
        p: Sink(address, 25, throttle=(ALPHA_PER_WINDOW, ALPHA_WINDOW_S, THROTTLE) if p == "alpha" else None)
        for p, address in addresses.items()
    }
    with DnsServer(_dns_records(addresses), ttl=300) as dns:
        for sink in sinks.values():
            sink.start()
        running = RunningService(service_config(SLOWER_RETRIES, sandbox={"enabled": False}, shaping=_shaping(dns)))
        running.service.instance.dns_server = dns.address
        registry = running.registry
        waves = [_wave("a"), _wave("b")]
        rates: list[dict[str, float]] = []
        paused_seen = False
        try:
            running.start()
            for number, wave in enumerate(waves):
                if number == 1:
                    # The second wave arrives while alpha is paused: its alpha messages wait in
                    # Redis; beta's and gamma's go at once.
                    wait_until(
                        lambda: _sample(registry, "mailer_postfixlog_provider_paused", provider="alpha") == 1,
                        60,
                        interval_s=0.05,
                        what="alpha paused",
                    )
                    paused_seen = True
                started = time.monotonic()
                queues.enqueue_many(INCOMING, [m.to_fields() for mails in wave.values() for m in mails], limit=False)
                others = {m.uuid for p in ("beta", "gamma") for m in wave[p]}
                wait_until(lambda: _delivered(redis_client, others) == len(others), 60, what="beta and gamma delivered")  # noqa: B023
                rates.append({"beta+gamma": len(others) / (time.monotonic() - started)})
            every = {m.uuid for wave in waves for mails in wave.values() for m in mails}
            wait_until(
                lambda: _delivered(redis_client, every) == len(every), 180, interval_s=0.2, what="everything delivered"
            )
            wait_until(
                lambda: _sample(registry, "mailer_postfixlog_provider_paused", provider="alpha") == 0,
                30,
                what="alpha not paused any more",
            )
        finally:
            assert running.stop() == 0
            for sink in sinks.values():
                sink.stop()

    events = events_of(redis_client)
    assert {e["event"] for e in events} <= {"delivered", "deferred"}  # no bounce, ever
    delivered = Counter(e["uuid"] for e in events if e["event"] == "delivered")
    assert set(delivered) == every and set(delivered.values()) == {1}
    # Each provider's mail reached its own MX (the sink of its loopback address) through its transport.
    for provider, sink in sinks.items():
        assert {m.rcpt.rpartition("@")[2].removeprefix("customer-of-") for m in sink.messages} == {f"{provider}.test"}
    # alpha pushed back: it was paused (and the pause shown); what Postfix had deferred and its
    # second wave waited in Redis and were released; it resumed; every pause and resume was logged.
    assert paused_seen
    assert sinks["alpha"].handler.throttled > 0
    assert _sample(registry, "mailer_postfixlog_provider_pauses_total", provider="alpha", kind="slow") >= 1
    assert _sample(registry, "mailer_postfixlog_provider_resumes_total", provider="alpha") >= 1
    held = _sample(registry, "mailer_postfixlog_provider_messages_total", provider="alpha", outcome="paused")
    withdrawn = _sample(registry, "mailer_postfixlog_provider_messages_total", provider="alpha", outcome="withdrawn")
    assert held >= 1
    assert withdrawn >= 1  # deferred in Postfix when the pause began: moved to Redis too
    held += withdrawn
    assert _sample(registry, "mailer_postfixlog_provider_messages_total", provider="alpha", outcome="released") >= held
    assert "provider alpha paused for" in caplog.text and "provider alpha resumed" in caplog.text
    assert not redis_client.exists("IB:postfixlog:held:provider:alpha")
    # The others were never slowed: nothing held, no slow-down answer, and their throughput
    # while alpha was paused is in line with before.
    for provider in ("beta", "gamma"):
        assert sinks[provider].handler.throttled == 0
        for outcome in ("paused", "rate"):
            assert (
                _sample(registry, "mailer_postfixlog_provider_messages_total", provider=provider, outcome=outcome) == 0
            )
        assert _sample(registry, "mailer_postfixlog_provider_paused", provider=provider) == 0
    before, during = rates[0]["beta+gamma"], rates[1]["beta+gamma"]
    assert during >= 0.5 * before, (before, during)
