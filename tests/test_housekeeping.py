"""Background work: leases expire at their deadline (the backstop for vanished clients)."""

import trio
import trio.testing

from trio_kv.core.engine import CacheEngine, EngineSettings
from trio_kv.core.l1 import L1Store
from trio_kv.export.shm import SharedKVCache
from trio_kv.keys import RequestKey
from trio_kv.protocol import Lookup, Store
from trio_kv.testing import make_kv_cache
from trio_kv.transfer import CpuTransfer

CHUNK = 32
TOKENS = list(range(2 * CHUNK))


async def _engine_holding_tokens(kv: SharedKVCache) -> CacheEngine:
    """An engine with a 30 s lease TTL that has stored TOKENS (2 chunks) from ``kv``."""
    engine = CacheEngine(EngineSettings(chunk_size=CHUNK, lease_ttl_s=30), L1Store(1 << 22), CpuTransfer())
    engine.register(kv.register_request("w"))
    await engine.store(Store("w", RequestKey("m", 1, 0, TOKENS), [0, 1, 2, 3]))
    return engine


async def _lookup_settled(engine: CacheEngine, tokens: list[int], request_id: str) -> int:
    """Hit tokens of a lookup, once every task it may have woken has run and slept again."""
    found = await engine.lookup(Lookup(RequestKey("m", 1, None, tokens, request_id=request_id)))
    await trio.testing.wait_all_tasks_blocked()
    return found.hit_tokens


async def test_leases_expire_at_their_deadline_and_not_before(autojump_clock):
    with make_kv_cache(num_blocks=16, block_size=16) as kv:
        engine = await _engine_holding_tokens(kv)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.run_housekeeping)
            await engine.lookup(Lookup(RequestKey("m", 1, None, TOKENS, request_id="gone")))
            assert len(engine.leases) == 2
            await trio.sleep(29.9)
            assert len(engine.leases) == 2
            await trio.sleep(0.2)
            assert len(engine.leases) == 0
            assert engine.leases.expired == 2
            # Expired chunks are ordinary cached chunks again: evictable, still hit.
            assert all(not e.pinned for e in engine.l1.entries())
            found = await engine.lookup(Lookup(RequestKey("m", 1, None, TOKENS)))
            assert found.hit_tokens == 2 * CHUNK
            nursery.cancel_scope.cancel()
        assert engine.audit() == []


async def test_a_lookup_that_leases_nothing_does_not_wake_the_expiry_sleeper():
    with make_kv_cache(num_blocks=16, block_size=16) as kv:
        engine = await _engine_holding_tokens(kv)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.run_housekeeping)
            await trio.testing.wait_all_tasks_blocked()
            asleep = engine.housekeeping_passes
            cold = [v + 1000 for v in TOKENS]
            for n in range(5):  # misses: nothing leased, no deadline queued
                assert await _lookup_settled(engine, cold, f"cold-{n}") == 0
            assert engine.housekeeping_passes == asleep
            # A hit queues the first deadline: the sleeper wakes once to sleep until it.
            assert await _lookup_settled(engine, TOKENS, "warm") == 2 * CHUNK
            assert engine.housekeeping_passes == asleep + 1
            # The same request again only moves its deadline later: no wake-up.
            assert await _lookup_settled(engine, TOKENS, "warm") == 2 * CHUNK
            assert engine.housekeeping_passes == asleep + 1
            nursery.cancel_scope.cancel()
        assert engine.audit() == []
