"""``backdata replay``: kept as an alias of ``mailer-queue`` (the one dead-letter tool).

``backdata replay [--id ID ...] [--count N] [--list] [--bounce-manager]`` runs
``mailer-queue replay EVENT_QUEUE …`` (``dead`` with ``--list``; ``bounce-manager`` instead of
the event queue with ``--bounce-manager``), with the same configuration files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import cli, queuectl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``replay`` subcommand (the config options are accepted before or after it)."""
    sub = parser.add_subparsers(dest="command", metavar="{replay}")
    replay = sub.add_parser("replay", help="alias of mailer-queue replay/dead for the event queue")
    for flag in ("--global-config-file", "--customer-config-file"):
        replay.add_argument(flag, type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    replay.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    replay.add_argument("--id", dest="ids", action="append", metavar="ID", help="dead-letter entry id (repeat)")
    replay.add_argument("--count", type=int, default=1000, help="oldest N entries (default 1000)")
    replay.add_argument("--list", action="store_true", help="only list the entries, replay nothing")
    replay.add_argument("--bounce-manager", action="store_true", help="the bounce-manager feed's dead letters instead")


def replay(args: argparse.Namespace) -> int | None:
    """Run ``backdata replay`` through ``mailer-queue``; None when the command is not ``replay``."""
    if getattr(args, "command", None) != "replay":
        return None
    global_path, customer_path = cli.config_paths(args)
    config = cli.load(args, queuectl.PROGRAM, check_only=False)
    queue = queuectl.BOUNCE_MANAGER if args.bounce_manager else config.global_.backdata.queue_name
    argv = ["--global-config-file", str(global_path), "--customer-config-file", str(customer_path)]
    if args.log_level:
        argv += ["--log-level", args.log_level]
    if args.list:
        argv += ["dead", queue, "--count", str(args.count)]
    else:
        argv += ["replay", queue, "--count", str(args.count)]
        for entry_id in args.ids or ():
            argv += ["--id", entry_id]
    sys.stderr.write(f"backdata replay: running mailer-queue {' '.join(argv[4:])}\n")
    return queuectl.main(argv)
