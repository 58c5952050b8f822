"""Provider-aware shaping in PostfixLog: rate, automatic back-off and warm-up, shared by all instances.

Sits between ``INCOMING-TO-POSTFIX`` and Postfix.  Postfix enforces each provider's static
limits itself (its ``ib_<provider>`` transport: connections, messages per connection, rate delay,
recipients -- :mod:`postfixlog.rules`); this module decides *whether a message goes to Postfix
now*, for every delivery instance together (the state is in Redis):

* **rate** -- a provider's ``rate-per-minute`` (and the reduced rate while it ramps back up
  after a pause) is a token bucket in Redis that every instance draws from;
* **back-off** -- the log follower reports every remote answer (:meth:`Shaper.observe`); when a
  provider's "slow down" answers reach ``backoff.threshold`` within ``window-seconds``, or on one
  "stop" answer (blocklisting), the provider is paused for everyone (one script decides, so one
  instance logs "paused"); after the pause it resumes at ``resume-factor`` x its rate and doubles
  every ``ramp-step-seconds``; a pause within a ramp lasts twice as long as the one before;
* **warm-up** -- a sending domain's daily volume (``warmup``), counted per UTC day.

A message that may not go now is *held*: its entry moves, in the same MULTI/EXEC that
acknowledges it, to the stream of its hold (``IB:postfixlog:held:provider:<p>`` or
``…:warmup:<domain>``) -- it waits in Redis, not in Postfix' deferred queue.  Every instance
releases held entries back to ``INCOMING-TO-POSTFIX`` (:meth:`Shaper.tick`) when their provider
is not paused, as fast as its rate allows, in a script that moves each entry exactly once; a
released entry carries ``shaping-grant`` (its token was taken) so it is not counted twice.
Entries that were already partly handed to Postfix (a retried or claimed entry) are never held.
Other providers are not slowed: each provider has its own bucket, state and hold.

Keys::

  IB:postfixlog:shaping:state:<provider>    HASH    until, kind (slow|stop), pauses, reason, since,
                                                    win, hits, resumed (TTL: pause + ramp + 1 h)
  IB:postfixlog:shaping:active              ZSET    provider -> end of its pause and ramp
  IB:postfixlog:shaping:bucket:<provider>   HASH    tokens, ts (TTL 1 h)
  IB:postfixlog:held:<hold>                 STREAM  held entries (hold: provider:<p>, warmup:<domain>)
  IB:postfixlog:held                        HASH    hold -> when an entry was last held (TTL 30 d)
  IB:postfixlog:warmup:<domain>:<yyyymmdd>  STRING  messages of the domain handed to Postfix that day (TTL 2 d)
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import redis

from common import keys
from common.errors import TemporaryError
from common.queue import Entry, HashWrite, Output, Write, redis_errors
from postfixlog.rules import Limits, Rules

log = logging.getLogger(__name__)

SERVICE: Final = "postfixlog"
ACTIVE_KEY: Final = keys.service_key(SERVICE, "shaping", "active")
HELD_INDEX: Final = keys.service_key(SERVICE, "held")
#: Field of a released entry: the provider whose token it already has.
GRANT_FIELD: Final = "shaping-grant"
HELD_PREFIX: Final = "held-"
HELD_INDEX_TTL_S: Final = 30 * 86400
#: Entries one instance releases per hold and tick at most.
RELEASE_BATCH: Final = 200
#: A bucket holds at most this many seconds' worth of tokens.
BURST_SECONDS: Final = 1.0
#: Labels of providers that are not listed in the rules (their names are recipient domains).
OTHER: Final = "other"

#: KEYS state, active; ARGV provider, kind, n, now, threshold, window, pause, max pause, stop
#: pause, ramp seconds, reason.  Returns {paused (0|1), until, pauses}.
OBSERVE_SCRIPT: Final = """
local now = tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'until', 'kind', 'pauses', 'win', 'hits')
local untl = tonumber(s[1]) or 0
local pauses = tonumber(s[3]) or 0
local kind = ARGV[2]
local window = tonumber(ARGV[6])
local pause = 0
if untl > now then
  if kind ~= 'stop' or s[2] == 'stop' then return {0, tostring(untl), pauses} end
  pause = tonumber(ARGV[9])
else
  local win = tonumber(s[4]) or 0
  local hits = tonumber(s[5]) or 0
  if now - win > window then win = now; hits = 0 end
  hits = hits + tonumber(ARGV[3])
  if kind == 'stop' then
    pause = tonumber(ARGV[9])
  elseif hits >= tonumber(ARGV[5]) then
    pause = math.min(tonumber(ARGV[8]), tonumber(ARGV[7]) * 2 ^ pauses)
  else
    redis.call('HSET', KEYS[1], 'win', tostring(win), 'hits', hits)
    if redis.call('TTL', KEYS[1]) < 2 * window then redis.call('EXPIRE', KEYS[1], math.ceil(2 * window)) end
    return {0, '0', pauses}
  end
end
untl = now + pause
redis.call('HSET', KEYS[1], 'until', tostring(untl), 'kind', kind, 'pauses', pauses + 1, 'win', tostring(now),
  'hits', 0, 'reason', ARGV[11], 'since', tostring(now))
redis.call('HDEL', KEYS[1], 'resumed')
redis.call('EXPIRE', KEYS[1], math.ceil(pause + tonumber(ARGV[10]) + 3600))
redis.call('ZADD', KEYS[2], untl + tonumber(ARGV[10]), ARGV[1])
return {1, tostring(untl), pauses + 1}
"""

#: KEYS bucket; ARGV rate per second, burst, wanted, now.  Returns the tokens granted.
TAKE_SCRIPT: Final = """
local rate, burst, want, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local granted = math.floor(math.min(want, tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], 3600)
return granted
"""

#: KEYS counter; ARGV wanted, limit.  Takes up to the day's remaining volume; returns it.
QUOTA_SCRIPT: Final = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.max(0, math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used))
if grant > 0 then
  redis.call('INCRBY', KEYS[1], grant)
  redis.call('EXPIRE', KEYS[1], 172800)
end
return grant
"""

#: KEYS held stream, incoming stream, held index; ARGV count, grant (or ''), hold name.
#: Moves the oldest entries back (without held-* fields, with the grant); returns how many.
RELEASE_SCRIPT: Final = """
local rows = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[1]))
for _, row in ipairs(rows) do
  local f, out = row[2], {}
  for i = 1, #f, 2 do
    if string.sub(f[i], 1, 5) ~= 'held-' and f[i] ~= 'shaping-grant' then
      out[#out + 1] = f[i]
      out[#out + 1] = f[i + 1]
    end
  end
  if ARGV[2] ~= '' then
    out[#out + 1] = 'shaping-grant'
    out[#out + 1] = ARGV[2]
  end
  redis.call('XADD', KEYS[2], '*', unpack(out))
  redis.call('XDEL', KEYS[1], row[1])
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[3], ARGV[3])
end
return #rows
"""


def state_key(provider: str) -> str:
    """Shared pause/ramp state of a provider."""
    return keys.service_key(SERVICE, "shaping", "state", provider)


def bucket_key(provider: str) -> str:
    """Token bucket of a provider's rate."""
    return keys.service_key(SERVICE, "shaping", "bucket", provider)


def held_key(hold: str) -> str:
    """Stream of the entries waiting in ``hold``."""
    return keys.service_key(SERVICE, "held", hold)


def warmup_key(domain: str, day: datetime.date) -> str:
    """Messages of a sending domain handed to Postfix on ``day``."""
    return keys.service_key(SERVICE, "warmup", domain, day.strftime("%Y%m%d"))


@dataclass(frozen=True)
class ProviderState:
    """A provider's shared back-off state (as read from Redis)."""

    until: float = 0.0
    kind: str = ""
    pauses: int = 0
    reason: str = ""
    resumed: bool = False

    @classmethod
    def decode(cls, row: Sequence[bytes | None]) -> ProviderState:
        """From ``HMGET until kind pauses reason resumed``."""

        def text(value: bytes | None) -> str:
            return value.decode("utf-8", "replace") if value else ""

        return cls(
            until=float(text(row[0]) or 0),
            kind=text(row[1]),
            pauses=int(float(text(row[2]) or 0)),
            reason=text(row[3]),
            resumed=bool(row[4]),
        )

    def paused(self, now: float) -> bool:
        """True while the provider is paused."""
        return self.until > now

    def rate_limit(self, limits: Limits, rules: Rules, now: float) -> float | None:
        """Messages per minute allowed now (0 while paused); None: no limit."""
        rate = limits.rate_per_minute or None
        if not self.until:
            return rate
        if self.paused(now):
            return 0.0
        backoff = rules.backoff
        steps = int((now - self.until) // backoff.ramp_step_seconds)
        base = rate * backoff.resume_factor if rate else backoff.resume_rate_per_minute
        ramped = base * 2.0 ** min(steps, 60)
        if rate:
            return rate if ramped >= rate else ramped
        return None if steps >= backoff.ramp_steps else ramped


@dataclass(frozen=True)
class Candidate:
    """An entry PostfixLog is about to hand to Postfix."""

    provider: str
    from_domain: str
    granted: bool


@dataclass(frozen=True)
class Hold:
    """Why and where an entry waits."""

    name: str  # provider:<p> or warmup:<domain>
    reason: str  # paused, rate, warmup
    provider: str


class ShapingMetrics(Protocol):
    """What the shaper counts (:class:`postfixlog.metrics.PostfixLogMetrics`)."""

    def shaped(self, provider: str, outcome: str, n: int) -> None:
        """Entries injected, held (paused, rate, warmup) or released, per provider label."""

    def provider_reply(self, provider: str, kind: str, n: int) -> None:
        """Slow-down/stop answers seen."""

    def provider_pause(self, provider: str, kind: str) -> None:
        """A pause this instance started."""

    def provider_resume(self, provider: str) -> None:
        """A resume this instance logged."""

    def provider_state(self, provider: str, paused: int, blocked: int, limit: float | None) -> None:
        """Current shared state per provider label."""

    def held(self, hold: str, n: int) -> None:
        """Entries waiting in a hold."""


class NoShapingMetrics:
    """Metrics sink for tests and tools."""

    def shaped(self, provider: str, outcome: str, n: int) -> None:
        """Ignore."""

    def provider_reply(self, provider: str, kind: str, n: int) -> None:
        """Ignore."""

    def provider_pause(self, provider: str, kind: str) -> None:
        """Ignore."""

    def provider_resume(self, provider: str) -> None:
        """Ignore."""

    def provider_state(self, provider: str, paused: int, blocked: int, limit: float | None) -> None:
        """Ignore."""

    def held(self, hold: str, n: int) -> None:
        """Ignore."""


class Shaper:
    """Admission, observation and release for one PostfixLog instance; the state is shared."""

    def __init__(
        self,
        client: redis.Redis,
        rules: Rules,
        *,
        incoming: str,
        metrics: ShapingMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis: redis.Redis = client
        self.rules = rules
        self.incoming = incoming
        self.metrics: ShapingMetrics = metrics or NoShapingMetrics()
        self.clock = clock
        self._observe = client.register_script(OBSERVE_SCRIPT)
        self._take = client.register_script(TAKE_SCRIPT)
        self._quota = client.register_script(QUOTA_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._labels_seen: set[str] = set()
        self._held_labels: set[str] = set()
        #: Providers paused at the last :meth:`tick`.
        self.paused: frozenset[str] = frozenset()

    def label(self, provider: str) -> str:
        """Metric label of a provider: its name when listed, else ``other`` (bounded cardinality)."""
        return provider if provider in self.rules.providers else OTHER

    # -- state -----------------------------------------------------------------------------

    def states(self, providers: Sequence[str]) -> dict[str, ProviderState]:
        """Shared state of each provider (one round trip).

        Raises:
            QueueUnavailableError: Redis is down.
        """
        if not providers:
            return {}
        with redis_errors("read provider states"):
            pipe = self.redis.pipeline(transaction=False)
            for provider in providers:
                pipe.hmget(state_key(provider), "until", "kind", "pauses", "reason", "resumed")
            rows = pipe.execute()
        return {p: ProviderState.decode(row) for p, row in zip(providers, rows, strict=True)}

    def _take_tokens(self, provider: str, wanted: int, per_minute: float, now: float) -> int:
        if wanted <= 0 or per_minute <= 0:
            return 0
        per_second = per_minute / 60.0
        burst = max(1.0, per_second * BURST_SECONDS)
        with redis_errors("take rate tokens"):
            return int(self._take(keys=[bucket_key(provider)], args=[per_second, burst, wanted, now]))

    # -- injection -------------------------------------------------------------------------

    def admit(self, candidates: Sequence[Candidate]) -> list[Hold | None]:
        """For each candidate: None (hand it to Postfix now) or where it waits.

        Raises:
            QueueUnavailableError: Redis is down (nothing was decided).
        """
        now = self.clock()
        holds: list[Hold | None] = [None] * len(candidates)
        states = self.states(sorted({c.provider for c in candidates}))
        by_provider: dict[str, list[int]] = defaultdict(list)
        for i, candidate in enumerate(candidates):
            by_provider[candidate.provider].append(i)
        for provider, indexes in by_provider.items():
            limits = self.rules.limits(provider)
            limit = states[provider].rate_limit(limits, self.rules, now)
            if limit is None:
                continue
            reason = "paused" if states[provider].paused(now) else "rate"
            wanted = [i for i in indexes if not candidates[i].granted or reason == "paused"]
            granted = 0 if reason == "paused" else self._take_tokens(provider, len(wanted), limit, now)
            for i in wanted[granted:]:
                holds[i] = Hold(f"provider:{provider}", reason, provider)
        self._warm_up(candidates, holds, now)
        counts: Counter[tuple[str, str]] = Counter()
        for candidate, hold in zip(candidates, holds, strict=True):
            counts[(self.label(candidate.provider), hold.reason if hold else "injected")] += 1
        for (label, outcome), n in counts.items():
            self.metrics.shaped(label, outcome, n)
        return holds

    def _warm_up(self, candidates: Sequence[Candidate], holds: list[Hold | None], now: float) -> None:
        if not self.rules.warmup:
            return
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        by_domain: dict[str, list[int]] = defaultdict(list)
        for i, candidate in enumerate(candidates):
            domain = candidate.from_domain.lower()
            if holds[i] is None and domain in self.rules.warmup:
                by_domain[domain].append(i)
        for domain, indexes in by_domain.items():
            limit = self.rules.warmup[domain].limit(today)
            if limit is None:
                continue
            with redis_errors("take warm-up volume"):
                granted = int(self._quota(keys=[warmup_key(domain, today)], args=[len(indexes), limit]))
            for i in indexes[granted:]:
                holds[i] = Hold(f"warmup:{domain}", "warmup", candidates[i].provider)

    def hold_writes(self, entry: Entry, hold: Hold) -> list[Write]:
        """What completes a held entry: a copy in its hold's stream and the hold's index entry."""
        now = repr(self.clock())
        fields: dict[str, bytes | str] = {
            k.decode(): v
            for k, v in entry.fields.items()
            if k != GRANT_FIELD.encode() and not k.startswith(HELD_PREFIX.encode())
        }
        fields[HELD_PREFIX + "reason"] = hold.reason
        fields[HELD_PREFIX + "at"] = now
        return [Output(held_key(hold.name), fields), HashWrite(HELD_INDEX, {hold.name: now}, HELD_INDEX_TTL_S)]

    def withdrawn_writes(self, fields: dict[str, bytes | str], provider: str) -> list[Write]:
        """Where a message withdrawn from Postfix (its provider is paused) waits: the provider's hold."""
        name = f"provider:{provider}"
        now = repr(self.clock())
        out = {**fields, HELD_PREFIX + "reason": "withdrawn", HELD_PREFIX + "at": now}
        self.metrics.shaped(self.label(provider), "withdrawn", 1)
        return [Output(held_key(name), out), HashWrite(HELD_INDEX, {name: now}, HELD_INDEX_TTL_S)]

    # -- outcomes --------------------------------------------------------------------------

    def observe(self, replies: Sequence[tuple[str, str]]) -> None:
        """Count the remote answers of (provider, reply text); pause providers that push back.

        Only real answers count (``host … said: …``), not Postfix' own notes such as "delivery
        temporarily suspended" that repeat an earlier answer for the queued messages.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        counted: Counter[tuple[str, str]] = Counter()
        last: dict[tuple[str, str], str] = {}
        for provider, text in replies:
            if " said: " not in text or text.startswith("delivery temporarily suspended"):
                continue
            kind = self.rules.limits(provider).classify(text)
            if kind is not None:
                counted[(provider, kind)] += 1
                last[(provider, kind)] = text
        now = self.clock()
        for (provider, kind), n in sorted(counted.items(), key=lambda item: item[0][1] != "stop"):
            self.metrics.provider_reply(self.label(provider), kind, n)
            limits = self.rules.limits(provider)
            if not limits.backoff:
                continue
            self._pause_if_due(provider, kind, n, last[(provider, kind)], now)

    def _pause_if_due(self, provider: str, kind: str, n: int, reason: str, now: float) -> None:
        backoff = self.rules.backoff
        with redis_errors("record provider answers"):
            paused, until, pauses = self._observe(
                keys=[state_key(provider), ACTIVE_KEY],
                args=[
                    provider,
                    kind,
                    n,
                    now,
                    backoff.threshold,
                    backoff.window_seconds,
                    backoff.pause_seconds,
                    backoff.max_pause_seconds,
                    backoff.stop_pause_seconds,
                    self.rules.ramp_seconds(provider),
                    reason[:300],
                ],
            )
        if int(paused):
            seconds = float(until) - now
            self.metrics.provider_pause(self.label(provider), kind)
            log.warning(
                "provider %s paused for %.0fs (%s, pause %d): %s; its messages wait in Redis",
                provider,
                seconds,
                "blocked: stop answer" if kind == "stop" else f"{backoff.threshold}+ slow-down answers",
                int(pauses),
                reason[:300],
            )

    # -- release and state (every instance, every second) ----------------------------------

    def tick(self) -> None:
        """Release held entries that may go, log resumes, refresh the gauges.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        now = self.clock()
        with redis_errors("read shaping state"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrangebyscore(ACTIVE_KEY, now, "+inf")
            pipe.zremrangebyscore(ACTIVE_KEY, "-inf", now)
            pipe.hkeys(HELD_INDEX)
            active_raw, _, holds_raw = pipe.execute()
        active = {a.decode() for a in active_raw}
        holds = sorted(h.decode() for h in holds_raw)
        held_providers = {h.partition(":")[2] for h in holds if h.startswith("provider:")}
        providers = sorted(set(self.rules.providers) | active | held_providers)
        states = self.states(providers)
        self.paused = frozenset(p for p, state in states.items() if state.paused(now))
        self._report(states, now)
        self._release_all(holds, states, now)

    def _report(self, states: dict[str, ProviderState], now: float) -> None:
        paused: Counter[str] = Counter()
        blocked: Counter[str] = Counter()
        limit: dict[str, float | None] = {}
        for provider, state in states.items():
            label = self.label(provider)
            is_paused = state.paused(now)
            paused[label] += int(is_paused)
            blocked[label] += int(is_paused and state.kind == "stop")
            if label != OTHER:
                limit[label] = state.rate_limit(self.rules.limits(provider), self.rules, now)
            if state.until and not is_paused and not state.resumed:
                self._log_resume(provider, state, now)
        for label in sorted(set(limit) | {OTHER} | self._labels_seen):
            self.metrics.provider_state(label, paused[label], blocked[label], limit.get(label))
        self._labels_seen |= set(limit)

    def _log_resume(self, provider: str, state: ProviderState, now: float) -> None:
        with redis_errors("mark resume"):
            first = self.redis.hsetnx(state_key(provider), "resumed", "1")
        if not first:
            return  # another instance logged it
        rate = state.rate_limit(self.rules.limits(provider), self.rules, now)
        self.metrics.provider_resume(self.label(provider))
        log.warning(
            "provider %s resumed after its pause (%s); sending at %s, doubling every %.0fs",
            provider,
            state.kind,
            "no limit" if rate is None else f"{rate:.0f}/min",
            self.rules.backoff.ramp_step_seconds,
        )

    def _release_all(self, holds: list[str], states: dict[str, ProviderState], now: float) -> None:
        if not holds:
            for label in self._held_labels:
                self.metrics.held(label, 0)
            return
        with redis_errors("size of holds"):
            pipe = self.redis.pipeline(transaction=False)
            for hold in holds:
                pipe.xlen(held_key(hold))
            waiting = dict(zip(holds, (int(n) for n in pipe.execute()), strict=True))
        totals: Counter[str] = Counter()
        for hold in holds:
            kind, _, subject = hold.partition(":")
            count, grant = self._releasable(kind, subject, waiting[hold], states, now)
            moved = 0
            if count > 0:
                with redis_errors(f"release {hold}"):
                    moved = int(
                        self._release(keys=[held_key(hold), self.incoming, HELD_INDEX], args=[count, grant, hold])
                    )
                if moved:
                    provider = subject if kind == "provider" else ""
                    self.metrics.shaped(self.label(provider) if provider else "warmup", "released", moved)
                    log.info("released %d held entries of %s", moved, hold)
            label = f"provider:{self.label(subject)}" if kind == "provider" else hold
            totals[label] += waiting[hold] - moved
        for label in set(totals) | self._held_labels:
            self.metrics.held(label, totals.get(label, 0))
        self._held_labels = set(totals)

    def _releasable(
        self, kind: str, subject: str, waiting: int, states: dict[str, ProviderState], now: float
    ) -> tuple[int, str]:
        """(entries to release now, grant) for one hold."""
        if waiting <= 0:
            return 0, ""
        want = min(waiting, RELEASE_BATCH)
        if kind == "provider":
            state = states.get(subject, ProviderState())
            limit = state.rate_limit(self.rules.limits(subject), self.rules, now)
            if limit is None:
                return want, ""
            return self._take_tokens(subject, want, limit, now), subject
        if kind == "warmup":
            rule = self.rules.warmup.get(subject)
            if rule is None:
                return want, ""  # the ramp was removed from the rules
            today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
            limit_today = rule.limit(today)
            if limit_today is None:
                return want, ""
            with redis_errors("read warm-up volume"):
                used = int(self.redis.get(warmup_key(subject, today)) or 0)
            return max(0, min(want, limit_today - used)), ""
        return want, ""


def safe_tick(shaper: Shaper) -> bool:
    """:meth:`Shaper.tick`, logging a Redis outage instead of raising; True when it ran."""
    try:
        shaper.tick()
    except TemporaryError as exc:
        log.warning("shaping tick skipped: %s", exc)
        return False
    return True
