"""L1: chunks in one CPU-memory arena, with states, pins, LRU eviction and per-salt accounting.

Touched only from the Trio thread, so it takes no locks. Bytes are copied in
and out by the transfer layer through the views this module hands out.

Entry life: ``reserve`` (state WRITING, bytes charged) -> ``commit`` (READY,
evictable when unpinned) or ``abort`` (freed). Readers and leases pin an entry;
only READY entries without pins are evicted. ``clear`` frees what it can at
once and marks pinned or half-written entries *doomed*: they leave the index
at once and their bytes are freed when the last pin goes. A freed entry is dead
(state FREED): committing, aborting or pinning it is an error.

The entry record and the eviction order (intrusive LRU lists) live in ``l1_order``.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import trio

from ..keys import ObjectKey
from ..transfer.hugepages import advise_huge_pages
from .allocator import ExtentAllocator
from .eviction import POLICIES, choose_victim_salt
from .l1_order import Entry, EntryState, EvictionOrder
from .ledger import ByteLedger

__all__ = ["Entry", "EntryState", "L1Store", "Refusal"]

log = logging.getLogger(__name__)

_MAX_SHARED_SIZES = 1024


class Refusal(enum.Enum):
    """Why ``reserve`` could not take room."""

    QUOTA = "quota"  # the tenant is at its quota and has nothing of its own left to evict
    CAPACITY = "capacity"  # the arena is full of pinned or half-written chunks


class L1Store:
    def __init__(
        self,
        capacity: int,
        *,
        high_watermark: float = 0.95,
        low_watermark: float = 0.90,
        arena: torch.Tensor | None = None,
        alignment: int = 4096,
        policy: str = "lru",
        quota: Callable[[str], int | None] | None = None,
        pin: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """``pin``, when given, page-locks the arena once it exists (the CUDA path copies into it)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not 0.0 < low_watermark <= high_watermark <= 1.0:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        self.allocator = ExtentAllocator(capacity, alignment)
        self.capacity = self.allocator.capacity
        if arena is None:
            arena = torch.empty(self.capacity, dtype=torch.uint8)
            advise_huge_pages(arena)  # before its pages are touched (transfer/hugepages.py)
        self.arena = arena
        if self.arena.numel() < self.capacity:
            raise ValueError("arena is smaller than the capacity")
        if pin is not None:
            pin(self.arena)
        self._arena_bytes = memoryview(self.arena.numpy())  # type: ignore[arg-type]
        self.ledger = ByteLedger(self.capacity)
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self._entries: dict[ObjectKey, Entry] = {}
        self._evictable = EvictionOrder()
        # One int object per distinct size, shared by the entries (a few chunk sizes in practice).
        self._sizes: dict[int, int] = {}
        self.policy = policy
        self.quota = quota
        self._doomed: set[Entry] = set()
        self._watermark_wakeup = trio.Event()
        self.evictions = 0
        self.evictions_by_reason: Counter[str] = Counter()
        self.refusals: Counter[Refusal] = Counter()

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: ObjectKey) -> bool:
        return key in self._entries

    def get(self, key: ObjectKey) -> Entry | None:
        return self._entries.get(key)

    def get_ready(self, key: ObjectKey) -> Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.state is EntryState.READY else None

    def ready_prefix(self, chunk_keys: Sequence[Sequence[ObjectKey]]) -> list[list[Entry]]:
        """The entries of the leading chunks whose every key is ready (one lookup's scan)."""
        get, ready_state = self._entries.get, EntryState.READY
        ready: list[list[Entry]] = []
        for keys in chunk_keys:
            chunk = []
            for key in keys:
                entry = get(key)
                if entry is None or entry.state is not ready_state:
                    return ready
                chunk.append(entry)
            ready.append(chunk)
        return ready

    def view(self, entry: Entry) -> torch.Tensor:
        """The entry's payload bytes in the arena."""
        return self.arena[entry.offset : entry.offset + entry.nbytes]

    def buffer(self, entry: Entry) -> memoryview:
        """The entry's payload as a writable memoryview (for L2 I/O; no copy)."""
        return self._arena_bytes[entry.offset : entry.offset + entry.nbytes]

    def order_problems(self) -> list[str]:
        """Inconsistencies of the eviction order, or between it and the index (for audits)."""
        problems = self._evictable.problems()
        if any(e.pinned or e.state is not EntryState.READY for e in self._evictable):
            problems.append("a pinned or half-written entry is evictable")
        if any(self._entries.get(e.key) is not e for e in self._evictable):
            problems.append("an evictable entry is not in the index")
        return problems

    def entries(self) -> list[Entry]:
        """Every live entry plus doomed ones still holding bytes (for audits)."""
        return [*self._entries.values(), *self._doomed]

    def eviction_order(self, salt: str | None = None) -> list[Entry]:
        """The evictable entries (of ``salt``, or all), least recent first (for audits)."""
        return list(self._evictable if salt is None else self._evictable.of_salt(salt))

    def allocations(self) -> dict[int, int]:
        """Offset -> size of every extent the entries hold (for audits; the allocator keeps none)."""
        return {entry.offset: self.size_of(entry) for entry in self.entries()}

    def size_of(self, entry: Entry) -> int:
        """The bytes ``entry`` takes in the arena (its payload, aligned). Not kept per entry:
        it follows from ``nbytes`` and the alignment."""
        return self.allocator.rounded(entry.nbytes)

    def is_doomed(self, entry: Entry) -> bool:
        """Cleared while pinned or half-written: out of the index, bytes still held."""
        return entry in self._doomed

    # ------------------------------------------------------------ writing

    def reserve(self, key: ObjectKey, nbytes: int) -> Entry | Refusal:
        """Take room for a new chunk, evicting if needed: first the tenant's own least recent
        chunks while it is at its quota, then by policy while the arena is full."""
        if key in self._entries:
            raise KeyError(f"{key} is already present")
        salt = key.cache_salt
        size = self.allocator.rounded(nbytes)
        limit = self.quota(salt) if self.quota is not None else None
        if limit is not None:
            while self.ledger.salt_bytes(salt) + size > limit:
                if size > limit or self._evictable.oldest(salt) is None:
                    return self._refuse(Refusal.QUOTA)
                self._evict_one("quota", salt)
        if size > self.capacity:
            return self._refuse(Refusal.CAPACITY)
        offset = self.allocator.allocate(size)
        while offset is None and self._evictable:
            self._evict_one("capacity")
            offset = self.allocator.allocate(size)
        if offset is None:
            return self._refuse(Refusal.CAPACITY)
        entry = Entry(key, offset, self._shared_size(nbytes))
        self._entries[key] = entry
        self.ledger.charge(salt, size)
        if self.allocator.used > self.high_watermark * self.capacity:
            self._watermark_wakeup.set()
        return entry

    def _shared_size(self, size: int) -> int:
        shared = self._sizes.get(size)
        if shared is not None:
            return shared
        if len(self._sizes) < _MAX_SHARED_SIZES:  # odd sizes past the bound just go unshared
            self._sizes[size] = size
        return size

    def _refuse(self, reason: Refusal) -> Refusal:
        self.refusals[reason] += 1
        return reason

    def commit(self, entry: Entry) -> None:
        """WRITING -> READY. A doomed entry is freed instead. Raises ValueError for an entry
        that is not a reservation of this store (already settled, or unknown)."""
        doomed = self._check_reservation(entry, "commit")
        entry.state = EntryState.READY
        if doomed:
            self._release_doomed(entry)
        else:
            self._evictable.push(entry)

    def abort(self, entry: Entry) -> None:
        """Free a reservation whose copy failed or was cancelled. Raises ValueError like ``commit``."""
        if self._check_reservation(entry, "abort"):
            self._release_doomed(entry)
        else:
            self._free(entry)

    def _check_reservation(self, entry: Entry, action: str) -> bool:
        """Whether the reservation ``entry`` is doomed; ValueError if it is not one of ours."""
        if entry.state is not EntryState.WRITING:
            raise ValueError(f"{action} of an entry that is not being written: {entry}")
        if self._entries.get(entry.key) is entry:
            return False
        if entry in self._doomed:
            return True
        raise ValueError(f"{action} of a reservation this store does not hold: {entry}")

    # ------------------------------------------------------------ pins

    def touch(self, entry: Entry) -> None:
        """Mark as most recently used."""
        self._evictable.touch(entry)

    def touch_all(self, entries: Sequence[Entry]) -> None:
        """``touch`` each of ``entries``, in order."""
        self._evictable.touch_all(entries)

    def pin_reader(self, entry: Entry) -> None:
        self._pin(entry)
        entry.readers += 1

    def unpin_reader(self, entry: Entry) -> None:
        if entry.readers <= 0:
            raise ValueError(f"reader unpin without a pin: {entry}")
        entry.readers -= 1
        self._after_unpin(entry)

    def add_lease(self, entry: Entry) -> None:
        self._pin(entry)
        entry.leases += 1

    def drop_lease(self, entry: Entry) -> None:
        if entry.leases <= 0:
            raise ValueError(f"lease drop without a lease: {entry}")
        entry.leases -= 1
        self._after_unpin(entry)

    def _pin(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is not entry:
            # Evicted or cleared: its bytes may already belong to another chunk.
            raise ValueError(f"only live entries can be pinned: {entry}")
        if entry.state is not EntryState.READY:
            raise ValueError(f"only ready entries can be pinned: {entry}")
        self._evictable.remove(entry)

    def _after_unpin(self, entry: Entry) -> None:
        if entry.pinned:
            return
        if self._entries.get(entry.key) is entry:
            self._evictable.push(entry)  # just used: most recent
        elif entry in self._doomed:
            self._release_doomed(entry)

    # ------------------------------------------------------------ eviction

    def evict_to(self, target_used: int, reason: str = "watermark") -> int:
        """Evict LRU chunks until at most ``target_used`` bytes are used; returns how many."""
        count = 0
        while self.allocator.used > target_used and self._evictable:
            self._evict_one(reason)
            count += 1
        return count

    async def run_watermark_eviction(self) -> None:
        """Background task: when usage passes the high watermark, evict down to the low one."""
        while True:
            await self._watermark_wakeup.wait()
            self._watermark_wakeup = trio.Event()
            self.evict_to(int(self.low_watermark * self.capacity))

    def clear(self, salt: str | None = None) -> tuple[int, int]:
        """Remove every chunk (of one salt, or all). Returns (entries removed, bytes freed now)."""
        removed = freed = 0
        for key, entry in list(self._entries.items()):
            if salt is not None and key.cache_salt != salt:
                continue
            removed += 1
            if entry.state is EntryState.WRITING or entry.readers > 0:
                del self._entries[key]
                self._evictable.remove(entry)
                self._doomed.add(entry)
            else:
                freed += self.size_of(entry)
                self._free(entry)
        return removed, freed

    def _evict_one(self, reason: str, salt: str | None = None) -> None:
        """Evict one chunk: ``salt``'s least recent, or the policy's choice."""
        if salt is None and self.policy == "isolated":
            salt = choose_victim_salt(
                self._evictable.salts(), self.ledger.bytes_by_salt, self.capacity, self.quota
            )
        entry = self._evictable.oldest(salt)
        if entry is None:
            raise RuntimeError(f"nothing evictable (salt {salt!r})")
        self.evictions += 1
        self.evictions_by_reason[reason] += 1
        self._free(entry)

    def _free(self, entry: Entry) -> None:
        del self._entries[entry.key]
        self._evictable.remove(entry)
        self._release_bytes(entry)

    def _release_doomed(self, entry: Entry) -> None:
        self._doomed.discard(entry)
        self._release_bytes(entry)

    def _release_bytes(self, entry: Entry) -> None:
        size = self.size_of(entry)
        self.allocator.free(entry.offset, size)
        self.ledger.release(entry.key.cache_salt, size)
        entry.state = EntryState.FREED
