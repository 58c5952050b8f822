"""The delivery instances in Redis: who runs, stale consumers, and retiring a drained instance.

Any number of Postfix + PostfixLog pods (a StatefulSet) consume ``INCOMING-TO-POSTFIX`` as one
consumer group (``postfixlog``).  Each instance is named after its pod's stable name (the host
name of a StatefulSet pod: ``postfix-2`` -> consumer and instance ``postfixlog-postfix-2-0``,
or ``INBOXBOOSTER_CONSUMER_NAME``), and keeps its own state under that name: its log position
and its queue ids (:mod:`postfixlog.records`).  A pod that comes back with its volume finds
them again and resumes exactly where it stopped.

Keys::

  IB:postfixlog:instances  ZSET  instance name -> time of its last heartbeat

What keeps Redis from growing as instances come and go:

* heartbeat (:meth:`Membership.heartbeat`, every few seconds): the registry entry, and a fresh
  TTL on the instance's log position (``instance-state-days``);
* sweep (:meth:`Membership.sweep`, every instance, once a minute): consumers of the group that
  have been idle for ``stale-consumer-minutes`` *and* have nothing pending are deleted -- the
  check and the ``XGROUP DELCONSUMER`` are one script, so a consumer that still owns entries is
  never deleted (the others claim its entries first, then it goes); instances not seen for
  ``instance-state-days`` leave the registry (their position has expired by then);
* retire (:meth:`Membership.retire`, on SIGTERM, once Postfix' queue went back to Redis and the
  log was read to its end): the log is moved aside on the volume (``postfix.log.drained``), the
  position and the registry entry are deleted, and the consumer too when nothing is pending on
  it.  An instance scaled away this way leaves nothing behind; scaled up again, it starts fresh.

An instance that is killed (SIGKILL, node loss) keeps its state: it resumes when its pod comes
back with the volume; if it never does, its entries are claimed by the others after
``reliable-queue.claim-idle-seconds`` and its keys expire.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import redis

from common import keys, redisreply
from common.queue import redis_errors
from postfixlog import records

log = logging.getLogger(__name__)

INSTANCES_KEY: Final = keys.service_key(records.SERVICE, "instances")

#: KEYS stream, registry; ARGV group, min idle ms, name to keep, registry cutoff (epoch s).
#: Deletes idle consumers that own no pending entry; returns their names.
SWEEP_SCRIPT: Final = """
local removed = {}
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
  if ok then
    for _, c in ipairs(consumers) do
      local f = {}
      for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
      if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
        table.insert(removed, f['name'])
      end
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
return removed
"""

#: KEYS stream, registry, position; ARGV group, name.  Forgets the instance; deletes its
#: consumer unless entries are still pending on it.  Returns 1 when the consumer was deleted.
RETIRE_SCRIPT: Final = """
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] == ARGV[2] then
    if tonumber(f['pending']) > 0 then return 0 end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return 0
"""


class Membership:
    """One instance's part in the group: heartbeat, sweep, retire."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        name: str,
        stream: str,
        group: str,
        state_ttl_s: int,
        stale_consumer_s: float,
    ) -> None:
        self.redis: redis.Redis = client
        self.name = name
        self.stream = stream
        self.group = group
        self.state_ttl_s = state_ttl_s
        self.stale_consumer_s = stale_consumer_s
        self._sweep_script = client.register_script(SWEEP_SCRIPT)
        self._retire_script = client.register_script(RETIRE_SCRIPT)

    def heartbeat(self, now: float | None = None) -> None:
        """Note that this instance runs; keep its log position alive.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        with redis_errors("instance heartbeat"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(INSTANCES_KEY, {self.name: time.time() if now is None else now})
            pipe.expire(records.position_key(self.name), self.state_ttl_s)
            pipe.execute()

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete stale consumers of the group and forgotten instances; returns the consumers deleted.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        cutoff = (time.time() if now is None else now) - self.state_ttl_s
        with redis_errors("sweep stale consumers"):
            removed = self._sweep_script(
                keys=[self.stream, INSTANCES_KEY],
                args=[self.group, int(self.stale_consumer_s * 1000), self.name, cutoff],
            )
        names = [r.decode() if isinstance(r, bytes) else str(r) for r in removed]
        for name in names:
            log.info("removed consumer %s of group %s (idle, nothing pending)", name, self.group)
        return names

    def instances(self) -> dict[str, float]:
        """Registered instances and their last heartbeat.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        with redis_errors("list instances"):
            rows = redisreply.scored(self.redis.zrange(INSTANCES_KEY, 0, -1, withscores=True))
        return {redisreply.text(n): float(score) for n, score in rows}

    def retire(self) -> bool:
        """Forget this drained instance; True when its consumer could be deleted too.

        Raises:
            QueueUnavailableError: Redis is down.
        """
        with redis_errors("retire instance"):
            deleted = self._retire_script(
                keys=[self.stream, INSTANCES_KEY, records.position_key(self.name)], args=[self.group, self.name]
            )
        log.info(
            "instance %s retired: position and registry entry deleted%s",
            self.name,
            ", consumer deleted" if deleted else "; its consumer still owns pending entries (the others claim them)",
        )
        return bool(deleted)
