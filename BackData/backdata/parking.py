"""Parking: events the webhook refuses on their own wait here, so they never block the others.

When the endpoint answers a 4xx (other than 408/429) the batch is split until the refused
events are alone; each of them is *parked*: moved, atomically with its acknowledgement (it is
an output of the completed entry), to the stream ``IB:backdata:parked`` with the time it is due
again (capped exponential backoff with jitter, never later than its age limit).  While an
event is parked the consumer keeps delivering everything else.

:meth:`Parking.requeue_due` (called by the consumer before each read) moves due events back to
the tail of the event queue, one Lua call each (remove from the parking stream and add to the
queue, only if the removal succeeded: two BackData replicas never requeue the same event
twice).  A requeued event is tried again like any other; past its age limit it is
dead-lettered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import redis

from common import keys, redisreply
from common.queue import Entry, Output, Queues, redis_errors
from common.retry import RetryPolicy

log = logging.getLogger(__name__)

#: The parking stream (documented in :mod:`common.keys`).
PARKED: Final = keys.service_key("backdata", "parked")
#: Field names added to a parked entry (``bd-parks`` stays when it is requeued).
DUE: Final = "bd-due"
PARKS: Final = "bd-parks"
REASON: Final = "bd-reason"
#: Where the event's age counts from (kept when it is requeued, so parking never extends it).
SINCE: Final = "bd-since"

_REQUEUE: Final = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
end
return false
"""


def parks(entry: Entry) -> int:
    """How often ``entry`` was parked before."""
    try:
        return int(entry.fields.get(PARKS.encode(), b"0"))
    except ValueError:
        return 0


class Parking:
    """The parking stream of one event queue."""

    def __init__(self, queues: Queues, queue: str, *, policy: RetryPolicy) -> None:
        self.queues = queues
        self.redis: redis.Redis = queues.redis
        self.queue = queue
        self.policy = policy
        self._script = self.redis.register_script(_REQUEUE)
        self._cursor = "-"

    def delay(self, times_parked: int) -> float:
        """Seconds until a parked event is tried again (the n-th park is attempt n + 1)."""
        return self.policy.delay(times_parked + 1)

    def output(self, entry: Entry, reason: str, *, since: float, not_after: float, now: float | None = None) -> Output:
        """The output that parks ``entry`` (write it with the entry's completion).

        ``since`` is where its age counts from, ``not_after`` its age limit: it is due again
        after a backoff, but never after the limit.
        """
        now = time.time() if now is None else now
        n = parks(entry)
        due = min(now + self.delay(n), max(not_after, now))
        fields: dict[str, bytes | str] = {
            k.decode("utf-8", "replace"): v for k, v in entry.fields.items() if not k.startswith(b"bd-")
        }
        fields.update({PARKS: str(n + 1), DUE: str(int(due * 1000)), REASON: reason[:500], SINCE: repr(since)})
        return Output(PARKED, fields)

    def requeue_due(self, limit: int = 500, now: float | None = None) -> int:
        """Move due parked events back to the queue; scans at most ``limit`` per call.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        now_ms = int((time.time() if now is None else now) * 1000)
        moved = 0
        with redis_errors(f"requeue from {PARKED}"):
            rows = redisreply.stream_rows(self.redis.xrange(PARKED, min=self._cursor, count=limit))
            self._cursor = f"({_id(rows[-1][0])}" if len(rows) == limit else "-"
            for raw_id, fields in rows:
                if _due(fields) > now_ms:
                    continue
                args: list[Any] = [_id(raw_id)]
                for name, value in fields.items():
                    if name not in (DUE.encode(), REASON.encode()):
                        args += [name, value]
                if self._script(keys=[PARKED, self.queue], args=args):
                    moved += 1
        if moved:
            log.info("requeued %d parked events to %s", moved, self.queue)
        return moved

    def count(self) -> int:
        """Events parked now.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        with redis_errors(f"length of {PARKED}"):
            return int(self.redis.xlen(PARKED))


def _due(fields: Mapping[bytes, bytes]) -> int:
    try:
        return int(fields.get(DUE.encode(), b"0"))
    except ValueError:
        return 0


def _id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
