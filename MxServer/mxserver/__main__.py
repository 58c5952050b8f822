"""MxServer: the public MX of the return-path domains (bounces, spam reports, unsubscribes).

Receives SMTP on ``mxserver.bind`` (port 25); writes events to the event stream and keeps
unclassified mail in ``mxserver.eml-directory``.  SIGTERM/SIGINT: stop accepting, finish
stores in progress (at most 20 s), exit 0.
"""

from __future__ import annotations

import asyncio
import sys

from prometheus_client import CollectorRegistry

from common import cli, logs
from common.errors import ConfigError
from common.metrics import Health, register_memory_gauge, serve
from mxserver.metrics import MxMetrics
from mxserver.server import SERVICE, run


def main(argv: list[str] | None = None) -> int:
    """Console script ``mxserver``."""
    args = cli.parser(SERVICE, __doc__).parse_args(argv)
    config = cli.load(args, SERVICE)
    logs.setup(SERVICE, args.log_level)
    registry = CollectorRegistry()
    register_memory_gauge(registry)
    metrics = MxMetrics(registry)
    health = Health()
    section = config.customer.mxserver
    assert section is not None  # cli.load checked the required sections
    http = serve(section.prometheus.inet_interface, section.prometheus.inet_port, health, registry)
    try:
        asyncio.run(run(config, metrics, health))
    except ConfigError as exc:
        sys.stderr.write(f"{SERVICE}: {exc}\n")
        return cli.EXIT_CONFIG
    finally:
        http.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
