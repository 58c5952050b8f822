"""HttpReceiver: HTTP submission API (``POST /v1/mail/send``) and RFC 8058 one-click unsubscribe.

Produces the P0/P1 mail streams and, for unsubscribe clicks, the event stream.  Runs gunicorn
(master + threaded workers) with the versioned gunicorn.conf.py; metrics and health on
``httpreceiver.bind.inet-port-metrics``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.service import ServiceSpec, run_service
from httpreceiver import server
from httpreceiver.settings import SERVICE


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gunicorn-config",
        type=Path,
        default=server.default_gunicorn_config(),
        help="gunicorn settings file (default: the gunicorn.conf.py shipped with the app)",
    )


SPEC = ServiceSpec(SERVICE, __doc__, server.build, arguments=_arguments, prepare=server.metrics_directory)


def main(argv: list[str] | None = None) -> int:
    """Console script ``httpreceiver``."""
    return run_service(SPEC, argv)


if __name__ == "__main__":
    raise SystemExit(main())
