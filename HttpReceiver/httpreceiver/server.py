"""gunicorn for HttpReceiver: the master binds the API port, forks the workers, serves metrics.

* Settings come from the versioned ``gunicorn.conf.py`` (hooks, timeouts, worker class); the
  customer file overrides ``bind`` (``httpreceiver.bind``) and ``workers``.
* Each worker builds its own app and Redis client after the fork (:meth:`load`).
* Each worker is gunicorn's asyncio (``asgi``) worker: its event loop reads every request
  completely, answers ``POST /v1/mail/send`` itself (:mod:`httpreceiver.front`), and hands
  any other request to one of ``httpreceiver.threads`` threads running the Flask app
  (:mod:`httpreceiver.bridge`) -- slow clients cost sockets, never threads.
* The master serves ``/metrics`` (the sum over all workers, prometheus multiprocess mode),
  ``/healthz`` and ``/readyz`` on ``bind.inet-port-metrics``, a socket of its own: the API
  port never answers them, and a scrape never waits for a busy worker.
* SIGTERM: the master closes the API socket, lets every worker finish its request (bounded by
  ``graceful_timeout``), then exits 0.

Nothing here may import ``prometheus_client`` at module level: its value class is chosen at
import time from ``PROMETHEUS_MULTIPROC_DIR``, which :func:`metrics_directory` sets first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from gunicorn import glogging
from gunicorn.app.base import Application
from gunicorn.arbiter import Arbiter

from common.config import Config
from common.queue import connect
from common.service import Context
from httpreceiver.settings import SERVICE, section_of

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def default_gunicorn_config() -> Path:
    """``gunicorn.conf.py`` shipped with the app: inside the package (wheel) or next to it (source)."""
    packaged = Path(__file__).with_name("gunicorn.conf.py")
    return packaged if packaged.exists() else Path(__file__).resolve().parents[1] / "gunicorn.conf.py"


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """``PROMETHEUS_MULTIPROC_DIR`` for this run: the image's (emptied) or a private temporary one.

    Workers are forked inside this block and leave it too (gunicorn ends them with
    ``sys.exit``), so only the process that entered it cleans up.

    Raises:
        RuntimeError: prometheus_client was imported before the variable was set.
    """
    owner = os.getpid()
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # values of a previous run are not ours
            stale.unlink()
        yield path
        return
    if "prometheus_client" in sys.modules:
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set")
    path = Path(tempfile.mkdtemp(prefix="httpreceiver-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if os.getpid() == owner:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(path, ignore_errors=True)


class RootLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn ships no type information
    """gunicorn's logger, but writing through the service's own handlers (one log format)."""

    def setup(self, cfg: Any) -> None:
        """Drop gunicorn's handlers and let its records reach the root logger."""
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True


class HttpReceiverServer(Application):  # type: ignore[misc]  # gunicorn ships no type information
    """The gunicorn application: configuration from both files, one Flask app per worker."""

    def __init__(self, config: Config, gunicorn_config: Path, health: Any = None) -> None:
        self.config = config
        self.health = health
        self.section = section_of(config)
        self.gunicorn_config = gunicorn_config
        self.probe_redis = config.redis_for(SERVICE).model_copy(update={"socket_timeout": 1.0})
        self.arbiter: Arbiter | None = None
        self.metrics_server: Any = None
        super().__init__(prog=SERVICE)

    def init(self, parser: Any, opts: Any, args: Any) -> None:
        """Unused: there is no gunicorn command line."""

    def load_config(self) -> None:
        """gunicorn.conf.py, then ``GUNICORN_CMD_ARGS``, then what the customer file decides."""
        self.load_config_from_file(str(self.gunicorn_config))
        env_args = self.cfg.parser().parse_args(self.cfg.get_cmd_args_from_env())
        for name, value in vars(env_args).items():
            if value is not None and name != "args":
                self.cfg.set(name.lower(), value)
        bind = self.section.bind
        host = f"[{bind.inet_interface}]" if ":" in bind.inet_interface else bind.inet_interface
        self.cfg.set("bind", [f"{host}:{bind.inet_port}"])
        if self.section.workers or env_args.workers is None:
            self.cfg.set("workers", self.section.workers or os.cpu_count() or 1)
        self.cfg.set("logger_class", RootLogger)
        self.cfg.set("default_proc_name", SERVICE)

    def load(self) -> Any:
        """Build the application (called in each worker, after the fork): :mod:`httpreceiver.front`."""
        from httpreceiver.app import create_api  # imports prometheus_client: only once the env is set

        return create_api(self.config)

    def run(self) -> None:
        """Serve metrics from this (master) process, then run gunicorn until it stops."""
        from common.metrics import Health, serve  # imports prometheus_client: only once the env is set

        # Live while this process answers (gunicorn itself replaces stuck or dead workers);
        # ready while workers run and Redis answers.
        health = self.health or Health()
        health.stale_after_s = float("inf")
        health.add_check("workers", self.workers_running)
        health.add_check("redis", self.redis_answers)
        bind = self.section.bind
        try:
            self.metrics_server = serve(bind.inet_interface, bind.inet_port_metrics, health)
        except OSError as exc:
            log.error(
                "cannot serve metrics on %s:%d (httpreceiver.bind.inet-port-metrics): %s",
                bind.inet_interface,
                bind.inet_port_metrics,
                exc.strerror or exc,
            )
            raise SystemExit(1) from None
        master = os.getpid()
        try:
            super().run()
        finally:
            # Workers return through here too (gunicorn ends them with sys.exit); the metrics
            # thread lives only in the master.
            if os.getpid() == master:
                self.metrics_server.close()

    def workers_running(self) -> bool:
        """Readiness: at least one worker serves the API."""
        return self.arbiter is not None and bool(self.arbiter.WORKERS)

    def redis_answers(self) -> bool:
        """Readiness: Redis answers PING (a fresh connection, 1 s timeout)."""
        client = connect(self.probe_redis, client_name=SERVICE + "-probe")
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    # -- hooks, called from gunicorn.conf.py ------------------------------------------------

    def when_ready(self, arbiter: Arbiter) -> None:
        """The API socket is bound: remember the arbiter for the health checks."""
        self.arbiter = arbiter
        log.info("HttpReceiver ready: API on %s, metrics on port %d", self.cfg.bind, self.metrics_server.port)

    def post_fork(self, worker: Any) -> None:
        """In a new worker: close its inherited copy of the master's metrics socket."""
        if self.metrics_server is not None:
            self.metrics_server.httpd.server_close()


class HttpReceiverService:
    """The gunicorn master of HttpReceiver as a :class:`common.service.Service` (it serves its own metrics)."""

    metrics_address = None

    def __init__(self, context: Context) -> None:
        section_of(context.config)
        self.server = HttpReceiverServer(context.config, context.args.gunicorn_config, context.health)

    def run(self) -> int:
        """Run gunicorn until SIGTERM; 0 after a graceful stop."""
        self.server.run()
        return 0


def build(context: Context) -> HttpReceiverService:
    """The HttpReceiver service of ``context``."""
    return HttpReceiverService(context)
