"""The MX listener: builds the handler from the configuration, runs it, shuts it down gracefully.

Runs in the process's asyncio loop (``redis.asyncio`` for the event stream).  On SIGTERM or
SIGINT it stops accepting connections, lets mails being stored finish (at most
:data:`DRAIN_SECONDS`), sends ``421`` to the remaining sessions and closes them, then closes
Redis.  Sessions over ``mxserver.max-connections`` get ``421 4.7.0`` at connect.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import time
from typing import Any, Final

import redis
from aiosmtpd.smtp import SMTP

from common.addressing import AddressSigner, load_secret
from common.config import Config
from common.config.mxserver import MxServerSection
from common.errors import ConfigError
from common.metrics import Health
from common.queue import AsyncQueues, QueueSettings, connect, connect_async
from mxserver.classifier import Classifier
from mxserver.emlstore import EmlStore
from mxserver.handler import MxHandler
from mxserver.metrics import MxMetrics
from mxserver.recipients import RecipientPolicy

log = logging.getLogger(__name__)

SERVICE: Final = "mxserver"
DRAIN_SECONDS: Final = 20.0
SESSION_TIMEOUT: Final = 300.0  # RFC 5321 §4.5.3.2.7: at least 5 minutes between commands
HEARTBEAT_SECONDS: Final = 5.0


class MxSMTP(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent sessions and a tracked session set."""

    def __init__(self, handler: Any, *, sessions: set[MxSMTP], limit: int, metrics: MxMetrics, **kw: Any) -> None:
        super().__init__(handler, **kw)
        self._sessions = sessions
        self._limit = limit
        self._metrics = metrics
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse beyond the session limit; otherwise start the SMTP dialogue."""
        first = self.transport is None
        if first and len(self._sessions) >= self._limit:
            self._refused = True
            self._metrics.rejected.labels("busy").inc()
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(f"421 4.7.0 {self.hostname} Too many connections, try again later\r\n".encode())
            transport.close()
            return
        if first:
            self._sessions.add(self)
            self._metrics.sessions.set(len(self._sessions))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        """Forget the session."""
        if self._refused:
            return
        self._sessions.discard(self)
        self._metrics.sessions.set(len(self._sessions))
        super().connection_lost(error)

    def shut_down(self) -> None:
        """Tell the client we are going away and close the connection."""
        transport = self.transport
        if transport is None:
            return
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(f"421 4.3.2 {self.hostname} Service shutting down, try again later\r\n".encode())
        transport.close()


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
        self.sessions: set[MxSMTP] = set()
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

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Build everything and start listening.

        Raises:
            ConfigError: bad TLS files.
            OSError: the eml directory or the listening socket cannot be set up.
        """
        signer = await self._signer(stop)
        classifier = Classifier.from_config(self.config, signer)
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
            classifier=classifier,
            policy=RecipientPolicy(classifier.attributor, classifier.abuse_addresses),
            queues=AsyncQueues(self._redis, QueueSettings.from_config(self.config.global_)),
            event_queue=self.config.global_.backdata.queue_name,
            store=store,
            metrics=self.metrics,
            hostname=self.hostname,
        )
        context = tls_context(self.config, self.section)
        loop = asyncio.get_running_loop()
        handler, limit = self.handler, self.section.max_connections

        def factory() -> MxSMTP:
            return MxSMTP(
                handler,
                sessions=self.sessions,
                limit=limit,
                metrics=self.metrics,
                data_size_limit=self.section.max_message_size,
                hostname=self.hostname,
                ident="ESMTP",
                tls_context=context,
                timeout=SESSION_TIMEOUT,
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
            ",".join(sorted(classifier.return_path_domains)),
        )

    async def _signer(self, stop: asyncio.Event | None) -> AddressSigner:
        """The address signer; waits for Redis when the secret is kept there."""
        delay = 1.0
        while True:
            try:
                return await asyncio.to_thread(load_secret, self.config, self._probe)
            except redis.exceptions.RedisError as exc:
                log.warning("cannot read the address secret from Redis (%s); retrying in %.0fs", exc, delay)
            if stop is not None and stop.is_set():
                raise ConfigError(["stopped while waiting for Redis"])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

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
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + drain_s
        while self.handler is not None and self.handler.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.shut_down()
        if self._server is not None:
            await self._server.wait_closed()
        if self._beat is not None:
            self._beat.cancel()
        await self._redis.aclose()
        self._probe.close()
        log.info("stopped")


async def run(config: Config, metrics: MxMetrics, health: Health) -> None:
    """Run the MX until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = MxServer(config, metrics, health)
    await server.start(stop)
    await server.serve(stop)
