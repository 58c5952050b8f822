"""HttpReceiver: HTTP submission API (``POST /v1/mail/send``) and RFC 8058 one-click unsubscribe.

Produces the P0/P1 mail streams and, for unsubscribe clicks, the event stream.  Runs gunicorn
(master + threaded workers) with the versioned gunicorn.conf.py; metrics and health on
``httpreceiver.bind.inet-port-metrics``.
"""

from __future__ import annotations

from pathlib import Path

from common import cli, logs
from httpreceiver import server
from httpreceiver.settings import SERVICE


def main(argv: list[str] | None = None) -> int:
    """Console script ``httpreceiver``."""
    parser = cli.parser(SERVICE, __doc__)
    parser.add_argument(
        "--gunicorn-config",
        type=Path,
        default=server.default_gunicorn_config(),
        help="gunicorn settings file (default: the gunicorn.conf.py shipped with the app)",
    )
    args = parser.parse_args(argv)
    config = cli.load(args, SERVICE)
    logs.setup(SERVICE, args.log_level)
    with server.metrics_directory():
        server.HttpReceiverServer(config, args.gunicorn_config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
