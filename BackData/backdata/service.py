"""BackData assembled: the webhook worker (main thread) and the bounce-manager worker (a thread).

Consumes ``EVENT_QUEUE`` (group ``backdata``) and, with a bounce manager configured,
``IB:backdata:bounce-manager``; feeds the suppression list (``IB:suppr:*``) and appends webhook
answers to the timelines (``IB:trace:<uuid>``).  Both loops share one stop flag: on SIGTERM each finishes the
POST in flight (at most ``timeout-seconds``), leaves what is not delivered pending in Redis,
and :meth:`BackData.run` returns.
"""

from __future__ import annotations

import logging
import threading

from backdata import SERVICE
from backdata.bouncemanager import STREAM as BOUNCE_MANAGER_STREAM
from backdata.bouncemanager import BounceManagerHandler
from backdata.consumer import BatchingConsumer
from backdata.delivery import WebhookHandler
from backdata.metrics import BackDataMetrics, BacklogCollector
from backdata.parking import Parking
from backdata.poster import Poster
from backdata.signing import Signer
from common import keys
from common.config import Config
from common.config.backdata import BackDataSection
from common.queue import Queues, QueueSettings, connect, consumer_name
from common.retry import RetryPolicy
from common.service import Context
from common.suppression import SuppressionList, SuppressionSettings
from common.trace import TraceSettings
from common.worker import Worker, WorkerMetrics

log = logging.getLogger(__name__)


def section_of(config: Config) -> BackDataSection:
    """The ``backdata`` section (``load_config(service="backdata")`` guarantees it)."""
    section = config.customer.backdata
    if section is None:
        raise ValueError("the customer file has no backdata section")
    return section


def signer_of(section: BackDataSection) -> Signer | None:
    """The Standard Webhooks signer, or None without ``webhook-secret``."""
    secrets = [s.get_secret_value() for s in (section.webhook_secret, section.webhook_secret_previous) if s]
    return Signer(secrets) if secrets else None


class BackData:
    """Both workers, built from the configuration (a :class:`common.service.Service`)."""

    def __init__(self, context: Context, *, block_ms: int = 1000) -> None:
        config, registry, stopper = context.config, context.registry, context.stopper
        heartbeat = context.health.beat
        section = section_of(config)
        self.metrics_address = (section.prometheus.inet_interface, section.prometheus.inet_port)
        self.client = connect(config.redis_for(SERVICE), client_name=SERVICE)
        client = self.client
        context.health.add_check("redis", lambda: bool(client.ping()))
        self.stopper = stopper
        self.queue = config.global_.backdata.queue_name
        settings = QueueSettings.from_config(config.global_)
        queues = Queues(client, settings)
        metrics = BackDataMetrics(registry)
        registry.register(BacklogCollector(queues, self.queue, keys.GROUP_BACKDATA))
        worker_metrics = WorkerMetrics("backdata", registry)
        policy = RetryPolicy(base_s=min(1.0, section.max_backoff_seconds), cap_s=section.max_backoff_seconds)
        parking = Parking(queues, self.queue, policy=policy)
        consumer = BatchingConsumer(
            queues,
            [self.queue],
            keys.GROUP_BACKDATA,
            consumer_name(SERVICE),
            batch_size=section.batch_size,
            max_wait_ms=section.batch_max_wait_ms,
            parking=parking,
            block_ms=block_ms,
        )
        handler = WebhookHandler(
            Poster(section.post_url, timeout_s=section.timeout_seconds, signer=signer_of(section)),
            parking,
            metrics,
            stopper,
            max_age_s=section.max_age_seconds,
            budget_s=settings.claim_idle_ms / 2000,
            bounce_manager=section.bounce_manager is not None,
            heartbeat=heartbeat,
            suppression=SuppressionList(client, SuppressionSettings.from_config(config)),
            trace_settings=TraceSettings.from_config(config),
        )
        self.worker = Worker(consumer, handler, stopper, policy=policy, metrics=worker_metrics, heartbeat=heartbeat)
        self.side: Worker | None = None
        if section.bounce_manager is not None:
            bm_consumer = BatchingConsumer(
                queues,
                [BOUNCE_MANAGER_STREAM],
                keys.GROUP_BACKDATA,
                consumer_name(SERVICE),
                batch_size=section.batch_size,
                max_wait_ms=section.batch_max_wait_ms,
                block_ms=block_ms,
            )
            bm_handler = BounceManagerHandler(
                Poster(section.bounce_manager.url, timeout_s=section.timeout_seconds),
                section.bounce_manager,
                metrics,
                max_age_s=section.max_age_seconds,
            )
            self.side = Worker(bm_consumer, bm_handler, stopper, policy=policy, metrics=worker_metrics)
        self.failed = False

    def run(self) -> int:
        """Run until the stopper is set; a crashed bounce-manager thread stops the service too.

        Returns 1 when the bounce-manager thread crashed, else 0.
        """
        thread = None
        if self.side is not None:
            thread = threading.Thread(target=self._run_side, args=(self.side,), name="bounce-manager", daemon=True)
            thread.start()
        log.info("delivering %s", self.queue)
        try:
            self.worker.run()
        finally:
            self.stopper.stop()
            if thread is not None:
                thread.join()
            self.client.close()
        return 1 if self.failed else 0

    def _run_side(self, worker: Worker) -> None:
        try:
            worker.run()
        except BaseException:
            log.exception("the bounce-manager worker crashed; stopping the service")
            self.failed = True
            self.stopper.stop()
            raise


def build(context: Context) -> BackData:
    """The BackData service of ``context``."""
    return BackData(context)
