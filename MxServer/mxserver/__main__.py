"""MxServer: the public MX of the return-path domains (bounces, spam reports, unsubscribes).

Receives SMTP on ``mxserver.bind`` (port 25); writes events to the event stream and keeps
unclassified mail in ``mxserver.eml-directory``.  SIGTERM/SIGINT: stop accepting, finish
stores in progress (at most 20 s), exit 0.
"""

from __future__ import annotations

from common.service import ServiceSpec, run_service
from mxserver.server import SERVICE, build

SPEC = ServiceSpec(SERVICE, __doc__, build)


def main(argv: list[str] | None = None) -> int:
    """Console script ``mxserver``."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
