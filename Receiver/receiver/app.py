"""Wiring of the Receiver: checks beyond the config model, listeners, one or several processes.

``receiver.processes`` (0 = one per CPU) decides the shape: one process runs the SMTP loop
and the metrics server itself; several processes are forked by a
:class:`~receiver.supervisor.Supervisor` that only serves metrics and health.
"""

from __future__ import annotations

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

from prometheus_client import CollectorRegistry

from common import passwords
from common.config import Config
from common.metrics import Health, MetricsServer
from common.queue import connect
from receiver import tls
from receiver.accounts import check_logins
from receiver.metrics import MemoryCollector, enable_multiprocess, multiprocess_registry
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


def run(config: Config) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    section = config.customer.receiver
    assert section is not None  # the loader requires it for this service
    hostname = section.hostname or socket.gethostname()
    context = tls.server_context(tls.locate(config), hostname)
    count = process_count(section.processes)
    try:
        per_worker = _listen(section.bind.inet_interface, section.bind.inet_port, section.implicit_tls_port, count)
    except OSError as exc:
        log.error("cannot listen on %s: %s", section.bind.inet_interface, exc)
        return 1
    health = Health()
    redis_client = connect(config.redis_for("receiver"), client_name="receiver-health")
    health.add_check("redis", lambda: bool(redis_client.ping()))
    prom = section.prometheus
    log.info("receiver starting: %d process(es), %d accounts", count, len(section.auth_logins))
    with _multiprocess_dir(count) as directory:
        if directory is not None:
            enable_multiprocess(directory)
        if count == 1:
            registry = CollectorRegistry()
            registry.register(MemoryCollector())
            process = ReceiverProcess(
                config, per_worker[0], context, registry, hostname=hostname, heartbeat=health.beat
            )
            server = MetricsServer(prom.inet_interface, prom.inet_port, health, registry)
            try:
                return process.run()
            finally:
                server.close()
        supervisor = Supervisor(
            config,
            context,
            worker_plan(per_worker),
            hostname,
            on_started=lambda: MetricsServer(prom.inet_interface, prom.inet_port, health, multiprocess_registry()),
            heartbeat=health.beat,
        )
        return supervisor.run()


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
def _multiprocess_dir(count: int) -> Iterator[Path | None]:
    """Where multiprocess metrics live: ``PROMETHEUS_MULTIPROC_DIR`` if set, else a temporary one.

    One process without the variable keeps its counters in memory (None).
    """
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        yield Path(configured)
        return
    if count == 1:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="receiver-metrics-") as tmp:
        yield Path(tmp)


def print_password_hash() -> int:
    """``receiver --hash-password``: read a password (prompt, or one line of stdin), print its hash."""
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
