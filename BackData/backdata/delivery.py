"""Delivery of event batches to the customer's webhook: the batch handler of BackData's worker.

Consumes ``EVENT_QUEUE`` (through :class:`common.worker.Worker`); produces parked events
(``IB:backdata:parked``), bounce-manager records (``IB:backdata:bounce-manager``) and dead
letters (``EVENT_QUEUE:dead``).

For each batch:

1. Every entry is decoded; one that is not a JSON event is dead-lettered with the reason and
   the rest of the batch goes on (the original dropped the whole batch).  Internal fields
   (``fd``, ``rcpt``) are stripped; an event without ``event_id`` gets a stable one.
2. The events are POSTed as one JSON array.  2xx: all delivered.  A transient failure (no
   connection, timeout, 5xx, 408, 429...): the whole batch is retried by the worker loop with
   capped exponential backoff and jitter (``Retry-After`` honoured), without using up the
   entries' delivery budget; nothing new is read meanwhile, so memory holds one batch and
   the rest waits in Redis.  A rejection (other 4xx): the batch is split in halves, recursively,
   until the refused events are alone; those are parked (:mod:`backdata.parking`) and retried
   on their own schedule while the others flow.  When *every* event of a batch is refused on
   its own, the endpoint is refusing everything: the oldest one is parked and the rest wait
   like a transient failure (one more is parked each round, so two bad events in one batch
   cannot block the queue).
3. Age limit: an event is retried until ``max-age-seconds`` after its ``timestamp`` (after
   ``replayed-at`` for a replayed event); a failed attempt after that dead-letters it.

Before the first POST of a batch, its ``bounce`` (``suppress: true``), ``spam-report`` and
``unsubscribe`` events feed the suppression list (:mod:`common.suppression`) in one pipelined
round trip -- *before* and independently of the webhook's answer, so an endpoint that is down
for days never delays the list (a feed is idempotent and happens once per ``event_id``: a marker
``IB:suppr-fed:<event id>`` lives ``max-age-seconds`` plus a day).  If Redis cannot take the
feed, nothing is posted and the batch waits.  Every event's webhook answer (delivered, parked,
retrying, dead-lettered) goes into its message's timeline (:mod:`common.trace`): in the
completion's MULTI/EXEC, or -- for a batch that waits -- in one pipeline with the wait.

Stopping (SIGTERM) never interrupts a POST: the one in flight completes or times out; the
events not yet delivered stay pending in Redis and are read again at the next start.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from backdata import bouncemanager
from backdata.metrics import BackDataMetrics
from backdata.parking import SINCE, Parking
from backdata.poster import Poster, PostResult
from backdata.signing import batch_id
from common import binding, keys, logs, trace
from common.binding import Sent
from common.errors import PermanentError, TemporaryError
from common.events import EVENT_KINDS, decode_event, make_event_id, public
from common.lifecycle import Stopper
from common.queue import REPLAYED_AT, Entry, ListAppend, Output, Write, redis_errors, write_all
from common.suppression import SuppressionList, normalise_address, reason_of, valid_address, valid_scope
from common.trace import TraceSettings
from common.worker import Done, Fail, Outcome, Retry

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One decoded event of the batch."""

    index: int
    entry: Entry
    event: dict[str, Any]
    body: bytes
    since: float
    deadline: float
    #: The webhook's answer to the latest POST holding this event.
    answer: str = ""
    #: Trace entry of the suppression-list feed this event just made.
    listed: str | None = None

    @property
    def kind(self) -> str:
        """The event type."""
        return str(self.event.get("event"))

    @property
    def event_id(self) -> str:
        """The event's stable id."""
        return str(self.event["event_id"])


@dataclass
class Attempt:
    """What the POSTs of one batch achieved."""

    delivered: list[Item] = field(default_factory=list)
    rejected: list[tuple[Item, PostResult]] = field(default_factory=list)
    unresolved: list[Item] = field(default_factory=list)
    failure: PostResult | None = None


class WebhookHandler:
    """Batch handler of the event queue (see the module docstring)."""

    def __init__(
        self,
        poster: Poster,
        parking: Parking,
        metrics: BackDataMetrics,
        stopper: Stopper,
        *,
        max_age_s: float,
        budget_s: float,
        bounce_manager: bool = False,
        heartbeat: Callable[[], None] | None = None,
        suppression: SuppressionList | None = None,
        trace_settings: TraceSettings = trace.DISABLED,
    ) -> None:
        self.poster = poster
        self.parking = parking
        self.metrics = metrics
        self.stopper = stopper
        self.max_age_s = max_age_s
        self.budget_s = budget_s
        self.bounce_manager = bounce_manager
        self.heartbeat = heartbeat or (lambda: None)
        self.suppression = suppression if suppression is not None and suppression.settings.enabled else None
        self.trace = trace_settings
        #: How long an event's feed marker lives: longer than the event can be retried.
        self.fed_ttl_s = int(max_age_s) + 86400
        self.redis: redis.Redis | None = suppression.redis if suppression is not None else None

    # -- the worker's interface ----------------------------------------------------------------

    def handle_batch(self, entries: Sequence[Entry]) -> Sequence[Outcome]:
        """One outcome per entry: Done (delivered or parked), Retry (wait) or Fail (dead-letter)."""
        outcomes: list[Outcome | None] = [None] * len(entries)
        items: list[Item] = []
        for index, entry in enumerate(entries):
            try:
                items.append(self._item(index, entry))
            except PermanentError as exc:
                self.metrics.malformed.inc()
                self.metrics.dead_lettered.labels("malformed").inc()
                outcomes[index] = Fail(f"malformed event entry: {exc}")
            except Exception as exc:  # one event that breaks this code must not stop its batch
                log.exception("cannot prepare %s %s", entry.queue, entry.id)
                outcomes[index] = Retry(f"{type(exc).__name__}: {exc}", counts=True)
        if items:
            try:
                self._feed(items)
            except TemporaryError as exc:
                log.warning("cannot feed the suppression list (%s); the batch waits", exc)
                return [o if o is not None else Retry(f"suppression list: {exc}") for o in outcomes]
            self._settle(self._deliver(items), len(items), outcomes)
            self._trace_waiting(items, outcomes)
        return [o if o is not None else Retry("no outcome", counts=True) for o in outcomes]

    def dead_letter_outputs(self, entry: Entry, reason: str) -> Sequence[Output]:
        """Nothing: an undeliverable event must not produce another event for the same webhook."""
        return ()

    # -- the suppression list and the timelines ------------------------------------------------

    def _feed(self, items: list[Item]) -> None:
        """Feed the list from the batch's suppressing events (see the module docstring).

        Raises:
            TemporaryError: Redis did not take it.
        """
        if self.suppression is None:
            return
        todo = [(item, reason) for item in items if (reason := reason_of(item.event)) is not None]
        if not todo:
            return
        with redis_errors("feed the suppression list"):
            client = self.suppression.redis
            sent = self._sent_records(client, [item for item, _ in todo if not item.event.get("fd")])
            pipe = client.pipeline(transaction=False)
            fed: list[tuple[Item, str, str, str]] = []
            for item, reason in todo:
                target = self._target(item, sent)
                if target is None:
                    continue
                scope, address = target
                self.suppression.feed(
                    pipe,
                    scope=scope,
                    address=address,
                    reason=reason,
                    at=_timestamp(item.event) or time.time(),
                    event_id=item.event_id,
                    uuid=_text(item.event.get("uuid")),
                    once_for_s=self.fed_ttl_s,
                )
                fed.append((item, reason, scope, address))
            results = pipe.execute() if fed else []
        for (item, reason, scope, address), written in zip(fed, results, strict=True):
            if written:
                self.metrics.fed.labels(reason).inc()
                item.listed = trace.entry("listed", recipient=address, reason=reason, scope=scope)
                log.info(
                    "event %s (%s) put its recipient on the suppression list of %s",
                    item.event_id,
                    item.kind,
                    scope,
                    extra=logs.fields(uuid=_text(item.event.get("uuid")), recipient=address, event_id=item.event_id),
                )

    def _sent_records(self, client: redis.Redis, items: list[Item]) -> dict[str, list[Sent]]:
        """The Transformer's records of the uuids whose events do not name their From domain."""
        uuids = sorted({u for item in items if (u := _text(item.event.get("uuid")))})
        if not uuids:
            return {}
        pipe = client.pipeline(transaction=False)
        for uuid in uuids:
            pipe.hgetall(keys.sent_record(uuid))
        return {uuid: binding.decode_record(raw) for uuid, raw in zip(uuids, pipe.execute(), strict=True)}

    def _target(self, item: Item, sent: dict[str, list[Sent]]) -> tuple[str, str] | None:
        """(scope, address) an event's entry goes to, or None (logged) when it names none."""
        assert self.suppression is not None
        event = item.event
        address = normalise_address(_text(event.get("recipient")) or _text(event.get("email")) or "")
        from_domain, stream_id = _text(event.get("fd")), _text(event.get("stream_id"))
        if not from_domain:
            for record in sent.get(_text(event.get("uuid")) or "", []):
                if record.recipient.lower() == address:
                    from_domain, stream_id = record.from_domain, stream_id or record.stream_id
        scope = self.suppression.settings.scope_of(from_domain, stream_id)
        if scope is None or not valid_address(address) or not valid_scope(scope):
            log.warning(
                "event %s (%s) names no usable recipient or sending domain; not on the suppression list",
                item.event_id,
                item.kind,
            )
            return None
        return scope, address

    def _steps(self, item: Item, outcome: str) -> list[ListAppend]:
        """Trace writes of one event: its webhook answer, and its feed of the list."""
        uuid = _text(item.event.get("uuid"))
        step = trace.entry(
            "webhook",
            event=item.kind,
            event_id=item.event_id,
            recipient=_text(item.event.get("recipient")),
            outcome=outcome,
            answer=item.answer or None,
        )
        return trace.append(self.trace, uuid, *([item.listed] if item.listed else []), step)

    def _trace_waiting(self, items: list[Item], outcomes: list[Outcome | None]) -> None:
        """Timeline entries of events that wait for another POST (one pipeline; best effort)."""
        waiting = [item for item in items if isinstance(outcomes[item.index], Retry)]
        if not waiting or not self.trace.enabled or self.redis is None:
            return
        pipe = self.redis.pipeline(transaction=False)
        write_all(pipe, [write for item in waiting for write in self._steps(item, "retrying")])
        for item in waiting:
            item.listed = None
        try:
            with redis_errors("trace waiting events"):
                pipe.execute()
        except TemporaryError as exc:
            log.debug("timeline entries of %d waiting events not written: %s", len(waiting), exc)

    # -- steps ---------------------------------------------------------------------------------

    def _item(self, index: int, entry: Entry) -> Item:
        event = decode_event(entry.fields)
        if not isinstance(event.get("event_id"), str) or not event["event_id"]:
            canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
            event["event_id"] = make_event_id("backdata", canonical)
        if event["event"] not in EVENT_KINDS:
            log.warning("event %s has unknown type %r; forwarding it", event["event_id"], event["event"])
        body = json.dumps(public(event), separators=(",", ":"), ensure_ascii=False).encode()
        since = self._since(entry, event)
        return Item(index, entry, event, body, since, since + self.max_age_s)

    @staticmethod
    def _since(entry: Entry, event: dict[str, Any]) -> float:
        """Start of the event's age: its timestamp (or park/replay time), never after it was queued."""
        queued = int(entry.id.partition("-")[0]) / 1000
        since = _number(entry.field(SINCE))
        if since is None:
            stamp = _timestamp(event)
            since = min(stamp, queued) if stamp is not None else queued
        replayed = _number(entry.field(REPLAYED_AT))
        return max(since, replayed) if replayed is not None else since

    def _deliver(self, items: list[Item]) -> Attempt:
        """POST the batch, splitting it on rejections until the refused events are alone."""
        attempt = Attempt()
        groups: deque[list[Item]] = deque([items])
        started = time.monotonic()
        first = True
        while groups:
            group = groups.popleft()
            if not first and (self.stopper.is_set() or time.monotonic() - started > self.budget_s):
                attempt.unresolved.extend(group)
                continue
            first = False
            result = self._post(group)
            self.heartbeat()
            for item in group:
                item.answer = result.reason
            if result.ok:
                attempt.delivered.extend(group)
            elif result.transient:
                attempt.failure = result
                attempt.unresolved.extend(group)
                while groups:
                    attempt.unresolved.extend(groups.popleft())
            elif len(group) == 1:
                attempt.rejected.append((group[0], result))
            else:
                middle = len(group) // 2
                groups.appendleft(group[middle:])
                groups.appendleft(group[:middle])
        return attempt

    def _post(self, group: list[Item]) -> PostResult:
        body = b"[" + b",".join(item.body for item in group) + b"]"
        self.metrics.posting.set(len(group))
        try:
            result = self.poster.post(body, batch_id([item.event_id for item in group]))
        finally:
            self.metrics.posting.set(0)
        self.metrics.post_seconds.labels("webhook").observe(result.seconds)
        outcome = "ok" if result.ok else ("transient" if result.transient else "rejected")
        self.metrics.posts.labels("webhook", outcome).inc()
        if result.ok:
            now = time.time()
            self.metrics.pushed_ok.inc(len(group))
            for item in group:
                self.metrics.count_delivered(item.kind)
                stamp = _timestamp(item.event)
                if stamp is not None:
                    self.metrics.age.observe(max(now - stamp, 0.0))
            log.debug("posted %d events (%s) in %.3fs", len(group), result.reason, result.seconds)
        else:
            self.metrics.pushed_failed.inc(len(group))
            log.warning("POST of %d events failed: %s", len(group), result.reason)
        return result

    def _settle(self, attempt: Attempt, total: int, outcomes: list[Outcome | None]) -> None:
        now = time.time()
        for item in attempt.delivered:
            outcomes[item.index] = Done([*self._records(item), *self._steps(item, "delivered")])
        rejected = attempt.rejected
        if rejected and not attempt.delivered and not attempt.unresolved and total > 1:
            # Every event refused on its own: most likely the endpoint refuses everything.
            log.warning(
                "the webhook refused each of the %d events of a batch alone (%s); parking the oldest, the others wait",
                total,
                rejected[0][1].reason,
            )
            rejected, waiting = rejected[:1], rejected[1:]
            for item, result in waiting:
                outcomes[item.index] = self._wait(item, result.reason, result.retry_after, now)
        for item, result in rejected:
            if now >= item.deadline:
                outcomes[item.index] = self._expire(item, result.reason)
            else:
                park = self.parking.output(
                    item.entry, result.reason, since=item.since, not_after=item.deadline, now=now
                )
                outcomes[item.index] = Done([park, *self._steps(item, "parked")])
                self.metrics.parked.inc()
                log.info("parked event %s (%s): %s", item.event_id, item.kind, result.reason)
        failure = attempt.failure
        reason = failure.reason if failure is not None else "interrupted before its POST (stopping or slow)"
        retry_after = failure.retry_after if failure is not None else None
        for item in attempt.unresolved:
            outcomes[item.index] = self._wait(item, reason, retry_after, now)

    def _wait(self, item: Item, reason: str, retry_after: float | None, now: float) -> Outcome:
        if now >= item.deadline:
            return self._expire(item, reason)
        return Retry(reason, retry_after=retry_after)

    def _expire(self, item: Item, reason: str) -> Outcome:
        self.metrics.dead_lettered.labels("max-age").inc()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.since))
        return Fail(
            f"not delivered within max-age-seconds={self.max_age_s:g} (counted from {since}); last error: {reason}",
            [*self._records(item), *self._steps(item, "dead-lettered")],
        )

    def _records(self, item: Item) -> list[Write]:
        """The bounce-manager record of a delivered (or expired) event, if it has one."""
        if not self.bounce_manager:
            return []
        try:
            out = bouncemanager.output(item.event)
        except Exception:  # statistics must never cost the customer's event
            log.exception("cannot build the bounce-manager record of event %s", item.event_id)
            return []
        return [out] if out is not None else []


def _timestamp(event: dict[str, Any]) -> float | None:
    """The event's ``timestamp`` (Unix seconds), if it has a plausible one."""
    stamp = event.get("timestamp")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and stamp > 0:
        return float(stamp)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(raw: bytes | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None
