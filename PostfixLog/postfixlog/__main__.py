"""PostfixLog: feed the private Postfix from INCOMING-TO-POSTFIX and turn its log into events.

Console script ``postfixlog``; SIGTERM/SIGINT stop consuming, stop Postfix, requeue what it
still holds, and exit 0 (see :mod:`postfixlog.service`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from common import cli, logs, metrics
from common.lifecycle import Stopper
from postfixlog.service import SERVICE, PostfixLogService


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``postfixlog`` console script."""
    args = cli.parser(SERVICE, __doc__).parse_args(argv)
    config = cli.load(args, SERVICE)
    logs.setup(SERVICE, args.log_level)
    stopper = Stopper().install()
    registry = CollectorRegistry()
    health = metrics.Health()
    service = PostfixLogService(config, registry=registry, health=health, stopper=stopper)
    section = service.section.prometheus
    server = metrics.serve(section.inet_interface, section.inet_port, health, registry)
    try:
        return service.run()
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
