"""Wiring of the Receiver: checks beyond the config model, listeners, one or several processes.

``receiver.processes`` (0 = one per CPU) decides the shape: one process runs the SMTP loop
and the metrics server itself; several processes are forked by a
:class:`~receiver.supervisor.Supervisor` that only serves metrics and health.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common import passwords
from common.config import Config
from common.errors import ConfigError
from common.metrics import MetricsServer
from common.queue import connect
from common.service import Context
from receiver import tls
from receiver.accounts import check_logins
from receiver.metrics import enable_multiprocess, multiprocess_registry
from receiver.server import Listener, ReceiverProcess
from receiver.supervisor import Supervisor, bind_listeners, worker_plan

log = logging.getLogger(__name__)


def preflight(config: Config) -> list[str]:
    """Problems the config model cannot see: certificate files and password hashes."""
    section = config.customer.receiver
    assert section is not None  # the loader requires it for this service
    problems = [f"{config.customer_path}: {line}" for line in check_logins(section.auth_logins)]
    try:
        source = tls.locate(config)
        if not source.generated:
            tls.server_context(source, "localhost")
    except tls.TlsProblem as exc:
        problems.append(str(exc))
    return problems


def process_count(configured: int, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Worker processes to run: the configured number, or one per usable CPU for 0.

    Usable CPUs are the affinity mask, lowered by a container CPU limit (cgroup v2 ``cpu.max``
    or v1 ``cpu.cfs_quota_us``): a pod on a 64-core node with a 2-CPU limit gets 2 workers.
    """
    if configured:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(math.ceil(quota), 1))
    return max(cpus, 1)


def _cgroup_cpu_limit(root: Path) -> float | None:
    """CPUs allowed by the cgroup's quota, or None when unlimited / unknown."""
    try:
        quota, _, period = (root / "cpu.max").read_text().partition(" ")
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


class ReceiverService:
    """The Receiver of one pod: one SMTP process, or a supervisor forking several."""

    def __init__(self, context: Context) -> None:
        problems = preflight(context.config)
        if problems:
            raise ConfigError(problems)
        section = context.config.customer.receiver
        assert section is not None  # the loader requires it for this service
        self.context = context
        self.section = section
        self.processes = process_count(section.processes)
        prom = section.prometheus
        # One process serves its metrics from this registry; a supervisor serves the workers'
        # sums itself, once they are forked (no thread may exist before fork).
        self.metrics_address = (prom.inet_interface, prom.inet_port) if self.processes == 1 else None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        context, section = self.context, self.section
        hostname = section.hostname or socket.gethostname()
        tls_context = tls.server_context(tls.locate(context.config), hostname)
        count = self.processes
        try:
            per_worker = _listen(section.bind.inet_interface, section.bind.inet_port, section.implicit_tls_port, count)
        except OSError as exc:
            log.error("cannot listen on %s: %s", section.bind.inet_interface, exc)
            return 1
        health = context.health
        redis_client = connect(context.config.redis_for("receiver"), client_name="receiver-health")
        health.add_check("redis", lambda: bool(redis_client.ping()))
        prom = section.prometheus
        log.info("receiver starting: %d process(es), %d accounts", count, len(section.auth_logins))
        if count == 1:
            process = ReceiverProcess(
                context.config,
                per_worker[0],
                tls_context,
                context.registry,
                hostname=hostname,
                stopper=context.stopper,
                heartbeat=health.beat,
            )
            return process.run()
        with _multiprocess_dir() as directory:
            enable_multiprocess(directory)
            supervisor = Supervisor(
                context.config,
                tls_context,
                worker_plan(per_worker),
                hostname,
                stopper=context.stopper,
                on_started=lambda: MetricsServer(prom.inet_interface, prom.inet_port, health, multiprocess_registry()),
                heartbeat=health.beat,
            )
            return supervisor.run()


def build(context: Context) -> ReceiverService:
    """The Receiver service of ``context`` (raises ConfigError for bad certificates or password hashes)."""
    return ReceiverService(context)


def _listen(host: str, port: int, implicit_tls_port: int | None, count: int) -> list[list[Listener]]:
    """The listening sockets of each of ``count`` workers (submission port, then 465 if any)."""
    per_worker: list[list[Listener]] = [[] for _ in range(count)]
    for i, listener in enumerate(bind_listeners(host, port, count)):
        per_worker[i].append(listener)
    if implicit_tls_port is not None:
        for i, listener in enumerate(bind_listeners(host, implicit_tls_port, count, implicit_tls=True)):
            per_worker[i].append(listener)
    return per_worker


@contextlib.contextmanager
def _multiprocess_dir() -> Iterator[Path]:
    """Where the workers' metrics live: ``PROMETHEUS_MULTIPROC_DIR`` if set, else a temporary one."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        yield Path(configured)
        return
    with tempfile.TemporaryDirectory(prefix="receiver-metrics-") as tmp:
        yield Path(tmp)


def print_password_hash(args: argparse.Namespace) -> int | None:
    """``receiver --hash-password``: read a password (prompt, or one line of stdin), print its hash.

    None (go on and start the service) without ``--hash-password``.
    """
    if not getattr(args, "hash_password", False):
        return None
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("receiver: the passwords differ\n")
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        sys.stderr.write("receiver: empty password\n")
        return 1
    sys.stdout.write(passwords.hash_password(password) + "\n")
    return 0
