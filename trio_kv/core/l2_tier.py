"""One L2 tier: an adapter's store under this server's policy.

``L2Tier`` wraps one ``L2Adapter`` (pure I/O) and keeps the byte ledger exact
around its primitives, pins keys that a lookup is loading so eviction never
deletes them mid-read, treats keys being deleted as misses, admits puts under
the tenant's quota in this tier, and runs the tier's task group: recovery scan
into the ledger first, then watermark-triggered eviction with real deletes
whenever a capacity is set (LRU, or per tenant under the isolated policy).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import trio

from ..adapters.base import AdapterError, AdapterHealth, Hit, L2Adapter, Unavailable
from ..adapters.spec import AdapterSpec, build_adapter
from ..keys import ObjectKey
from ..protocol import AdapterUsage
from .eviction import POLICIES, choose_victim_salt
from .ledger import KeyedLedger

log = logging.getLogger(__name__)

QuotaOf = Callable[[str], int | None]
AdapterT = TypeVar("AdapterT", bound=L2Adapter)


class QuotaExceeded(AdapterError):
    """The tenant is at its quota in this tier and has nothing of its own left to evict."""


class L2Tier(Generic[AdapterT]):
    """``adapter`` under a ``capacity`` (None: no eviction) with eviction between the
    watermarks, the eviction ``policy`` ("lru" or "isolated") and ``quota``, the per-salt
    byte limit of this tier (None for no limit). ``name`` and ``kind`` are the adapter's."""

    def __init__(
        self,
        adapter: AdapterT,
        *,
        capacity: int | None = None,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        policy: str = "lru",
        quota: QuotaOf | None = None,
    ) -> None:
        name = adapter.name
        if capacity is not None and capacity <= 0:
            raise ValueError(f"{name}: capacity must be positive, got {capacity}")
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError(f"{name}: watermarks must satisfy 0 < low <= high <= 1")
        if policy not in POLICIES:
            raise ValueError(f"{name}: eviction policy must be one of {', '.join(POLICIES)}")
        self.adapter = adapter
        self.ledger = KeyedLedger(capacity)
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.policy = policy
        self.quota = quota
        self.quota_skips = 0
        self.evictions_by_reason: Counter[str] = Counter()  # "watermark", "quota"
        self.errors = 0  # failed eviction passes
        self.recovered = trio.Event()  # set once the recovery scan has run (at start or deferred)
        self._pins: Counter[ObjectKey] = Counter()
        self._deleting: set[ObjectKey] = set()  # being deleted: misses from now on
        self._evict_wakeup = trio.Event()
        self._recovery_pending = False

    @classmethod
    def from_spec(
        cls, spec: AdapterSpec, *, policy: str = "lru", quota: QuotaOf | None = None
    ) -> L2Tier[Any]:
        """The tier an ``--l2`` spec names: its adapter, capacity and watermarks."""
        return L2Tier(build_adapter(spec), policy=policy, quota=quota, **spec.tier_options())

    @property
    def name(self) -> str:
        return self.adapter.name

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def capacity(self) -> int | None:
        return self.ledger.capacity

    @property
    def evictions(self) -> int:
        return sum(self.evictions_by_reason.values())

    def health(self) -> AdapterHealth:
        return self.adapter.health()

    def usage(self) -> AdapterUsage:
        return self.ledger.usage()

    # ------------------------------------------------------------ objects

    async def put(self, key: ObjectKey, payload: memoryview, layout: str = "") -> bool:
        """Store one object (with the fingerprint of the KV layout that stored it). Returns False (without writing) if it is already stored.
        A tenant at its quota first evicts its own least recent objects; if that cannot
        make room, QuotaExceeded is raised and nothing is written."""
        if key in self.ledger:
            self.ledger.touch([key])
            return False
        await self._admit(key.cache_salt, len(payload))
        await self.adapter.put(key, payload, layout)
        self.ledger.add([key], [len(payload)])
        if self._over_high_watermark():
            self._evict_wakeup.set()
        return True

    async def get_into(self, key: ObjectKey, buffer: memoryview) -> Hit | None:
        """Read one object into ``buffer`` (exactly its size). A Hit (with the object's layout
        fingerprint) or None. A miss forgets the key, unless the adapter could not ask its
        store (Unavailable)."""
        if key in self._deleting:
            await trio.lowlevel.checkpoint()
            return None
        self.pin(key)
        try:
            hit = await self.adapter.get_into(key, buffer)
        except Unavailable:
            return None  # most likely still there: the ledger keeps it
        finally:
            self.unpin(key)
        if hit:
            self.ledger.touch([key])
        elif key in self.ledger:
            # Gone or corrupt behind our back: the ledger must not count it.
            self.ledger.remove([key])
        return hit

    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        held = await self.adapter.contains(keys)
        if self._deleting:
            held = [h and k not in self._deleting for k, h in zip(keys, held)]
        return held

    async def delete(self, keys: Sequence[ObjectKey]) -> int:
        """Delete objects (pinned ones are skipped); returns how many were deleted."""
        victims = [k for k in keys if not self._pins[k]]
        if victims:
            await self._remove(victims)
        return len(victims)

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

    async def _remove(self, keys: Sequence[ObjectKey]) -> None:
        """Delete objects and forget them. While the delete runs they are misses for new
        lookups and loads, so no load can start on an object that is going away."""
        self._deleting.update(keys)
        try:
            await self.adapter.delete(keys)
            self.ledger.remove(keys)
        finally:
            self._deleting.difference_update(keys)

    # ------------------------------------------------------------ pins

    def pin(self, key: ObjectKey) -> None:
        """Keep ``key`` from eviction (a lookup is loading it)."""
        self._pins[key] += 1

    def unpin(self, key: ObjectKey) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def pinned(self) -> int:
        return sum(self._pins.values())

    def _unevictable(self, key: ObjectKey) -> bool:
        return self._pins[key] > 0 or key in self._deleting

    # ------------------------------------------------------------ task group

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The tier's task group: recover usage, start the adapter's own tasks, report
        started, then evict on demand (and run a deferred recovery scan) until cancelled."""
        if self.capacity is None and self.adapter.needs_capacity:
            log.warning(
                "%s: no capacity set: the tier grows until its disk is full, then every write "
                "fails; set one (e.g. fs:DIR?capacity=100GiB)",
                self.name,
            )
        await self.recover()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.adapter.run)
            if self._recovery_pending:
                nursery.start_soon(self._deferred_recovery)
            task_status.started()
            await self._run_eviction()

    async def recover(self) -> int:
        """Rebuild the ledger from what is stored; returns how many objects were found.
        If the store is unreachable the scan is left to ``run``, which tries it again
        once the adapter is available, and 0 is returned."""
        try:
            found = await self._scan_into_ledger()
        except Unavailable as exc:
            self._recovery_pending = True
            log.warning("%s: recovery scan deferred until the endpoint answers: %s", self.name, exc)
            return 0
        self.recovered.set()
        return found

    async def _scan_into_ledger(self) -> int:
        keys: list[ObjectKey] = []
        sizes: list[int] = []
        async for key, size in self.adapter.scan():
            keys.append(key)
            sizes.append(size)
        self.ledger.add(keys, sizes)
        if keys:
            log.info("%s: recovered %d objects, %d bytes", self.name, len(keys), self.ledger.total)
        return len(keys)

    async def _deferred_recovery(self) -> None:
        while self._recovery_pending:
            await self.adapter.wait_available()
            try:
                found = await self._scan_into_ledger()
            except Unavailable:
                continue  # unreachable again: wait for the next chance
            except AdapterError as exc:
                self._recovery_pending = False  # not the endpoint's absence: trying again will not help
                log.error("%s: deferred recovery scan failed: %s", self.name, exc)
                return
            self._recovery_pending = False
            self.recovered.set()
            log.info("%s: deferred recovery scan found %d objects", self.name, found)

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

    def _next_victim(self) -> ObjectKey | None:
        pinned = self._unevictable
        if self.policy != "isolated":
            return self.ledger.oldest(skip=pinned)
        candidates = {s: self.ledger.oldest(s, skip=pinned) for s in self.ledger.salts()}
        evictable = {s: k for s, k in candidates.items() if k is not None}
        salt = choose_victim_salt(evictable, self.ledger.bytes_by_salt, self.ledger.capacity or 0, self.quota)
        return None if salt is None else evictable[salt]
