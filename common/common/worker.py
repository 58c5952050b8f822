"""The one worker loop every queue-consuming service reuses (style anchor C8).

A service supplies a handler; the loop owns reading, completing, retrying, dead-lettering and
stopping:

* :class:`Done` -- the outputs are handed off and the input acknowledged in one MULTI/EXEC;
* :class:`Fail` -- a permanent problem: the entry goes to the dead-letter stream at once, with
  the handler's optional outputs (e.g. an ``error`` event) in the same transaction;
* :class:`Retry` -- kept pending and tried again after a capped, jittered backoff.  A temporary
  error (``counts=False``: a dependency is down) does not use up the entry's delivery budget;
  an unexpected exception (``counts=True``) does, and the entry is dead-lettered once it has
  been delivered ``max_deliveries`` times.

SIGTERM/SIGINT: the current batch is finished and completed, then :meth:`Worker.run` returns.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from common.errors import PermanentError, TemporaryError
from common.lifecycle import Stopper
from common.queue import Consumer, Entry, Write
from common.retry import RetryPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Done:
    """Completed: write ``outputs`` and acknowledge the input."""

    outputs: Sequence[Write] = ()


@dataclass(frozen=True)
class Retry:
    """Try again later.  ``counts``: an unexpected failure that uses up a delivery."""

    reason: str
    counts: bool = False
    retry_after: float | None = None


@dataclass(frozen=True)
class Fail:
    """Dead-letter now with ``reason``; ``outputs`` are written in the same transaction."""

    reason: str
    outputs: Sequence[Write] = ()


Outcome = Done | Retry | Fail


class BatchHandler(Protocol):
    """What the loop calls: one outcome per entry, in order."""

    def handle_batch(self, entries: Sequence[Entry]) -> Sequence[Outcome]:
        """Process a batch."""
        ...

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Write]:
        """Outputs to write when ``entry`` is dead-lettered (e.g. an error event)."""
        ...


class EntryHandler(abc.ABC):
    """Adapter for handlers that process one entry at a time."""

    @abc.abstractmethod
    def handle(self, entry: Entry) -> Sequence[Write]:
        """Process one entry and return its outputs.

        Raises:
            TemporaryError: something it needs is unavailable; retry without counting.
            PermanentError: the entry can never succeed; dead-letter it.
        """

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Write]:
        """Outputs written with a dead-lettered entry; none by default."""
        return ()

    def handle_batch(self, entries: Sequence[Entry]) -> Sequence[Outcome]:
        """Call :meth:`handle` for each entry, mapping exceptions to outcomes."""
        outcomes: list[Outcome] = []
        for entry in entries:
            try:
                outcomes.append(Done(self.handle(entry)))
            except TemporaryError as exc:
                outcomes.append(Retry(str(exc), retry_after=exc.retry_after))
            except PermanentError as exc:
                reason = str(exc)
                outcomes.append(Fail(reason, self.dead_letter_outputs(entry, reason)))
            except Exception as exc:
                log.exception("unexpected error on %s %s (delivery %d)", entry.queue, entry.id, entry.deliveries)
                outcomes.append(Retry(f"{type(exc).__name__}: {exc}", counts=True))
        return outcomes


@dataclass
class WorkerMetrics:
    """Counters every worker exports, named after its service (``mailer_<service>_worker_…``).

    ``mailer_<service>_worker_entries_total{queue, outcome}`` (outcome: done, retried, dead) and
    ``mailer_<service>_worker_batch_seconds``.
    """

    service: str
    registry: CollectorRegistry | None = None
    entries: Counter = field(init=False)
    batch_seconds: Histogram = field(init=False)

    def __post_init__(self) -> None:
        kw = {"registry": self.registry} if self.registry is not None else {}
        self.entries = Counter(
            f"mailer_{self.service}_worker_entries",
            "Queue entries processed, by queue and outcome",
            ["queue", "outcome"],
            **kw,  # type: ignore[arg-type]
        )
        self.batch_seconds = Histogram(
            f"mailer_{self.service}_worker_batch_seconds",
            "Time to process and complete one batch",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            **kw,  # type: ignore[arg-type]
        )


class Worker:
    """Runs a handler over a consumer until stopped."""

    def __init__(
        self,
        consumer: Consumer,
        handler: BatchHandler,
        stopper: Stopper,
        *,
        policy: RetryPolicy | None = None,
        metrics: WorkerMetrics | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.handler = handler
        self.stopper = stopper
        self.policy = policy or RetryPolicy()
        self.metrics = metrics
        self.heartbeat = heartbeat or (lambda: None)
        self.processed = 0
        consumer.on_dead_letter = handler.dead_letter_outputs

    def run(self) -> None:
        """Process batches until a stop is requested; the last batch is always completed."""
        self._setup()
        pending: list[Entry] = []
        streak = 0
        while not self.stopper.is_set():
            self.heartbeat()
            try:
                batch = pending or self.consumer.read()
            except TemporaryError as exc:
                streak += 1
                self._backoff(streak, None, f"reading failed: {exc}", [])
                continue
            pending = []
            if not batch:
                continue
            pending, retry_after = self._process(batch)
            if pending:
                streak += 1
                self._backoff(streak, retry_after, pending[0].queue, pending)
            else:
                streak = 0
        if pending:
            # Stopping while entries wait for a retry: a restart must not count that as a
            # crash, so hand them back with the deliveries that really happened.
            try:
                self.consumer.release(pending)
            except TemporaryError as exc:
                log.warning("cannot release %d pending entries (%s)", len(pending), exc)
        log.info("worker %s stopped after %d entries", self.consumer.name, self.processed)

    def _setup(self) -> None:
        attempt = 0
        while not self.stopper.is_set():
            try:
                self.consumer.setup()
                return
            except TemporaryError as exc:
                attempt += 1
                log.warning("cannot set up consumer group (%s); retrying", exc)
                self.policy.wait(attempt, self.stopper)

    def _process(self, batch: list[Entry]) -> tuple[list[Entry], float | None]:
        started = time.perf_counter()
        outcomes = self.handler.handle_batch(batch)
        if len(outcomes) != len(batch):
            raise RuntimeError(f"handler returned {len(outcomes)} outcomes for {len(batch)} entries")
        done: list[tuple[Entry, Sequence[Write]]] = []
        failed: list[tuple[Entry, str, Sequence[Write]]] = []
        temporary: list[Entry] = []
        counted: list[Entry] = []
        retry_after: float | None = None
        for entry, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Done):
                done.append((entry, outcome.outputs))
            elif isinstance(outcome, Fail):
                failed.append((entry, outcome.reason, outcome.outputs))
            elif outcome.counts:
                if entry.deliveries >= self.consumer.settings.max_deliveries:
                    reason = f"failed {entry.deliveries} times; last error: {outcome.reason}"
                    failed.append((entry, reason, self.handler.dead_letter_outputs(entry, reason)))
                else:
                    counted.append(entry)
            else:
                temporary.append(entry)
                if outcome.retry_after is not None:
                    retry_after = max(retry_after or 0.0, outcome.retry_after)
        self._commit(done, failed)
        retry = temporary
        if counted:
            retry = retry + self._redeliver(counted)
        self._count(batch[0].queue, len(done), len(failed), len(retry))
        if self.metrics is not None:
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
        if retry:
            log.warning(
                "will retry %d entries of %s (first %s, delivery %d/%d)",
                len(retry),
                retry[0].queue,
                retry[0].id,
                max(e.deliveries for e in retry),
                self.consumer.settings.max_deliveries,
            )
        # Keep input order: the retried entries are tried again before anything new.
        retry.sort(key=lambda e: (e.queue, e.id))
        return retry, retry_after

    def _commit(
        self,
        done: list[tuple[Entry, Sequence[Write]]],
        failed: list[tuple[Entry, str, Sequence[Write]]],
    ) -> None:
        """Complete and dead-letter; retry while Redis is down (side effects already happened)."""
        attempt = 0
        while done or failed:
            try:
                if done:
                    self.consumer.complete(done)
                    self.processed += len(done)
                    done = []
                if failed:
                    self.consumer.dead_letter(failed)
                    failed = []
            except TemporaryError as exc:
                attempt += 1
                if self.stopper.is_set() and attempt >= 3:
                    log.error(
                        "stopping with %d entries not completed (%s); they will be delivered again",
                        len(done) + len(failed),
                        exc,
                    )
                    return
                log.warning("cannot complete batch (%s); retrying", exc)
                self.policy.wait(attempt, self.stopper)

    def _redeliver(self, entries: list[Entry]) -> list[Entry]:
        try:
            return self.consumer.redeliver(entries)
        except TemporaryError:
            return [Entry(e.queue, e.id, e.fields, e.deliveries + 1) for e in entries]

    def _backoff(self, streak: int, retry_after: float | None, what: str, pending: list[Entry]) -> None:
        delay = max(self.policy.delay(streak), retry_after or 0.0)
        log.warning("backing off %.1fs (attempt %d): %s", delay, streak, what)
        deadline = time.monotonic() + delay
        touch_every = max(self.consumer.settings.claim_idle_ms / 3000, 0.5)
        while not self.stopper.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.stopper.wait(min(left, touch_every)):
                return
            self.heartbeat()
            if pending:
                try:
                    self.consumer.touch(pending)
                except TemporaryError:
                    log.debug("cannot touch pending entries; Redis unavailable")

    def _count(self, queue: str, done: int, dead: int, retried: int) -> None:
        if self.metrics is None:
            return
        for outcome, n in (("done", done), ("dead", dead), ("retried", retried)):
            if n:
                self.metrics.entries.labels(queue=queue, outcome=outcome).inc(n)
