"""Command-line plumbing shared by every service entry point.

Every service accepts the original's ``--global-config-file`` / ``--customer-config-file``,
plus ``--check-config`` (validate, print the result, exit 0 or 2) and ``--log-level``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import DEFAULT_CUSTOMER_FILE, DEFAULT_GLOBAL_FILE, Config, load_config
from common.errors import ConfigError

EXIT_CONFIG = 2


def parser(service: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every service shares."""
    p = argparse.ArgumentParser(
        prog=service, description=(description or "").strip().splitlines()[0] if description else None
    )
    p.add_argument(
        "--global-config-file",
        type=Path,
        default=DEFAULT_GLOBAL_FILE,
        help=f"inboxbooster-mailer-global.yaml (default {DEFAULT_GLOBAL_FILE})",
    )
    p.add_argument(
        "--customer-config-file",
        type=Path,
        default=DEFAULT_CUSTOMER_FILE,
        help=f"inboxbooster-mailer-customer.yaml (default {DEFAULT_CUSTOMER_FILE})",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration files and exit (0 = valid, 2 = invalid)",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING… (default INFO)")
    return p


def load(args: argparse.Namespace, service: str) -> Config:
    """Load the configuration named by ``args``; exits with status 2 and one line per problem.

    With ``--check-config`` it also exits: 0 after printing that the files are valid.
    """
    try:
        config = load_config(args.global_config_file, args.customer_config_file, service=service)
    except ConfigError as exc:
        sys.stderr.write(f"{service}: invalid configuration:\n")
        for line in exc.problems:
            sys.stderr.write(f"  {line}\n")
        raise SystemExit(EXIT_CONFIG) from None
    if args.check_config:
        sys.stdout.write(f"{service}: configuration OK ({args.global_config_file}, {args.customer_config_file})\n")
        raise SystemExit(0)
    return config
