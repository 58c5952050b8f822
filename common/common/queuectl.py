"""``mailer-queue``: look at the queues and manage their dead letters (an operator's tool).

Commands::

  mailer-queue stats                          length, pending and dead letters of every queue
  mailer-queue dead QUEUE [--count N]         list dead-lettered entries with their reasons
  mailer-queue replay QUEUE [--id ID]… [--count N]
                                              move dead letters back to their queue
  mailer-queue purge QUEUE --older-than AGE   delete dead letters older than AGE (e.g. 30d, 12h)
  mailer-queue trace UUID [--json]            the timeline of one message (common.trace): which
                                              door took it, its copies, Postfix' queue ids, every
                                              delivery attempt and webhook answer

QUEUE is a configured queue name (``IB-MAIL-QUEUE-P0``, ``IB-MAIL-QUEUE-P1``,
``INCOMING-TO-POSTFIX``, ``EVENT_QUEUE`` by default) or ``bounce-manager`` (BackData's feed of
its bounce manager).  A replayed event is retried by BackData for a fresh ``max-age-seconds``.

It reads the same two configuration files as the services (found as they find them: in a
checkout running ``./mailer up`` it needs no flags) and says on stderr which ones.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping

import redis

from common import cli, keys, logs, trace
from common.config import Config
from common.errors import TemporaryError
from common.queue import Entry, Queues, QueueSettings, connect

PROGRAM = "mailer-queue"
#: BackData's bounce-manager stream, replayable like a queue.
BOUNCE_MANAGER = "bounce-manager"
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def known_queues(config: Config) -> dict[str, tuple[str, str]]:
    """Name on the command line -> (stream, consumer group)."""
    g = config.global_
    queues = {
        g.reliable_queue.queue_names.primary_queue: keys.GROUP_TRANSFORMER,
        g.reliable_queue.queue_names.default_queue: keys.GROUP_TRANSFORMER,
        g.postfix.incoming_queue_name: keys.GROUP_POSTFIXLOG,
        g.backdata.queue_name: keys.GROUP_BACKDATA,
    }
    out = {name: (name, group) for name, group in queues.items()}
    out[BOUNCE_MANAGER] = (keys.BOUNCE_MANAGER_STREAM, keys.GROUP_BACKDATA)
    return out


def age_seconds(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` (seconds) -> seconds."""
    match = _AGE.match(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 30d, 12h, 90m or 3600")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def build_parser() -> argparse.ArgumentParser:
    """The ``mailer-queue`` argument parser."""
    parser = cli.parser(PROGRAM, __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("stats", help="length, pending and dead letters of every queue")
    dead = sub.add_parser("dead", help="list dead-lettered entries of a queue")
    dead.add_argument("queue", help="a configured queue name, or bounce-manager")
    dead.add_argument("--count", type=int, default=20, help="oldest N entries (default 20)")
    replay = sub.add_parser("replay", help="move dead-lettered entries back to their queue")
    replay.add_argument("queue", help="a configured queue name, or bounce-manager")
    replay.add_argument("--id", action="append", dest="ids", metavar="ID", help="only this entry (repeatable)")
    replay.add_argument("--count", type=int, default=1000, help="oldest N entries (default 1000)")
    purge = sub.add_parser("purge", help="delete dead letters older than an age")
    purge.add_argument("queue", help="a configured queue name, or bounce-manager")
    purge.add_argument("--older-than", type=age_seconds, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m")
    traced = sub.add_parser("trace", help="the timeline of one message")
    traced.add_argument("uuid", help="the X-Uuid of the message")
    traced.add_argument("--json", action="store_true", help="the JSON of GET /v1/messages/<uuid>")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mailer-queue``: 0 done, 1 an ``--id`` or traced uuid not found, 2 usage/config, 3 no Redis."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = cli.load(args, PROGRAM, announce=True)
    logs.setup(PROGRAM, args.log_level or "WARNING")
    known = known_queues(config)
    if args.command == "trace":
        return _trace(args, config)
    if args.command != "stats" and args.queue not in known:
        sys.stderr.write(f"{PROGRAM}: unknown queue {args.queue!r}; known queues: {', '.join(known)}\n")
        return 2
    client = connect(config.redis_for("redis"), client_name=PROGRAM)
    queues = Queues(client, QueueSettings.from_config(config.global_))
    try:
        return _run(args, queues, known)
    except TemporaryError as exc:
        sys.stderr.write(f"{PROGRAM}: {exc}\n")
        return 3
    finally:
        client.close()


def _run(args: argparse.Namespace, queues: Queues, known: Mapping[str, tuple[str, str]]) -> int:
    out = sys.stdout
    if args.command == "stats":
        out.write(f"{'queue':28s} {'length':>8s} {'pending':>8s} {'dead':>8s}\n")
        for name, (stream, group) in known.items():
            s = queues.stats(stream, group)
            out.write(f"{name:28s} {s.length:8d} {s.pending:8d} {s.dead:8d}\n")
        return 0
    stream = known[args.queue][0]
    if args.command == "dead":
        for entry in queues.dead_letters(stream, args.count):
            out.write(describe(entry) + "\n")
        return 0
    if args.command == "purge":
        removed = queues.purge_dead_letters(stream, args.older_than)
        out.write(f"purged {removed} dead-lettered entries of {args.queue}\n")
        return 0
    ids = list(dict.fromkeys(args.ids)) if args.ids else None
    moved = queues.replay_dead_letters(stream, ids, args.count)
    out.write(f"replayed {moved} dead-lettered entries of {args.queue}\n")
    if ids and moved < len(ids):
        sys.stderr.write(f"{PROGRAM}: {len(ids) - moved} of the given ids are not in {keys.dead_letter(stream)}\n")
        return 1
    return 0


def _trace(args: argparse.Namespace, config: Config) -> int:
    """``trace UUID``: 0 found, 1 unknown uuid, 3 Redis down."""
    settings = trace.TraceSettings.from_config(config)
    client = connect(config.redis_for("redis"), client_name=PROGRAM)
    try:
        entries = trace.read(client, args.uuid)
    except redis.exceptions.RedisError as exc:
        sys.stderr.write(f"{PROGRAM}: Redis unavailable: {exc}\n")
        return 3
    finally:
        client.close()
    if not entries:
        sys.stderr.write(
            f"{PROGRAM}: no message with uuid {args.uuid} is known (never submitted, or its timeline expired: "
            f"common-config.trace.retention-days = {settings.ttl_s / 86400:g})\n"
        )
        return 1
    if args.json:
        sys.stdout.write(json.dumps(trace.timeline(args.uuid, entries, settings), ensure_ascii=False) + "\n")
    else:
        for item in entries:
            sys.stdout.write(trace.format_line(item) + "\n")
    return 0


def describe(entry: Entry) -> str:
    """One line per dead letter: id, time, deliveries, what it was (event kind) and the reason."""
    fields = {k.decode(errors="replace"): v for k, v in entry.fields.items()}

    def text(name: str) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    try:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(text("dl-at"))))
    except ValueError:
        at = "?"
    what = text("uuid") or "-"
    return f"{entry.id}  {at}  deliveries={text('dl-deliveries') or '?'}  uuid={what}  {text('dl-reason')}"


if __name__ == "__main__":
    raise SystemExit(main())
