"""Tiering: L1 <-> L2. Write-behind of new chunks to every adapter; prefetch on lookup.

Per-call failures are counted (status, metrics) and logged at debug level only: a
dead endpoint would otherwise log once per chunk.

Write-behind (``write_behind.TierWriter``): every chunk that becomes ready in L1 is
queued to each adapter (one bounded queue per adapter; a full queue drops and counts,
it never delays a Store reply). A queued chunk stays pinned in L1 until it is written
or given up, and is written only once its predecessor is in that tier.

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
drops, never the event loop (queued chunks hold at most ``queue_size`` chunks of L1 each).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import msgspec
import trio

from ..adapters.base import AdapterError
from ..keys import ObjectKey
from .l1 import Entry, L1Store, Refusal
from .l2_tier import L2Tier
from .write_behind import TierCounters, TierWriter

__all__ = ["Prefetched", "TierCounters", "Tiering", "TieringSettings"]

log = logging.getLogger(__name__)


class TieringSettings(msgspec.Struct, frozen=True):
    queue_size: int = 1024
    writers_per_adapter: int = 2
    lookup_timeout_s: float = 0.5
    load_timeout_s: float = 10.0
    load_concurrency: int = 8
    write_timeout_s: float = 30.0
    max_inflight_writes: int = 16


class _Load:
    """One load's hand-off between the lookup that wants it and the task that runs it."""

    __slots__ = ("abandoned", "entry", "finished", "hit", "predecessor", "tier")

    def __init__(self, entry: Entry, tier: TierWriter, predecessor: ObjectKey | None) -> None:
        self.entry = entry
        self.tier = tier
        self.predecessor = predecessor  # the chunk before it (for its write-behind)
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
        self.tiers = [
            TierWriter(
                t,
                l1,
                queue_size=settings.queue_size,
                max_inflight_writes=settings.max_inflight_writes,
                write_timeout_s=settings.write_timeout_s,
                call_nursery=self._call_nursery,
            )
            for t in l2_tiers
        ]
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

    def write_behind(
        self,
        entries: Sequence[Entry],
        predecessors: Sequence[ObjectKey | None] | None = None,
        *,
        source: L2Tier | None = None,
    ) -> None:
        """Queue ready chunks to every L2 tier but ``source``; never blocks. ``predecessors``
        (one per entry; None for chunk 0) name the chunk before each: a tier gets a chunk
        only once it holds that one (entries without predecessors are written as they come)."""
        for entry in entries:
            self._known_sizes[(entry.key.model, entry.key.world_size)] = entry.nbytes
        before = list(predecessors) if predecessors is not None else [None] * len(entries)
        for tier in self.tiers:
            if tier.l2 is source:
                continue
            for entry, predecessor in zip(entries, before):
                tier.offer(entry, predecessor)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write-behind workers for every L2 tier (the tiers' own task groups run beside)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for tier in self.tiers:
                for _ in range(self.settings.writers_per_adapter):
                    nursery.start_soon(tier.run_writer, tier.receive.clone())
            task_status.started()

    def _call_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("Tiering.run() must be started before adapters are called")
        return self._nursery

    # ------------------------------------------------------------ prefetch

    async def prefetch(
        self, chunk_keys: Sequence[Sequence[ObjectKey]], before: Sequence[ObjectKey] | None = None
    ) -> Prefetched:
        """Bring the longest loadable prefix of ``chunk_keys`` (one list of rank keys per
        chunk) into L1. Keys already ready in L1 count as held. ``before`` holds the rank
        keys of the chunk before the first (None if the first is chunk 0). On failure or
        cancellation every pin is released and every reservation freed but those of loads
        still running, which settle their own when they return."""
        result = Prefetched(self.l1)
        previous = [before, *chunk_keys[:-1]]
        predecessor_of = {
            key: None if prior is None else prior[rank]
            for chunk, prior in zip(chunk_keys, previous)
            for rank, key in enumerate(chunk)
        }
        reserved: list[tuple[Entry, TierWriter]] = []
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
            loaded = await self._load_all(reserved, predecessor_of)
            for entry, tier in reserved:
                if entry in loaded:
                    self.l1.commit(entry)
                    result.pin(entry)
                    self.write_behind([entry], [predecessor_of[entry.key]], source=tier.l2)
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
        sources: dict[ObjectKey, TierWriter],
        result: Prefetched,
        reserved: list[tuple[Entry, TierWriter]],
    ) -> list[Entry] | None:
        """Pin or reserve every rank key of one chunk; None (and nothing taken) if it cannot be had."""
        steps: list[tuple[ObjectKey, Entry | None, TierWriter | None, int]] = []
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
        taken: list[tuple[Entry, TierWriter]] = []
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

    async def _locate(self, keys: list[ObjectKey]) -> dict[ObjectKey, TierWriter]:
        """Ask every adapter at once; for each key, the first adapter (config order) that holds it.
        Adapters that have not answered by the lookup deadline count as holding nothing."""
        if not keys or not self.tiers:
            return {}
        answers: list[list[bool] | None] = [None] * len(self.tiers)
        pending = [len(self.tiers)]
        all_answered = trio.Event()

        async def ask(index: int, tier: TierWriter) -> None:
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
        sources: dict[ObjectKey, TierWriter] = {}
        for tier, answer in zip(self.tiers, list(answers)):
            if answer is None:
                continue
            for key, held in zip(keys, answer):
                if held and key not in sources:
                    sources[key] = tier
        return sources

    async def _load_all(
        self,
        reserved: list[tuple[Entry, TierWriter]],
        predecessor_of: dict[ObjectKey, ObjectKey | None],
    ) -> set[Entry]:
        """Load every reservation; returns the entries loaded. A load still running at the
        deadline, or when the caller is cancelled, is abandoned: it settles its reservation
        itself, which leaves ``reserved`` here (even on cancellation) so that the caller,
        who settles the rest, never frees what a late load still writes into and commits."""
        loads = [_Load(entry, tier, predecessor_of[entry.key]) for entry, tier in reserved]
        if not loads:
            return set()
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
            abandoned = {load.entry for load in loads if load.abandoned}
            reserved[:] = [(entry, tier) for entry, tier in reserved if entry not in abandoned]
        return {load.entry for load in loads if load.finished and load.hit}

    async def _load(self, load: _Load, pending: list[int], all_done: trio.Event) -> None:
        tier, entry = load.tier, load.entry
        try:
            async with self._load_limiter:
                hit = await tier.l2.get_into(entry.key, self.l1.buffer(entry))
            load.hit = hit is not None
            if hit is not None:
                # A retrieve by another KV layout misses it. Interned: every load decodes a
                # fresh copy of the same few fingerprints, and L1 keeps one per chunk.
                entry.layout = sys.intern(hit.layout)
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
                    self.write_behind([entry], [load.predecessor], source=tier.l2)
                else:
                    self.l1.abort(entry)
