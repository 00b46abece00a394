"""The cache engine: store, lookup and retrieve flows over L1, leases and the transfer layer.

Plain objects touched only from the Trio thread. The only awaits are the byte
copies (in worker threads) and the fault points tests use; every resource a
flow takes is given back in a ``finally``, so a flow that fails, times out or
is cancelled at any await leaves every count exactly where it was.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import trio

from ..errors import ErrorCode, TrioKVError
from ..keys import RequestKey, effective_end, object_keys, validate_salt
from ..protocol import (
    Clear,
    Cleared,
    EndSession,
    Limits,
    Lookup,
    LookupResult,
    Registered,
    RegisterKVCache,
    Released,
    ReleaseLookup,
    Retrieve,
    RetrieveResult,
    SessionEnded,
    StatusResult,
    Store,
    StoreResult,
    Unregistered,
    UnregisterKVCache,
)
from ..transfer import CopyJob, CpuTransfer, MappedKVCache
from . import lookup as lookup_flow
from .audit import audit_l1
from .checks import check_blocks, check_id, check_key, check_registration
from .inflight import InflightChunks
from .l1 import Entry, L1Store, Refusal
from .leases import LeaseTable
from .owners import OwnerWatch
from .peers import Peer, require_admin
from .registry import InstanceRegistry
from .sessions import HashSessions
from .status import engine_status
from .tiering import Tiering

FaultHook = Callable[[str], Awaitable[None]]
log = logging.getLogger(__name__)

UNMAP_WAIT_S = 10.0  # how long an Unregister waits for the server to unmap the engine's memory


class EngineSettings(msgspec.Struct, frozen=True):
    chunk_size: int = 256
    lease_ttl_s: float = 60.0
    session_ttl_s: float = 600.0
    max_sessions: int = 65536
    max_session_bytes: int = 256 * 1024**2
    inflight_wait_s: float = 2.0  # how long a lookup waits for a chunk being stored (0: never)
    inflight_max_waiters: int = 32  # lookups waiting at once; more miss (each holds a server worker)
    limits: Limits = Limits(
        max_message_bytes=16 * 1024 * 1024,
        max_tokens_per_key=1 << 20,
        max_block_ids=1 << 20,
        max_world_size=1024,
    )


class CacheEngine:
    def __init__(
        self,
        settings: EngineSettings,
        l1: L1Store,
        transfer: CpuTransfer,
        *,
        tiering: Tiering | None = None,
        faults: FaultHook | None = None,
    ) -> None:
        self.settings = settings
        self.chunk_size = settings.chunk_size
        self.l1 = l1
        self.transfer = transfer
        self.tiering = tiering
        self.faults = faults
        self.sessions = HashSessions(
            settings.chunk_size,
            settings.session_ttl_s,
            settings.max_sessions,
            trio.current_time,
            max_bytes=settings.max_session_bytes,
        )
        self.leases = LeaseTable(l1)
        self.inflight = InflightChunks(settings.inflight_wait_s, max_waiters=settings.inflight_max_waiters)
        self.registry = InstanceRegistry()
        self.started_at = time.monotonic()
        self.requests_in_flight = 0
        self.layout_mismatches = 0  # retrieves stopped at a chunk another KV layout stored
        self._housekeeping_wakeup = trio.Event()
        self._scheduled_expiry = math.inf
        self.housekeeping_passes = 0  # times the lease-expiry sleeper woke (tests)

    # ------------------------------------------------------------ registry

    @property
    def instances(self) -> dict[str, MappedKVCache]:
        return self.registry.instances

    @property
    def owners(self) -> OwnerWatch:
        return self.registry.owners

    def register(self, request: RegisterKVCache, peer: Peer | None = None) -> Registered:
        """Map an engine's KV cache for ``peer``, on the calling thread (``registry.register``)."""
        check_registration(request, self.settings.limits, self.chunk_size)
        return self.registry.register(self.transfer, request, peer)

    async def aregister(self, request: RegisterKVCache, peer: Peer | None = None) -> Registered:
        """``register``, the mapping opened off the event loop (``registry.aregister``)."""
        check_registration(request, self.settings.limits, self.chunk_size)
        return await self.registry.aregister(self.transfer, request, peer)

    async def unregister(self, request: UnregisterKVCache, peer: Peer | None = None) -> Unregistered:
        """Unregister an instance, answered once the server maps none of its memory: by CUDA's
        rules the engine must not free memory another process has open (a CUDA cache's copies
        end or stop first, then its IPC mappings close; bounded by ``UNMAP_WAIT_S``). Copies in
        flight keep their own reference to the mapping, so this is safe at any time."""
        cache = self.registry.instances.get(request.instance_id)
        existed = self.registry.remove(request.instance_id, peer)
        if cache is not None and not await self.transfer.wait_unmapped(cache, UNMAP_WAIT_S):
            log.warning("KV cache %r: still mapped %g s after Unregister", request.instance_id, UNMAP_WAIT_S)
        return Unregistered(existed=existed)

    def drop_peer(self, peer: Peer) -> int:
        """Unregister what ``peer``'s connection registered and drop what it claimed: it went away."""
        self.inflight.drop_peer(peer)
        return self.registry.drop_peer(peer)

    async def aclose(self) -> None:
        """At shutdown: unregister everything; wait (bounded) until the backend released it."""
        await self.registry.aclose(self.transfer)

    def _instance(self, instance_id: str) -> MappedKVCache:
        return self.registry.get(instance_id)

    async def _copy(
        self,
        copy: Callable[..., Awaitable[None]],
        cache: MappedKVCache,
        jobs: Sequence[CopyJob],
        ipc_event: bytes,
    ) -> None:
        try:
            await copy(cache, jobs, ipc_event=ipc_event)
        except TrioKVError:
            raise
        except Exception as exc:
            raise TrioKVError(ErrorCode.TRANSFER_FAILED, f"copy failed: {type(exc).__name__}: {exc}") from exc

    async def fault_point(self, name: str) -> None:
        if self.faults is not None:
            await self.faults(name)

    # ------------------------------------------------------------ flows

    async def store(self, request: Store) -> StoreResult:
        """Copy the full chunks of ``request.key`` that L1 lacks from the engine's blocks."""
        key = request.key
        check_key(key, self.settings.limits, self.chunk_size, needs_rank=True)
        cache = self._instance(request.instance_id)
        check_blocks(request.block_ids, cache.layout.num_blocks, self.settings.limits)
        blocks_per_chunk = self.chunk_size // cache.layout.block_size
        n_chunks = min(effective_end(key), len(request.block_ids) * cache.layout.block_size)
        n_chunks //= self.chunk_size
        first = -(-key.start // self.chunk_size)
        hashes = self.sessions.hashes(key, n_chunks * self.chunk_size)
        assert key.rank is not None
        chunk_bytes = cache.layout.chunk_bytes(blocks_per_chunk)

        keys = object_keys(key, hashes, key.rank)
        reserved: list[tuple[int, Entry]] = []
        present = no_room = over_quota = 0
        committed = False
        owner, refused = (key.cache_salt, key.request_id), keys[n_chunks:]
        try:
            for index, okey in enumerate(keys[first:], start=first):
                existing = self.l1.get(okey)
                if existing is not None:
                    present += 1
                    self.l1.touch(existing)
                    continue
                entry = self.l1.reserve(okey, chunk_bytes)
                if isinstance(entry, Refusal):
                    # Later chunks are useless without this one: a lookup counts leading hits only.
                    if entry is Refusal.QUOTA:
                        over_quota = n_chunks - index
                    else:
                        no_room = n_chunks - index
                    refused = keys[index:]
                    break
                entry.layout = cache.layout.fingerprint
                reserved.append((index, entry))
            self.inflight.writing([entry.key for _, entry in reserved], owner)
            await self.fault_point("store.before_copy")
            if reserved:
                jobs = [
                    CopyJob(
                        request.block_ids[i * blocks_per_chunk : (i + 1) * blocks_per_chunk],
                        self.l1.view(entry),
                    )
                    for i, entry in reserved
                ]
                await self._copy(self.transfer.store, cache, jobs, request.ipc_event)
            await self.fault_point("store.after_copy")
            for _, entry in reserved:
                self.l1.commit(entry)
            committed = True
            if self.tiering is not None:
                # Each chunk names the one before it: a tier gets it only once it holds that one.
                self.tiering.write_behind(
                    [entry for _, entry in reserved], [keys[i - 1] if i else None for i, _ in reserved]
                )
        finally:
            if not committed:
                for _, entry in reserved:
                    self.l1.abort(entry)
            # Lookups waiting for these chunks look again: stored, or a miss.
            self.inflight.settle([*(entry.key for _, entry in reserved), *refused], owner)
        return StoreResult(
            stored=len(reserved), skipped_present=present, skipped_no_room=no_room, skipped_quota=over_quota
        )

    async def lookup(self, request: Lookup, peer: Peer | None = None) -> LookupResult:
        """Count the leading chunks held for every rank (or the key's rank), waiting for those in flight,
        loading what L2 holds past the L1 hits; lease them; ``claim`` what misses (``core.lookup``)."""
        return await lookup_flow.lookup(self, request, peer)

    def lookup_now(self, request: Lookup, peer: Peer | None = None) -> LookupResult | None:
        """``lookup`` answered without waiting, or None where it would wait and nothing was done."""
        return lookup_flow.lookup_now(self, request, peer)

    def lease_hits(self, key: RequestKey, hits: list[tuple[int, Entry]]) -> None:
        if not key.request_id:
            return
        deadline = trio.current_time() + self.settings.lease_ttl_s
        held = self.leases.grant((key.cache_salt, key.request_id), hits, deadline)
        # A miss leases nothing and queues no deadline: waking the sleeper for it would cost the
        # loop two task switches per cold lookup and find nothing to expire.
        if held and deadline < self._scheduled_expiry:
            self._housekeeping_wakeup.set()

    async def retrieve(self, request: Retrieve) -> RetrieveResult:
        """Copy the leading cached chunks into the engine's blocks, then end this rank's leases."""
        key = request.key
        check_key(key, self.settings.limits, self.chunk_size, needs_rank=True)
        if request.skip_first_n_tokens < 0:
            raise TrioKVError(
                ErrorCode.INVALID_ARGUMENT,
                f"skip_first_n_tokens must be >= 0, got {request.skip_first_n_tokens}",
            )
        cache = self._instance(request.instance_id)
        check_blocks(request.block_ids, cache.layout.num_blocks, self.settings.limits)
        block_size = cache.layout.block_size
        skip = max(key.start, request.skip_first_n_tokens)
        if skip % block_size:
            raise TrioKVError(
                ErrorCode.INVALID_ARGUMENT,
                f"tokens to skip ({skip}) must be a multiple of the block size {block_size}",
            )
        skip_blocks = skip // block_size
        blocks_per_chunk = self.chunk_size // block_size
        n_chunks = min(effective_end(key), len(request.block_ids) * block_size) // self.chunk_size
        hashes = self.sessions.hashes(key, n_chunks * self.chunk_size)
        assert key.rank is not None
        keys = object_keys(key, hashes, key.rank)
        chunk_bytes = cache.layout.chunk_bytes(blocks_per_chunk)

        jobs: list[CopyJob] = []
        readers: list[Entry] = []
        hit_chunks = 0
        try:
            for index, okey in enumerate(keys):
                first_block = index * blocks_per_chunk
                if skip_blocks >= first_block + blocks_per_chunk:
                    hit_chunks += 1  # the engine holds this chunk already
                    continue
                entry = self.l1.get_ready(okey)
                if entry is None or entry.nbytes != chunk_bytes:
                    break
                if entry.layout and entry.layout != cache.layout.fingerprint:
                    self.layout_mismatches += 1  # same size, other bytes: a miss, never a wrong hit
                    break
                self.l1.pin_reader(entry)
                readers.append(entry)
                jobs.append(
                    CopyJob(
                        request.block_ids[first_block : first_block + blocks_per_chunk],
                        self.l1.view(entry),
                        first_block=max(0, skip_blocks - first_block),
                    )
                )
                hit_chunks += 1
            await self.fault_point("retrieve.before_copy")
            if jobs:
                await self._copy(self.transfer.retrieve, cache, jobs, request.ipc_event)
            await self.fault_point("retrieve.after_copy")
        finally:
            for entry in readers:
                self.l1.unpin_reader(entry)
        if key.request_id:
            self.leases.release_keys((key.cache_salt, key.request_id), keys)
        return RetrieveResult(hit_tokens=hit_chunks * self.chunk_size, chunks_written=len(jobs))

    def release(self, request: ReleaseLookup) -> Released:
        check_id("request_id", request.request_id, self.settings.limits)
        end_chunk = None if request.end is None else request.end // self.chunk_size
        start_chunk = -(-request.start // self.chunk_size)
        released = self.leases.release_chunks(
            (request.cache_salt, request.request_id), start_chunk, end_chunk
        )
        return Released(leases_released=released)

    def end_session(self, request: EndSession) -> SessionEnded:
        check_id("request_id", request.request_id, self.settings.limits)
        had = self.sessions.end(request.cache_salt, request.request_id)
        released = self.leases.release_all((request.cache_salt, request.request_id))
        return SessionEnded(leases_released=released, had_session=had)

    async def clear(self, request: Clear, peer: Peer | None = None) -> Cleared:
        """Drop ``request.cache_salt``'s chunks, or every salt's (an admin action)."""
        if request.cache_salt is None:
            require_admin(peer, "Clear of every salt")
            self.leases.clear()
            self.sessions.clear()
        else:
            validate_salt(request.cache_salt)  # BAD_SALT, like every other request naming one
            self.leases.release_salt(request.cache_salt)
        removed, freed = self.l1.clear(request.cache_salt)
        deleted = 0
        if request.include_l2 and self.tiering is not None:
            for l2 in self.tiering.l2_tiers:
                salt = request.cache_salt
                keys = list(l2.ledger.least_recent()) if salt is None else l2.ledger.keys_of_salt(salt)
                deleted += await l2.delete(keys)
        return Cleared(entries_removed=removed, bytes_freed=freed, l2_objects_deleted=deleted)

    def status(self) -> StatusResult:
        """The server's state (``core.status``): what Status, admin and metrics all read."""
        return engine_status(self)

    # ------------------------------------------------------------ background

    async def run_housekeeping(self) -> None:
        """Expire leases at their deadlines. Sleeps until the next one; no polling."""
        while True:
            next_deadline = self.leases.next_deadline()
            self._scheduled_expiry = math.inf if next_deadline is None else next_deadline
            with trio.move_on_at(self._scheduled_expiry):
                await self._housekeeping_wakeup.wait()
            self._housekeeping_wakeup = trio.Event()
            self.housekeeping_passes += 1
            self.leases.expire(trio.current_time())

    # ------------------------------------------------------------ audit

    def audit(self) -> list[str]:
        """Recount everything from the entries themselves; return each mismatch found."""
        return audit_l1(self.l1, self.leases)
