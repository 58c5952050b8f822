"""The ``redis-sidecar`` subcommands (one function each; ``__main__`` dispatches)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from common import cli
from common.config import Config
from common.errors import ConfigError
from common.lifecycle import Stopper
from common.metrics import Health, serve
from common.queue import Queues, QueueSettings, connect
from redis_sidecar import connection
from redis_sidecar.backup import BackupError, Backups, DataLayout, restore
from redis_sidecar.check import run_checks
from redis_sidecar.exporter import RedisMetrics
from redis_sidecar.server import RedisLauncher
from redis_sidecar.storage import ObjectStore

#: Heartbeat period of the exporter's main loop (``/healthz`` goes stale after 120 s).
BEAT_SECONDS = 5.0


def object_store(config: Config) -> ObjectStore | None:
    """The backup bucket, when ``common-config.object-storage`` is configured."""
    settings = config.customer.common_config.object_storage
    return ObjectStore(settings) if settings is not None else None


def server(config: Config, args: argparse.Namespace) -> int:
    """Run redis-server (restore before, back up on stop)."""
    try:
        launcher = RedisLauncher(config, Stopper().install(), object_store(config))
    except ConfigError as exc:
        sys.stderr.write("redis-sidecar: invalid configuration:\n")
        sys.stderr.writelines(f"  {line}\n" for line in exc.problems)
        return cli.EXIT_CONFIG
    return launcher.run()


def exporter(config: Config, args: argparse.Namespace) -> int:
    """Serve /metrics, /healthz and /readyz until SIGTERM."""
    section = connection.section(config)
    client: Any = connect(connection.local_server(config), client_name="redis-sidecar-exporter")
    registry = CollectorRegistry()
    RedisMetrics(Queues(client, QueueSettings.from_config(config.global_)), config.global_, registry)
    health = Health()
    health.add_check("redis", lambda: bool(client.ping()))
    metrics = serve(section.prometheus.inet_interface, section.prometheus.inet_port, health, registry)
    stopper = Stopper().install()
    while not stopper.wait(BEAT_SECONDS):
        health.beat()
    metrics.close()
    client.close()
    return 0


def backup(config: Config, args: argparse.Namespace) -> int:
    """Upload a BGSAVE snapshot of the running Redis now."""
    store = object_store(config)
    if store is None:
        sys.stderr.write("redis-sidecar: common-config.object-storage is not configured\n")
        return 2
    section = connection.section(config)
    local = connection.local_server(config).model_copy(update={"socket_timeout": 600.0})
    try:
        digest = Backups(connect(local), store, DataLayout(section.data_directory)).backup(final=False)
    except (BackupError, redis.exceptions.RedisError) as exc:
        sys.stderr.write(f"redis-sidecar: backup failed: {exc}\n")
        return 1
    sys.stdout.write(f"backed up to {store.where} (sha256 {digest})\n")
    return 0


def restore_command(config: Config, args: argparse.Namespace) -> int:
    """Restore the backup into an empty data directory (Redis must not be running on it)."""
    try:
        outcome = restore(object_store(config), DataLayout(connection.section(config).data_directory))
    except BackupError as exc:
        sys.stderr.write(f"redis-sidecar: restore failed: {exc}\n")
        return 1
    sys.stdout.write(outcome + "\n")
    return 0


def check(config: Config, args: argparse.Namespace) -> int:
    """Print the checks; exit 1 when there is a problem."""
    findings = run_checks(config, object_store(config), live=not args.offline)
    for finding in findings:
        sys.stdout.write(f"{finding.level:8} {finding.text}\n")
    return 1 if any(f.level == "problem" for f in findings) else 0
