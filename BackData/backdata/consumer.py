"""Reading side of BackData: full batches with a short wait, and due parked events first.

A :class:`common.queue.Consumer` returns whatever is in the stream right now (often one event
at low traffic).  :class:`BatchingConsumer` then waits up to ``max_wait_ms`` for more, so a
trickle of events goes out as a few POSTs instead of one POST per event, while a busy queue
fills each batch at once.  Before reading it moves due parked events (:mod:`backdata.parking`)
back into the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from backdata.parking import Parking
from common.errors import TemporaryError
from common.queue import Consumer, Entry, Queues, redis_errors

log = logging.getLogger(__name__)

#: Seconds between two passes over the parking stream.
SWEEP_INTERVAL_S = 1.0


class BatchingConsumer(Consumer):
    """A consumer whose batches wait up to ``max_wait_ms`` to fill."""

    def __init__(
        self,
        queues: Queues,
        streams: Sequence[str],
        group: str,
        name: str,
        *,
        batch_size: int,
        max_wait_ms: int,
        parking: Parking | None = None,
        block_ms: int = 1000,
    ) -> None:
        super().__init__(queues, streams, group, name, batch_size=batch_size, block_ms=block_ms)
        self.max_wait_ms = max_wait_ms
        self.parking = parking
        self._next_sweep = 0.0

    def read(self) -> list[Entry]:
        """The next batch (see the module docstring).

        Raises:
            QueueUnavailableError: Redis is down.
        """
        if self.parking is not None and time.monotonic() >= self._next_sweep:
            self.parking.requeue_due()
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        entries = super().read()
        if entries and len(entries) < self.batch_size and self.max_wait_ms > 0:
            entries.extend(self._fill(self.batch_size - len(entries)))
        return entries

    def _fill(self, need: int) -> list[Entry]:
        """New entries arriving within ``max_wait_ms`` (never raises: the batch in hand matters more)."""
        deadline = time.monotonic() + self.max_wait_ms / 1000
        more: list[Entry] = []
        while len(more) < need:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms < 1:
                break
            try:
                with redis_errors("fill batch"):
                    reply = self.client.xreadgroup(
                        self.group,
                        self.name,
                        dict.fromkeys(self.streams, ">"),
                        count=need - len(more),
                        block=left_ms,
                    )
            except TemporaryError as exc:
                log.warning("stopped filling the batch: %s", exc)
                break
            more.extend(_entries(reply))
        return more


def _entries(reply: Any) -> list[Entry]:
    """Entries of an XREADGROUP reply (RESP2 list or RESP3 mapping)."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[Entry] = []
    for stream, rows in items:
        name = stream.decode() if isinstance(stream, bytes) else stream
        for raw_id, fields in rows:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            out.append(Entry(name, entry_id, dict(fields or {})))
    return out
