"""A circuit breaker: stop calling a dependency that keeps failing, probe it now and then."""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    """Open after `threshold` failures in a row; while open, let one call through per `cooldown`."""

    def __init__(self, threshold: int = 3, cooldown: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._retry_at = 0.0  # meaningful only while open

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold

    @property
    def state(self) -> str:
        if not self.is_open:
            return "closed"
        return "half-open" if self._clock() >= self._retry_at else "open"

    def allow(self) -> bool:
        """Say whether to call the dependency now."""
        if not self.is_open:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        # One probe per cooldown: the next one waits even if this probe never reports back.
        self._retry_at = now + self.cooldown
        return True

    def success(self) -> bool:
        """Record a success; return True when it closes an open circuit."""
        was_open = self.is_open
        self._failures = 0
        return was_open

    def failure(self) -> bool:
        """Record a failure; return True when it opens the circuit."""
        was_open = self.is_open
        self._failures += 1
        if self.is_open:
            self._retry_at = self._clock() + self.cooldown
        return self.is_open and not was_open
