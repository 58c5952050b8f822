"""``redis-sidecar check``: is this Redis set up so that queued mail survives?

Configuration (offline): a password whenever Redis listens beyond loopback, the static
redis.conf present, object storage configured (else a warning: the data then lives only on the
pod's volume).  Live (unless ``--offline``): the running server really has ``appendonly yes``,
``maxmemory-policy noeviction`` and a memory limit, and the bucket answers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Literal

import redis

from common import redisacl
from common.config import Config
from common.errors import ConfigError
from common.queue import connect
from redis_sidecar import connection
from redis_sidecar.server import container_memory_limit, runtime_settings
from redis_sidecar.storage import ObjectStore


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    level: Literal["ok", "warning", "problem"]
    text: str


def run_checks(config: Config, store: ObjectStore | None, *, live: bool) -> list[Finding]:
    """Every finding, problems first."""
    found = _offline(config, store)
    if live:
        found += _live(config, store)
    order = {"problem": 0, "warning": 1, "ok": 2}
    return sorted(found, key=lambda f: order[f.level])


def _offline(config: Config, store: ObjectStore | None) -> list[Finding]:
    section = connection.section(config)
    found: list[Finding] = []
    try:
        runtime_settings(config, container_memory_limit())
        found.append(Finding("ok", f"listens on {section.bind.inet_interface}:{section.bind.inet_port}"))
    except ConfigError as exc:
        found += [Finding("problem", line) for line in exc.problems]
    try:
        users = redisacl.users(config)
    except ConfigError as exc:
        found += [Finding("problem", line) for line in exc.problems]
    else:
        own = {user.service for user in users}
        found += [Finding("ok", f"ACL user {u.name} for {u.service}") for u in users]
        found += [
            Finding("warning", f"{service} logs in as the default user (no reliable-queue.redis.username)")
            for service in redisacl.SERVICES
            if service not in own
        ]
    if not section.config_file.is_file():
        found.append(Finding("problem", f"redis.config-file: {section.config_file} does not exist"))
    if shutil.which(section.redis_server) is None:
        found.append(Finding("warning", f"redis.redis-server: {section.redis_server} is not installed here"))
    if store is None:
        found.append(
            Finding(
                "warning",
                "common-config.object-storage is not configured: no backups; the data lives only in "
                f"{section.data_directory} and is lost with the pod's volume",
            )
        )
    else:
        found.append(Finding("ok", f"backups go to {store.where}"))
    if section.appendfsync != "always":
        found.append(
            Finding("warning", f"redis.appendfsync is {section.appendfsync}: a crash can lose acknowledged mail")
        )
    return found


def _live(config: Config, store: ObjectStore | None) -> list[Finding]:
    found: list[Finding] = []
    client: redis.Redis = connect(connection.local_server(config), client_name="redis-sidecar-check")
    try:
        settings = {
            name: client.config_get(name).get(name)
            for name in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")
        }
    except redis.exceptions.RedisError as exc:
        found.append(Finding("problem", f"cannot read the running server's settings: {exc}"))
    else:
        found += _server_findings(settings)
    finally:
        client.close()
    if store is not None:
        problem = store.check()
        found.append(Finding("problem", problem) if problem else Finding("ok", f"bucket {store.bucket} answers"))
    return found


def _server_findings(settings: dict[str, Any]) -> list[Finding]:
    text = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in settings.items()}
    found = []
    if text["appendonly"] != "yes":
        found.append(Finding("problem", "the running server has appendonly no: accepted mail is not durable"))
    if text["maxmemory-policy"] != "noeviction":
        found.append(Finding("problem", f"maxmemory-policy is {text['maxmemory-policy']}: Redis may evict queued mail"))
    if text["maxmemory"] == "0":
        found.append(Finding("warning", "maxmemory is 0: a backlog can exhaust the node's memory"))
    if not found:
        found.append(Finding("ok", f"running server: appendonly yes, appendfsync {text['appendfsync']}, noeviction"))
    return found
