"""``redis-sidecar server``: run redis-server with the customer file's settings; back up on stop.

Start: :func:`redis_sidecar.backup.restore` prepares the data directory (restores the bucket's
backup into an empty one), then ``redis-server <config-file> -`` starts with the runtime
settings written to its standard input -- the password never appears on a command line, in an
environment listing or on disk -- followed by one ACL ``user`` line per service
(:mod:`common.redisacl`: its own password, as a SHA-256 hash, and only its commands and keys).
The default user (this launcher, the exporter, backups, operators) keeps every right.

Stop (SIGTERM/SIGINT): with object storage configured, a final backup (writes paused, SAVE,
upload), then SIGTERM to redis-server -- repeated while Redis postpones its shutdown, e.g. while
it writes its initial AOF -- which fsyncs the AOF and exits; the launcher exits with
redis-server's status.  redis-server runs in its own session, so a terminal's Ctrl-C reaches
only the launcher and the backup happens before Redis stops.  With ``backup-interval-seconds``
the launcher also uploads a BGSAVE snapshot periodically.

With ``redis.replication`` (``deploy/ha``) the pod is one data node of several: before starting,
the launcher finds the primary (:mod:`redis_sidecar.topology`) and starts redis-server as its
replica -- or as the primary when it is the one -- with :mod:`common.redisha`'s settings (the
replication and sentinel users, ``min-replicas-to-write``).  Only a node that starts as the
primary restores a backup (a replica copies the primary), and backups are taken only while the
node is the primary, so one object is written however many nodes run.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import time
from pathlib import Path
from typing import Final

import redis

from common import redisacl, redisha, redisreply
from common.config import Config
from common.config.redismodule import Replication
from common.errors import ConfigError
from common.lifecycle import Stopper, stop_process
from common.queue import connect
from redis_sidecar import connection, topology
from redis_sidecar.backup import BackupError, Backups, DataLayout, restore
from redis_sidecar.storage import ObjectStore

log = logging.getLogger(__name__)

#: Share of the container's memory limit given to Redis when ``maxmemory`` is not set (the
#: rest covers fork copy-on-write during BGSAVE/AOF rewrites and client buffers).
MEMORY_SHARE: Final = 0.75
CGROUP_LIMITS: Final = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def container_memory_limit(paths: tuple[Path, ...] = CGROUP_LIMITS) -> int | None:
    """The cgroup memory limit in bytes, or None when there is none."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
        return None
    return None


def is_loopback(bind: str) -> bool:
    """True when every address of a redis ``bind`` value is a loopback address."""
    for token in bind.split():
        name = token.lstrip("-")
        if name == "localhost":
            continue
        try:
            if not ipaddress.ip_address(name).is_loopback:
                return False
        except ValueError:
            return False  # '*' or a host name: not provably loopback
    return True


def runtime_settings(config: Config, memory_limit: int | None) -> dict[str, str]:
    """The redis.conf lines the launcher feeds on stdin (they override the static file).

    Raises:
        ConfigError: Redis would listen beyond loopback without a password, or an ACL user
            name is configured (the launcher only sets the default user's password).
    """
    section = connection.section(config)
    server = connection.local_server(config)
    where = config.customer_path
    problems = []
    if server.username not in (None, "default"):
        problems.append(
            f"{where}: redis.reliable-queue.redis.username: {server.username!r}: the Redis pod logs in as the "
            "administrator (the default user, whose password the launcher sets); leave the user name out"
        )
    if server.password is None and not is_loopback(section.bind.inet_interface):
        problems.append(
            f"{where}: common-config.redis.password: required when Redis listens on "
            f"{section.bind.inet_interface!r}; e.g. ${{file:/secrets/redis-password}} from a Secret"
        )
    if problems:
        raise ConfigError(problems)
    settings = {
        "bind": section.bind.inet_interface,
        "port": str(section.bind.inet_port),
        "appendonly": "yes",
        "appendfsync": section.appendfsync,
        "daemonize": "no",
        **DataLayout(section.data_directory).redis_settings(),
    }
    if section.maxmemory is not None:
        settings["maxmemory"] = section.maxmemory
    elif memory_limit is not None:
        settings["maxmemory"] = str(int(memory_limit * MEMORY_SHARE))
    if server.password is not None:
        settings["requirepass"] = redisha.quote(server.password.get_secret_value())
    return settings


class RedisLauncher:
    """Restore, run and stop one redis-server (a :class:`common.service.Service`; the exporter serves metrics)."""

    metrics_address = None

    def __init__(self, config: Config, stopper: Stopper, store: ObjectStore | None) -> None:
        self.config = config
        self.section = connection.section(config)
        self.stopper = stopper
        self.store = store
        self.layout = DataLayout(self.section.data_directory)
        self.settings = runtime_settings(config, container_memory_limit())
        self.users = redisacl.user_lines(config)
        self.proc: subprocess.Popen[bytes] | None = None
        # SAVE of a large dataset takes longer than a queue command's timeout.
        local = connection.local_server(config).model_copy(update={"socket_timeout": 600.0})
        self.client = connect(local, client_name="redis-sidecar-server")
        #: False while this data node is a replica (deploy/ha): it neither restores nor backs up.
        self.primary = True

    def run(self) -> int:
        """Run until stopped or until redis-server exits; returns the exit status."""
        if self.section.replication is not None:
            self._join(self.section.replication)
        try:
            if self.primary:
                log.info("data directory: %s", restore(self.store, self.layout))
            else:
                self.layout.directory.mkdir(parents=True, exist_ok=True)
                log.info("data directory: %s (a replica copies the primary; no restore)", self.layout.directory)
        except BackupError as exc:
            log.error("not starting Redis: restoring the backup failed: %s", exc)
            return 1
        self.proc = self._start()
        interval = self.section.backup_interval_seconds if self.store is not None else 0
        next_backup = time.monotonic() + interval
        while self.proc.poll() is None:
            if self.stopper.wait(1.0):
                return self._stop()
            if interval and time.monotonic() >= next_backup:
                self._backup(final=False)
                next_backup = time.monotonic() + interval
        log.error("redis-server exited by itself with status %s", self.proc.returncode)
        return self.proc.returncode or 1

    def _join(self, replication: Replication) -> None:
        """Find the primary; start as its replica, or as the primary when this node is the one."""
        me = topology.announced(replication.announce_hostname, self.section.bind.inet_port, replication.hosts())
        admin = connection.local_server(self.config)
        credentials = topology.Credentials(
            admin.username, admin.password.get_secret_value() if admin.password else None
        )
        sentinel = self.config.redis_for("redis").sentinel
        primary, how = topology.find_primary(sentinel, replication, credentials, me=me)
        self.primary = topology.same_node(primary, me)
        if self.primary:
            primary = me
        self.settings.update(redisha.node_settings(replication, me=me, primary=primary))
        self.users += redisha.internal_user_lines(replication)
        log.info(
            "data node %s:%d starts as %s (%s)",
            *me,
            "the primary" if self.primary else f"a replica of {primary[0]}:{primary[1]}",
            how,
        )

    def _is_primary(self) -> bool:
        """True when this node is the primary now (always without replication)."""
        if self.section.replication is None:
            return True
        try:
            return redisreply.role(self.client) == "master"
        except redis.exceptions.RedisError as exc:
            log.warning("cannot ask Redis for its role (%s); no backup", exc)
            return False

    def _start(self) -> subprocess.Popen[bytes]:
        command = [self.section.redis_server, str(self.section.config_file), "-"]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)
        assert proc.stdin is not None
        lines = [f"{k} {v}" for k, v in self.settings.items()] + self.users
        proc.stdin.write("".join(line + "\n" for line in lines).encode())
        proc.stdin.close()
        shown = {k: ("(secret)" if k in ("requirepass", "masterauth") else v) for k, v in self.settings.items()}
        log.info(
            "started redis-server (pid %d): %s; ACL users: %s",
            proc.pid,
            shown,
            ", ".join(line.split()[1] for line in self.users) or "none (every service is the default user)",
        )
        return proc

    def _backup(self, *, final: bool) -> bool:
        assert self.store is not None
        if not self._is_primary():
            log.info(
                "%s backup skipped: this data node is a replica (the primary's launcher uploads)",
                "final" if final else "periodic",
            )
            return False
        try:
            Backups(self.client, self.store, self.layout).backup(final=final)
        except BackupError as exc:
            log.error("%s backup failed: %s", "final" if final else "periodic", exc)
            return False
        return True

    def _stop(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        if self.store is not None and self._answers():
            self._backup(final=True)
        elif self.store is None:
            log.info("no object storage configured: the data stays only in %s", self.layout.directory)
        # Repeated SIGTERM: Redis handles one request once and stays up when it cannot stop at that
        # moment ("Writing initial AOF, can't exit." while a freshly synced replica writes its AOF).
        status = stop_process(self.proc, timeout_s, what="redis-server")
        log.info("redis-server stopped with status %d", status)
        return status

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.exceptions.RedisError as exc:
            log.error("Redis does not answer (%s); no final backup", exc)
            return False
