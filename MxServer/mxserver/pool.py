"""Worker processes for phase 1 of classification, each mail under a time budget.

The MX is public: anybody can send it a mail that costs seconds of CPU to parse (70 KB of
nested multiparts, thousands of parts, pathological text).  Parsing and classifying
(:func:`mxserver.analysis.analyse`, pure) therefore never runs in the event loop: each mail
goes to one of ``mxserver.classify-processes`` worker processes, and the loop keeps answering
every other client.  A mail that takes longer than ``mxserver.classify-timeout-seconds`` gets
its worker killed (SIGKILL, by process id, only a child of this process) and replaced; the
caller keeps the mail in the eml store as unclassified (:class:`Overrun`).

Each worker is a one-process :class:`concurrent.futures.ProcessPoolExecutor` (a "slot"), so
killing one never disturbs the mails running on the others.  Workers are forked from a
``forkserver`` that has imported the classifier already (never from the threaded, asyncio
parent), so a replacement is ready in tens of milliseconds.

Workers run at a lower CPU priority (``nice`` +10) than the event loop.  When every worker is
busy, a freed worker goes to the waiting client (by address) that was served least recently --
not first come, first served -- so a few senders of expensive mail cannot make everybody else
wait behind their queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Final

from mxserver.analysis import Analysis, Settings, analyse

log = logging.getLogger(__name__)

#: Seconds a new worker may take to start and answer.
START_TIMEOUT_S: Final = 60.0
#: Workers run at a lower CPU priority than the event loop: when mail to classify keeps every
#: core busy, the loop still gets the CPU it needs to answer every client at once.
WORKER_NICENESS: Final = 10
#: Client addresses whose last turn is remembered (the oldest are forgotten beyond this).
MAX_REMEMBERED: Final = 10_000
#: The worker process' own state (set once by :func:`_init`; a dict, not a ``global``).
_STATE: dict[str, Settings] = {}


class Overrun(Exception):
    """A mail took longer than the time budget; its worker was replaced."""


class WorkerLost(Exception):
    """A worker died while classifying a mail (it was replaced)."""


def _init(settings: Settings) -> None:
    """Worker initialiser: keep the settings; lower priority; let the parent handle SIGINT/SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    _STATE["settings"] = settings


def _work(recipients: Sequence[str], raw: bytes) -> Analysis:
    return analyse(_STATE["settings"], recipients, raw)


@dataclass
class _Slot:
    """One worker process."""

    executor: ProcessPoolExecutor
    pid: int


class _FairQueue:
    """Free workers, and clients waiting for one: the least recently served client goes first."""

    def __init__(self) -> None:
        self.free: list[_Slot] = []
        self.waiting: dict[str, collections.deque[asyncio.Future[_Slot]]] = {}
        self.served: collections.OrderedDict[str, float] = collections.OrderedDict()

    async def get(self, client: str) -> _Slot:
        if self.free and not self.waiting:
            return self._serve(client, self.free.pop())
        future: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(client, collections.deque()).append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.put(future.result())  # handed over just as the caller gave up
            else:
                self._forget(client, future)
            raise

    def put(self, slot: _Slot) -> None:
        while self.waiting:
            client = min(self.waiting, key=lambda c: self.served.get(c, 0.0))
            future = self.waiting[client].popleft()
            if not self.waiting[client]:
                del self.waiting[client]
            if not future.done():
                future.set_result(self._serve(client, slot))
                return
        self.free.append(slot)

    def _serve(self, client: str, slot: _Slot) -> _Slot:
        self.served[client] = time.monotonic()
        self.served.move_to_end(client)
        while len(self.served) > MAX_REMEMBERED:
            self.served.popitem(last=False)
        return slot

    def _forget(self, client: str, future: asyncio.Future[_Slot]) -> None:
        queue = self.waiting.get(client)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self.waiting[client]


class ClassifierPool:
    """``processes`` workers; :meth:`analyse` runs one mail on a free one, within ``timeout_s``."""

    def __init__(self, settings: Settings, processes: int, timeout_s: float) -> None:
        self.settings = settings
        self.processes = max(processes, 1)
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["mxserver.analysis"])
        self._queue = _FairQueue()
        self._slots: set[int] = set()
        #: Workers replaced after an overrun or a crash (tests and metrics read it).
        self.replaced = 0

    async def start(self) -> None:
        """Start every worker (and the forkserver)."""
        slots = await asyncio.gather(*(self._new_slot() for _ in range(self.processes)))
        for slot in slots:
            self._queue.put(slot)
        log.info("%d classifier worker processes started (budget %.1fs per mail)", self.processes, self.timeout_s)

    async def _new_slot(self) -> _Slot:
        # Starting a process (and, the first time, the forkserver) blocks: not in the event loop.
        executor, pid = await asyncio.to_thread(self._start_worker)
        self._slots.add(pid)
        return _Slot(executor, pid)

    def _start_worker(self) -> tuple[ProcessPoolExecutor, int]:
        executor = ProcessPoolExecutor(1, mp_context=self._context, initializer=_init, initargs=(self.settings,))
        try:
            pid = executor.submit(os.getpid).result(START_TIMEOUT_S)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        return executor, pid

    async def analyse(self, recipients: Sequence[str], raw: bytes, client: str = "") -> Analysis:
        """Phase 1 of one mail in a worker process (``client``: the sender's address, for fairness).

        Raises:
            Overrun: the mail took longer than the budget (the worker was replaced).
            WorkerLost: the worker died (it was replaced).
        """
        slot = await self._queue.get(client)
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(slot.executor, _work, list(recipients), raw)
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            slot = await self._replace(slot)
            raise Overrun(f"classification took longer than {self.timeout_s:.1f}s") from None
        except BrokenProcessPool:
            slot = await self._replace(slot)
            raise WorkerLost("a classifier worker died") from None
        finally:
            self._queue.put(slot)

    async def _replace(self, slot: _Slot) -> _Slot:
        self._kill(slot.pid)
        slot.executor.shutdown(wait=False, cancel_futures=True)
        self._slots.discard(slot.pid)
        self.replaced += 1
        fresh = await self._new_slot()
        log.warning("replaced classifier worker %d by %d", slot.pid, fresh.pid)
        return fresh

    def _kill(self, pid: int) -> None:
        """SIGKILL ``pid`` -- only a worker of this pool that still descends from this process."""
        if pid not in self._slots or not _descends_from_us(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    async def close(self) -> None:
        """Stop every worker (idle ones exit; busy ones are killed)."""
        for slot in self._queue.free:
            slot.executor.shutdown(wait=False, cancel_futures=True)
        self._queue.free.clear()
        for pid in list(self._slots):
            self._kill(pid)
        self._slots.clear()


def _parent(pid: int) -> int | None:
    """The parent process id of ``pid`` (Linux /proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]) if len(fields) > 1 else None


def _descends_from_us(pid: int) -> bool:
    """True when ``pid`` is our child, or a child of our forkserver (our child)."""
    me = os.getpid()
    parent = _parent(pid)
    return parent is not None and (parent == me or _parent(parent) == me)
