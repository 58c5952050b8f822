"""What PostfixLog remembers in Redis about each message it handed to Postfix.

Keys (all built with :func:`common.keys.service_key`)::

  IB:postfixlog:tx:<token>                HASH    one injection attempt, written *before* the SMTP
                                                  transaction: ``d`` = JSON of uuid, recipient, return
                                                  path, From domain, stream id, provider and the
                                                  instance that sent it; the log follower adds ``qid``
                                                  when Postfix logs the token with its queue id
  IB:postfixlog:qid:<instance>:<queue id> HASH    the same ``d`` keyed by the instance and Postfix' queue
                                                  id (written by that instance's log follower when it
                                                  reads ``orig_queue_id=<token>``, or by its injector
                                                  after 250 if the follower has not yet); ``acc`` once
                                                  qmgr picked the file up, ``last-*`` the latest
                                                  deferral (for the expiry event)
  IB:postfixlog:progress:<entry id>       HASH    recipient -> t:<token> (sent, answer not recorded),
                                                  q:<queue id> (queued), r:<code> <reply> (refused)
  IB:postfixlog:position:<instance>       STRING  "<inode>:<offset>:<fingerprint>" of the instance's log

Every Postfix instance (one per delivery pod) has its own queue ids and its own log, so both are
keyed by the instance name (the consumer name, derived from the pod's stable name): two instances
can never read each other's records, even if their queue ids collided.  Tokens are random and
entries move between instances (a claimed entry), so ``tx`` and ``progress`` records are shared.

The token is Postfix' ``XFORWARD IDENT``: Postfix logs it as ``orig_queue_id=`` in the same line
that first names the queue id, so the follower never has to wait for the injector.

Lifetimes: ``qid`` records are deleted when Postfix logs ``removed`` (or the message is
requeued) and otherwise expire after twice the queue lifetime plus a day; ``tx`` and
``progress`` records are deleted once their queue entry is acknowledged and otherwise expire
after :data:`PROGRESS_TTL_S`; the position expires ``instance-state-days`` after the instance
was last seen, and is deleted when the instance drains cleanly (:mod:`postfixlog.membership`).

Before 2.1 there was one instance: ``IB:postfixlog:qid:<queue id>`` and the hash
``IB:postfixlog:log-position`` (instance -> position).  They are still read when the new keys
are missing, so an upgrade neither repeats nor loses events.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from common import keys

SERVICE: Final = "postfixlog"
PROGRESS_TTL_S: Final = 3 * 86400
#: Default lifetime of an instance's log position after its last write (postfixlog.instance-state-days).
POSITION_TTL_S: Final = 14 * 86400
#: Before 2.1: one hash of every instance's log position (read once, then moved).
LEGACY_POSITION_KEY: Final = keys.service_key(SERVICE, "log-position")

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# The scripts below write many records in one call: redis-py spends far more CPU per command
# than Redis does, and PostfixLog shares its cores with Postfix.  They run on the standalone
# Redis the platform uses (keys are passed in KEYS, as Redis asks).

#: Before a batch's transactions: per recipient the injection record and ``t:<token>``.
#: KEYS tx1, progress1, tx2, progress2…; ARGV ttl, then envelope JSON, recipient, progress value
#: per recipient.
PREWRITE_SCRIPT: Final = """
local ttl = ARGV[1]
for i = 1, #KEYS / 2 do
  local tx, progress, a = KEYS[2 * i - 1], KEYS[2 * i], 3 * i - 1
  redis.call('HSET', tx, 'd', ARGV[a])
  redis.call('EXPIRE', tx, ttl)
  redis.call('HSET', progress, ARGV[a + 1], ARGV[a + 2])
  redis.call('EXPIRE', progress, ttl)
end
return 1
"""
#: After a batch's transactions, per recipient (KEYS progress, tx, queue-id record; ARGV op,
#: recipient, progress value, envelope JSON, queue id; ARGV[1] = queue-id record ttl):
#: ``q`` queued -- progress, and the queue id's record unless the log follower already linked
#: the token (then it wrote the record and may have deleted it again on ``removed``);
#: ``r`` refused -- progress; ``x`` not queued -- forget the token.
FINALIZE_SCRIPT: Final = """
local ttl = ARGV[1]
for i = 1, #KEYS / 3 do
  local progress, tx, qk, a = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], 5 * i - 3
  local op, rcpt, value = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if op == 'q' then
    redis.call('HSET', progress, rcpt, value)
    if redis.call('HEXISTS', tx, 'qid') == 0 then
      redis.call('HSET', qk, 'd', ARGV[a + 3], 'qid', ARGV[a + 4])
      redis.call('EXPIRE', qk, ttl)
    end
  elseif op == 'r' then
    redis.call('HSET', progress, rcpt, value)
  else
    redis.call('HDEL', progress, rcpt)
    redis.call('DEL', tx)
  end
end
return 1
"""
#: The log follower's commit for one chunk of lines, atomic with the new position.
#: KEYS event queue, position key, then the records named in ARGV[1] (JSON: "link" token ->
#: queue id, written only into injection records that still exist; "set" record -> fields;
#: "del" records; "events" event JSON strings; "traces" [timeline key, entry] appended to the
#: messages' timelines (ARGV[4] their TTL, ARGV[5] their length cap); "pos" position) by their
#: index in KEYS.  ARGV[2] is the records' TTL, ARGV[3] the position's (instance-state-days).
COMMIT_SCRIPT: Final = """
local c = cjson.decode(ARGV[1])
local ttl = ARGV[2]
local position_ttl = ARGV[3]
for _, link in ipairs(c.link) do
  local key = KEYS[link[1]]
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'qid', link[2]) end
end
for _, set in ipairs(c.set) do
  local key = KEYS[set[1]]
  redis.call('HSET', key, unpack(set[2]))
  redis.call('EXPIRE', key, ttl)
end
for _, index in ipairs(c.del) do redis.call('DEL', KEYS[index]) end
for _, event in ipairs(c.events) do redis.call('XADD', KEYS[1], '*', 'data', event) end
for _, step in ipairs(c.traces) do
  local key = KEYS[step[1]]
  redis.call('RPUSH', key, step[2])
  redis.call('LTRIM', key, -tonumber(ARGV[5]), -1)
  redis.call('EXPIRE', key, ARGV[4])
end
redis.call('SET', KEYS[2], c.pos, 'EX', position_ttl)
return #c.events
"""


def tx_key(token: str) -> str:
    """Record of one injection attempt."""
    return keys.service_key(SERVICE, "tx", token)


def qid_key(instance: str, queue_id: str) -> str:
    """Record of one queue file of ``instance``'s Postfix."""
    return keys.service_key(SERVICE, "qid", instance, queue_id)


def legacy_qid_key(queue_id: str) -> str:
    """Record of a queue file before 2.1 (one instance); read when :func:`qid_key` is missing."""
    return keys.service_key(SERVICE, "qid", queue_id)


def position_key(instance: str) -> str:
    """Where ``instance``'s log follower stands in its log."""
    return keys.service_key(SERVICE, "position", instance)


def progress_key(entry_id: str) -> str:
    """Per-recipient progress of one ``INCOMING-TO-POSTFIX`` entry."""
    return keys.service_key(SERVICE, "progress", entry_id)


def postfix_seconds(value: str | int | bool, default_unit: str = "d") -> int:
    """Seconds of a Postfix time value such as ``12h``, ``5d`` or ``300`` (unit ``default_unit``).

    Raises:
        ValueError: not a Postfix time value.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(value))
    if match is None or isinstance(value, bool):
        raise ValueError(f"not a Postfix time value: {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2) or default_unit]


def qid_ttl_s(maximal_queue_lifetime: str | int | bool) -> int:
    """TTL of ``qid`` records: longer than any message can stay in Postfix' queue."""
    return 2 * postfix_seconds(maximal_queue_lifetime) + 86400


@dataclass(frozen=True)
class Delivery:
    """What an event needs to know about one (message, recipient) handed to Postfix."""

    uuid: str
    recipient: str
    mail_from: str
    from_domain: str
    stream_id: str | None = None
    submitted_at: float = 0.0
    token: str | None = None
    queue_id: str | None = None
    accepted: bool = False
    last_reason: str | None = None
    last_status: str | None = None
    last_ip: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    #: A final status line (sent, bounced, expired) was seen for this recipient.
    final: bool = False
    #: The provider the recipient's domain belongs to (:mod:`postfixlog.providers`).
    provider: str | None = None
    #: The PostfixLog instance that handed it to its Postfix.
    instance: str | None = None

    def envelope(self) -> str:
        """The fixed part of the record as one JSON field (``d``): cheap to write and read."""
        data: dict[str, object] = {
            "uuid": self.uuid,
            "rcpt": self.recipient,
            "from": self.mail_from,
            "fd": self.from_domain,
            "ts": self.submitted_at,
        }
        if self.stream_id is not None:
            data["stream"] = self.stream_id
        if self.token is not None:
            data["token"] = self.token
        if self.meta:
            data["meta"] = dict(self.meta)
        if self.provider is not None:
            data["prov"] = self.provider
        if self.instance is not None:
            data["inst"] = self.instance
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    def to_hash(self) -> dict[str, str]:
        """Fields of the Redis hash: ``d`` plus the fields the log follower maintains."""
        out = {"d": self.envelope()}
        optional = {
            "qid": self.queue_id,
            "acc": "1" if self.accepted else None,
            "last-reason": self.last_reason,
            "last-status": self.last_status,
            "last-ip": self.last_ip,
            "fin": "1" if self.final else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes] | None) -> Delivery | None:
        """Decode a Redis hash; None when the record does not exist or is incomplete."""
        if not raw or b"d" not in raw:
            return None
        try:
            data = json.loads(raw[b"d"])
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or "uuid" not in data or "rcpt" not in data:
            return None

        def text(name: bytes) -> str | None:
            value = raw.get(name)
            return value.decode("utf-8", "replace") if value is not None else None

        meta = data.get("meta") or {}
        return cls(
            uuid=str(data["uuid"]),
            recipient=str(data["rcpt"]),
            mail_from=str(data.get("from", "")),
            from_domain=str(data.get("fd", "")),
            stream_id=data.get("stream"),
            submitted_at=float(data.get("ts") or 0.0),
            token=data.get("token"),
            queue_id=text(b"qid"),
            accepted=raw.get(b"acc") == b"1",
            last_reason=text(b"last-reason"),
            last_status=text(b"last-status"),
            last_ip=text(b"last-ip"),
            meta={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
            final=raw.get(b"fin") == b"1",
            provider=data.get("prov"),
            instance=data.get("inst"),
        )

    def with_queue_id(self, queue_id: str, *, accepted: bool | None = None) -> Delivery:
        """A copy that knows its queue id."""
        return replace(self, queue_id=queue_id, accepted=self.accepted if accepted is None else accepted)


@dataclass(frozen=True)
class Progress:
    """State of one recipient of a queue entry, as stored in the progress hash."""

    kind: str  # "t" sent (token), "q" queued (queue id), "r" refused (reply)
    value: str

    def encode(self) -> str:
        """Hash field value."""
        return f"{self.kind}:{self.value}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Progress | None:
        """Parse a hash field value; None when unreadable."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        kind, sep, value = text.partition(":")
        if not sep or kind not in ("t", "q", "r"):
            return None
        return cls(kind, value)


@dataclass(frozen=True)
class Position:
    """Where the log follower stands in Postfix' log file."""

    inode: int
    offset: int
    fingerprint: str

    def encode(self) -> str:
        """Hash field value."""
        return f"{self.inode}:{self.offset}:{self.fingerprint}"

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Position | None:
        """Parse a stored position; None when absent or unreadable."""
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        parts = text.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            return None
        return cls(int(parts[0]), int(parts[1]), parts[2])
