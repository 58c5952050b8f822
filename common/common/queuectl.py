"""``mailer-queue``: look at the queues and replay dead letters (an operator's tool).

``mailer-queue stats`` prints length, pending and dead-letter counts of every queue;
``mailer-queue dead QUEUE`` lists dead-lettered entries with their reasons;
``mailer-queue replay QUEUE [--id ID ...] [--count N]`` moves them back to the queue.

It reads the same two configuration files as the services (Redis of ``common-config.redis``).
"""

from __future__ import annotations

import sys
import time

from common import cli, keys, logs
from common.config import Config
from common.errors import TemporaryError
from common.queue import Queues, QueueSettings, connect


def _queues(config: Config) -> dict[str, str]:
    """Queue name -> consumer group."""
    g = config.global_
    return {
        g.reliable_queue.queue_names.primary_queue: keys.GROUP_TRANSFORMER,
        g.reliable_queue.queue_names.default_queue: keys.GROUP_TRANSFORMER,
        g.postfix.incoming_queue_name: keys.GROUP_POSTFIXLOG,
        g.backdata.queue_name: keys.GROUP_BACKDATA,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mailer-queue``."""
    parser = cli.parser("mailer-queue", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="length, pending and dead letters of every queue")
    dead = sub.add_parser("dead", help="list dead-lettered entries of a queue")
    dead.add_argument("queue")
    dead.add_argument("--count", type=int, default=20)
    replay = sub.add_parser("replay", help="move dead-lettered entries back to their queue")
    replay.add_argument("queue")
    replay.add_argument("--id", action="append", dest="ids", help="only this entry (repeatable)")
    replay.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    config = cli.load(args, "mailer-queue")  # needs no section of its own
    logs.setup("mailer-queue", args.log_level or "WARNING")
    queues = Queues(connect(config.redis_for("redis")), QueueSettings.from_config(config.global_))
    known = _queues(config)
    try:
        if args.command == "stats":
            sys.stdout.write(f"{'queue':28s} {'length':>8s} {'pending':>8s} {'dead':>8s}\n")
            for queue, group in known.items():
                s = queues.stats(queue, group)
                sys.stdout.write(f"{queue:28s} {s.length:8d} {s.pending:8d} {s.dead:8d}\n")
        elif args.command == "dead":
            for entry in queues.dead_letters(args.queue, args.count):
                fields = {k.decode(errors="replace"): v for k, v in entry.fields.items()}
                at = float(fields.get("dl-at", b"0") or 0)
                sys.stdout.write(
                    f"{entry.id}  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(at))}Z  "
                    f"deliveries={fields.get('dl-deliveries', b'?').decode()}  "
                    f"{fields.get('dl-reason', b'').decode(errors='replace')}\n"
                )
        else:
            moved = queues.replay_dead_letters(args.queue, args.ids, args.count)
            sys.stdout.write(f"replayed {moved} entries of {args.queue}\n")
    except TemporaryError as exc:
        sys.stderr.write(f"mailer-queue: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
