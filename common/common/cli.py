"""Command-line plumbing shared by every service and tool (``common.service`` uses it).

Every command accepts the original's ``--global-config-file`` / ``--customer-config-file``, plus
``--check-config`` (validate, print the result, exit 0 or 2), ``--log-level`` and ``--version``.

Where the configuration files are, when not given on the command line (first match wins):

1. ``INBOXBOOSTER_CONFIG_DIR`` -- a directory holding both files;
2. ``/configs`` -- the Kubernetes ConfigMap mount, when it holds the global file;
3. ``run/configs`` of a checkout running ``./mailer up``, found from the current directory
   upwards -- so ``mailer-queue stats`` works in a checkout with no flags;
4. ``/configs`` (and a clear "cannot read file" error naming it).

Tools print the files they read on stderr (``announce``), so nobody wonders which Redis they
are looking at.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from common.config import DEFAULT_CUSTOMER_FILE, DEFAULT_GLOBAL_FILE, Config, load_config
from common.errors import ConfigError
from common.version import __version__

EXIT_CONFIG: Final = 2
CONFIG_DIR_ENV: Final = "INBOXBOOSTER_CONFIG_DIR"
LOCAL_STACK_CONFIGS: Final = Path("run/configs")


def config_directory(cwd: Path | None = None) -> Path:
    """The directory the configuration files are read from by default (see the module docstring)."""
    configured = os.environ.get(CONFIG_DIR_ENV)
    if configured:
        return Path(configured)
    if DEFAULT_GLOBAL_FILE.exists():
        return DEFAULT_GLOBAL_FILE.parent
    start = (cwd or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        candidate = directory / LOCAL_STACK_CONFIGS
        if (candidate / DEFAULT_GLOBAL_FILE.name).exists():
            return candidate
    return DEFAULT_GLOBAL_FILE.parent


def parser(program: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every command shares."""
    summary = (description or "").strip().splitlines()[0] if description else None
    p = argparse.ArgumentParser(prog=program, description=summary)
    p.add_argument(
        "--global-config-file",
        type=Path,
        default=None,
        help=f"{DEFAULT_GLOBAL_FILE.name} (default: in ${CONFIG_DIR_ENV}, /configs, or ./run/configs)",
    )
    p.add_argument(
        "--customer-config-file",
        type=Path,
        default=None,
        help=f"{DEFAULT_CUSTOMER_FILE.name} (default: next to the global file's default)",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration files and exit (0 = valid, 2 = invalid)",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING… (default INFO)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def config_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The two files ``args`` names, defaults filled in."""
    given_global = getattr(args, "global_config_file", None)
    given_customer = getattr(args, "customer_config_file", None)
    return (
        Path(given_global) if given_global is not None else config_directory() / DEFAULT_GLOBAL_FILE.name,
        Path(given_customer) if given_customer is not None else config_directory() / DEFAULT_CUSTOMER_FILE.name,
    )


def report_problems(program: str, problems: Iterable[str]) -> None:
    """Print configuration problems the one way every command prints them."""
    sys.stderr.write(f"{program}: invalid configuration:\n")
    for line in problems:
        sys.stderr.write(f"  {line}\n")


def report_ok(program: str, args: argparse.Namespace) -> None:
    """Print the ``--check-config`` success line."""
    global_path, customer_path = config_paths(args)
    sys.stdout.write(f"{program}: configuration OK ({global_path}, {customer_path})\n")


def load(args: argparse.Namespace, service: str, *, check_only: bool = True, announce: bool = False) -> Config:
    """Load the configuration named by ``args``; exits with status 2 and one line per problem.

    With ``check_only`` and ``--check-config`` it also exits: 0 after printing that the files
    are valid (services check more in their ``build`` and pass ``check_only=False``).
    ``announce`` prints which files were read (for tools).
    """
    global_path, customer_path = config_paths(args)
    if announce:
        sys.stderr.write(f"{service}: configuration {global_path}, {customer_path}\n")
    try:
        config = load_config(global_path, customer_path, service=service)
    except ConfigError as exc:
        report_problems(service, exc.problems)
        raise SystemExit(EXIT_CONFIG) from None
    if check_only and getattr(args, "check_config", False):
        report_ok(service, args)
        raise SystemExit(0)
    return config
