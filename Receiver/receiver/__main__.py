"""Receiver: SMTP submission (STARTTLS/implicit TLS + AUTH) into the P0/P1 mail queues.

Console script ``receiver``; ``receiver --hash-password`` prints a password hash for
``receiver.auth-logins``.
"""

from __future__ import annotations

import argparse

from common.service import ServiceSpec, run_service
from receiver.app import build, print_password_hash

SERVICE = "receiver"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hash-password", action="store_true", help="read a password and print its pbkdf2_sha256 hash")


SPEC = ServiceSpec(SERVICE, __doc__, build, arguments=_arguments, early=print_password_hash)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load and check the configuration, serve until SIGTERM; exit 0."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
