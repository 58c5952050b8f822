"""The MX listener: builds the handler from the configuration, runs it, shuts it down gracefully.

Runs in the process's asyncio loop (``redis.asyncio`` for the event stream).  On SIGTERM or
SIGINT it stops accepting connections, lets mails being stored finish (at most
:data:`DRAIN_SECONDS`), sends ``421`` to the remaining sessions and closes them, then closes
Redis.  Connection and session limits (``mxserver.max-connections``,
``max-connections-per-ip``, timeouts) are those of :mod:`common.smtpserver`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Final

import redis

from common.addressing import wait_for_secret_async
from common.config import Config
from common.config.mxserver import MxServerSection
from common.errors import ConfigError
from common.metrics import Health
from common.queue import AsyncQueues, QueueSettings, connect, connect_async
from common.service import Context
from common.smtpserver import BaseSMTP, Limits, Sessions
from mxserver.classifier import settings_from_config
from mxserver.emlstore import EmlStore
from mxserver.handler import MxHandler
from mxserver.metrics import MxMetrics
from mxserver.pool import ClassifierPool
from mxserver.recipients import RecipientPolicy

log = logging.getLogger(__name__)

SERVICE: Final = "mxserver"
DRAIN_SECONDS: Final = 20.0
HEARTBEAT_SECONDS: Final = 5.0


class MxSMTP(BaseSMTP):
    """One connection to the public MX (limits, timeouts and shutdown from the shared base)."""


def tls_context(config: Config, section: MxServerSection) -> ssl.SSLContext | None:
    """The STARTTLS context when a certificate is configured.

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    if section.tls_cert_file is None or section.tls_key_file is None:
        return None
    cert, key = config.resolve(section.tls_cert_file), config.resolve(section.tls_key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        where = f"{config.customer_path}: mxserver.tls-cert-file"
        raise ConfigError([f"{where}: cannot load {cert} / {key}: {exc}"]) from None
    return context


class MxServer:
    """One running MX: ``await start()``, then ``await serve(stop)`` or ``await close()``."""

    def __init__(self, config: Config, metrics: MxMetrics, health: Health) -> None:
        section = config.customer.mxserver
        if section is None:
            raise ConfigError([f"{config.customer_path}: mxserver: section is missing"])
        self.config = config
        self.section = section
        self.metrics = metrics
        self.health = health
        self.hostname = section.hostname or socket.gethostname()
        self.tls = tls_context(config, section)
        #: Reads and checks the bounce rules now: a bad rule stops the start (and --check-config).
        self.settings = settings_from_config(config)
        self.pool: ClassifierPool | None = None
        self.sessions = Sessions(
            Limits.from_config(section),
            on_refused=lambda reason: metrics.connections_refused.labels(reason).inc(),
            on_count=metrics.sessions.set,
        )
        self.handler: MxHandler | None = None
        self._server: asyncio.Server | None = None
        self._redis = connect_async(config.redis_for(SERVICE), client_name=SERVICE)
        self._probe = connect(config.redis_for(SERVICE), client_name=f"{SERVICE}-probe")
        self._beat: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``inet-port: 0``)."""
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Build everything and start listening; False when stopped while waiting for Redis.

        Raises:
            OSError: the eml directory or the listening socket cannot be set up.
        """
        signer = await wait_for_secret_async(self.config, self._probe, stop or asyncio.Event(), self.health.beat)
        if signer is None:
            return False
        self.pool = ClassifierPool(
            self.settings, self.section.classify_processes, self.section.classify_timeout_seconds
        )
        await self.pool.start()
        store = await asyncio.to_thread(
            EmlStore(
                self.section.eml_directory,
                self.section.eml_directory_max_files,
                self.section.eml_directory_max_bytes,
            ).open
        )
        self.metrics.eml_files.set(store.count)
        self.metrics.eml_bytes.set(store.total_bytes)
        self.handler = MxHandler(
            analyser=self.pool,
            signer=signer,
            policy=RecipientPolicy(signer, self.settings.domains, self.settings.abuse_addresses),
            redis_client=self._redis,
            queues=AsyncQueues(self._redis, QueueSettings.from_config(self.config.global_)),
            event_queue=self.config.global_.backdata.queue_name,
            store=store,
            metrics=self.metrics,
            hostname=self.hostname,
        )
        context = self.tls
        loop = asyncio.get_running_loop()
        handler = self.handler

        def factory() -> MxSMTP:
            return MxSMTP(
                handler,
                sessions=self.sessions,
                data_size_limit=self.section.max_message_size,
                hostname=self.hostname,
                ident="ESMTP",
                tls_context=context,
                loop=loop,
            )

        bind = self.section.bind
        self._server = await loop.create_server(factory, host=bind.inet_interface, port=bind.inet_port)
        self.health.add_check("redis", self._redis_answers)
        self._beat = asyncio.create_task(self._heartbeat())
        log.info(
            "listening on %s:%d as %s (STARTTLS %s, max %d bytes, domains %s)",
            bind.inet_interface,
            self.port,
            self.hostname,
            "on" if context else "off",
            self.section.max_message_size,
            ",".join(sorted(self.settings.domains)),
        )
        return True

    def _redis_answers(self) -> bool:
        try:
            return bool(self._probe.ping())
        except redis.exceptions.RedisError:
            return False

    async def _heartbeat(self) -> None:
        while True:
            self.health.beat()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down gracefully."""
        await stop.wait()
        await self.close()

    async def close(self, drain_s: float = DRAIN_SECONDS) -> None:
        """Stop accepting, let stores in progress finish, close sessions and Redis."""
        servers = [self._server] if self._server is not None else []
        await self.sessions.drain(servers, drain_s)
        for server in servers:
            await server.wait_closed()
        if self._beat is not None:
            self._beat.cancel()
        if self.pool is not None:
            await self.pool.close()
        await self._redis.aclose()
        self._probe.close()
        log.info("stopped")


class MxService:
    """The MX of one process (a :class:`common.service.Service`)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.metrics = MxMetrics(context.registry)
        #: Checks the TLS files now: a bad certificate stops the start (and --check-config).
        self.server = MxServer(context.config, self.metrics, context.health)
        prom = self.server.section.prometheus
        self.metrics_address = (prom.inet_interface, prom.inet_port)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT."""
        return asyncio.run(self._main())

    async def _main(self) -> int:
        stop = self.context.stopper.async_event()
        if await self.server.start(stop):
            await self.server.serve(stop)
        return 0


def build(context: Context) -> MxService:
    """The MxServer service of ``context`` (raises ConfigError for unusable TLS files)."""
    return MxService(context)
