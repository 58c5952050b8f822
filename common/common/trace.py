"""Where is my message?  The timeline of one uuid, written by every stage that moves it.

Key (documented in :mod:`common.keys`)::

  IB:trace:<uuid>   LIST   one compact JSON object per stage, oldest first; at most
                           ``common-config.trace.max-entries`` (older ones trimmed), expires
                           ``common-config.trace.retention-days`` (default 7) after the last one

Each entry is written *in the transaction that already moves the message* -- a
:class:`common.queue.ListAppend` among the outputs of a completed queue entry, or a few more
commands in a script or pipeline a stage sends anyway -- so tracing costs commands, not round
trips (``bench/pipeline --trace`` measures it).  Stages, in order:

==============  =======================  ====================================================
stage           written by               fields (besides ``at``, Unix seconds)
==============  =======================  ====================================================
``accepted``    Receiver, HttpReceiver   ``door`` (smtp/http), ``queue``, ``bytes``, ``recipients``
``signed``      Transformer              ``recipient``, ``message_id``, ``return_path``, ``bytes``
``suppressed``  Transformer              ``recipient``, ``reason``, ``since``, ``scope``
``failed``      Transformer              ``reason`` (dead-lettered with an ``error`` event)
``injected``    PostfixLog               ``recipient``, ``queue_id`` (Postfix' queue id)
``refused``     PostfixLog               ``recipient``, ``reply`` (the local Postfix said 5xx)
``attempt``     PostfixLog (its log)     ``recipient``, ``queue_id``, ``status`` (sent, deferred,
                                         bounced, expired), ``relay``, ``dsn``, ``reply``
``webhook``     BackData                 ``event``, ``event_id``, ``recipient``, ``outcome``
                                         (delivered, parked, retrying, dead-lettered), ``answer``
``listed``      BackData                 ``recipient``, ``reason``, ``scope``: the event fed the
                                         suppression list
==============  =======================  ====================================================

Values are short texts; replies are cut to :data:`MAX_TEXT` characters.  Nothing of the
message body is ever stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis

from common import keys, redisreply
from common.config import Config
from common.queue import ListAppend, write_all

#: Longest text kept in one field (remote replies can be long).
MAX_TEXT: Final = 500


@dataclass(frozen=True)
class TraceSettings:
    """``common-config.trace`` in the units the writers need."""

    enabled: bool = True
    ttl_s: int = 7 * 86400
    max_entries: int = 200

    @classmethod
    def from_config(cls, config: Config) -> TraceSettings:
        """The settings of the customer file."""
        section = config.customer.common_config.trace
        return cls(section.enabled, int(section.retention_days * 86400), section.max_entries)


DISABLED: Final = TraceSettings(enabled=False)


def entry(stage: str, *, at: float | None = None, **fields: Any) -> str:
    """One timeline entry as compact JSON (None values left out, long texts cut)."""
    record: dict[str, Any] = {"at": round(time.time() if at is None else at, 3), "stage": stage}
    for name, value in fields.items():
        if value is None:
            continue
        record[name] = value[:MAX_TEXT] if isinstance(value, str) else value
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def append(settings: TraceSettings, uuid: str | None, *entries: str) -> list[ListAppend]:
    """The write adding ``entries`` to the timeline of ``uuid`` (none when disabled or no uuid)."""
    if not settings.enabled or not uuid or not entries:
        return []
    return [ListAppend(keys.trace(uuid), entries, settings.max_entries, settings.ttl_s)]


def add_to(pipe: redisreply.Pipeline, settings: TraceSettings, uuid: str | None, *entries: str) -> None:
    """Queue the commands of :func:`append` on a pipeline the caller sends anyway."""
    write_all(pipe, append(settings, uuid, *entries))


def decode(raw: Sequence[bytes | str]) -> list[dict[str, Any]]:
    """The entries of an ``LRANGE``, in time order (unreadable ones are skipped)."""
    out: list[dict[str, Any]] = []
    for item in raw:
        try:
            value = json.loads(item)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(value, dict) and isinstance(value.get("at"), int | float):
            out.append(value)
    out.sort(key=lambda e: float(e["at"]))
    return out


def read(client: redis.Redis, uuid: str) -> list[dict[str, Any]]:
    """The timeline of ``uuid``: empty when unknown or expired.

    Raises:
        redis.exceptions.RedisError: Redis is down.
    """
    return decode(redisreply.strings(client.lrange(keys.trace(uuid), 0, -1)))


def timeline(uuid: str, entries: list[dict[str, Any]], settings: TraceSettings) -> dict[str, Any]:
    """The answer of ``GET /v1/messages/<uuid>`` (and ``mailer-queue trace --json``)."""
    out = []
    for item in entries:
        stamp = float(item["at"])
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}Z"
        out.append({"time": iso, **item})
    return {"uuid": uuid, "retention_days": round(settings.ttl_s / 86400, 3), "entries": out}


def format_line(item: Mapping[str, Any]) -> str:
    """One entry as a line of text (``mailer-queue trace``)."""
    stamp = float(item["at"])
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}"
    rest = "  ".join(f"{k}={v}" for k, v in item.items() if k not in ("at", "stage", "time"))
    return f"{when}  {item.get('stage', '?'):<10s}  {rest}"
