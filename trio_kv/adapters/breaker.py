"""A circuit breaker for one L2 endpoint. Pure: no I/O, and time comes from an injected clock.

    closed --(failure_threshold consecutive connection failures)--> open
    open --(cooldown_s elapsed; the next caller is let through as the probe)--> half-open
    half-open --(the probe succeeds)--> closed
    half-open --(the probe fails)--> open again, for another cool-down

Only *connection* failures count (the endpoint is unreachable, refused or reset
the connection, or timed out); an HTTP error response proves the endpoint is
there, so callers report it as a success. While the breaker is not closed,
``blocking()`` is True for everyone except the one probe, so lookups can answer
"miss" at once instead of waiting on a dead endpoint.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Counts consecutive connection failures and decides who may call the endpoint.

    ``clock`` returns seconds (monotonic). ``on_change`` hears every state change,
    with the breaker already updated. ``reason`` says why the breaker last opened.
    """

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float],
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.reason = ""
        self.retry_at = 0.0  # when an open breaker lets its next probe through
        self.opened = 0  # how many times it has opened (for status and metrics)

    def blocking(self) -> bool:
        """Would a call be refused now? (A question only: it never takes the probe.)"""
        if self.state is BreakerState.CLOSED:
            return False
        if self.state is BreakerState.HALF_OPEN:
            return True  # the probe is out
        return self._clock() < self.retry_at

    def allow(self) -> bool:
        """May the caller call the endpoint? After the cool-down of an open breaker the
        first caller gets True and is the probe (the breaker is then half-open): it must
        report ``record_success``, ``record_failure`` or ``release_probe``."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.blocking():
            return False
        self._set(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        """The endpoint answered (with data or with an HTTP error)."""
        self.consecutive_failures = 0
        if self.state is not BreakerState.CLOSED:
            self.reason = ""
            self._set(BreakerState.CLOSED)

    def record_failure(self, reason: str) -> None:
        """A connection failure. Opens the breaker at the threshold, or again from half-open."""
        self.consecutive_failures += 1
        if self.state is BreakerState.OPEN:
            return  # a call from before the breaker opened; the cool-down already runs
        if self.state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.failure_threshold:
            self.reason = f"{self.consecutive_failures} consecutive connection failures; last: {reason}"
            self.retry_at = self._clock() + self.cooldown_s
            self.opened += 1
            self._set(BreakerState.OPEN)

    def trip(self, reason: str) -> None:
        """Open at once (a failure no retry will cure, e.g. the bucket is gone), for a cool-down."""
        self.consecutive_failures += 1
        self.reason = reason
        self.retry_at = self._clock() + self.cooldown_s
        if self.state is not BreakerState.OPEN:
            self.opened += 1
            self._set(BreakerState.OPEN)

    def release_probe(self) -> None:
        """The probe ended without a verdict (it was cancelled): the next caller probes instead."""
        if self.state is BreakerState.HALF_OPEN:
            self.retry_at = self._clock()
            self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)
