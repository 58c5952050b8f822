"""Several Receiver processes on one port: bind once, fork the workers, watch them.

The supervisor binds one listening socket per worker and port with ``SO_REUSEPORT`` (the
kernel spreads new connections evenly over the workers), forks the workers (each runs a
:class:`~receiver.server.ReceiverProcess` with its own event loop and Redis client) and then
only serves ``/metrics`` (summed over the workers), ``/healthz`` and ``/readyz``.  A worker
that dies is restarted on the same sockets, so no connection waits long in its backlog.

SIGTERM/SIGINT is passed on to the workers; the supervisor exits 0 once they all have (each
within ``shutdown-grace-seconds``), and kills any that overstay by more than a few seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry

from common.config import Config
from common.lifecycle import Stopper
from common.metrics import MetricsServer
from receiver.metrics import mark_dead
from receiver.server import Listener, ReceiverProcess

log = logging.getLogger(__name__)

BACKLOG: Final = 512
RESPAWN_WINDOW_S: Final = 60.0
MAX_RESPAWNS: Final = 10
KILL_AFTER_GRACE_S: Final = 5.0
PR_SET_PDEATHSIG: Final = 1


def bind_listeners(host: str, port: int, copies: int, *, implicit_tls: bool = False) -> list[Listener]:
    """``copies`` listening sockets on the same address (``SO_REUSEPORT`` when more than one).

    Port 0 binds an ephemeral port once and the other copies join it.
    """
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    reuse_port = copies > 1
    first = socket.create_server((host, port), family=family, backlog=BACKLOG, reuse_port=reuse_port)
    actual_port = first.getsockname()[1]
    socks = [first] + [
        socket.create_server((host, actual_port), family=family, backlog=BACKLOG, reuse_port=True)
        for _ in range(copies - 1)
    ]
    for sock in socks:
        sock.setblocking(False)
    return [Listener(sock, implicit_tls) for sock in socks]


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return ":" in host


@dataclass
class Worker:
    """One forked worker and the sockets it serves."""

    index: int
    listeners: list[Listener]
    pid: int = 0
    started: float = 0.0


@dataclass
class Supervisor:
    """Forks and watches ``workers``; serves nothing itself but metrics and health."""

    config: Config
    tls_context: ssl.SSLContext
    workers: list[Worker]
    hostname: str
    stopper: Stopper = field(default_factory=Stopper)
    #: Starts the metrics server once the first workers are forked (no threads before fork).
    on_started: Callable[[], MetricsServer] | None = None
    heartbeat: Callable[[], None] | None = None
    _metrics_server: MetricsServer | None = None
    _respawns: list[float] = field(default_factory=list)

    def run(self) -> int:
        """Fork the workers and wait until stopped; returns the exit status."""
        # Before forking (no window in which SIGTERM would kill only the supervisor); each
        # worker resets them and installs its own in its event loop.
        self.stopper.install()
        for worker in self.workers:
            self._fork(worker)
        if self.on_started is not None:
            self._metrics_server = self.on_started()
        status = 0
        while not self.stopper.is_set():
            if not self._reap():
                status = 1
                break
            if self.heartbeat is not None:
                self.heartbeat()
            self.stopper.wait(0.5)
        status = self._stop_workers() or status
        if self._metrics_server is not None:
            self._metrics_server.close()
        return status

    def _fork(self, worker: Worker) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            os._exit(self._worker_main(worker))
        worker.pid, worker.started = pid, time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, pid)

    def _worker_main(self, worker: Worker) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _stop_with_parent()
        if self._metrics_server is not None:
            self._metrics_server.httpd.socket.close()
        for other in self.workers:
            if other is not worker:
                for listener in other.listeners:
                    listener.sock.close()
        try:
            process = ReceiverProcess(
                self.config,
                worker.listeners,
                self.tls_context,
                CollectorRegistry(),
                hostname=self.hostname,
                stopper=Stopper(),
                processes=len(self.workers),
            )
            return process.run()
        except BaseException:  # a worker's last word before os._exit (no finally runs)
            log.exception("worker %d failed", worker.index)
            return 1

    def _reap(self) -> bool:
        """Restart workers that died; False when they die too often to go on."""
        for worker in self.workers:
            if worker.pid == 0:
                continue
            done, status = os.waitpid(worker.pid, os.WNOHANG)
            if done == 0:
                continue
            mark_dead(worker.pid)
            log.error(
                "worker %d (pid %d) exited unexpectedly with status %d",
                worker.index,
                worker.pid,
                os.waitstatus_to_exitcode(status),
            )
            now = time.monotonic()
            self._respawns = [t for t in self._respawns if now - t < RESPAWN_WINDOW_S] + [now]
            if len(self._respawns) > MAX_RESPAWNS:
                log.error("workers keep dying (%d restarts in %.0fs); giving up", MAX_RESPAWNS, RESPAWN_WINDOW_S)
                worker.pid = 0
                return False
            self._fork(worker)
        return True

    def _stop_workers(self) -> int:
        """SIGTERM every worker, wait for them; returns 0 when all exited 0."""
        # Our copies of the listening sockets would keep accepting into the backlog.
        for worker in self.workers:
            for listener in worker.listeners:
                listener.sock.close()
        alive = [w for w in self.workers if w.pid]
        for worker in alive:
            _signal(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._grace() + KILL_AFTER_GRACE_S
        status = 0
        while alive:
            for worker in list(alive):
                done, raw = os.waitpid(worker.pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(raw)
                    log.info("worker %d (pid %d) exited with %d", worker.index, worker.pid, code)
                    status = status or (1 if code else 0)
                    alive.remove(worker)
            if alive and time.monotonic() > deadline:
                for worker in alive:
                    log.error("worker %d (pid %d) did not stop in time; killing it", worker.index, worker.pid)
                    _signal(worker.pid, signal.SIGKILL)
                    os.waitpid(worker.pid, 0)
                return 1
            if alive:
                time.sleep(0.05)
        return status

    def _grace(self) -> float:
        section = self.config.customer.receiver
        return section.shutdown_grace_seconds if section is not None else 25.0


def _stop_with_parent() -> None:
    """Have the kernel SIGTERM this worker if the supervisor dies (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        log.debug("worker %d already gone", pid)


def worker_plan(per_worker: Sequence[Sequence[Listener]]) -> list[Worker]:
    """Workers, one per entry of ``per_worker`` (the sockets each one serves)."""
    return [Worker(index=i, listeners=list(listeners)) for i, listeners in enumerate(per_worker)]
