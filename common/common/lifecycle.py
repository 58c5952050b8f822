"""Process life cycle: turn SIGTERM/SIGINT into a stop request every loop and wait can see.

Waits use :meth:`Stopper.wait`, never ``time.sleep``, so a worker sleeping in a 30 s backoff
exits as soon as Kubernetes asks it to (style anchor C8).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class Stopper:
    """A stop flag set by SIGTERM/SIGINT (or by code)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self, *signals: signal.Signals) -> Stopper:
        """Set the flag on these signals (default SIGTERM and SIGINT); main thread only."""
        for sig in signals or (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        log.info("received %s; finishing the current batch, then stopping", self.signal_name)
        self._event.set()

    def stop(self) -> None:
        """Request a stop."""
        self._event.set()

    def is_set(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; returns True (early) when a stop is requested."""
        return self._event.wait(max(seconds, 0.0))
