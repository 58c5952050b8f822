"""The one backoff rule of the platform (style anchor C9): capped exponential, with jitter.

Every wait before trying again uses a :class:`RetryPolicy`: the worker loop's retries, BackData's
parked events, PostfixLog's restarts of Postfix and its waits for Redis, the waits for the
address secret.  ``delay(n)`` for the n-th consecutive attempt (1-based) is drawn uniformly
from ``[ceiling * (1 - jitter), ceiling]`` with ``ceiling = min(cap_s, base_s * 2 ** (n - 1))``:
the jitter keeps many processes that failed together from retrying together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


class Waiter(Protocol):
    """Anything with an interruptible wait (:class:`common.lifecycle.Stopper`)."""

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when interrupted by a stop request."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter."""

    base_s: float = 0.5
    cap_s: float = 30.0
    #: Fraction of the ceiling taken off at random (0 = no jitter, 0.5 = half to full).
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s or not 0 <= self.jitter <= 1:
            raise ValueError(f"bad retry policy {self!r}")

    def ceiling(self, attempt: int) -> float:
        """The longest delay before attempt ``attempt`` (1-based)."""
        exponent: int = min(max(attempt - 1, 0), 64)
        return min(self.cap_s, self.base_s * float(2**exponent))

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based), jittered."""
        ceiling = self.ceiling(attempt)
        return float(random.uniform(ceiling * (1 - self.jitter), ceiling))

    def wait(self, attempt: int, waiter: Waiter) -> bool:
        """Wait before attempt ``attempt``; True when a stop request ended the wait."""
        return waiter.wait(self.delay(attempt))


#: Waiting for a dependency (Redis, Postfix) at start or after a failure.
DEPENDENCY = RetryPolicy(base_s=0.5, cap_s=30.0)
