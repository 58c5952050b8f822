"""``redis-sidecar sentinel``: run one Redis Sentinel of the ``deploy/ha`` layout.

Three sentinels watch the data nodes (``redis.replication.nodes``).  When the primary stops
answering for ``redis.sentinel.down-after-milliseconds``, a quorum of them agrees it is down,
promotes the replica with the most data and reconfigures the others; the services ask any
sentinel where the primary is (``common-config.redis.sentinel``, :mod:`common.queue`).

Start: find the primary (:mod:`redis_sidecar.topology`: the other sentinels first, then the data
nodes' ROLE, else the first node), write the sentinel's configuration
(:func:`common.redisha.sentinel_lines`) to ``redis.sentinel.data-directory`` -- Sentinel rewrites
that file as it learns replicas and peers, and it holds passwords, so the pod mounts a
memory-backed volume there -- and run ``redis-server <file> --sentinel`` in its own session.
A restarted sentinel keeps its id (:func:`common.redisha.sentinel_id` of the host name).
Stop (SIGTERM/SIGINT): SIGTERM to the sentinel; the launcher exits with its status.

This command reads only the sentinels' password and the data nodes' sentinel password
(configuration service ``redis-sentinel``), never a service's Redis password.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

from common import redisha
from common.config import Config
from common.config.base import SentinelSettings
from common.config.redismodule import Replication, SentinelProcess
from common.errors import ConfigError
from common.lifecycle import Stopper, stop_process
from redis_sidecar import connection, topology

log = logging.getLogger(__name__)

CONFIG_FILE = "sentinel.conf"


def settings(config: Config) -> tuple[SentinelSettings, SentinelProcess, Replication]:
    """The clients' sentinel block, this sentinel's settings and the data nodes.

    Raises:
        ConfigError: one of the three is not configured.
    """
    section = connection.section(config)
    client = config.redis_for("redis").sentinel
    where = config.customer_path
    problems = []
    if client is None:
        problems.append(f"{where}: common-config.redis.sentinel: required to run a sentinel")
    if section.sentinel is None:
        problems.append(f"{where}: redis.sentinel: required to run a sentinel")
    if section.replication is None:
        problems.append(f"{where}: redis.replication: required to run a sentinel (the data nodes)")
    if problems or client is None or section.sentinel is None or section.replication is None:
        raise ConfigError(problems)
    return client, section.sentinel, section.replication


class SentinelLauncher:
    """Find the primary, write the configuration, run one sentinel until stopped."""

    metrics_address = None

    def __init__(self, config: Config, stopper: Stopper) -> None:
        self.client, self.process, self.replication = settings(config)
        self.redis_server = connection.section(config).redis_server
        self.stopper = stopper
        self.me = topology.announced(self.process.announce_hostname, self.process.bind.inet_port, self.client.hosts())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        """The sentinel's configuration (rewritten by Sentinel itself)."""
        return self.process.data_directory / CONFIG_FILE

    def write_config(self) -> topology.Address:
        """Find the primary and write the configuration watching it; returns the primary."""
        credentials = topology.Credentials(redisha.SENTINEL_USER, self.replication.sentinel_password.get_secret_value())
        primary, how = topology.find_primary(self.client, self.replication, credentials, me=None, skip_sentinel=self.me)
        lines = redisha.sentinel_lines(
            self.client,
            self.process,
            self.replication,
            me=self.me,
            primary=primary,
            myid=redisha.sentinel_id(socket.gethostname()),
        )
        # Private: Sentinel rewrites the file (a new file renamed over it) with the passwords in it.
        self.process.data_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.process.data_directory.chmod(0o700)
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
        log.info("sentinel %s:%d watches %s:%d (%s)", *self.me, *primary, how)
        return primary

    def run(self) -> int:
        """Run until stopped or until the sentinel exits; returns the exit status."""
        self.write_config()
        # umask 077: the files Sentinel rewrites stay readable by this user only.
        self.proc = subprocess.Popen(
            [self.redis_server, str(self.config_file), "--sentinel"], start_new_session=True, umask=0o077
        )
        log.info("started redis-server --sentinel (pid %d)", self.proc.pid)
        while self.proc.poll() is None:
            if self.stopper.wait(1.0):
                return self._stop()
        log.error("the sentinel exited by itself with status %s", self.proc.returncode)
        return self.proc.returncode or 1

    def _stop(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        status = stop_process(self.proc, timeout_s, what="the sentinel")
        log.info("sentinel stopped with status %d", status)
        return status
