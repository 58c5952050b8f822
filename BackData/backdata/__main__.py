"""BackData: posts events from the event queue to the customer's webhook; "backdata replay" re-queues dead letters."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from backdata import SERVICE
from backdata.commands import arguments, replay
from backdata.service import BackData, section_of
from common import cli, logs, metrics, queue
from common.lifecycle import Stopper

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT (exit 0), or the ``replay`` command."""
    args = arguments(argv, __doc__)
    config = cli.load(args, SERVICE)
    logs.setup(SERVICE, args.log_level)
    if args.command == "replay":
        return replay(config, args)
    section = section_of(config)
    registry = CollectorRegistry()
    metrics.register_memory_gauge(registry)
    health = metrics.Health()
    client = queue.connect(config.redis_for(SERVICE), client_name=SERVICE)
    health.add_check("redis", lambda: bool(client.ping()))
    server = metrics.serve(section.prometheus.inet_interface, section.prometheus.inet_port, health, registry)
    stopper = Stopper().install()
    service = BackData(config, client, stopper, registry, heartbeat=health.beat)
    try:
        service.run()
    finally:
        server.close()
        client.close()
    log.info("stopped (%s)", stopper.signal_name or "requested")
    return 1 if service.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
