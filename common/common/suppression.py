r"""The suppression list: addresses the platform refuses to send to, per scope and reason.

Fed by BackData from the events on their way to the customer (:func:`reason_of`):

==============  ========================================================================
reason          fed by
==============  ========================================================================
``bounce``      a ``bounce`` event with ``suppress: true`` (the address is dead: user
                unknown, domain unknown, mailbox disabled, moved -- :mod:`common.bounces`)
``spam-report`` every ``spam-report`` event (ARF complaint)
``unsubscribe`` every ``unsubscribe`` event (one-click and mailto)
``manual``      the API (``PUT /v1/suppressions/<scope>/<address>``) and ``mailer-suppressions``
==============  ========================================================================

Checked by the Transformer before signing, one ``MGET`` per batch (:meth:`SuppressionList.check`):
a recipient with an enforced entry gets no copy; the customer gets a ``suppressed`` event
instead.  Each reason has its policy (``common-config.suppression.reasons.<reason>``):
``enforce`` (default true), ``enforce-days`` (enforced while the last event is younger; default:
bounces 30 days, the rest as long as the entry exists) and ``retention-days`` (the key's TTL,
renewed by every new event: bounces 90 days, the rest 10 years).

The *scope* (``common-config.suppression.scope``) is the From domain (``domain``, the default)
or the ``X-Stream-Id`` (``stream``; a message without one uses its From domain).  Addresses
are compared in lower case.

Keys (:mod:`common.keys`)::

  IB:suppr:<reason>:<scope>:<address>   STRING  JSON {scope, address, reason, first, last,
                                                event_id, uuid, count}; TTL retention-days
  IB:suppr-fed:<event id>               STRING  the event already fed the list (feeding is
                                                once per event, so a customer's DELETE is not
                                                undone by a retried delivery of the same event)

``first``/``last`` are the times (Unix seconds) of the first and the latest event, ``event_id``
and ``uuid`` those of the latest one, ``count`` how many events fed the entry.  Memory per
entry: ``bench/suppression`` measures it (about 200 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis

from common import keys
from common.config import Config
from common.config.commonconfig import ReasonPolicy
from common.queue import redis_errors

REASONS: Final = ("bounce", "spam-report", "unsubscribe", "manual")
#: When an address has entries for several reasons, the one a ``suppressed`` event names.
PRECEDENCE: Final = ("unsubscribe", "spam-report", "manual", "bounce")
SCOPES: Final = ("domain", "stream")
#: Longest address and scope accepted (RFC 5321 path limit; a stream id is a header value).
MAX_ADDRESS: Final = 320
MAX_SCOPE: Final = 255

#: KEYS: fed marker, entry.  ARGV: marker TTL (0: no marker), entry TTL, scope, address, reason,
#: time, event id, uuid.  Creates or updates the entry (first = earliest, last = latest time,
#: count + 1) unless the marker says this event already fed it; returns 1 when written.
FEED_SCRIPT: Final = """
if ARGV[1] ~= '0' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
end
local at = tonumber(ARGV[6])
local e = {scope = ARGV[3], address = ARGV[4], reason = ARGV[5], first = at, last = at,
           event_id = ARGV[7], uuid = ARGV[8], count = 1}
local old = redis.call('GET', KEYS[2])
if old then
  local ok, prev = pcall(cjson.decode, old)
  if ok and type(prev) == 'table' then
    local first, last = tonumber(prev.first), tonumber(prev.last)
    if first and first < at then e.first = first end
    if last and last > at then
      e.last = last
      e.event_id = prev.event_id
      e.uuid = prev.uuid
    end
    e.count = (tonumber(prev.count) or 1) + 1
  end
end
if e.uuid == '' then e.uuid = nil end
if e.event_id == '' then e.event_id = nil end
redis.call('SET', KEYS[2], cjson.encode(e), 'EX', ARGV[2])
return 1
"""


def normalise_address(address: str) -> str:
    """An address as the list keys it: without brackets and surrounding space, lower case."""
    return address.strip().strip("<>").strip().lower()


#: Characters of an address part: printable ASCII but ``/ < > @`` and space, or U+00A1-U+FFFF
#: (the API's contract uses the same classes, ``HttpReceiver/httpreceiver/openapi.yaml``).
ADDRESS_CHARS: Final = "!-.0-;=?A-~\u00a1-\uffff"
#: Characters of a scope: printable ASCII but ``/`` and space, or U+00A1-U+FFFF.
SCOPE_CHARS: Final = "!-.0-~\u00a1-\uffff"
_ADDRESS: Final = re.compile(f"[{ADDRESS_CHARS}]+@[{ADDRESS_CHARS}]+")
_SCOPE: Final = re.compile(f"[{SCOPE_CHARS}]+")


def valid_address(address: str) -> bool:
    """True for something that can be a recipient address (``local@domain``, no space or control)."""
    return len(address) <= MAX_ADDRESS and _ADDRESS.fullmatch(address) is not None


def valid_scope(scope: str) -> bool:
    """True for a usable scope (From domain or stream id)."""
    return len(scope) <= MAX_SCOPE and _SCOPE.fullmatch(scope) is not None


@dataclass(frozen=True)
class Policy:
    """One reason's policy in seconds."""

    enforce: bool
    enforce_s: float | None
    retention_s: int

    @classmethod
    def of(cls, section: ReasonPolicy) -> Policy:
        """From its configuration."""
        enforce_s = None if section.enforce_days is None else section.enforce_days * 86400
        return cls(section.enforce, enforce_s, int(section.retention_days * 86400))


def _default_policies() -> dict[str, Policy]:
    from common.config.commonconfig import SuppressionReasons

    return _policies(SuppressionReasons())


def _policies(reasons: Any) -> dict[str, Policy]:
    return {reason: Policy.of(getattr(reasons, reason.replace("-", "_"))) for reason in REASONS}


@dataclass(frozen=True)
class SuppressionSettings:
    """``common-config.suppression``."""

    enabled: bool = True
    scope: str = "domain"
    policies: Mapping[str, Policy] = field(default_factory=_default_policies)

    @classmethod
    def from_config(cls, config: Config) -> SuppressionSettings:
        """The settings of the customer file."""
        section = config.customer.common_config.suppression
        return cls(section.enabled, section.scope, _policies(section.reasons))

    def scope_of(self, from_domain: str | None, stream_id: str | None) -> str | None:
        """The scope of a message (see the module docstring); None when nothing names one."""
        if self.scope == "stream" and stream_id:
            return stream_id
        return from_domain.strip().lower().rstrip(".") if from_domain else None


@dataclass(frozen=True)
class Entry:
    """One suppression entry."""

    scope: str
    address: str
    reason: str
    first: float
    last: float
    event_id: str | None = None
    uuid: str | None = None
    count: int = 1
    #: Seconds until the key expires (filled in where it was read; None: unknown or no TTL).
    expires_in: int | None = None

    @property
    def key(self) -> str:
        """Its Redis key."""
        return keys.suppression(self.reason, self.scope, self.address)

    def to_dict(self) -> dict[str, Any]:
        """The API's and the export's representation."""
        out: dict[str, Any] = {
            "scope": self.scope,
            "address": self.address,
            "reason": self.reason,
            "first": _number(self.first),
            "last": _number(self.last),
            "count": self.count,
        }
        if self.event_id:
            out["event_id"] = self.event_id
        if self.uuid:
            out["uuid"] = self.uuid
        if self.expires_in is not None:
            out["expires_in"] = self.expires_in
        return out

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Entry | None:
        """An entry from its stored JSON; None when absent or unreadable."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(
                scope=str(data["scope"]),
                address=str(data["address"]),
                reason=str(data["reason"]),
                first=float(data["first"]),
                last=float(data["last"]),
                event_id=data.get("event_id") or None,
                uuid=data.get("uuid") or None,
                count=int(data.get("count") or 1),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def reason_of(event: Mapping[str, Any]) -> str | None:
    """The reason an event feeds the list for, or None (see the module docstring)."""
    kind = event.get("event")
    if kind == "bounce" and event.get("suppress") is True:
        return "bounce"
    if kind in ("spam-report", "unsubscribe"):
        return str(kind)
    return None


@dataclass(frozen=True)
class Filters:
    """What ``GET /v1/suppressions`` and ``mailer-suppressions list`` select."""

    scope: str | None = None
    reason: str | None = None
    #: Part of the address (case-insensitive).
    address: str | None = None
    #: Only entries whose last event is at or after this time (Unix seconds).
    since: float | None = None

    def pattern(self) -> str:
        """The SCAN MATCH pattern."""
        reason = _glob(self.reason) if self.reason else "*"
        scope = _glob(self.scope) if self.scope else "*"
        address = f"*{_glob(normalise_address(self.address))}*" if self.address else "*"
        return f"{keys.SUPPRESSION_PREFIX}{reason}:{scope}:{address}"

    def accepts(self, entry: Entry) -> bool:
        """The checks a glob cannot make exactly."""
        if self.scope is not None and entry.scope != self.scope:
            return False
        if self.reason is not None and entry.reason != self.reason:
            return False
        if self.address is not None and normalise_address(self.address) not in entry.address:
            return False
        return self.since is None or entry.last >= self.since


def _glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(frozen=True)
class Page:
    """One page of a listing; ``cursor`` is None after the last page."""

    entries: list[Entry]
    cursor: str | None


class SuppressionList:
    """Reading and writing the list (Transformer, BackData, HttpReceiver, mailer-suppressions)."""

    def __init__(self, client: redis.Redis, settings: SuppressionSettings) -> None:
        self.redis: redis.Redis = client
        self.settings = settings
        self._feed = client.register_script(FEED_SCRIPT)

    # -- enforcing (Transformer) -----------------------------------------------------------

    def enforced(self, entry: Entry, now: float) -> bool:
        """True when ``entry`` stops a send now (its reason is enforced and still in its window)."""
        policy = self.settings.policies.get(entry.reason)
        if policy is None or not policy.enforce:
            return False
        return policy.enforce_s is None or now - entry.last < policy.enforce_s

    def check(self, pairs: Iterable[tuple[str, str]], now: float | None = None) -> dict[tuple[str, str], Entry]:
        """The enforced entry of each (scope, address) that has one -- one MGET for all.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        now = time.time() if now is None else now
        reasons = [r for r in PRECEDENCE if self.settings.policies[r].enforce]
        wanted = list(dict.fromkeys((scope, normalise_address(address)) for scope, address in pairs))
        if not wanted or not reasons:
            return {}
        names = [keys.suppression(r, scope, address) for scope, address in wanted for r in reasons]
        with redis_errors("read the suppression list"):
            values = self.redis.mget(names)
        found: dict[tuple[str, str], Entry] = {}
        for i, pair in enumerate(wanted):
            for j in range(len(reasons)):
                entry = Entry.decode(values[i * len(reasons) + j])
                if entry is not None and self.enforced(entry, now):
                    found[pair] = entry
                    break
        return found

    # -- feeding (BackData) ----------------------------------------------------------------

    def feed(
        self,
        pipe: redis.client.Pipeline,
        *,
        scope: str,
        address: str,
        reason: str,
        at: float,
        event_id: str | None,
        uuid: str | None,
        once_for_s: int,
    ) -> None:
        """Queue the feed of one event on ``pipe`` (a pipeline the caller executes).

        ``once_for_s`` > 0: the event feeds the list at most once within that time (marker key).
        """
        address = normalise_address(address)
        policy = self.settings.policies[reason]
        marker = (
            keys.suppression_fed(event_id) if event_id and once_for_s > 0 else keys.suppression(reason, scope, address)
        )
        self._feed(
            keys=[marker, keys.suppression(reason, scope, address)],
            args=[
                once_for_s if event_id and once_for_s > 0 else 0,
                policy.retention_s,
                scope,
                address,
                reason,
                int(at),
                event_id or "",
                uuid or "",
            ],
            client=pipe,
        )

    # -- managing (API, CLI) ---------------------------------------------------------------

    def get(self, scope: str, address: str) -> list[Entry]:
        """Every entry (one per reason) of an address in a scope, with its time to live."""
        address = normalise_address(address)
        names = [keys.suppression(r, scope, address) for r in REASONS]
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(names)
        for name in names:
            pipe.ttl(name)
        values, *ttls = pipe.execute()
        out = []
        for value, ttl in zip(values, ttls, strict=True):
            entry = Entry.decode(value)
            if entry is not None:
                out.append(_with_ttl(entry, ttl))
        return out

    def put(
        self,
        scope: str,
        address: str,
        reason: str = "manual",
        *,
        at: float | None = None,
        event_id: str | None = None,
        uuid: str | None = None,
    ) -> Entry:
        """Add an entry by hand, or renew one (as a new event would); returns it as stored.

        Raises:
            LookupError: it was not there right after writing it (Redis lost it).
        """
        pipe = self.redis.pipeline(transaction=True)
        self.feed(
            pipe,
            scope=scope,
            address=address,
            reason=reason,
            at=time.time() if at is None else at,
            event_id=event_id,
            uuid=uuid,
            once_for_s=0,
        )
        pipe.execute()
        found = [e for e in self.get(scope, address) if e.reason == reason]
        if not found:
            raise LookupError(f"the entry {scope}/{address} ({reason}) was not stored")
        return found[0]

    def store(self, entries: Sequence[Entry]) -> int:
        """Write entries exactly as given (import; an existing entry is replaced), in one MULTI/EXEC.

        Each key gets its reason's retention from now.  Returns how many were written.
        """
        if not entries:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        for entry in entries:
            data = entry.to_dict()
            data.pop("expires_in", None)
            value = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
            pipe.set(entry.key, value, ex=self.settings.policies[entry.reason].retention_s)
        pipe.execute()
        return len(entries)

    def delete(self, scope: str, address: str, reason: str | None = None) -> int:
        """Remove an address' entries (one reason, or all); returns how many existed."""
        address = normalise_address(address)
        names = [keys.suppression(r, scope, address) for r in ([reason] if reason else REASONS)]
        return int(self.redis.delete(*names))

    def page(self, filters: Filters, cursor: str | None = None, limit: int = 100) -> Page:
        """Up to about ``limit`` entries after ``cursor`` (a SCAN cursor; None or "0" starts).

        The listing is a Redis SCAN: an entry present during the whole listing is returned at
        least once (rarely twice, when Redis grows its table meanwhile); the order is Redis'.
        A page stops at ``limit`` entries or after scanning ``50 * limit`` keys, whichever
        comes first, so a page may be short (even empty) while ``cursor`` is not None.
        """
        position = int(cursor or 0)
        pattern = filters.pattern()
        found: list[Entry] = []
        scanned = 0
        count = max(min(limit * 10, 5000), 100)
        while True:
            position, names = self.redis.scan(cursor=position, match=pattern, count=count)
            scanned += count
            if names:
                found.extend(self._entries(names, filters))
            if position == 0 or len(found) >= limit or scanned >= 50 * limit:
                break
        return Page(found, None if position == 0 else str(position))

    def iterate(self, filters: Filters) -> Iterator[Entry]:
        """Every entry the filters select (export)."""
        cursor: str | None = None
        while True:
            page = self.page(filters, cursor, limit=1000)
            yield from page.entries
            if page.cursor is None:
                return
            cursor = page.cursor

    def _entries(self, names: list[Any], filters: Filters) -> list[Entry]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(names)
        for name in names:
            pipe.ttl(name)
        values, *ttls = pipe.execute()
        out = []
        for value, ttl in zip(values, ttls, strict=True):
            entry = Entry.decode(value)
            if entry is not None and filters.accepts(entry):
                out.append(_with_ttl(entry, ttl))
        return out


def _with_ttl(entry: Entry, ttl: Any) -> Entry:
    seconds = int(ttl) if isinstance(ttl, int) else -1
    if seconds < 0:
        return entry
    return dataclasses.replace(entry, expires_in=seconds)


# -- import and export formats --------------------------------------------------------------

CSV_COLUMNS: Final = ("scope", "address", "reason", "first", "last", "event_id", "uuid", "count")


def parse_record(record: Mapping[str, Any], default_scope: str | None = None) -> Entry:
    """An entry from an imported CSV row or JSON line.

    Only ``address`` is required (``scope`` may come from ``default_scope``); ``reason``
    defaults to ``manual``, times to now, ``count`` to 1.

    Raises:
        ValueError: the record is not a valid entry (the message says why).
    """
    address = normalise_address(str(record.get("address") or record.get("email") or ""))
    scope = str(record.get("scope") or record.get("domain") or default_scope or "").strip()
    reason = str(record.get("reason") or "manual").strip()
    if not valid_address(address):
        raise ValueError(f"not an address: {address[:100]!r}")
    if not valid_scope(scope):
        raise ValueError("scope (the From domain or stream id) is missing or invalid")
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {', '.join(REASONS)}, not {reason[:40]!r}")
    now = float(int(time.time()))
    last = _time(record.get("last")) or now
    first = min(_time(record.get("first")) or last, last)
    count = record.get("count")
    return Entry(
        scope,
        address,
        reason,
        first,
        last,
        str(record["event_id"]) if record.get("event_id") else None,
        str(record["uuid"]) if record.get("uuid") else None,
        int(count) if isinstance(count, int | str) and str(count).isdigit() and int(count) > 0 else 1,
    )


def _time(value: Any) -> float:
    if value in (None, ""):
        return 0.0
    try:
        stamp = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"time {str(value)[:40]!r} is not Unix seconds") from None
    if stamp < 0 or stamp > 2**33:
        raise ValueError(f"time {stamp!r} is out of range")
    return stamp
