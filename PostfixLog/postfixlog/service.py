"""PostfixLog: run a private Postfix, feed it from Redis, report its log as events.

Consumes ``INCOMING-TO-POSTFIX`` (group ``postfixlog``); produces ``delivered``, ``bounce``,
``deferred`` and ``error`` events on ``EVENT_QUEUE``; on shutdown puts the mail Postfix still
holds back on ``INCOMING-TO-POSTFIX``.

Start: remove messages an interrupted requeue already put back -> follow the log -> start
Postfix (master in the foreground, a child of this process) -> consume.  A Postfix that dies
is restarted; readiness is "Postfix answers, Redis answers, the log follower runs".

Stop (SIGTERM/SIGINT): stop consuming (the current batch is completed) -> stop Postfix -> read
its log to the end -> requeue what is left in its queue -> retire the instance (nothing of it
stays in Redis) -> exit 0.

Any number of instances run side by side (one per delivery pod), each with its own Postfix, its
own state in Redis and a consumer name derived from the pod's stable name
(:mod:`postfixlog.membership`).

Shaping (``postfixlog.shaping``, :mod:`postfixlog.rules`): every recipient is routed to its
provider's Postfix transport (:mod:`postfixlog.providers`, :mod:`postfixlog.routing`); the
``shaping`` thread releases held entries and the log follower reports every remote answer to the
shared back-off (:mod:`postfixlog.shaping`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence

import redis
from prometheus_client import CollectorRegistry

from common import bouncerules, keys
from common.config import Config
from common.config.postfixlog import PostfixLogSection
from common.errors import ConfigError, TemporaryError
from common.lifecycle import Stopper
from common.metrics import Health
from common.queue import Consumer, Queues, QueueSettings, connect, consumer_name, redis_errors
from common.retry import DEPENDENCY
from common.service import Context
from common.trace import TraceSettings
from common.worker import Worker, WorkerMetrics
from postfixlog import records
from postfixlog.follower import LogFollower, LogReader
from postfixlog.injector import Injector
from postfixlog.instance import PostfixError, PostfixInstance
from postfixlog.interpreter import Effects
from postfixlog.membership import Membership
from postfixlog.metrics import PostfixLogMetrics
from postfixlog.providers import ProviderResolver
from postfixlog.records import Delivery
from postfixlog.requeue import Requeuer
from postfixlog.rules import load_rules
from postfixlog.shaping import Shaper, safe_tick

log = logging.getLogger(__name__)

SERVICE = "postfixlog"
#: Seconds between "does Postfix still answer" probes (each one is a log line pair in Postfix).
PROBE_INTERVAL_S = 10.0
CATCH_UP_TIMEOUT_S = 15.0
#: Transactions per SMTP session in one batch (batch size = this x postfix.connections at least).
BATCH_ROUNDS = 32
#: Seconds between two sweeps of stale consumers by one instance (jittered).
SWEEP_INTERVAL_S = 60.0
#: Seconds between two releases of held entries (and refreshes of the provider gauges).
SHAPING_TICK_S = 1.0
#: Seconds between two withdrawals of a paused provider's deferred mail from Postfix.
WITHDRAW_INTERVAL_S = 10.0


class QueueResolver:
    """Did Postfix queue a transaction whose answer PostfixLog never read?  (see injector)."""

    def __init__(self, client: redis.Redis, instance: PostfixInstance, follower: LogFollower, name: str) -> None:
        self.redis: redis.Redis = client
        self.instance = instance
        self.follower = follower
        self.name = name

    def queued_ids(self, sent: Sequence[tuple[str, str, str]]) -> dict[str, str | None]:
        """For (token, mail_from, recipient): token -> queue id when Postfix accepted it, else None.

        A token another instance sent (an entry claimed from a consumer that stopped) is known
        only from that instance's records: its Postfix and its log are out of reach here.

        Raises:
            TemporaryError: Redis or Postfix cannot be asked, or the log follower is behind.
        """
        found, foreign = self._accepted([token for token, _, _ in sent])
        for token in foreign:
            if not found.get(token):
                log.warning(
                    "token %s was sent by instance %s and its Postfix did not record it; sending again",
                    token,
                    foreign[token],
                )
        missing = [item for item in sent if not found.get(item[0]) and item[0] not in foreign]
        if not missing:
            return found
        try:
            queued = self.instance.queue_json()
        except PostfixError as exc:
            raise TemporaryError(f"cannot list Postfix' queue: {exc}") from exc
        in_queue = {
            (str(m.get("sender")), str(r.get("address"))): str(m["queue_id"])
            for m in queued
            for r in m.get("recipients", ())
        }
        for token, mail_from, recipient in missing:
            found[token] = in_queue.get((mail_from, recipient))
        missing = [item for item in missing if not found.get(item[0])]
        if not missing:
            return found
        # Already delivered and gone?  Then qmgr logged it; let the follower read that far.
        if not self.follower.wait_caught_up(CATCH_UP_TIMEOUT_S):
            raise TemporaryError("log follower is behind; cannot tell whether Postfix queued a message")
        found.update(self._accepted([token for token, _, _ in missing])[0])
        return found

    def _accepted(self, tokens: list[str]) -> tuple[dict[str, str | None], dict[str, str]]:
        """Queue ids of the tokens the follower saw Postfix commit, and tokens of other instances.

        The follower writes the queue id into the injection record (``client=…
        orig_queue_id=<token>``) and ``acc`` into the queue id's record when qmgr picks the file
        up; a queue-id record that is gone means Postfix logged ``removed`` (delivered, bounced,
        expired) or the message was requeued -- either way it must not be sent again.
        """
        with redis_errors("read injection records"):
            pipe = self.redis.pipeline(transaction=False)
            for token in tokens:
                pipe.hmget(records.tx_key(token), "qid", "d")
            rows = pipe.execute()
            owners: list[str] = []
            qids: list[str] = []
            for qid_raw, envelope in rows:
                record = Delivery.from_hash({b"d": envelope}) if envelope else None
                owners.append((record.instance if record else None) or self.name)
                qids.append(qid_raw.decode() if qid_raw else "")
            pipe = self.redis.pipeline(transaction=False)
            for owner, qid in zip(owners, qids, strict=True):
                for key in (records.qid_key(owner, qid or "-"), records.legacy_qid_key(qid or "-")):
                    pipe.hget(key, "acc")
                    pipe.exists(key)
            replies = pipe.execute()
        out: dict[str, str | None] = {}
        foreign: dict[str, str] = {}
        for i, (token, owner, qid) in enumerate(zip(tokens, owners, qids, strict=True)):
            acc, exists, legacy_acc, legacy_exists = replies[4 * i : 4 * i + 4]
            accepted = acc == b"1" or legacy_acc == b"1" or not (exists or legacy_exists)
            out[token] = qid if qid and accepted else None
            if owner != self.name:
                foreign[token] = owner
        return out, foreign


class PostfixLogService:
    """Everything one PostfixLog process runs, wired from the configuration."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry,
        health: Health,
        stopper: Stopper,
        name: str | None = None,
    ) -> None:
        section = config.customer.postfixlog
        if section is None:
            raise ConfigError([f"{config.customer_path}: postfixlog: section is missing"])
        self.section: PostfixLogSection = section
        self.metrics_address = (section.prometheus.inet_interface, section.prometheus.inet_port)
        self.health = health
        self.stopper = stopper
        self.name = name or consumer_name(SERVICE)
        shaping = section.shaping
        self.rules = load_rules(shaping, config.customer_path)
        #: How failures read: the shipped bounce rules and the customer file's (the MX's too).
        self.bounce_rules = bouncerules.configured(config)
        self.instance = PostfixInstance.from_config(section, self.rules if shaping.enabled else None)
        self.redis = connect(config.redis_for(SERVICE), client_name=self.name)
        self.incoming = config.global_.postfix.incoming_queue_name
        self.event_queue = config.global_.backdata.queue_name
        lifetime = section.string_replacer.main_cf.get("maximal_queue_lifetime", "12h")
        qid_ttl = records.qid_ttl_s(lifetime)
        trace_settings = TraceSettings.from_config(config)
        self.metrics = PostfixLogMetrics(registry, self.instance.queue_counts)
        self.providers: ProviderResolver | None = None
        self.shaper: Shaper | None = None
        if shaping.enabled:
            self.providers = ProviderResolver(
                self.rules,
                nameservers=shaping.dns_servers or None,
                # The sandbox never reaches the internet, DNS included, unless told where to ask.
                use_dns=not section.sandbox.enabled or bool(shaping.dns_servers),
                timeout_s=shaping.dns_timeout_seconds,
                cache_size=shaping.dns_cache_size,
                metrics=self.metrics,
            )
            self.shaper = Shaper(self.redis, self.rules, incoming=self.incoming, metrics=self.metrics)
        state_ttl = int(section.instance_state_days * 86400)
        self.follower = LogFollower(
            LogReader(self.instance.log_path),
            self.redis,
            event_queue=self.event_queue,
            instance_name=self.name,
            qid_ttl_s=qid_ttl,
            position_ttl_s=state_ttl,
            metrics=self.metrics,
            rotate=self.instance.rotate_log,
            rotate_bytes=section.log_rotate_bytes,
            trace_settings=trace_settings,
            observer=self._observe if self.shaper is not None else None,
            rules=self.bounce_rules,
        )
        self.requeuer = Requeuer(self.instance, self.redis, incoming_queue=self.incoming, name=self.name)
        self.membership = Membership(
            self.redis,
            name=self.name,
            stream=self.incoming,
            group=keys.GROUP_POSTFIXLOG,
            state_ttl_s=state_ttl,
            stale_consumer_s=section.stale_consumer_minutes * 60,
        )
        self.injector = Injector(
            self.redis,
            host=section.postfix.hostname,
            port=section.postfix.port,
            event_queue=self.event_queue,
            qid_ttl_s=qid_ttl,
            resolver=QueueResolver(self.redis, self.instance, self.follower, self.name),
            instance=self.name,
            connections=section.postfix.connections,
            timeout_s=section.postfix.timeout_seconds,
            metrics=self.metrics,
            trace_settings=trace_settings,
            providers=self.providers,
            shaper=self.shaper,
            rules=self.bounce_rules,
        )
        queues = Queues(self.redis, QueueSettings.from_config(config.global_))
        # Batches of several rounds per connection: the sessions idle only between batches.
        batch_size = max(queues.settings.batch_size, BATCH_ROUNDS * section.postfix.connections)
        consumer = Consumer(queues, [self.incoming], keys.GROUP_POSTFIXLOG, self.name, batch_size=batch_size)
        self.worker = Worker(
            consumer,
            self.injector,
            stopper,
            metrics=WorkerMetrics("postfixlog", registry),
            heartbeat=health.beat,
        )
        self._postfix_answers = False
        self._next_heartbeat = self._next_sweep = 0.0
        if section.postfix.port != section.string_replacer.master_cf.smtpd_port:
            log.warning(
                "postfixlog.postfix.port (%d) differs from string-replacer.master-cf.smtpd-port (%d)",
                section.postfix.port,
                section.string_replacer.master_cf.smtpd_port,
            )
        health.add_check("postfix", lambda: self._postfix_answers and self.instance.running)
        health.add_check("redis", self._redis_answers)
        health.add_check("log-follower", lambda: self.follower.alive)

    def _observe(self, effects: Effects) -> None:
        """The follower's hook: remote answers per provider go to the shaper (back-off)."""
        if self.shaper is None or not effects.replies:
            return
        replies = []
        for provider, recipient, text in effects.replies:
            if provider is None and self.providers is not None:  # a record written before 2.1
                provider = self.providers.provider(recipient.rpartition("@")[2])
            replies.append((provider or recipient.rpartition("@")[2].lower(), text))
        try:
            self.shaper.observe(replies)
        except TemporaryError as exc:
            log.warning("provider answers not counted: %s", exc)

    def _shaping_loop(self) -> None:
        """Release held entries and refresh the provider gauges, every second, until stopped.

        While a provider is paused, its mail deferred in this instance's Postfix goes to Redis
        too (when the pause is first seen, then every :data:`WITHDRAW_INTERVAL_S`).
        """
        assert self.shaper is not None
        withdrawn: frozenset[str] = frozenset()
        next_withdraw = 0.0
        while not self.stopper.wait(SHAPING_TICK_S):
            if not safe_tick(self.shaper):
                continue
            paused = self.shaper.paused
            if paused and (paused - withdrawn or time.monotonic() >= next_withdraw) and self.instance.running:
                try:
                    self.requeuer.withdraw(paused, self.shaper.withdrawn_writes)
                except (TemporaryError, PostfixError) as exc:
                    log.warning("deferred mail of paused providers stays in Postfix for now: %s", exc)
                next_withdraw = time.monotonic() + WITHDRAW_INTERVAL_S
            withdrawn = paused

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit status."""
        early_exit = self._prepare()
        if early_exit is not None:
            return early_exit
        worker = threading.Thread(target=self.worker.run, name="injector")
        worker.start()
        shaping = None
        if self.shaper is not None:
            shaping = threading.Thread(target=self._shaping_loop, name="shaping", daemon=True)
            shaping.start()
        status = self._supervise(worker)
        worker.join()
        if shaping is not None:
            shaping.join(10.0)
        return self.shutdown() or status

    def _prepare(self) -> int | None:
        """Finish an interrupted requeue, follow the log, start Postfix.

        Returns None when running, else the exit status: 1 when Postfix cannot be set up (a
        configuration or directory problem: retrying would not help), 0 when stopped meanwhile.
        """
        try:
            self.instance.render()
            self.instance.stop_stale()
            self.instance.check()  # creates the queue directories postqueue reads
        except PostfixError as exc:
            log.error("cannot set up Postfix: %s", exc)
            return 1
        attempt = 0
        while not self.stopper.is_set():
            try:
                self.requeuer.finish_interrupted()
                break
            except (TemporaryError, PostfixError) as exc:
                attempt += 1
                log.warning("cannot check Postfix' queue before starting (%s); retry %d", exc, attempt)
                DEPENDENCY.wait(attempt, self.stopper)
        if self.stopper.is_set():
            log.info("stopped before Postfix was started")
            return 0
        self.follower.start()
        try:
            self.instance.start(check=False)
        except PostfixError as exc:
            log.error("Postfix does not start: %s", exc)
            self.follower.drain(5.0)
            return 1
        self._postfix_answers = True
        self.metrics.postfix_up.set(1)
        return None

    def _supervise(self, worker: threading.Thread) -> int:
        """Keep Postfix running while the injector works; returns 1 if the injector died."""
        next_probe = time.monotonic() + PROBE_INTERVAL_S
        failures = 0
        self._membership_tasks(force=True)
        while not self.stopper.wait(0.5):
            self._membership_tasks()
            if not worker.is_alive():
                log.error("the injector stopped unexpectedly; shutting down")
                self.stopper.stop()
                return 1
            if not self.instance.running:
                self._postfix_answers = False
                self.metrics.postfix_up.set(0)
                failures += 1
                status = self.instance.proc.returncode if self.instance.proc else None
                log.error("Postfix exited (status %s); restarting it", status)
                try:
                    self.instance.start()
                    self.injector.reconnect()
                    self.metrics.postfix_restarts.inc()
                    self._postfix_answers = True
                    self.metrics.postfix_up.set(1)
                    failures = 0
                except PostfixError as exc:
                    log.error("Postfix does not start again: %s", exc)
                    DEPENDENCY.wait(failures, self.stopper)
                continue
            if time.monotonic() >= next_probe:
                self._postfix_answers = self.instance.answers()
                self.metrics.postfix_up.set(1 if self._postfix_answers else 0)
                next_probe = time.monotonic() + PROBE_INTERVAL_S
        return 0

    def _membership_tasks(self, *, force: bool = False) -> None:
        """Heartbeat and sweep when due (a Redis outage only postpones them)."""
        now = time.monotonic()
        try:
            if force or now >= self._next_heartbeat:
                self._next_heartbeat = now + PROBE_INTERVAL_S
                self.membership.heartbeat()
            if force or now >= self._next_sweep:
                # Spread the instances' sweeps; any one of them is enough.
                self._next_sweep = now + SWEEP_INTERVAL_S * random.uniform(0.75, 1.25)
                self.membership.sweep()
        except TemporaryError as exc:
            log.warning("instance heartbeat/sweep postponed: %s", exc)

    def shutdown(self) -> int:
        """Stop Postfix, read its log to the end, requeue what is left; returns 0 or 1.

        When everything went back to Redis and the log was read to its end, the instance is
        retired (:meth:`postfixlog.membership.Membership.retire`): a pod scaled away leaves
        nothing behind.
        """
        self.injector.close()
        if self.providers is not None:
            self.providers.close()
        self._postfix_answers = False
        self.instance.stop()
        self.metrics.postfix_up.set(0)
        drained = self.follower.drain(60.0)
        if not drained:
            log.error("log follower did not reach the end of the log; later events come after restart")
        try:
            report = self.requeuer.requeue_all()
        except (TemporaryError, PostfixError) as exc:
            log.error("requeue failed (%s); the mail stays in Postfix' queue for the next start", exc)
            return 1
        if report.failed:
            return 1
        if drained and report.left == 0:
            self._retire()
        return 0

    def _retire(self) -> None:
        """Nothing is left in Postfix and every log line is handled: forget this instance."""
        try:
            self.instance.retire_log()
            self.membership.retire()
        except (OSError, TemporaryError) as exc:
            # Harmless: the position then names a log that is gone (a new log is read from its
            # start) and the keys expire; the next start works either way.
            log.warning("instance %s not retired: %s", self.name, exc)


def build(context: Context) -> PostfixLogService:
    """The PostfixLog service of ``context``."""
    return PostfixLogService(context.config, registry=context.registry, health=context.health, stopper=context.stopper)
