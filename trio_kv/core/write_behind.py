"""Write-behind of ready L1 chunks to one L2 tier: a bounded queue, its writers, its counters.

* **Nothing queued vanishes.** A queued chunk holds an L1 reader pin until it is written
  or given up, so L1 cannot evict it meanwhile. The pins are bounded by the queue size:
  once the queue is full, further chunks are dropped (and counted), and a full L1 refuses
  new stores (``skipped_no_room``) rather than losing queued chunks. A chunk leaves the
  queue unwritten only if it was cleared, failed, was refused (quota, circuit breaker) or
  would be an orphan; each counts in its detail counter *and* in ``lost``.
* **Whole prefixes only.** A chunk's key chains over every token before it, so chunk i is
  found only if chunks 0..i-1 are. Each chunk travels with its predecessor's key; a writer
  writes it only once that predecessor is in this tier (or it is chunk 0), waiting for a
  predecessor still queued or in flight here, and skips it (``skipped_orphan``) otherwise.
  So a tier never holds an object that write-behind made unreachable.
* **Hung puts.** Every put runs as a task in the tiering layer's nursery; the writer waits
  only ``write_timeout_s`` for it (then counts a timeout and moves on) while the task keeps
  the chunk's pin until the put really returns. Puts in flight are bounded, so a dead
  endpoint fills the queue and drops, never the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..adapters.base import AdapterError, Unavailable
from ..keys import ObjectKey
from .l1 import Entry, L1Store
from .l2_tier import L2Tier, QuotaExceeded

log = logging.getLogger(__name__)


class TierCounters:
    """What happened to one adapter's traffic (for status and metrics). Once the queue is
    empty and no put is in flight, ``queued + dropped == written + lost``."""

    def __init__(self) -> None:
        self.queued = 0
        self.dropped = 0  # queue full
        self.skipped_evicted = 0  # cleared from L1 before its turn
        self.skipped_orphan = 0  # its predecessor is not in this tier: it could never be found
        self.written = 0
        self.write_failures = 0  # the put was sent and failed
        self.breaker_skips = 0  # not sent: the endpoint is known to be down (breaker open)
        self.quota_skips = 0  # the tenant was at its quota in this tier
        self.write_timeouts = 0  # puts abandoned at their deadline (they finish on their own)
        self.lost = 0  # handed to write-behind and never written, for any of the reasons above
        self.loads = 0
        self.load_failures = 0
        self.load_timeouts = 0  # loads abandoned at the lookup's deadline
        self.lookup_errors = 0


class Queued:
    """One chunk on its way to one tier; ``settled`` is set once it is written or given up."""

    __slots__ = ("entry", "predecessor", "settled")

    def __init__(self, entry: Entry, predecessor: ObjectKey | None) -> None:
        self.entry = entry
        self.predecessor = predecessor  # None: chunk 0, or its predecessor is held elsewhere
        self.settled = trio.Event()


class TierWriter:
    """One L2 tier's write-behind: its queue, the chunks pending there, its counters."""

    def __init__(
        self,
        l2: L2Tier,
        l1: L1Store,
        *,
        queue_size: int,
        max_inflight_writes: int,
        write_timeout_s: float,
        call_nursery: Callable[[], trio.Nursery],
    ) -> None:
        self.l2 = l2
        self.l1 = l1
        self.send, self.receive = trio.open_memory_channel[Queued](queue_size)
        self.counters = TierCounters()
        self.inflight_writes = trio.CapacityLimiter(max_inflight_writes)
        self.write_timeout_s = write_timeout_s
        self._call_nursery = call_nursery
        self._pending: dict[ObjectKey, Queued] = {}  # queued or being written here

    def offer(self, entry: Entry, predecessor: ObjectKey | None) -> None:
        """Queue a ready chunk, pinned until settled; a full queue drops it (counted). Never blocks."""
        item = Queued(entry, predecessor)
        self.l1.pin_reader(entry)
        try:
            self.send.send_nowait(item)
        except trio.WouldBlock:
            self.l1.unpin_reader(entry)
            self.counters.dropped += 1
            self.counters.lost += 1
            return
        self.counters.queued += 1
        self._pending[entry.key] = item

    async def wait_settled(self) -> None:
        """Return once every chunk queued so far is written or given up."""
        while self._pending:
            await next(iter(self._pending.values())).settled.wait()

    async def run_writer(self, receive: trio.MemoryReceiveChannel[Queued]) -> None:
        async with receive:
            async for item in receive:
                await self._write_one(item)

    def _give_up(self, item: Queued, reason: str) -> None:
        setattr(self.counters, reason, getattr(self.counters, reason) + 1)
        self.counters.lost += 1
        self._settle(item)

    def _settle(self, item: Queued) -> None:
        self.l1.unpin_reader(item.entry)
        if self._pending.get(item.entry.key) is item:
            del self._pending[item.entry.key]
        item.settled.set()

    def _cleared(self, item: Queued) -> bool:
        return self.l1.get_ready(item.entry.key) is not item.entry

    async def _write_one(self, item: Queued) -> None:
        """Write one chunk, or give it up and count why. Cancelled (at shutdown) before its
        put starts, the chunk is settled unwritten; a started put finishes on its own."""
        handed_over = False
        try:
            if self._cleared(item):
                self._give_up(item, "skipped_evicted")
                return
            if not await self._predecessor_held(item):
                self._give_up(item, "skipped_orphan")
                return
            await self.inflight_writes.acquire_on_behalf_of(item)
            if self._cleared(item):  # cleared while it waited for its predecessor or a slot
                self.inflight_writes.release_on_behalf_of(item)
                self._give_up(item, "skipped_evicted")
                return
            self._call_nursery().start_soon(self._put, item)
            handed_over = True
        finally:
            if not handed_over and not item.settled.is_set():
                self._settle(item)
        with trio.move_on_after(self.write_timeout_s):
            await item.settled.wait()
        if not item.settled.is_set():
            self.counters.write_timeouts += 1
            log.debug("%s: a put outlived %.1f s; moving on", self.l2.name, self.write_timeout_s)

    async def _predecessor_held(self, item: Queued) -> bool:
        """Is the chunk before this one in this tier? Waits (up to the write timeout) for one
        still queued or in flight here; asks the tier about one it did not write itself."""
        predecessor = item.predecessor
        if predecessor is None or predecessor in self.l2.ledger:
            return True
        ahead = self._pending.get(predecessor)
        if ahead is not None:
            # Queued before this chunk (stores queue in prefix order), so a writer has it already.
            with trio.move_on_after(self.write_timeout_s):
                await ahead.settled.wait()
            return predecessor in self.l2.ledger
        try:
            with trio.move_on_after(self.write_timeout_s):
                return (await self.l2.contains([predecessor]))[0]  # e.g. another server wrote it
        except AdapterError as exc:
            log.debug("%s: contains failed: %s", self.l2.name, exc)
        return False

    async def _put(self, item: Queued) -> None:
        entry = item.entry
        try:
            await self.l2.put(entry.key, self.l1.buffer(entry), entry.layout)
            self.counters.written += 1
        except QuotaExceeded:
            self.counters.quota_skips += 1
            self.counters.lost += 1
        except Unavailable:
            self.counters.breaker_skips += 1
            self.counters.lost += 1
        except AdapterError as exc:
            self.counters.write_failures += 1
            self.counters.lost += 1
            log.debug("%s: write-behind of a chunk failed: %s", self.l2.name, exc)
        finally:
            self.inflight_writes.release_on_behalf_of(item)
            self._settle(item)
