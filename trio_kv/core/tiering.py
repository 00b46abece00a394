"""Tiering: L1 <-> L2. Write-behind of new chunks to every adapter; prefetch on lookup.

Per-call failures are counted (status, metrics) and logged at debug level only: a
dead endpoint would otherwise log once per chunk.

Write-behind: every chunk that becomes ready in L1 is queued to each adapter
(one bounded queue per adapter; a full queue drops and counts, it never delays
a Store reply). Writers pin the L1 entry only while they copy it out, so a
queued chunk may still be evicted (then it is skipped and counted).

Prefetch: from the first L1 miss, every adapter is asked at once which chunks it
holds (bounded by ``lookup_timeout_s``); the first adapter in config order that
holds a key serves it. Only the contiguous prefix is loaded, into fresh L1
reservations, bounded by ``load_timeout_s``; what loads is committed, pinned
for the caller and written behind to the *other* adapters.

Hung adapters: every adapter call runs as a task in this layer's own nursery,
and the request that wanted it waits only until its deadline. A call that
outlives its deadline is *abandoned*, not cancelled (a thread blocked in I/O
cannot be): its task keeps the L1 pin or reservation it works on until the call
really returns, then releases it (keeping a late load if it succeeded). Calls
in flight per adapter are bounded, so a dead endpoint fills its queue and
drops, never the event loop or L1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec
import trio

from ..adapters.base import AdapterError
from ..keys import ObjectKey
from .l1 import Entry, L1Store, Refusal
from .l2_tier import L2Tier, QuotaExceeded

log = logging.getLogger(__name__)


class TieringSettings(msgspec.Struct, frozen=True):
    queue_size: int = 1024
    writers_per_adapter: int = 2
    lookup_timeout_s: float = 0.5
    load_timeout_s: float = 10.0
    load_concurrency: int = 8
    write_timeout_s: float = 30.0
    max_inflight_writes: int = 16


class TierCounters:
    """What happened to one adapter's traffic (for status and metrics)."""

    def __init__(self) -> None:
        self.queued = 0
        self.dropped = 0  # queue full
        self.skipped_evicted = 0  # evicted from L1 before its turn
        self.written = 0
        self.write_failures = 0
        self.quota_skips = 0  # the tenant was at its quota in this tier
        self.write_timeouts = 0  # puts abandoned at their deadline (they finish on their own)
        self.loads = 0
        self.load_failures = 0
        self.load_timeouts = 0  # loads abandoned at the lookup's deadline
        self.lookup_errors = 0


class _Tier:
    def __init__(self, l2: L2Tier, queue_size: int, max_inflight_writes: int) -> None:
        self.l2 = l2
        self.send, self.receive = trio.open_memory_channel[Entry](queue_size)
        self.counters = TierCounters()
        self.inflight_writes = trio.CapacityLimiter(max_inflight_writes)


class _Load:
    """One load's hand-off between the lookup that wants it and the task that runs it."""

    __slots__ = ("abandoned", "entry", "finished", "hit", "tier")

    def __init__(self, entry: Entry, tier: _Tier) -> None:
        self.entry = entry
        self.tier = tier
        self.finished = False
        self.hit = False
        self.abandoned = False  # the lookup stopped waiting: the task now owns the reservation


class Prefetched:
    """A prefetch's result: the contiguous chunks now in L1, each entry reader-pinned
    for the caller, who must call ``release`` (in a finally) once it has leased them."""

    def __init__(self, l1: L1Store) -> None:
        self._l1 = l1
        self.chunks: list[list[Entry]] = []
        self.pinned: list[Entry] = []

    def pin(self, entry: Entry) -> None:
        self._l1.pin_reader(entry)
        self.pinned.append(entry)

    def release(self) -> None:
        pinned, self.pinned = self.pinned, []
        for entry in pinned:
            self._l1.unpin_reader(entry)


class Tiering:
    def __init__(self, l1: L1Store, l2_tiers: Sequence[L2Tier], settings: TieringSettings) -> None:
        self.l1 = l1
        self.settings = settings
        self.tiers = [_Tier(t, settings.queue_size, settings.max_inflight_writes) for t in l2_tiers]
        self._nursery: trio.Nursery | None = None
        self._load_limiter = trio.CapacityLimiter(settings.load_concurrency)
        self._known_sizes: dict[tuple[str, int], int] = {}

    @property
    def l2_tiers(self) -> list[L2Tier]:
        return [t.l2 for t in self.tiers]

    def counters(self, l2: L2Tier) -> TierCounters:
        return next(t.counters for t in self.tiers if t.l2 is l2)

    def queue_depth(self, l2: L2Tier) -> int:
        tier = next(t for t in self.tiers if t.l2 is l2)
        return tier.send.statistics().current_buffer_used

    # ------------------------------------------------------------ write-behind

    def write_behind(self, entries: Sequence[Entry], *, source: L2Tier | None = None) -> None:
        """Queue ready chunks to every L2 tier but ``source``; never blocks."""
        for entry in entries:
            self._known_sizes[(entry.key.model, entry.key.world_size)] = entry.nbytes
        for tier in self.tiers:
            if tier.l2 is source:
                continue
            for entry in entries:
                try:
                    tier.send.send_nowait(entry)
                    tier.counters.queued += 1
                except trio.WouldBlock:
                    tier.counters.dropped += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write-behind workers for every L2 tier (the tiers' own task groups run beside)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for tier in self.tiers:
                for _ in range(self.settings.writers_per_adapter):
                    nursery.start_soon(self._writer, tier, tier.receive.clone())
            task_status.started()

    async def _writer(self, tier: _Tier, receive: trio.MemoryReceiveChannel[Entry]) -> None:
        async with receive:
            async for entry in receive:
                await self._write_one(tier, entry)

    async def _write_one(self, tier: _Tier, entry: Entry) -> None:
        if self.l1.get_ready(entry.key) is not entry:
            tier.counters.skipped_evicted += 1
            return
        done = trio.Event()
        # Taken before the pin: with every slot held by hung puts, the writer waits here
        # (and the queue fills and drops) instead of pinning ever more of L1.
        await tier.inflight_writes.acquire_on_behalf_of(done)
        if self.l1.get_ready(entry.key) is not entry:
            # Evicted while this writer waited for a slot: its bytes may be another chunk's now.
            tier.inflight_writes.release_on_behalf_of(done)
            tier.counters.skipped_evicted += 1
            return
        self.l1.pin_reader(entry)  # not evicted (nor freed) mid-copy
        self._call_nursery().start_soon(self._put, tier, entry, done)
        with trio.move_on_after(self.settings.write_timeout_s):
            await done.wait()
        if not done.is_set():
            tier.counters.write_timeouts += 1
            log.debug("%s: a put outlived %.1f s; moving on", tier.l2.name, self.settings.write_timeout_s)

    async def _put(self, tier: _Tier, entry: Entry, done: trio.Event) -> None:
        try:
            await tier.l2.put(entry.key, self.l1.buffer(entry), entry.layout)
            tier.counters.written += 1
        except QuotaExceeded:
            tier.counters.quota_skips += 1
        except AdapterError as exc:
            tier.counters.write_failures += 1
            log.debug("%s: write-behind of a chunk failed: %s", tier.l2.name, exc)
        finally:
            self.l1.unpin_reader(entry)
            tier.inflight_writes.release_on_behalf_of(done)
            done.set()

    def _call_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("Tiering.run() must be started before adapters are called")
        return self._nursery

    # ------------------------------------------------------------ prefetch

    async def prefetch(self, chunk_keys: Sequence[Sequence[ObjectKey]]) -> Prefetched:
        """Bring the longest loadable prefix of ``chunk_keys`` (one list of rank keys per
        chunk) into L1. Keys already ready in L1 count as held. On failure or
        cancellation every reservation is freed and every pin released."""
        result = Prefetched(self.l1)
        reserved: list[tuple[Entry, _Tier]] = []
        try:
            sources = await self._locate(
                [k for chunk in chunk_keys for k in chunk if self.l1.get_ready(k) is None]
            )
            plan: list[list[Entry]] = []
            for chunk in chunk_keys:
                planned = self._plan_chunk(chunk, sources, result, reserved)
                if planned is None:
                    break
                plan.append(planned)
            loaded, abandoned = await self._load_all(reserved)
            # Abandoned loads own their reservations now; the rest are ours to settle.
            reserved = [(e, t) for e, t in reserved if e not in abandoned]
            for entry, tier in reserved:
                if entry in loaded:
                    self.l1.commit(entry)
                    result.pin(entry)
                    self.write_behind([entry], source=tier.l2)
                else:
                    self.l1.abort(entry)
            reserved = []
            held = set(result.pinned)  # every pinned entry is ready: L1 hits and fresh loads
            for chunk_entries in plan:
                if not all(e in held for e in chunk_entries):
                    break
                result.chunks.append(chunk_entries)
            # Entries past the prefix stay cached (they are valid) but need no pin.
        except BaseException:
            for entry, _ in reserved:
                self.l1.abort(entry)
            result.release()
            raise
        return result

    def _plan_chunk(
        self,
        chunk: Sequence[ObjectKey],
        sources: dict[ObjectKey, _Tier],
        result: Prefetched,
        reserved: list[tuple[Entry, _Tier]],
    ) -> list[Entry] | None:
        """Pin or reserve every rank key of one chunk; None (and nothing taken) if it cannot be had."""
        steps: list[tuple[ObjectKey, Entry | None, _Tier | None, int]] = []
        for key in chunk:
            ready = self.l1.get_ready(key)
            if ready is not None:
                steps.append((key, ready, None, 0))
                continue
            tier = sources.get(key)
            size = self._size_hint(key, tier.l2) if tier is not None else None
            if tier is None or size is None or key in self.l1:
                return None  # absent, size unknown, or being written by another request
            steps.append((key, None, tier, size))
        entries: list[Entry] = []
        taken: list[tuple[Entry, _Tier]] = []
        for key, ready, tier, size in steps:
            if ready is not None:
                result.pin(ready)
                entries.append(ready)
                continue
            assert tier is not None
            entry = self.l1.reserve(key, size)
            if isinstance(entry, Refusal):
                for done, _ in taken:
                    self.l1.abort(done)
                return None
            taken.append((entry, tier))
            entries.append(entry)
        reserved.extend(taken)
        return entries

    def _size_hint(self, key: ObjectKey, l2: L2Tier) -> int | None:
        size = l2.ledger.size_of(key)
        return size if size is not None else self._known_sizes.get((key.model, key.world_size))

    async def _locate(self, keys: list[ObjectKey]) -> dict[ObjectKey, _Tier]:
        """Ask every adapter at once; for each key, the first adapter (config order) that holds it.
        Adapters that have not answered by the lookup deadline count as holding nothing."""
        if not keys or not self.tiers:
            return {}
        answers: list[list[bool] | None] = [None] * len(self.tiers)
        pending = [len(self.tiers)]
        all_answered = trio.Event()

        async def ask(index: int, tier: _Tier) -> None:
            try:
                answer = await tier.l2.contains(keys)
            except AdapterError as exc:
                tier.counters.lookup_errors += 1
                log.debug("%s: contains failed: %s", tier.l2.name, exc)
            else:
                answers[index] = answer
            finally:
                pending[0] -= 1
                if not pending[0]:
                    all_answered.set()

        for index, tier in enumerate(self.tiers):
            self._call_nursery().start_soon(ask, index, tier)
        with trio.move_on_after(self.settings.lookup_timeout_s):
            await all_answered.wait()
        sources: dict[ObjectKey, _Tier] = {}
        for tier, answer in zip(self.tiers, list(answers)):
            if answer is None:
                continue
            for key, held in zip(keys, answer):
                if held and key not in sources:
                    sources[key] = tier
        return sources

    async def _load_all(self, reserved: list[tuple[Entry, _Tier]]) -> tuple[set[Entry], set[Entry]]:
        """Load every reservation; returns (entries loaded, entries abandoned at the deadline)."""
        loads = [_Load(entry, tier) for entry, tier in reserved]
        if not loads:
            return set(), set()
        pending = [len(loads)]
        all_done = trio.Event()
        for load in loads:
            self._call_nursery().start_soon(self._load, load, pending, all_done)
        try:
            with trio.move_on_after(self.settings.load_timeout_s):
                await all_done.wait()
        finally:
            # On the deadline, or if the lookup itself is cancelled: hand over what is still running.
            for load in loads:
                if not load.finished:
                    load.abandoned = True
                    load.tier.counters.load_timeouts += 1
        loaded = {load.entry for load in loads if load.finished and load.hit}
        abandoned = {load.entry for load in loads if load.abandoned}
        return loaded, abandoned

    async def _load(self, load: _Load, pending: list[int], all_done: trio.Event) -> None:
        tier, entry = load.tier, load.entry
        try:
            async with self._load_limiter:
                hit = await tier.l2.get_into(entry.key, self.l1.buffer(entry))
            load.hit = hit is not None
            if hit is not None:
                entry.layout = hit.layout  # a retrieve by another KV layout misses it
                tier.counters.loads += 1
            else:
                tier.counters.load_failures += 1
        except AdapterError as exc:
            tier.counters.load_failures += 1
            log.debug("%s: load failed: %s", tier.l2.name, exc)
        finally:
            load.finished = True
            pending[0] -= 1
            if not pending[0]:
                all_done.set()
            if load.abandoned:
                # Nobody waits for this chunk any more: keep it if it arrived, else free it.
                if load.hit:
                    self.l1.commit(entry)
                    self.write_behind([entry], source=tier.l2)
                else:
                    self.l1.abort(entry)
