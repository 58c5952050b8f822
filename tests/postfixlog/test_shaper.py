"""The shaper on real Redis: shared back-off, holding and releasing, rate, warm-up (a fake clock)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from common.config.postfixlog import Shaping
from common.queue import Entry
from postfixlog.rules import Rules, load_rules
from postfixlog.shaping import GRANT_FIELD, Candidate, ProviderState, Shaper, held_key

pytestmark = [pytest.mark.redis]

INCOMING = "INCOMING-TO-POSTFIX"
SLOW = "host mx.alpha-mail.test[127.0.0.1] said: 421 4.7.0 too many messages, slow down (in reply to RCPT TO command)"
STOP = "host mx.alpha-mail.test[127.0.0.1] said: 554 5.7.1 blocked using zen.spamhaus.org (in reply to RCPT TO command)"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Captures what the shaper reports."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str], int] = {}
        self.pauses: list[tuple[str, str]] = []
        self.resumes: list[str] = []
        self.states: dict[str, tuple[int, int, float | None]] = {}
        self.holds: dict[str, int] = {}

    def shaped(self, provider: str, outcome: str, n: int) -> None:
        self.outcomes[(provider, outcome)] = self.outcomes.get((provider, outcome), 0) + n

    def provider_reply(self, provider: str, kind: str, n: int) -> None:
        pass

    def provider_pause(self, provider: str, kind: str) -> None:
        self.pauses.append((provider, kind))

    def provider_resume(self, provider: str) -> None:
        self.resumes.append(provider)

    def provider_state(self, provider: str, paused: int, blocked: int, limit: float | None) -> None:
        self.states[provider] = (paused, blocked, limit)

    def held(self, hold: str, n: int) -> None:
        self.holds[hold] = n


def _rules(**providers: Any) -> Rules:
    shaping = Shaping(
        providers={
            "alpha": {"mx": ["*.alpha-mail.test"], **providers.get("alpha", {})},
            "beta": {"mx": ["*.beta-mail.test"], **providers.get("beta", {})},
        },
        backoff={
            "threshold": 3,
            "window-seconds": 10,
            "pause-seconds": 30,
            "max-pause-seconds": 100,
            "stop-pause-seconds": 600,
            "resume-factor": 0.25,
            "resume-rate-per-minute": 60,
            "ramp-step-seconds": 20,
            "ramp-steps": 2,
        },
        warmup={"new.example": {"start": "2027-01-15", "daily": [3, 6]}},
    )
    return load_rules(shaping, Path("customer.yaml"))


def _shaper(client: Any, rules: Rules, clock: Clock) -> tuple[Shaper, Recorder]:
    recorder = Recorder()
    return Shaper(client, rules, incoming=INCOMING, metrics=recorder, clock=clock), recorder


def _entry(client: Any, provider: str, n: int, from_domain: str = "example.test", grant: str = "") -> Entry:
    fields: dict[str, str] = {
        "uuid": f"{provider}{n}",
        "rcpts": f'["r{n}@{provider}.test"]',
        "from_domain": from_domain,
    }
    if grant:
        fields[GRANT_FIELD] = grant
    entry_id = client.xadd("SOURCE", fields)
    return Entry("SOURCE", entry_id.decode(), {k.encode(): v.encode() for k, v in fields.items()})


def _complete_held(client: Any, shaper: Shaper, entries: list[Entry], holds: list[Any]) -> None:
    """What the worker does with a held entry: its writes in one MULTI/EXEC."""
    pipe = client.pipeline(transaction=True)
    for entry, hold in zip(entries, holds, strict=True):
        if hold is not None:
            for write in shaper.hold_writes(entry, hold):
                write.write(pipe)
    pipe.execute()


def _candidates(entries: list[Entry], provider: str) -> list[Candidate]:
    return [
        Candidate(provider, e.fields[b"from_domain"].decode(), e.fields.get(GRANT_FIELD.encode()) == provider.encode())
        for e in entries
    ]


@pytest.mark.parametrize(
    ("rate", "elapsed", "expected"),
    [
        (0, -1, 0.0),  # paused
        (0, 0, 60.0),  # no rate of its own: resume-rate-per-minute, doubled every step...
        (0, 20, 120.0),
        (0, 40, None),  # ...for ramp-steps steps, then no limit again
        (400, 0, 100.0),  # a rate: resume-factor x rate...
        (400, 20, 200.0),
        (400, 40, 400.0),  # ...until the full rate
        (400, 1000, 400.0),
    ],
)
def test_resume_rate_ramps_back_up(rate: float, elapsed: float, expected: float | None) -> None:
    rules = _rules(alpha={"rate-per-minute": rate})
    state = ProviderState(until=T0, kind="slow", pauses=1)
    assert state.rate_limit(rules.limits("alpha"), rules, T0 + elapsed) == expected
    assert ProviderState().rate_limit(rules.limits("alpha"), rules, T0) == (rate or None)


def test_slow_down_answers_of_all_instances_pause_the_provider_once(
    redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Two instances each see some of the 421s; together they reach the threshold: one pause,
    # logged and counted once, seen by both; answers during the pause do not extend it.
    clock = Clock()
    rules = _rules()
    one, one_seen = _shaper(redis_client, rules, clock)
    two, two_seen = _shaper(redis_client, rules, clock)
    one.observe([("alpha", SLOW), ("alpha", SLOW)])
    assert not one.states(["alpha"])["alpha"].paused(clock.now)
    with caplog.at_level(logging.WARNING):
        two.observe([("alpha", SLOW)])
        one.observe([("alpha", SLOW)] * 5)
    state = one.states(["alpha"])["alpha"]
    assert state.paused(clock.now) and state.until == T0 + 30 and state.kind == "slow"
    assert one_seen.pauses == [] and two_seen.pauses == [("alpha", "slow")]
    assert caplog.text.count("provider alpha paused for 30s") == 1
    # Postfix' own notes and other providers' answers do not count.
    beta_before = two.states(["beta"])["beta"]
    two.observe([("beta", "delivery temporarily suspended: host x said: 421 4.7.0 slow down")] * 5)
    two.observe([("beta", "conversation with mx.beta-mail.test timed out while receiving the initial greeting")] * 5)
    assert two.states(["beta"])["beta"] == beta_before
    # After the pause: resumed once, at the reduced rate; a second pause within the ramp is longer.
    clock.now = T0 + 31
    with caplog.at_level(logging.WARNING):
        one.tick()
        two.tick()
    assert one_seen.resumes + two_seen.resumes == ["alpha"]
    assert "provider alpha resumed" in caplog.text
    assert one_seen.states["alpha"] == (0, 0, 60.0)
    one.observe([("alpha", SLOW)] * 3)
    assert one.states(["alpha"])["alpha"].until == clock.now + 60


def test_one_stop_answer_blocks_the_provider_for_longer(redis_client: Any) -> None:
    clock = Clock()
    shaper, seen = _shaper(redis_client, _rules(), clock)
    shaper.observe([("alpha", SLOW)] * 3)  # a slow-down pause...
    shaper.observe([("alpha", STOP)])  # ...becomes a stop pause
    state = shaper.states(["alpha"])["alpha"]
    assert state.kind == "stop" and state.until == T0 + 600
    shaper.tick()
    assert seen.states["alpha"] == (1, 1, 0.0)
    assert seen.states["beta"] == (0, 0, None)


def test_a_paused_providers_mail_waits_in_redis_and_is_released_once(redis_client: Any) -> None:
    clock = Clock()
    rules = _rules()
    one, seen = _shaper(redis_client, rules, clock)
    two, _ = _shaper(redis_client, rules, clock)
    one.observe([("alpha", SLOW)] * 3)
    alpha = [_entry(redis_client, "alpha", n) for n in range(5)]
    beta = [_entry(redis_client, "beta", n) for n in range(3)]
    holds = one.admit(_candidates(alpha, "alpha") + _candidates(beta, "beta"))
    assert [h.reason if h else None for h in holds] == ["paused"] * 5 + [None] * 3  # beta is not slowed
    _complete_held(redis_client, one, alpha + beta, holds)
    assert redis_client.xlen(held_key("provider:alpha")) == 5
    one.tick()
    assert redis_client.xlen(INCOMING) == 0  # still paused
    assert seen.holds == {"provider:alpha": 5}
    # Resumed at 60/min: a bucket of one token, refilled once a second, shared by both instances.
    clock.now = T0 + 30
    one.tick()
    two.tick()
    assert redis_client.xlen(INCOMING) == 1
    for second in (31, 32, 33):
        clock.now = T0 + second
        two.tick()
        one.tick()
    released = redis_client.xrange(INCOMING)
    assert len(released) == 4
    assert {f[GRANT_FIELD.encode()] for _, f in released} == {b"alpha"}
    assert not any(k.startswith(b"held-") for _, f in released for k in f)
    # A released entry has its token already: admitted although the bucket is empty now.
    again = [Entry(INCOMING, i.decode(), f) for i, f in released]
    assert one.admit(_candidates(again, "alpha")) == [None] * 4
    clock.now = T0 + 40
    one.tick()
    assert redis_client.xlen(INCOMING) == 5 and not redis_client.exists(held_key("provider:alpha"))
    assert not redis_client.hexists("IB:postfixlog:held", "provider:alpha")


def test_rate_per_minute_is_shared_and_excess_waits(redis_client: Any) -> None:
    clock = Clock()
    rules = _rules(beta={"rate-per-minute": 120})  # 2 per second, bursts of 2
    one, _ = _shaper(redis_client, rules, clock)
    two, _ = _shaper(redis_client, rules, clock)
    first = [_entry(redis_client, "beta", n) for n in range(3)]
    second = [_entry(redis_client, "beta", n) for n in range(3, 5)]
    assert [h is None for h in one.admit(_candidates(first, "beta"))] == [True, True, False]
    assert [h.reason if h else None for h in two.admit(_candidates(second, "beta"))] == ["rate", "rate"]
    clock.now += 1.0
    assert [h is None for h in two.admit(_candidates(second, "beta"))] == [True, True]


def test_warm_up_holds_a_new_domain_beyond_its_daily_volume(redis_client: Any) -> None:
    clock = Clock()
    clock.now = 1_800_000_000.0  # 2027-01-15, day 1 of new.example's ramp: 3 messages
    shaper, _ = _shaper(redis_client, _rules(), clock)
    entries = [_entry(redis_client, "beta", n, from_domain="new.example") for n in range(5)]
    holds = shaper.admit(_candidates(entries, "beta"))
    assert [h.reason if h else None for h in holds] == [None, None, None, "warmup", "warmup"]
    _complete_held(redis_client, shaper, entries, holds)
    shaper.tick()
    assert redis_client.xlen(INCOMING) == 0  # nothing more today
    clock.now += 86400  # day 2: 6 messages
    shaper.tick()
    assert redis_client.xlen(INCOMING) == 2
    assert shaper.admit([Candidate("beta", "new.example", False)] * 2) == [None, None]
    # Other senders are not concerned.
    assert shaper.admit([Candidate("beta", "example.test", False)] * 10) == [None] * 10
