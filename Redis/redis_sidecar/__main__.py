"""redis-sidecar: the Redis pod's launcher, queue exporter, backups and checks.

server:    restore the backup into an empty data directory, run redis-server, back up on stop
exporter:  serve queue depths and Redis health on /metrics, /healthz, /readyz
backup:    upload a snapshot of the running Redis to object storage now
restore:   restore the backup into an empty data directory (Redis stopped)
check:     check the configuration and the running server (exit 1 on a problem)
"""

from __future__ import annotations

import sys

from common import cli, logs
from redis_sidecar import commands

COMMANDS = {
    "server": commands.server,
    "exporter": commands.exporter,
    "backup": commands.backup,
    "restore": commands.restore_command,
    "check": commands.check,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``redis-sidecar`` console script."""
    parser = cli.parser("redis-sidecar", __doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, func in COMMANDS.items():
        command = sub.add_parser(name, help=(func.__doc__ or "").splitlines()[0])
        if name == "check":
            command.add_argument("--offline", action="store_true", help="skip the running server and bucket")
    args = parser.parse_args(argv)
    logs.setup("redis", args.log_level)
    config = cli.load(args, "redis")
    if args.command is None:
        parser.error("a COMMAND is required: " + ", ".join(COMMANDS))
    return COMMANDS[args.command](config, args)


if __name__ == "__main__":
    sys.exit(main())
