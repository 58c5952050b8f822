"""Reading side of BackData: full batches with a short wait, and due parked events first.

A :class:`common.queue.Consumer` with ``fill_wait_ms`` = ``batch-max-wait-ms``: a trickle of
events goes out as a few POSTs instead of one POST per event, while a busy queue fills each
batch at once.  Before reading it moves due parked events (:mod:`backdata.parking`) back into
the stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from backdata.parking import Parking
from common.queue import Consumer, Entry, Queues

#: Seconds between two passes over the parking stream.
SWEEP_INTERVAL_S = 1.0


class BatchingConsumer(Consumer):
    """A consumer whose batches wait up to ``max_wait_ms`` to fill, parked events first."""

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
        super().__init__(
            queues, streams, group, name, batch_size=batch_size, block_ms=block_ms, fill_wait_ms=max_wait_ms
        )
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
        return super().read()
