"""The ``redis-sidecar`` subcommands: long-running services (server, exporter) and one-shot commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import redis

from common.config import Config
from common.queue import Queues, QueueSettings, connect
from common.service import Context, Service
from redis_sidecar import connection
from redis_sidecar.backup import BackupError, Backups, DataLayout, restore
from redis_sidecar.check import run_checks
from redis_sidecar.exporter import RedisMetrics
from redis_sidecar.sentinel import SentinelLauncher
from redis_sidecar.server import RedisLauncher
from redis_sidecar.storage import ObjectStore

#: Heartbeat period of the exporter's main loop (``/healthz`` goes stale after 120 s).
BEAT_SECONDS = 5.0


def object_store(config: Config) -> ObjectStore | None:
    """The backup bucket, when ``common-config.object-storage`` is configured."""
    settings = config.customer.common_config.object_storage
    return ObjectStore(settings) if settings is not None else None


class Exporter:
    """``exporter``: serve queue depths and Redis health until SIGTERM."""

    def __init__(self, context: Context) -> None:
        config = context.config
        self.context = context
        section = connection.section(config)
        self.metrics_address = (section.prometheus.inet_interface, section.prometheus.inet_port)
        self.client: redis.Redis = connect(connection.local_server(config), client_name="redis-sidecar-exporter")
        RedisMetrics(Queues(self.client, QueueSettings.from_config(config.global_)), config.global_, context.registry)
        context.health.add_check("redis", lambda: bool(self.client.ping()))

    def run(self) -> int:
        """Beat until stopped."""
        while not self.context.stopper.wait(BEAT_SECONDS):
            self.context.health.beat()
        self.client.close()
        return 0


@dataclass
class OneShot:
    """A command that runs once (backup, restore, check) as a :class:`common.service.Service`."""

    command: Callable[[Config, argparse.Namespace], int]
    context: Context
    metrics_address: tuple[str, int] | None = None

    def run(self) -> int:
        """Run the command; its exit status."""
        return self.command(self.context.config, self.context.args)


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


def server(context: Context) -> RedisLauncher:
    """``server``: run redis-server (restore before, back up on stop)."""
    return RedisLauncher(context.config, context.stopper, object_store(context.config))


ONE_SHOT: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "backup": backup,
    "restore": restore_command,
    "check": check,
}


def build(context: Context) -> Service:
    """The service or command named on the command line."""
    command = context.args.command
    if command is None:  # --check-config alone
        return OneShot(lambda _config, _args: 0, context)
    if command == "server":
        return server(context)
    if command == "exporter":
        return Exporter(context)
    if command == "sentinel":
        return SentinelLauncher(context.config, context.stopper)
    return OneShot(ONE_SHOT[command], context)
