"""Group commit for asyncio callers: the calls that arrive while a round trip is in flight go together in the next.

Used where many concurrent tasks of one event loop each need one Redis round trip of the same
kind: :class:`common.queue.AsyncQueues` (one MULTI/EXEC for the enqueues of concurrent
submissions) and :class:`common.authguard.AsyncLoginGuard` (one MGET for the lockout checks of
concurrent logins).  The per-call client work of redis-py's asyncio client (pool, timeouts,
replies) costs as much as the command itself, and Redis fsyncs once per transaction, so under
load one round trip carries many calls; with a single caller nothing waits (its batch is sent at
once).

Calls are grouped by a key (e.g. the queue): each batch holds calls of one key.  Every caller gets
its own result, or the exception of its batch.  A caller cancelled while waiting is left out of
the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

#: Sends one batch of one key; returns one result per item, in order.
SendBatch = Callable[[K, Sequence[T]], Awaitable[Sequence[R]]]


@dataclass(frozen=True)
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class Coalescer(Generic[K, T, R]):
    """Runs ``send`` on batches of the items given to :meth:`call` by concurrent tasks."""

    def __init__(self, send: SendBatch[K, T, R]) -> None:
        self._send = send
        self._waiting: dict[K, list[_Waiting[T, R]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, key: K, item: T) -> R:
        """``item``'s result, once the batch it joined has been sent."""
        loop = asyncio.get_running_loop()
        waiting: _Waiting[T, R] = _Waiting(item, loop.create_future())
        self._waiting.setdefault(key, []).append(waiting)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await waiting.future

    async def _flush(self) -> None:
        """Send what waits, one batch per key, until nothing waits."""
        while self._waiting:
            key, batch = self._waiting.popitem()
            batch = [w for w in batch if not w.future.done()]  # a cancelled caller's item is not sent
            if not batch:
                continue
            try:
                results = await self._send(key, [w.item for w in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every caller, each raises it
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            for w, result in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(result)
