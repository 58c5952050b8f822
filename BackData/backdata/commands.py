"""Command line of the ``backdata`` console script.

``backdata [options]`` runs the service; ``backdata replay [--id ID ...] [--count N] [--list]
[--bounce-manager]`` puts dead-lettered events back into the event queue (each is then retried
for a fresh ``max-age-seconds``), or only lists them with ``--list``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backdata import SERVICE
from backdata.bouncemanager import STREAM as BOUNCE_MANAGER_STREAM
from backdata.delivery import REPLAYED_AT
from common import cli, queue
from common.config import Config
from common.errors import TemporaryError
from common.queue import Queues, QueueSettings


def arguments(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """Parse the command line (the config options are accepted before or after ``replay``)."""
    parser = cli.parser(SERVICE, description)
    sub = parser.add_subparsers(dest="command", metavar="{replay}")
    replay = sub.add_parser("replay", help="replay (or --list) dead-lettered events")
    for flag in ("--global-config-file", "--customer-config-file"):
        replay.add_argument(flag, type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    replay.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    replay.add_argument("--id", dest="ids", action="append", metavar="ID", help="dead-letter entry id (repeat)")
    replay.add_argument("--count", type=int, default=1000, help="oldest N entries (default 1000)")
    replay.add_argument("--list", action="store_true", help="only list the entries, replay nothing")
    replay.add_argument("--bounce-manager", action="store_true", help="the bounce-manager feed's dead letters instead")
    return parser.parse_args(argv)


def replay(config: Config, args: argparse.Namespace) -> int:
    """``backdata replay``: 0 when done, 1 when some ``--id`` was not found, 3 when Redis is down."""
    target = BOUNCE_MANAGER_STREAM if args.bounce_manager else config.global_.backdata.queue_name
    ids = list(dict.fromkeys(args.ids)) if args.ids else None
    client = queue.connect(config.redis_for(SERVICE), client_name=f"{SERVICE}-replay")
    queues = Queues(client, QueueSettings.from_config(config.global_))
    try:
        if args.list:
            for entry in queues.dead_letters(target, count=args.count):
                if ids and entry.id not in ids:
                    continue
                sys.stdout.write(_describe(entry.id, entry.fields) + "\n")
            return 0
        stamp = {REPLAYED_AT: repr(time.time())}
        done = queues.replay_dead_letters(target, ids, count=args.count, stamp=stamp)
    except TemporaryError as exc:
        sys.stderr.write(f"{SERVICE} replay: {exc}\n")
        return 3
    finally:
        client.close()
    sys.stdout.write(f"replayed {done} dead-lettered entries into {target}\n")
    if ids and done < len(ids):
        sys.stderr.write(f"{len(ids) - done} of the given ids are not in {target}:dead\n")
        return 1
    return 0


def _describe(entry_id: str, fields: dict[bytes, bytes]) -> str:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode("utf-8", "replace")

    kind = event_id = "?"
    try:
        event = json.loads(fields.get(b"data", b""))
        if isinstance(event, dict):
            kind, event_id = str(event.get("event", "?")), str(event.get("event_id", "?"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        kind = "(not JSON)"
    try:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(text("dl-at"))))
    except ValueError:
        at = "?"
    return f"{entry_id}\t{at}\t{kind}\t{event_id}\t{text('dl-reason')}"
