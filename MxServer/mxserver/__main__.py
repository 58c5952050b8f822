"""MxServer: the public MX of the return-path domains (bounces, spam reports, unsubscribes).

Receives SMTP on ``mxserver.bind`` (port 25); writes events to the event stream and keeps
unclassified and unverified mail in ``mxserver.eml-directory``.  SIGTERM/SIGINT: stop accepting,
finish stores in progress (at most 20 s), exit 0.

``mxserver classify FILE… | -`` prints what the MX makes of a mail, without Redis
(:mod:`mxserver.cli`).
"""

from __future__ import annotations

import sys

from common.service import ServiceSpec, run_service
from mxserver import cli
from mxserver.server import SERVICE, build

SPEC = ServiceSpec(SERVICE, __doc__, build, arguments=cli.describe)


def main(argv: list[str] | None = None) -> int:
    """Console script ``mxserver`` (and ``mxserver classify …``)."""
    args = sys.argv[1:] if argv is None else argv
    at = cli.command_index(args)
    if at is not None:
        return cli.main(args[:at] + args[at + 1 :])
    return run_service(SPEC, args)


if __name__ == "__main__":
    raise SystemExit(main())
