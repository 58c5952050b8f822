"""``mailer-suppressions``: the suppression list from the command line (an operator's tool).

Commands (the HTTP API's, ``/v1/suppressions``; :mod:`common.suppression`)::

  mailer-suppressions list [--scope S] [--reason R] [--address PART] [--since UNIX] [--json]
  mailer-suppressions get SCOPE ADDRESS
  mailer-suppressions add SCOPE ADDRESS [--reason R]        (default reason: manual)
  mailer-suppressions delete SCOPE ADDRESS [--reason R]
  mailer-suppressions export [--format csv|jsonl] [filters]  (to stdout)
  mailer-suppressions import FILE [--format csv|jsonl] [--scope S]   (FILE - is stdin)

SCOPE is the From domain (``common-config.suppression.scope: domain``) or the stream id
(``stream``).  It reads the configuration files as every service does (``common.cli``) and says
on stderr which ones.  Exit status: 0 done, 1 not found / rows rejected, 2 usage or
configuration, 3 Redis unavailable.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import redis

from common import cli, logs
from common.queue import connect
from common.suppression import (
    CSV_COLUMNS,
    REASONS,
    Entry,
    Filters,
    SuppressionList,
    SuppressionSettings,
    parse_record,
    valid_address,
    valid_scope,
)

PROGRAM = "mailer-suppressions"


def build_parser() -> argparse.ArgumentParser:
    """The ``mailer-suppressions`` argument parser."""
    parser = cli.parser(PROGRAM, __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scope", help="only this From domain or stream id")
        p.add_argument("--reason", choices=REASONS)
        p.add_argument("--address", help="only addresses containing this text")
        p.add_argument("--since", type=float, help="only entries whose last event is at or after (Unix seconds)")

    listing = sub.add_parser("list", help="list entries")
    filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    get = sub.add_parser("get", help="the entries of one address")
    add = sub.add_parser("add", help="add an address (or renew its entry)")
    delete = sub.add_parser("delete", help="remove an address' entries; it is sent to again")
    for p in (get, add, delete):
        p.add_argument("scope")
        p.add_argument("address")
    add.add_argument("--reason", choices=REASONS, default="manual")
    delete.add_argument("--reason", choices=REASONS, help="only this reason (default: all)")
    export = sub.add_parser("export", help="every selected entry to stdout")
    filters(export)
    export.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    imp = sub.add_parser("import", help="add entries from a CSV or JSON-lines file")
    imp.add_argument("file", help="the file, or - for stdin")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file name (.csv), else jsonl")
    imp.add_argument("--scope", help="scope of rows without a scope column")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mailer-suppressions``."""
    args = build_parser().parse_args(argv)
    config = cli.load(args, PROGRAM, announce=True)
    logs.setup(PROGRAM, args.log_level or "WARNING")
    client = connect(config.redis_for("redis"), client_name=PROGRAM)
    lst = SuppressionList(client, SuppressionSettings.from_config(config))
    try:
        return run(args, lst, sys.stdout)
    except redis.exceptions.RedisError as exc:
        sys.stderr.write(f"{PROGRAM}: Redis unavailable: {exc}\n")
        return 3
    finally:
        client.close()


def run(args: argparse.Namespace, lst: SuppressionList, out: TextIO) -> int:
    """Carry out one parsed command (tests call this with their own list and stream)."""
    command = args.command
    if command in ("get", "add", "delete"):
        address = args.address.strip().lower()
        if not valid_scope(args.scope) or not valid_address(address):
            sys.stderr.write(f"{PROGRAM}: {args.scope!r} {args.address!r} is not a scope and an address\n")
            return 2
        if command == "get":
            entries = lst.get(args.scope, address)
            for entry in entries:
                out.write(_line(entry, lst) + "\n")
            return 0 if entries else 1
        if command == "add":
            out.write(_line(lst.put(args.scope, address, args.reason), lst) + "\n")
            return 0
        deleted = lst.delete(args.scope, address, args.reason)
        out.write(f"deleted {deleted} entries of {address} in {args.scope}\n")
        return 0 if deleted else 1
    if command == "import":
        return _import(args, lst, out)
    selected = lst.iterate(Filters(args.scope, args.reason, args.address, args.since))
    if command == "list":
        for entry in selected:
            out.write((json.dumps(entry.to_dict()) if args.json else _line(entry, lst)) + "\n")
        return 0
    if args.format == "csv":
        writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for entry in selected:
            writer.writerow(entry.to_dict())
    else:
        for entry in selected:
            out.write(json.dumps(entry.to_dict(), ensure_ascii=False) + "\n")
    return 0


def _line(entry: Entry, lst: SuppressionList) -> str:
    def when(stamp: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))

    state = "enforced" if lst.enforced(entry, time.time()) else "not enforced"
    return (
        f"{entry.scope}  {entry.address}  {entry.reason}  first={when(entry.first)}  last={when(entry.last)}  "
        f"count={entry.count}  {state}" + (f"  event_id={entry.event_id}" if entry.event_id else "")
    )


def _import(args: argparse.Namespace, lst: SuppressionList, out: TextIO) -> int:
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8-sig")
    kind = args.format or ("csv" if str(args.file).lower().endswith(".csv") else "jsonl")
    rows: list[tuple[int, Any]]
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            rows.extend((reader.line_num, row) for row in reader)
        except csv.Error as exc:
            rows.append((reader.line_num, f"not CSV: {exc}"))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    rows.append((number, f"not JSON: {exc.msg}"))
    entries = []
    rejected = 0
    for number, row in rows:
        try:
            if not isinstance(row, dict):
                raise ValueError(row if isinstance(row, str) else "not a JSON object")
            entries.append(parse_record(row, args.scope))
        except ValueError as exc:
            rejected += 1
            sys.stderr.write(f"{PROGRAM}: line {number}: {exc}\n")
    for start in range(0, len(entries), 500):
        lst.store(entries[start : start + 500])
    out.write(f"imported {len(entries)} entries, rejected {rejected} rows\n")
    return 1 if rejected else 0


if __name__ == "__main__":
    raise SystemExit(main())
