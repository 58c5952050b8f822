"""Process life cycle: turn SIGTERM/SIGINT into a stop request every loop and wait can see.

Waits use :meth:`Stopper.wait`, never ``time.sleep``, so a worker sleeping in a 30 s backoff
exits as soon as Kubernetes asks it to (style anchor C8).  asyncio services wait on
:meth:`Stopper.async_event` instead: the loop then handles the signals itself (a plain signal
handler would not wake a loop blocked in ``select``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


class Stopper:
    """A stop flag set by SIGTERM/SIGINT (or by code)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._listeners: list[Callable[[], None]] = []

    def install(self, *signals: signal.Signals) -> Stopper:
        """Set the flag on these signals (default SIGTERM and SIGINT); main thread only."""
        for sig in signals or (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        log.info("received %s; finishing the work in progress, then stopping", self.signal_name)
        self.stop()

    def stop(self) -> None:
        """Request a stop (from any thread)."""
        self._event.set()
        for listener in list(self._listeners):
            listener()

    def async_event(self) -> asyncio.Event:
        """An asyncio event of the running loop, set when a stop is requested.

        The loop takes over SIGTERM/SIGINT (``add_signal_handler``); :meth:`stop` from any
        thread sets the event too.
        """
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(event.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):  # not the main thread (tests)
                loop.add_signal_handler(sig, self._on_signal, sig, None)
        self._listeners.append(wake)
        if self.is_set():
            event.set()
        return event

    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; returns True (early) when a stop is requested."""
        return self._event.wait(max(seconds, 0.0))


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float, *, what: str, repeat_every_s: float = 1.0) -> int:
    """Stop a child cleanly: SIGTERM every ``repeat_every_s`` until it exits, SIGKILL after ``timeout_s``.

    Returns its exit status.

    Some servers act on one stop request once and keep running when they cannot stop at that
    moment: redis-server logs "Writing initial AOF, can't exit." while a replica that has just
    synced writes its first AOF, and then waits for the next request.
    """
    deadline = time.monotonic() + timeout_s
    proc.send_signal(signal.SIGTERM)
    while True:
        try:
            return proc.wait(max(0.0, min(repeat_every_s, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            log.error("%s did not stop within %.0fs; killing it", what, timeout_s)
            proc.kill()
            return proc.wait()
        log.info("%s is still running (its log says why); asking it to stop again", what)
        proc.send_signal(signal.SIGTERM)
