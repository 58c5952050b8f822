"""Start real servers on loopback for tests, benchmarks and the local stack."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common.lifecycle import stop_process

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


#: Ports this process has handed out (see :func:`free_port`).
_HANDED_OUT: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now, and never one this process handed out before.

    The port is released at once, so the kernel may offer it again to the next caller before
    whoever asked for it binds it: a stack's port map could then name one port twice (its MX
    answering another service's readiness check was seen once in CI).  Remembering what was
    handed out keeps every port of a process distinct.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port left that this process has not handed out already")


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        time.sleep(interval_s)


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def require(binary: str) -> str:
    """Path of a required executable, or a clear error naming the package to install."""
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if found is None:
        raise FileNotFoundError(f"{binary} is not installed (Debian: apt-get install redis-server postfix swaks)")
    return found


class RedisProcess:
    """A private redis-server on loopback with AOF persistence in ``directory``."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        appendfsync: str = "always",
        password: str | None = None,
        config_file: Path | None = None,
        extra: dict[str, str] | None = None,
        users: list[str] | None = None,
        conf_lines: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.password = password
        self.config_file = config_file
        self.extra = extra or {}
        #: ACL ``user`` directives (common.redisacl; passwords only as hashes).
        self.users = users or []
        #: More redis.conf lines, in the same included file (e.g. common.redisha's replication
        #: settings, whose quoted values a command line would not keep).
        self.conf_lines = conf_lines or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command(self) -> list[str]:
        """The redis-server command line."""
        args = [require("redis-server")]
        if self.config_file is not None:
            args.append(str(self.config_file))
        settings = {
            "port": str(self.port),
            "bind": LOOPBACK,
            "dir": str(self.directory),
            "appendonly": "yes",
            "appendfsync": self.appendfsync,
            "save": "",
            "daemonize": "no",
            "logfile": str(self.directory / "redis.log"),
            "pidfile": "",
            **self.extra,
        }
        if self.password:
            settings["requirepass"] = self.password
        if self.users or self.conf_lines:
            settings["include"] = str(self.directory / "users.acl.conf")
        for key, value in settings.items():
            args += [f"--{key}", value]
        return args

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        """Start and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.users or self.conf_lines:
            acl = self.directory / "users.acl.conf"
            acl.touch(mode=0o600)
            acl.write_text("".join(line + "\n" for line in [*self.users, *self.conf_lines]))
        # A session of its own: Ctrl-C in the terminal of `./mailer up` reaches only the stack,
        # which stops Redis last (after PostfixLog has handed Postfix' queue back to it).
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        wait_until(self._answers, timeout_s, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        return _answers_ping(self.proc, self.port, self.password, self.directory / "redis.log")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown (SIGTERM, repeated while Redis postpones it: Redis flushes the AOF)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc, timeout_s, what=f"redis-server on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and data directory."""
        self.stop()
        self.start()


def _answers_ping(proc: subprocess.Popen[bytes] | None, port: int, password: str | None, log_file: Path) -> bool:
    """True once the server on ``port`` answers PING; raises when its process has exited."""
    if proc is not None and proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        log_text = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise RuntimeError(f"redis-server exited with {proc.returncode}: {err}{log_text}")
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
            auth = f"AUTH {password}\r\n".encode() if password else b""
            s.sendall(auth + b"PING\r\n")
            reply = s.recv(64)
            return b"PONG" in reply or (bool(auth) and b"+OK" in reply)
    except OSError:
        return False


class SentinelProcess:
    """A private Redis Sentinel on loopback; ``lines`` is its configuration (:func:`common.redisha.sentinel_lines`).

    Sentinel rewrites its configuration file, so it lives in ``directory`` (mode 0600).
    """

    def __init__(self, directory: Path, port: int, lines: list[str], password: str | None = None) -> None:
        self.directory = directory
        self.port = port
        self.lines = lines
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        """The sentinel's (rewritten) configuration."""
        return self.directory / "sentinel.conf"

    def start(self, timeout_s: float = 10.0) -> SentinelProcess:
        """Write the configuration, start, and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_file.touch(mode=0o600)
        log_file = self.directory / "sentinel.log"
        lines = [line for line in self.lines if not line.startswith("logfile ")] + [f'logfile "{log_file}"']
        self.config_file.write_text("".join(line + "\n" for line in lines))
        self.proc = subprocess.Popen(
            [require("redis-server"), str(self.config_file), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        wait_until(
            lambda: _answers_ping(self.proc, self.port, self.password, log_file),
            timeout_s,
            what=f"sentinel on port {self.port}",
        )
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (repeated while it runs), then SIGKILL after ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc, timeout_s, what=f"sentinel on port {self.port}")


@contextlib.contextmanager
def redis_server(directory: Path, **kwargs: object) -> Iterator[RedisProcess]:
    """A running :class:`RedisProcess`, stopped on exit."""
    server = RedisProcess(directory, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
