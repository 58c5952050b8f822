"""Wiring: configuration -> Redis, keys, handler, consumer, worker loop.

Consumes ``reliable-queue.queue-names.primary-queue`` then ``default-queue`` (consumer group
``transformer``); produces ``postfix.incoming-queue-name`` and, for unprocessable messages
and suppressed recipients, ``backdata.queue-name``; reads the suppression list
(``IB:suppr:*``) and appends to the timelines (``IB:trace:<uuid>``).  One process uses one
core; scale with more processes (replicas).
"""

from __future__ import annotations

import logging
import time

from common import binding, keys
from common.addressing import wait_for_secret
from common.queue import Consumer, Queues, QueueSettings, connect, consumer_name
from common.service import Context
from common.suppression import SuppressionList, SuppressionSettings
from common.trace import TraceSettings
from common.worker import Worker, WorkerMetrics
from transformer.handler import SERVICE, TransformHandler
from transformer.metrics import TransformerMetrics
from transformer.settings import Settings
from transformer.transform import MessageTransformer

log = logging.getLogger(__name__)


class TransformerService:
    """The Transformer of one process (a :class:`common.service.Service`)."""

    def __init__(self, context: Context, *, block_ms: int = 1000) -> None:
        config = context.config
        self.context = context
        #: Every DKIM key is loaded here: a bad key stops the start (and ``--check-config``).
        self.settings = Settings.from_config(config, time.time)
        self.metrics = TransformerMetrics(context.registry)
        self.metrics_address = (config.transformer.prometheus.inet_interface, config.transformer.prometheus.inet_port)
        self.client = connect(config.redis_for(SERVICE), client_name=SERVICE)
        context.health.add_check("redis", lambda: bool(self.client.ping()))
        names = config.global_.reliable_queue.queue_names
        self.queues = Queues(self.client, QueueSettings.from_config(config.global_))
        self.consumer = Consumer(
            self.queues,
            [names.primary_queue, names.default_queue],
            keys.GROUP_TRANSFORMER,
            consumer_name(SERVICE),
            block_ms=block_ms,
        )
        self.handler: TransformHandler | None = None

    def run(self) -> int:
        """Transform messages until stopped."""
        context, config = self.context, self.context.config
        try:
            addresses = wait_for_secret(config, self.client, context.stopper, context.health.beat)
            if addresses is None:
                return 0
            names = config.global_.reliable_queue.queue_names
            self.handler = TransformHandler(
                MessageTransformer(self.settings, addresses, binding_ttl_s=binding.retention_s(config)),
                primary_queue=names.primary_queue,
                outgoing_queue=config.global_.postfix.incoming_queue_name,
                event_queue=config.global_.backdata.queue_name,
                metrics=self.metrics,
                suppression=SuppressionList(self.client, SuppressionSettings.from_config(config)),
                trace_settings=TraceSettings.from_config(config),
            )
            log.info(
                "transforming %s then %s into %s for %d domain(s)",
                names.primary_queue,
                names.default_queue,
                self.handler.outgoing_queue,
                len(self.settings.profiles),
            )
            worker = Worker(
                self.consumer,
                self.handler,
                context.stopper,
                metrics=WorkerMetrics("transformer", context.registry),
                heartbeat=context.health.beat,
            )
            worker.run()
        finally:
            self.client.close()
        return 0


def build(context: Context) -> TransformerService:
    """The Transformer service of ``context`` (raises ConfigError for unusable DKIM keys)."""
    return TransformerService(context)
