"""``mxserver classify FILE… | -``: what MxServer makes of a mail, without Redis and without SMTP.

For operators who want to know what a bounce (or spam report, or auto-reply) means, and for
tests.  Each FILE (``-`` is standard input) is classified exactly as the MX classifies a mail
(:mod:`mxserver.analysis`, :mod:`mxserver.verification`, the same bounce rules, the customer
file's ``mxserver.bounce-rules`` included) and the events are printed, one JSON object per
line, as the customer's webhook would receive them, plus ``verified: true``.

There is no Redis, so no record of what was sent: a tag verifies only against an address the
report itself names (its HMAC must match), or against ``--sent UUID:RECIPIENT`` (what the
Transformer recorded).  ``--rcpt`` gives the envelope recipient (our tagged bounce or
unsubscribe address the report was sent to).  When nothing verifies, every recipient's reading
is printed anyway, marked ``"verified": false`` (no event would be emitted), so any bounce from
anywhere can be read.  A mail that is no report at all prints nothing; a note goes to stderr.

The configuration files are optional: they give the address secret, the return-path domains,
our own MTA's host name and extra bounce rules.  Exit status: 0, or 1 when a file cannot be
read, 2 for a configuration problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from common import bouncerules as rules
from common import cli
from common.addressing import AddressSigner, parse_address
from common.config import Config, load_config
from common.errors import ConfigError
from common.events import public
from mxserver.analysis import Settings, analyse
from mxserver.classifier import records_of, settings_from_config
from mxserver.verification import readings, verify

COMMAND = "classify"


def parser() -> argparse.ArgumentParser:
    """The ``mxserver classify`` command line (configuration options as every command has)."""
    p = cli.parser("mxserver classify", __doc__)
    p.add_argument("files", nargs="*", metavar="FILE", help="mails to classify ('-' or none: standard input)")
    p.add_argument(
        "--rcpt", action="append", default=[], metavar="ADDRESS", help="envelope recipient at our MX (repeatable)"
    )
    p.add_argument(
        "--sent",
        action="append",
        default=[],
        metavar="UUID:RECIPIENT",
        help="a copy the Transformer recorded as sent, as IB:sent:<uuid> would say (repeatable)",
    )
    p.add_argument("--now", type=int, default=None, help="event timestamp (default: the current time)")
    return p


#: Shared options that take a value (so the word after them is not the subcommand).
_VALUED = frozenset(("--global-config-file", "--customer-config-file", "--log-level"))


def command_index(argv: list[str]) -> int | None:
    """Where the word ``classify`` stands as the subcommand in ``argv`` (None: not there)."""
    skip = False
    for index, word in enumerate(argv):
        if skip:
            skip = False
        elif word in _VALUED:
            skip = True
        elif not word.startswith("-"):
            return index if word == COMMAND else None
    return None


def describe(parser: argparse.ArgumentParser) -> None:
    """Mention the subcommand in ``mxserver --help`` (a :class:`common.service.ServiceSpec` hook)."""
    parser.epilog = f"mxserver {COMMAND} FILE… | - : print what the MX makes of a mail, without Redis (see --help)."


def main(argv: list[str]) -> int:
    """``mxserver classify …`` (``argv`` after the word ``classify``)."""
    args = parser().parse_args(argv)
    try:
        settings, signer = _setup(args)
    except ConfigError as exc:
        cli.report_problems("mxserver classify", exc.problems)
        return cli.EXIT_CONFIG
    return classify_files(args.files or ["-"], args, settings, signer, sys.stdout, sys.stderr)


def _setup(args: argparse.Namespace) -> tuple[Settings, AddressSigner | None]:
    config = _config(args)
    if config is None:
        domains = {t.domain for t in (parse_address(r) for r in args.rcpt) if t is not None and t.domain}
        return Settings(domains=frozenset(domains), rules=rules.load()), None
    secret = config.customer.common_config.address_secret
    signer = AddressSigner(secret.get_secret_value().encode()) if secret is not None else None
    return settings_from_config(config), signer


def _config(args: argparse.Namespace) -> Config | None:
    """The configuration when given or found at the default place; None when there is none."""
    global_path, customer_path = cli.config_paths(args)
    given = args.global_config_file is not None or args.customer_config_file is not None
    if not given and not (global_path.exists() and customer_path.exists()):
        return None
    return load_config(global_path, customer_path, service=None)


def classify_files(
    files: list[str],
    args: argparse.Namespace,
    settings: Settings,
    signer: AddressSigner | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Classify each file; print events / readings on ``out``, notes on ``err``."""
    sent: dict[str, set[str]] = {}
    for item in args.sent:
        uuid, _, recipient = item.partition(":")
        if uuid and recipient:
            sent.setdefault(uuid.strip().lower(), set()).add(recipient.strip())
    records = records_of(sent)
    now = int(time.time()) if args.now is None else args.now
    status = 0
    for name in files:
        try:
            raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as exc:
            err.write(f"{name}: cannot read: {exc.strerror or exc}\n")
            status = 1
            continue
        for line in classify_one(raw, args.rcpt, settings, signer, records, now, name, err):
            out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    return status


def classify_one(
    raw: bytes,
    rcpts: list[str],
    settings: Settings,
    signer: AddressSigner | None,
    records: dict[str, Any],
    now: int,
    name: str,
    err: TextIO,
) -> list[dict[str, Any]]:
    """The JSON objects printed for one mail."""
    analysis = analyse(settings, rcpts, raw)
    verifier = signer or AddressSigner(b"")  # no secret: no tag verifies
    outcome = verify(analysis, records, verifier, now=now)
    if outcome.events:
        return [public(event.to_dict()) for event in outcome.events]
    note = f"{name}: {outcome.kind}"
    if outcome.reason or outcome.note:
        note += f" ({outcome.reason or outcome.note})"
    err.write(note + "\n")
    if outcome.kind == "unverified":
        return readings(analysis, now=now)
    return []
