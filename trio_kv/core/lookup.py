"""The lookup flow: count the leading chunks cached for a key, lease them, claim what misses.

``lookup`` may wait (for chunks in flight, for L2 loads); ``lookup_now`` answers only where
nothing needs a wait, on the caller's task, and otherwise does nothing (the server's
listener then hands the request to ``lookup`` on a worker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..keys import ObjectKey, RequestKey, effective_end
from ..protocol import Lookup, LookupResult
from .checks import check_key
from .inflight import flat
from .peers import Peer

if TYPE_CHECKING:
    from .engine import CacheEngine


async def lookup(engine: CacheEngine, request: Lookup, peer: Peer | None = None) -> LookupResult:
    """Count the leading chunks held for every rank (or the key's rank), waiting for those in flight,
    loading what L2 holds past the L1 hits; lease them; ``claim`` what misses (``inflight``). Waits only where
    ``lookup_now`` would answer None."""
    key, ranks, chunk_keys = chunk_keys_of(engine, request)
    await engine.fault_point("lookup.before_scan")
    owner = (key.cache_salt, key.request_id)
    ready = await engine.inflight.walk(engine.l1, chunk_keys, owner)
    hits = [(index, entry) for index, entries in enumerate(ready) for entry in entries]
    l1_chunks = len(ready)
    l2_chunks = 0
    if request.claim and key.request_id:  # before the L2 loads: lookups meanwhile wait for them
        engine.inflight.claim(flat(chunk_keys[l1_chunks:]), owner, peer)
    if engine.tiering is not None and l1_chunks < len(chunk_keys):
        # Pin the L1 hits first: the loads' reservations must not evict them.
        for _, entry in hits:
            engine.l1.pin_reader(entry)
        prefetched = None
        try:
            await engine.fault_point("lookup.before_prefetch")
            before = chunk_keys[l1_chunks - 1] if l1_chunks else None
            prefetched = await engine.tiering.prefetch(chunk_keys[l1_chunks:], before)
            for offset, chunk_entries in enumerate(prefetched.chunks):
                hits.extend((l1_chunks + offset, entry) for entry in chunk_entries)
            l2_chunks = len(prefetched.chunks)
            engine.lease_hits(key, hits)
        finally:
            for _, entry in hits[: l1_chunks * len(ranks)]:
                engine.l1.unpin_reader(entry)
            if prefetched is not None:
                prefetched.release()
            engine.inflight.settle(flat(chunk_keys[l1_chunks : l1_chunks + l2_chunks]), owner)
    else:
        engine.lease_hits(key, hits)
    return LookupResult(
        hit_tokens=(l1_chunks + l2_chunks) * engine.chunk_size, l1_chunks=l1_chunks, l2_chunks=l2_chunks
    )


def lookup_now(engine: CacheEngine, request: Lookup, peer: Peer | None = None) -> LookupResult | None:
    """``lookup`` answered without waiting, or None where it would wait (a chunk in flight,
    L2 to ask, fault injection) and nothing was done: then ``lookup`` answers it. Raises
    what ``lookup`` raises for a bad key."""
    if engine.faults is not None:
        return None
    key, _, chunk_keys = chunk_keys_of(engine, request)
    owner = (key.cache_salt, key.request_id)
    # With L2 tiers, a partial hit goes to lookup: L2 may hold the rest.
    ready = engine.inflight.walk_now(engine.l1, chunk_keys, owner, whole=engine.tiering is not None)
    if ready is None:
        return None
    l1_chunks = len(ready)
    if request.claim and key.request_id:
        engine.inflight.claim(flat(chunk_keys[l1_chunks:]), owner, peer)
    engine.lease_hits(key, [(index, entry) for index, entries in enumerate(ready) for entry in entries])
    return LookupResult(hit_tokens=l1_chunks * engine.chunk_size, l1_chunks=l1_chunks, l2_chunks=0)


def chunk_keys_of(
    engine: CacheEngine, request: Lookup
) -> tuple[RequestKey, range | tuple[int], list[list[ObjectKey]]]:
    """The request's key (checked), the ranks it asks for, and each chunk's keys, one per rank."""
    key = request.key
    check_key(key, engine.settings.limits, engine.chunk_size, needs_rank=False)
    n_chunks = effective_end(key) // engine.chunk_size
    hashes = engine.sessions.hashes(key, n_chunks * engine.chunk_size)
    ranks = range(key.world_size) if key.rank is None else (key.rank,)
    model, world, salt = key.model, key.world_size, key.cache_salt
    if len(ranks) == 1:  # one comprehension, not one per chunk: 1.5 instead of 4 us for 16 chunks
        rank = ranks[0]
        return key, ranks, [[ObjectKey(model, world, rank, h, salt)] for h in hashes]
    by_rank = [[ObjectKey(model, world, r, h, salt) for h in hashes] for r in ranks]
    return key, ranks, [list(keys) for keys in zip(*by_rank)]
