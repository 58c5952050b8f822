"""Receiver: SMTP submission (STARTTLS/implicit TLS + AUTH) into the P0/P1 mail queues.

Console script ``receiver``; ``receiver --hash-password`` prints a password hash for
``receiver.auth-logins``.
"""

from __future__ import annotations

import sys

from common import cli, logs
from receiver import app

SERVICE = "receiver"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load and check the configuration, serve until SIGTERM; exit 0."""
    parser = cli.parser(SERVICE, __doc__)
    parser.add_argument("--hash-password", action="store_true", help="read a password and print its pbkdf2_sha256 hash")
    args = parser.parse_args(argv)
    if args.hash_password:
        return app.print_password_hash()
    check_only, args.check_config = args.check_config, False
    config = cli.load(args, SERVICE)
    problems = app.preflight(config)
    if problems:
        sys.stderr.write(f"{SERVICE}: invalid configuration:\n" + "".join(f"  {p}\n" for p in problems))
        return cli.EXIT_CONFIG
    if check_only:
        sys.stdout.write(f"{SERVICE}: configuration OK ({args.global_config_file}, {args.customer_config_file})\n")
        return 0
    logs.setup(SERVICE, args.log_level)
    return app.run(config)


if __name__ == "__main__":
    sys.exit(main())
