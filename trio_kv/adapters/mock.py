"""An in-memory adapter with injectable latency, bandwidth and failures, for tests."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence

import trio

from ..keys import ObjectKey
from .base import AdapterError, AdapterHealth, Hit, L2Adapter


class MockAdapter(L2Adapter):
    """Objects in a dict. ``latency_s`` is added to every operation, ``bandwidth_bps``
    (bytes per second, 0 = unlimited) to puts and gets; ``fail_rate`` makes that
    fraction of operations (of the kinds in ``fail_ops``) raise AdapterError;
    ``down`` makes every one raise;
    ``stall`` makes operations wait until ``unstall``."""

    kind = "mock"

    def __init__(
        self,
        name: str = "mock",
        *,
        latency_s: float = 0.0,
        bandwidth_bps: float = 0.0,
        fail_rate: float = 0.0,
        fail_ops: tuple[str, ...] = ("put", "get", "contains", "delete"),
        seed: int = 0,
        max_threads: int = 8,
    ) -> None:
        super().__init__(name, max_threads=max_threads)
        self.objects: dict[ObjectKey, bytes] = {}
        self.layouts: dict[ObjectKey, str] = {}  # each object's layout fingerprint
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self.fail_rate = fail_rate
        self.fail_ops = fail_ops
        self.down = False
        self._random = random.Random(seed)
        self._unstalled = trio.Event()
        self._unstalled.set()
        self._stalled_ops: set[str] = set()
        self.calls: list[str] = []

    def stall(self, *ops: str) -> None:
        """Make operations of these kinds (all when none are named) wait until ``unstall``."""
        self._stalled_ops = set(ops) if ops else {"put", "get", "contains", "delete"}
        self._unstalled = trio.Event()

    def unstall(self) -> None:
        self._unstalled.set()

    async def _io(self, op: str, nbytes: int = 0) -> None:
        self.calls.append(op)
        if op in self._stalled_ops:
            await self._unstalled.wait()
        delay = self.latency_s + (nbytes / self.bandwidth_bps if self.bandwidth_bps else 0.0)
        if delay:
            await trio.sleep(delay)
        if self.down:
            raise AdapterError(f"{self.name}: down")
        if self.fail_rate and op in self.fail_ops and self._random.random() < self.fail_rate:
            raise AdapterError(f"{self.name}: injected failure in {op}")

    async def put(self, key: ObjectKey, payload: memoryview, layout: str = "") -> None:
        await self._io("put", len(payload))
        self.objects[key] = bytes(payload)
        self.layouts[key] = layout

    async def get_into(self, key: ObjectKey, buffer: memoryview) -> Hit | None:
        data = self.objects.get(key)
        await self._io("get", len(data) if data is not None else 0)
        data = self.objects.get(key)
        if data is None or len(data) != len(buffer):
            return None
        buffer[:] = data
        return Hit(self.layouts.get(key, ""))

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        await self._io("contains")
        return [k in self.objects for k in keys]

    async def delete(self, keys: Sequence[ObjectKey]) -> None:
        await self._io("delete")
        for key in keys:
            self.objects.pop(key, None)
            self.layouts.pop(key, None)

    async def scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        for key, data in list(self.objects.items()):
            yield key, len(data)

    def health(self) -> AdapterHealth:
        if self.down:
            return AdapterHealth(healthy=False, state="down", reason="marked down by the test")
        return AdapterHealth(healthy=True)
