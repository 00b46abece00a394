"""Counter deltas for vLLM's connector stats: what changed since the previous report. No vLLM import."""

from __future__ import annotations

import msgspec


class CounterDeltas:
    """Turns a struct of running counters into the non-zero changes since the previous call."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def since_last(self, counters: msgspec.Struct) -> dict[str, int]:
        now: dict[str, int] = msgspec.structs.asdict(counters)
        delta = {name: value - self._last.get(name, 0) for name, value in now.items()}
        self._last = now
        return {name: value for name, value in delta.items() if value}
