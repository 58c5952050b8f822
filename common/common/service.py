"""One way to start a service: every console script is ``run_service(SPEC)`` (style anchors C4, C8, C11).

A service module provides a :class:`ServiceSpec` whose ``build(context)`` turns the loaded
configuration into a :class:`Service` -- an object with ``run() -> exit status`` that returns
once ``context.stopper`` is set.  :func:`run_service` does the rest, in this order, for every
service alike:

1. parse the shared options (``--global-config-file``, ``--customer-config-file``,
   ``--check-config``, ``--log-level``, ``--version``) and the service's own (``arguments``);
2. run a config-less command when the service has one (``early``, e.g. ``--hash-password``);
3. load and validate both configuration files;
4. set up logging (stderr, text or JSON lines);
5. ``build(context)``: everything that can be checked without Redis is checked here (DKIM keys,
   certificates, password hashes), so ``--check-config`` sees it too;
6. with ``--check-config``: print ``configuration OK`` and exit 0;
7. install SIGTERM/SIGINT on the stopper, serve ``/metrics``, ``/healthz``, ``/readyz`` on the
   service's address (unless the service serves them itself, e.g. from a pre-fork master), run
   the service and return its status.

A configuration problem, from the files or from ``build``, is always printed the same way and
exits with status 2::

    transformer: invalid configuration:
      /configs/inboxbooster-mailer-customer.yaml: transformer.domain-settings[0].dkim-private-key-file: …

Tests build services through the same ``build`` with :meth:`Context.create` and run them in a
thread, setting ``context.stopper`` to stop them.

``prometheus_client`` is imported only inside functions: a service that runs pre-fork workers in
multiprocess mode (HttpReceiver) must set ``PROMETHEUS_MULTIPROC_DIR`` in ``prepare`` before the
library is first imported.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from common import cli, logs
from common.config import Config
from common.errors import ConfigError
from common.lifecycle import Stopper

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from common.metrics import Health

log = logging.getLogger(__name__)


class Service(Protocol):
    """A built service: ``run`` blocks until the context's stopper is set, then returns a status."""

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where :func:`run_service` serves metrics and health (host, port).

        None when the service serves them itself, or has none (a one-shot command).
        """
        ...

    def run(self) -> int:
        """Serve until stopped; the process exit status."""
        ...


@dataclass
class Context:
    """What ``build`` gets: the configuration and the process' shared objects."""

    config: Config
    args: argparse.Namespace
    stopper: Stopper
    registry: CollectorRegistry
    health: Health

    @classmethod
    def create(cls, config: Config, args: argparse.Namespace | None = None) -> Context:
        """A context with a fresh registry (holding the original ``memory_usage_percent``), health and stopper."""
        from prometheus_client import CollectorRegistry

        from common.metrics import Health, register_memory_gauge

        registry = CollectorRegistry()
        register_memory_gauge(registry)
        return cls(config, args or argparse.Namespace(), Stopper(), registry, Health())


Build = Callable[[Context], Service]


def _no_preparation() -> AbstractContextManager[object]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service."""

    #: Program name; also the configuration's service name (required sections) and log field.
    name: str
    #: Module docstring: the first line is the ``--help`` description.
    doc: str | None
    build: Build
    #: Adds the service's own options to the shared parser.
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    #: A command that needs no configuration (returns an exit status), or None to go on.
    early: Callable[[argparse.Namespace], int | None] | None = None
    #: Entered before anything imports prometheus_client; left when the service has stopped.
    prepare: Callable[[], AbstractContextManager[object]] = field(default=_no_preparation)
    #: The configuration's service name when it differs from ``name`` (e.g. ``redis``), or a
    #: function of the parsed arguments choosing it (a subcommand that reads other secrets).
    config_service: str | Callable[[argparse.Namespace], str] | None = None


def run_service(spec: ServiceSpec, argv: list[str] | None = None) -> int:
    """Start the service described by ``spec``; returns the process exit status."""
    parser = cli.parser(spec.name, spec.doc)
    if spec.arguments is not None:
        spec.arguments(parser)
    args = parser.parse_args(argv)
    if spec.early is not None:
        status = spec.early(args)
        if status is not None:
            return status
    config_service = spec.config_service(args) if callable(spec.config_service) else spec.config_service or spec.name
    config = cli.load(args, config_service, check_only=False)
    logs.setup(spec.name, args.log_level)
    with spec.prepare():
        try:
            context = Context.create(config, args)
            service = spec.build(context)
        except ConfigError as exc:
            cli.report_problems(spec.name, exc.problems)
            return cli.EXIT_CONFIG
        if args.check_config:
            cli.report_ok(spec.name, args)
            return 0
        context.stopper.install()
        with _metrics_server(service.metrics_address, context):
            status = service.run()
    log.debug("%s finished with status %d", spec.name, status)
    return status


@contextlib.contextmanager
def _metrics_server(address: tuple[str, int] | None, context: Context) -> Iterator[None]:
    if address is None:
        yield
        return
    from common.metrics import serve

    host, port = address
    try:
        server = serve(host, port, context.health, context.registry)
    except OSError as exc:
        sys.stderr.write(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}\n")
        raise SystemExit(1) from None
    try:
        yield
    finally:
        server.close()
