"""One Receiver process: an asyncio loop serving SMTP on already-bound listening sockets.

Each process has its own event loop (uvloop's: the stock asyncio loop and transports took
about a quarter of the CPU per message) and its own ``redis.asyncio`` client.  SIGTERM/SIGINT:
stop listening, close idle sessions with ``421 4.3.2``, let transactions in progress finish
(each is closed right after its DATA reply), and after ``shutdown-grace-seconds`` close what is
left (:meth:`common.smtpserver.Sessions.drain`); then close Redis and return 0.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final

import uvloop
from prometheus_client import CollectorRegistry

from common.authguard import AsyncLoginGuard
from common.config import Config
from common.lifecycle import Stopper
from common.queue import AsyncQueues, QueueSettings, connect_async
from common.smtpserver import Limits, Sessions
from common.trace import TraceSettings
from receiver.accounts import Accounts
from receiver.handler import QueueNames, SubmissionHandler
from receiver.metrics import ReceiverMetrics
from receiver.protocol import SubmissionSMTP

log = logging.getLogger(__name__)

MAX_AUTH_FAILURES_PER_SESSION: Final = 3
IDENT: Final = "ESMTP Inboxbooster-Mailer"


@dataclass(frozen=True)
class Listener:
    """A bound, listening socket; ``implicit_tls`` for the RFC 8314 port (465)."""

    sock: socket.socket
    implicit_tls: bool = False

    def describe(self) -> str:
        """host:port (kind), for logs."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port} ({'implicit TLS' if self.implicit_tls else 'STARTTLS'})"


class ReceiverProcess:
    """Serves SMTP on ``listeners`` until SIGTERM/SIGINT (or until its stopper is set)."""

    def __init__(
        self,
        config: Config,
        listeners: Sequence[Listener],
        tls_context: ssl.SSLContext,
        registry: CollectorRegistry,
        *,
        hostname: str,
        stopper: Stopper,
        processes: int = 1,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        section = config.customer.receiver
        assert section is not None  # the loader requires it for this service
        self.config = config
        self.section = section
        self.listeners = list(listeners)
        self.tls_context = tls_context
        self.metrics = ReceiverMetrics(registry)
        self.hostname = hostname
        self.stopper = stopper
        self.limits = Limits.from_config(section, processes)
        self.heartbeat = heartbeat

    def run(self) -> int:
        """Run the event loop until stopped; returns the exit status."""
        return uvloop.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = self.stopper.async_event()
        client = connect_async(
            self.config.redis_for("receiver"), client_name="receiver", registry=self.metrics.registry
        )
        names = self.config.global_.reliable_queue.queue_names
        transformer = self.config.transformer
        handler = SubmissionHandler(
            accounts=Accounts(self.section.auth_logins),
            guard=AsyncLoginGuard(client, "receiver", self.section.auth_lockout),
            lockout=self.section.auth_lockout,
            # Group commit: the messages of concurrent sessions share one MULTI/EXEC.
            queues=AsyncQueues(client, QueueSettings.from_config(self.config.global_), coalesce=True),
            queue_names=QueueNames(primary=names.primary_queue, default=names.default_queue),
            is_configured_domain=lambda domain: transformer.domain(domain) is not None,
            metrics=self.metrics,
            max_auth_failures_per_session=MAX_AUTH_FAILURES_PER_SESSION,
            trace_settings=TraceSettings.from_config(self.config),
        )
        sessions = Sessions(
            self.limits,
            on_refused=lambda reason: self.metrics.connections_refused.labels(reason).inc(),
            on_count=self.metrics.sessions.set,
        )
        servers = []
        for listener in self.listeners:
            factory = partial(self._protocol, handler, sessions, implicit_tls=listener.implicit_tls, loop=loop)
            tls = self.tls_context if listener.implicit_tls else None
            servers.append(await loop.create_server(factory, sock=listener.sock, ssl=tls))
        log.info("serving SMTP on %s", ", ".join(li.describe() for li in self.listeners))
        beating = asyncio.create_task(self._beat())
        await stop.wait()
        log.info("stopping: no new connections; finishing open transactions")
        beating.cancel()
        await sessions.drain(servers, self.section.shutdown_grace_seconds)
        await client.aclose()
        log.info("stopped")
        return 0

    def _protocol(
        self, handler: SubmissionHandler, sessions: Sessions, *, implicit_tls: bool, loop: asyncio.AbstractEventLoop
    ) -> SubmissionSMTP:
        return SubmissionSMTP(
            handler,
            sessions=sessions,
            trusted_networks=self.section.trusted_networks,
            max_auth_failures=MAX_AUTH_FAILURES_PER_SESSION,
            data_size_limit=self.section.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident=IDENT,
            # Implicit TLS: the connection is encrypted from the first byte, so no STARTTLS
            # and AUTH needs no further TLS check.
            tls_context=None if implicit_tls else self.tls_context,
            auth_require_tls=not implicit_tls,
            loop=loop,
        )

    async def _beat(self) -> None:
        while self.heartbeat is not None:
            self.heartbeat()
            await asyncio.sleep(5)
