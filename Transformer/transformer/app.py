"""Wiring: configuration -> Redis, keys, handler, consumer, worker loop.

Consumes ``reliable-queue.queue-names.primary-queue`` then ``default-queue`` (consumer group
``transformer``); produces ``postfix.incoming-queue-name`` and, for unprocessable messages,
``backdata.queue-name``.  One process uses one core; scale with more processes (replicas).
"""

from __future__ import annotations

import logging
import time

import redis
from prometheus_client import CollectorRegistry

from common import keys
from common.addressing import AddressSigner, load_secret
from common.config import Config
from common.lifecycle import Stopper
from common.metrics import Health, register_memory_gauge, serve
from common.queue import Consumer, Queues, QueueSettings, connect, consumer_name
from common.worker import RetryPolicy, Worker, WorkerMetrics
from transformer.handler import SERVICE, TransformHandler
from transformer.metrics import TransformerMetrics
from transformer.settings import Settings
from transformer.transform import MessageTransformer

log = logging.getLogger(__name__)


def run(config: Config, stopper: Stopper) -> None:
    """Serve metrics and transform messages until ``stopper`` is set.

    Raises:
        ConfigError: a DKIM key cannot be loaded.
    """
    settings = Settings.from_config(config, time.time)
    registry = CollectorRegistry()
    metrics = TransformerMetrics(registry)
    register_memory_gauge(registry)
    health = Health()
    client = connect(config.redis_for(SERVICE), client_name=SERVICE)
    health.add_check("redis", lambda: bool(client.ping()))
    prom = config.transformer.prometheus
    server = serve(prom.inet_interface, prom.inet_port, health, registry)
    try:
        addresses = _address_signer(config, client, stopper, health)
        if addresses is None:
            return
        names = config.global_.reliable_queue.queue_names
        handler = TransformHandler(
            MessageTransformer(settings, addresses),
            primary_queue=names.primary_queue,
            outgoing_queue=config.global_.postfix.incoming_queue_name,
            event_queue=config.global_.backdata.queue_name,
            metrics=metrics,
        )
        queues = Queues(client, QueueSettings.from_config(config.global_))
        consumer = Consumer(
            queues,
            [names.primary_queue, names.default_queue],
            keys.GROUP_TRANSFORMER,
            consumer_name(SERVICE),
        )
        log.info(
            "transforming %s then %s into %s for %d domain(s)",
            names.primary_queue,
            names.default_queue,
            handler.outgoing_queue,
            len(settings.profiles),
        )
        worker = Worker(
            consumer,
            handler,
            stopper,
            policy=RetryPolicy(),
            metrics=WorkerMetrics(registry),
            heartbeat=health.beat,
        )
        worker.run()
    finally:
        server.close()
        client.close()


def _address_signer(config: Config, client: redis.Redis, stopper: Stopper, health: Health) -> AddressSigner | None:
    """The return-path tag signer; waits for Redis when the secret lives there."""
    attempt = 0
    while not stopper.is_set():
        health.beat()  # waiting for Redis is not a hung loop
        try:
            return load_secret(config, client)
        except redis.exceptions.RedisError as exc:
            attempt += 1
            log.warning("cannot read the address secret from Redis (%s); retry %d", exc, attempt)
            stopper.wait(RetryPolicy().delay(attempt))
    return None
