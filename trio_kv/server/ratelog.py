"""A log line that a flood cannot multiply: at most one per interval, counting what it held back.

A client sending malformed frames as fast as it can must not fill the server's log (or spend
its event loop formatting tracebacks); one line every few seconds says it is happening."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """``note(message)`` logs ``message`` at most once per ``interval_s``; the next line that is
    logged says how many notes were held back since the last one."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._level = level
        self._clock = clock
        self._last_logged: float | None = None
        self.held_back = 0

    def note(self, message: str) -> None:
        now = self._clock()
        if self._last_logged is not None and now - self._last_logged < self._interval_s:
            self.held_back += 1
            return
        if self.held_back:
            message = f"{message} ({self.held_back} more like it not logged)"
        self._logger.log(self._level, "%s", message)
        self._last_logged = now
        self.held_back = 0
