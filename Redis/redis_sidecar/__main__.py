"""redis-sidecar: the Redis pod's launcher, queue exporter, backups and checks.

server:    restore the backup into an empty data directory, run redis-server, back up on stop
exporter:  serve queue depths and Redis health on /metrics, /healthz, /readyz
sentinel:  run one Redis Sentinel (deploy/ha), watching the primary it finds at start
backup:    upload a snapshot of the running Redis to object storage now
restore:   restore the backup into an empty data directory (Redis stopped)
check:     check the configuration and the running server (exit 1 on a problem)
"""

from __future__ import annotations

import argparse
import sys

from common.service import ServiceSpec, run_service
from redis_sidecar import commands

DESCRIPTIONS = {
    "server": "run redis-server (restore before, back up on stop)",
    "exporter": "serve /metrics, /healthz and /readyz until SIGTERM",
    "sentinel": "run one Redis Sentinel (deploy/ha) until SIGTERM",
    "backup": "upload a BGSAVE snapshot of the running Redis now",
    "restore": "restore the backup into an empty data directory (Redis must not be running on it)",
    "check": "print the checks; exit 1 when there is a problem",
}


def _arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in DESCRIPTIONS.items():
        command = sub.add_parser(name, help=text)
        if name == "check":
            command.add_argument("--offline", action="store_true", help="skip the running server and bucket")


def _command_needed(args: argparse.Namespace) -> int | None:
    """A COMMAND is required, except to check the configuration."""
    if args.command is None and not args.check_config:
        sys.stderr.write("redis-sidecar: a COMMAND is required: " + ", ".join(DESCRIPTIONS) + "\n")
        return 2
    return None


def _config_service(args: argparse.Namespace) -> str:
    """A sentinel reads only the sentinel passwords (``redis-sentinel``); everything else the Redis pod's."""
    return "redis-sentinel" if args.command == "sentinel" else "redis"


SPEC = ServiceSpec(
    "redis-sidecar",
    __doc__,
    commands.build,
    arguments=_arguments,
    early=_command_needed,
    config_service=_config_service,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``redis-sidecar`` console script."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
