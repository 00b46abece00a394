"""The L2 adapter interface and what every adapter shares: accounting, pins, eviction, health.

An adapter stores whole chunks ("objects") under their ObjectKey. Subclasses
implement five primitives (``_put``, ``_get_into``, ``_contains``, ``_delete``,
``_scan``); this base class keeps the byte ledger exact around them, pins keys
that a lookup is loading so eviction never deletes them mid-read, and runs the
adapter's task group: recovery scan first, then watermark-triggered LRU
eviction with real deletes whenever a capacity is set.

Primitives may block in threads (bounded by ``self.limiter``) but must be
cancellation-safe: an object is either fully published or absent.
"""

from __future__ import annotations

import abc
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import msgspec
import trio

from ..core.eviction import choose_victim_salt
from ..core.ledger import AdapterUsage, KeyedLedger
from ..keys import ObjectKey

log = logging.getLogger(__name__)


class AdapterError(Exception):
    """An adapter operation failed (I/O error, endpoint down, breaker open)."""


class QuotaExceeded(AdapterError):
    """The tenant is at its quota in this tier and has nothing of its own left to evict."""


class AdapterHealth(msgspec.Struct, frozen=True):
    healthy: bool
    state: str = "ok"  # e.g. "ok", "breaker-open", "degraded"
    reason: str = ""


class L2Adapter(abc.ABC):
    """Base class of every L2 adapter. ``name`` identifies it in logs, status and metrics."""

    kind = "abstract"

    def __init__(
        self,
        name: str,
        *,
        capacity: int | None = None,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        max_threads: int = 8,
    ) -> None:
        if capacity is not None and capacity <= 0:
            raise ValueError(f"{name}: capacity must be positive, got {capacity}")
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError(f"{name}: watermarks must satisfy 0 < low <= high <= 1")
        self.name = name
        self.ledger = KeyedLedger(capacity)
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.limiter = trio.CapacityLimiter(max_threads)
        self._pins: Counter[ObjectKey] = Counter()
        self._deleting: set[ObjectKey] = set()  # being deleted: misses from now on
        # Set by the server: the eviction policy and the per-salt quota of this tier.
        self.policy = "lru"
        self.quota: Callable[[str], int | None] | None = None
        self.quota_skips = 0
        self._evict_wakeup = trio.Event()
        self.evictions_by_reason: Counter[str] = Counter()  # "watermark", "quota"
        self.errors = 0

    @property
    def evictions(self) -> int:
        return sum(self.evictions_by_reason.values())

    @property
    def capacity(self) -> int | None:
        return self.ledger.capacity

    # ------------------------------------------------------------ primitives

    @abc.abstractmethod
    async def _put(self, key: ObjectKey, payload: memoryview) -> None:
        """Publish ``payload`` under ``key`` atomically; raise AdapterError on failure."""

    @abc.abstractmethod
    async def _get_into(self, key: ObjectKey, buffer: memoryview) -> bool:
        """Fill ``buffer`` with the object's bytes; False if absent, corrupt or of another size."""

    @abc.abstractmethod
    async def _contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Which keys are stored (one round trip or scan for the batch where possible)."""

    @abc.abstractmethod
    async def _delete(self, keys: Sequence[ObjectKey]) -> None:
        """Delete objects; absent ones are not an error."""

    @abc.abstractmethod
    def _scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        """Every stored object and its payload size (for recovery at start)."""

    def health(self) -> AdapterHealth:
        return AdapterHealth(healthy=True)

    # ------------------------------------------------------------ public API

    async def put(self, key: ObjectKey, payload: memoryview) -> bool:
        """Store one object. Returns False (without writing) if it is already stored.
        A tenant at its quota first evicts its own least recent objects; if that cannot
        make room, QuotaExceeded is raised and nothing is written."""
        if key in self.ledger:
            self.ledger.touch([key])
            return False
        await self._admit(key.cache_salt, len(payload))
        await self._put(key, payload)
        self.ledger.add([key], [len(payload)])
        if self._over_high_watermark():
            self._evict_wakeup.set()
        return True

    async def get_into(self, key: ObjectKey, buffer: memoryview) -> bool:
        """Read one object into ``buffer`` (exactly its size). True on a hit."""
        if key in self._deleting:
            await trio.lowlevel.checkpoint()
            return False
        self.pin(key)
        try:
            hit = await self._get_into(key, buffer)
        finally:
            self.unpin(key)
        if hit:
            self.ledger.touch([key])
        elif key in self.ledger:
            # Gone or corrupt behind our back: the ledger must not count it.
            self.ledger.remove([key])
        return hit

    async def _admit(self, salt: str, size: int) -> None:
        limit = self.quota(salt) if self.quota is not None else None
        if limit is None:
            return
        while self.ledger.salt_bytes(salt) + size > limit:
            victim = self.ledger.oldest(salt, skip=self._unevictable)
            if size > limit or victim is None:
                self.quota_skips += 1
                raise QuotaExceeded(f"{self.name}: salt {salt!r} is at its quota of {limit} bytes")
            await self._remove([victim])
            self.evictions_by_reason["quota"] += 1

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        held = await self._contains(keys)
        if self._deleting:
            held = [h and k not in self._deleting for k, h in zip(keys, held)]
        return held

    async def _remove(self, keys: Sequence[ObjectKey]) -> None:
        """Delete objects and forget them. While the delete runs they are misses for new
        lookups and loads, so no load can start on an object that is going away."""
        self._deleting.update(keys)
        try:
            await self._delete(keys)
            self.ledger.remove(keys)
        finally:
            self._deleting.difference_update(keys)

    async def delete(self, keys: Sequence[ObjectKey]) -> int:
        """Delete objects (pinned ones are skipped); returns how many were deleted."""
        victims = [k for k in keys if not self._pins[k]]
        if victims:
            await self._remove(victims)
        return len(victims)

    def usage(self) -> AdapterUsage:
        return self.ledger.usage()

    def pin(self, key: ObjectKey) -> None:
        """Keep ``key`` from eviction (a lookup is loading it)."""
        self._pins[key] += 1

    def unpin(self, key: ObjectKey) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def pinned(self) -> int:
        return sum(self._pins.values())

    # ------------------------------------------------------------ task group

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The adapter's own task group: recover usage, report started, then evict on demand."""
        await self.recover()
        async with trio.open_nursery() as nursery:
            await self._start_background(nursery)
            task_status.started()
            await self._run_eviction()

    async def _start_background(self, nursery: trio.Nursery) -> None:  # noqa: B027 - optional hook
        """Hook for subclasses that need tasks of their own (e.g. a breaker's probe)."""

    async def recover(self) -> int:
        """Rebuild the ledger from what is stored; returns how many objects were found."""
        keys: list[ObjectKey] = []
        sizes: list[int] = []
        async for key, size in self._scan():
            keys.append(key)
            sizes.append(size)
        self.ledger.add(keys, sizes)
        if keys:
            log.info("%s: recovered %d objects, %d bytes", self.name, len(keys), self.ledger.total)
        return len(keys)

    def _over_high_watermark(self) -> bool:
        capacity = self.ledger.capacity
        return bool(capacity) and self.ledger.total > self.high_watermark * capacity  # type: ignore[operator]

    async def _run_eviction(self) -> None:
        while True:
            if not self._over_high_watermark():
                await self._evict_wakeup.wait()
                self._evict_wakeup = trio.Event()
            try:
                await self.evict_to(int(self.low_watermark * (self.ledger.capacity or 0)), reason="watermark")
            except AdapterError as exc:
                self.errors += 1
                log.warning("%s: eviction failed: %s", self.name, exc)
                await trio.sleep(1.0)  # back off before trying again

    async def evict_to(self, target_bytes: int, *, reason: str = "watermark") -> int:
        """Delete unpinned objects until usage is at most ``target_bytes``: least recently
        used first, or, under the isolated policy, from the tenant furthest over its share."""
        evicted = 0
        while self.ledger.total > target_bytes:
            victim = self._next_victim()
            if victim is None:
                break
            await self._remove([victim])
            evicted += 1
            self.evictions_by_reason[reason] += 1
        return evicted

    def is_pinned(self, key: ObjectKey) -> bool:
        return self._pins[key] > 0

    def _unevictable(self, key: ObjectKey) -> bool:
        return self._pins[key] > 0 or key in self._deleting

    def _next_victim(self) -> ObjectKey | None:
        pinned = self._unevictable
        if self.policy != "isolated":
            return self.ledger.oldest(skip=pinned)
        candidates = {s: self.ledger.oldest(s, skip=pinned) for s in self.ledger.salts()}
        evictable = {s: k for s, k in candidates.items() if k is not None}
        salt = choose_victim_salt(evictable, self.ledger.bytes_by_salt, self.ledger.capacity or 0, self.quota)
        return None if salt is None else evictable[salt]
