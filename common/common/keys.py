"""Every Redis key the platform uses, built in this one module (style anchor C6).

Queue streams (names configurable in the global file; defaults shown)::

  key                          type    producer(s)                      consumer group
  IB-MAIL-QUEUE-P0             STREAM  Receiver, HttpReceiver           transformer
  IB-MAIL-QUEUE-P1             STREAM  Receiver, HttpReceiver           transformer
  INCOMING-TO-POSTFIX          STREAM  Transformer, PostfixLog requeue  postfixlog
  EVENT_QUEUE                  STREAM  every service                    backdata
  <queue>:dead                 STREAM  the queue's consumers            (operators; replay CLI)

Each queue stream has exactly one consumer group, named after the consuming service.  PostfixLog
also reads ``XINFO CONSUMERS`` of ``INCOMING-TO-POSTFIX`` and deletes idle consumers of its group
that own nothing (``XGROUP DELCONSUMER``, postfixlog.membership); its scripts (``EVALSHA``) only
touch the keys listed here.  An entry
is deleted (XDEL) in the same MULTI/EXEC that acknowledges it, so a stream's length is the
number of entries not yet completed (waiting + pending).

Other keys::

  IB:address-secret                          STRING  generated address-tag secret (if not configured)
  IB:sent:<uuid>                             HASH    Transformer: recipient -> stream id, From domain (TTL:
                                                     common-config.binding-retention-days; common.binding)
  IB:postfixlog:qid:<instance>:<queue id>    HASH    PostfixLog instance: its Postfix' queue id -> uuid, recipient,
                                                     stream… (TTL; postfixlog.records)
  IB:postfixlog:tx:<token>                   HASH    PostfixLog: one injection (XFORWARD IDENT) -> same (TTL)
  IB:postfixlog:progress:<entry id>          HASH    PostfixLog: recipient -> sent/queued/refused (TTL)
  IB:postfixlog:position:<instance>          STRING  PostfixLog instance: its log position (inode:offset:fingerprint;
                                                     TTL postfixlog.instance-state-days, deleted when it retires)
  IB:postfixlog:instances                    ZSET    PostfixLog: instance -> last heartbeat (postfixlog.membership)
  IB:postfixlog:shaping:state:<provider>     HASH    PostfixLog (all instances): a provider's pause/ramp state (TTL;
                                                     postfixlog.shaping)
  IB:postfixlog:shaping:active               ZSET    PostfixLog: provider -> end of its pause and ramp
  IB:postfixlog:shaping:bucket:<provider>    HASH    PostfixLog: a provider's rate token bucket (TTL 1 h)
  IB:postfixlog:held:<hold>                  STREAM  PostfixLog -> PostfixLog: entries waiting (hold = provider:<p> or
                                                     warmup:<domain>); released back to INCOMING-TO-POSTFIX
  IB:postfixlog:held                         HASH    PostfixLog: hold -> time of its last held entry (TTL 30 d)
  IB:postfixlog:warmup:<domain>:<yyyymmdd>   STRING  PostfixLog: messages of a sending domain handed to Postfix that
                                                     UTC day (TTL 2 d)
  IB:postfixlog:qid:<queue id>               HASH    PostfixLog before 2.1 (read only, expires)
  IB:postfixlog:log-position                 HASH    PostfixLog before 2.1: instance -> position (read once, moved)
  IB:httpreceiver:idem:<user>:<key>          STRING  HttpReceiver: Idempotency-Key -> first answer (TTL 24 h)
  IB:<service>:authfail:<kind>:<id>          STRING  Receiver, HttpReceiver: failed logins per client address
                                                     (kind ip) and per account (kind user; TTL window; common.authguard)
  IB:<service>:authflight:<kind>:<id>        STRING  Receiver, HttpReceiver: logins being checked right now (TTL 60 s)
  IB:<service>:lockout:<kind>:<id>           STRING  Receiver, HttpReceiver: lockout marker per address / account (TTL)
  IB:health:<service>:<consumer>             STRING  worker heartbeat (TTL)
  IB:backdata:parked                         STREAM  BackData: events the webhook refused alone, with due time
  IB:backdata:bounce-manager                 STREAM  BackData: records for the bounce manager (group backdata)
  IB:backdata:bounce-manager:dead            STREAM  BackData: bounce-manager records past max-age
  IB:redis:last-backup                       STRING  Redis sidecar: time of the last periodic/manual backup
  IB:suppr:<reason>:<scope>:<address>        STRING  suppression entry (JSON; TTL retention of the reason;
                                                     common.suppression): written by BackData (from
                                                     events), HttpReceiver and mailer-suppressions (API,
                                                     CLI); read by the Transformer (MGET per batch),
                                                     HttpReceiver and mailer-suppressions (SCAN, GET, DEL)
  IB:suppr-fed:<event id>                    STRING  BackData: this event already fed the list (TTL
                                                     backdata.max-age-seconds + 1 day)
  IB:trace:<uuid>                            LIST    timeline of one message (JSON entries; TTL
                                                     common-config.trace.retention-days; common.trace):
                                                     appended by Receiver, HttpReceiver, Transformer,
                                                     PostfixLog (injector, log follower) and BackData in
                                                     the transactions that move the message; read by
                                                     HttpReceiver (GET /v1/messages/<uuid>) and
                                                     mailer-queue trace
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "IB"
DEAD_SUFFIX: Final = ":dead"

#: Consumer group of each queue (the consuming service).
GROUP_TRANSFORMER: Final = "transformer"
GROUP_POSTFIXLOG: Final = "postfixlog"
GROUP_BACKDATA: Final = "backdata"


def dead_letter(queue: str) -> str:
    """Dead-letter stream of ``queue``."""
    return queue + DEAD_SUFFIX


def service_key(service: str, *parts: str) -> str:
    """A key owned by one service: ``IB:<service>:<part>:<part>…``."""
    return ":".join((PREFIX, service, *parts))


ADDRESS_SECRET: Final = f"{PREFIX}:address-secret"


def sent_record(uuid: str) -> str:
    """Who the message ``uuid`` was sent to (:mod:`common.binding`)."""
    return f"{PREFIX}:sent:{uuid}"


#: BackData's feed of the customer's bounce manager (a stream with group ``backdata``).
BOUNCE_MANAGER_STREAM: Final = service_key("backdata", "bounce-manager")


#: Prefix of suppression entries (:mod:`common.suppression`).
SUPPRESSION_PREFIX: Final = f"{PREFIX}:suppr:"


def suppression(reason: str, scope: str, address: str) -> str:
    """One suppression entry: an address of a scope (From domain or stream id), for one reason."""
    return f"{SUPPRESSION_PREFIX}{reason}:{scope}:{address}"


def suppression_fed(event_id: str) -> str:
    """Marker: the event ``event_id`` has fed the suppression list (it feeds it once)."""
    return f"{PREFIX}:suppr-fed:{event_id}"


def trace(uuid: str) -> str:
    """The timeline of the message ``uuid`` (:mod:`common.trace`)."""
    return f"{PREFIX}:trace:{uuid}"


def heartbeat(service: str, consumer: str) -> str:
    """Liveness key a worker refreshes while its loop runs."""
    return service_key("health", service, consumer)
