"""L1 <-> L2: write-behind, prefetch on lookup, adapters combining, failures and deadlines.

The engine runs directly (no sockets) over real shared memory, with in-memory
mock adapters whose latency, stalls and failures the tests control.
"""

from __future__ import annotations

from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing

from trio_kv.adapters import MockAdapter
from trio_kv.core.engine import CacheEngine, EngineSettings
from trio_kv.core.l1 import L1Store
from trio_kv.core.l2_tier import L2Tier
from trio_kv.core.tiering import Tiering, TieringSettings
from trio_kv.keys import ObjectKey, RequestKey, chunk_hashes
from trio_kv.protocol import Clear, Lookup, Retrieve, Store
from trio_kv.testing import FaultInjector, InjectedFault, make_kv_cache
from trio_kv.transfer import CpuTransfer

CHUNK = 32
BLOCK = 16
TOKENS = list(range(1000, 1000 + 4 * CHUNK))


@pytest.fixture
def kv():
    with make_kv_cache(num_blocks=64, block_size=BLOCK, num_layers=2) as cache:
        yield cache


def chunk_bytes(kv) -> int:
    return (CHUNK // BLOCK) * len(kv.block_bytes(0))


class Rig:
    def __init__(self, engine: CacheEngine, l2_tiers: list[L2Tier[MockAdapter]], kv) -> None:
        self.engine = engine
        self.l2_tiers = l2_tiers
        self.adapters = [t.adapter for t in l2_tiers]  # to inject faults and look at objects
        self.kv = kv
        self.l1 = engine.l1
        self.tiering = engine.tiering

    def object_keys(self, n_chunks: int, tokens=TOKENS) -> list[ObjectKey]:
        return [ObjectKey("m", 1, 0, h, "") for h in chunk_hashes(tokens, CHUNK)[:n_chunks]]

    async def store(self, tokens=TOKENS, blocks=None):
        blocks = blocks if blocks is not None else list(range(len(tokens) // BLOCK))
        return await self.engine.store(Store("w", RequestKey("m", 1, 0, tokens), blocks))

    async def lookup(self, tokens=TOKENS, request_id="r"):
        return await self.engine.lookup(Lookup(RequestKey("m", 1, None, tokens, request_id=request_id)))

    def clear_l1(self) -> None:
        self.l1.clear()

    def assert_clean(self, *, leases_allowed=True) -> None:
        assert self.engine.audit() == []
        if not leases_allowed:
            assert len(self.engine.leases) == 0
        assert all(t.pinned() == 0 for t in self.l2_tiers)


@asynccontextmanager
async def rig(kv, n_adapters=1, *, l1_bytes=8 << 20, adapter_kwargs=None, faults=None, **settings):
    l2_tiers = [L2Tier(MockAdapter(f"mock{i}", **(adapter_kwargs or {}))) for i in range(n_adapters)]
    l1 = L1Store(l1_bytes)
    tiering = Tiering(l1, l2_tiers, TieringSettings(**settings))
    engine = CacheEngine(EngineSettings(chunk_size=CHUNK), l1, CpuTransfer(), tiering=tiering, faults=faults)
    engine.register(kv.register_request("w"))
    async with trio.open_nursery() as nursery:
        for l2 in l2_tiers:
            await nursery.start(l2.run)
        await nursery.start(tiering.run)
        yield Rig(engine, l2_tiers, kv)
        nursery.cancel_scope.cancel()


async def test_stored_chunks_are_written_behind_to_every_adapter(kv):
    async with rig(kv, 2) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        for l2 in r.l2_tiers:
            assert set(l2.adapter.objects) == set(r.object_keys(4))
            assert l2.ledger.total == 4 * chunk_bytes(kv)
            for key in r.object_keys(4):
                assert l2.adapter.objects[key] == bytes(r.l1.buffer(r.l1.get_ready(key)))
        r.assert_clean()


async def test_lookup_loads_from_l2_what_l1_lost_and_retrieve_gets_the_right_bytes(kv):
    async with rig(kv) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        r.clear_l1()
        found = await r.lookup()
        assert (found.hit_tokens, found.l1_chunks, found.l2_chunks) == (4 * CHUNK, 0, 4)
        assert len(r.engine.leases) == 4
        got = await r.engine.retrieve(
            Retrieve("w", RequestKey("m", 1, 0, TOKENS, request_id="r"), list(range(20, 28)))
        )
        assert got.chunks_written == 4
        for src, dst in zip(range(8), range(20, 28)):
            assert kv.block_bytes(src) == kv.block_bytes(dst)
        r.assert_clean(leases_allowed=False)


async def test_l1_hits_then_l2_hits_continue_the_prefix(kv):
    async with rig(kv) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        # Evict chunks 2 and 3 from L1 only.
        for key in r.object_keys(4)[2:]:
            r.l1._free(r.l1.get(key))
        found = await r.lookup()
        assert (found.l1_chunks, found.l2_chunks) == (2, 2)
        r.assert_clean()


async def test_adapters_combine_and_the_first_in_order_serves(kv):
    async with rig(kv, 2) as r:
        first, second = r.adapters
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        keys = r.object_keys(4)
        for key in keys[2:]:
            del first.objects[key]  # first holds chunks 0-1, second holds 0-3
        r.l2_tiers[0].ledger.remove(keys[2:])
        r.clear_l1()
        first.calls.clear()
        second.calls.clear()
        found = await r.lookup()
        assert found.l2_chunks == 4
        assert first.calls.count("get") == 2  # chunks 0-1 come from the first adapter
        assert second.calls.count("get") == 2  # chunks 2-3 from the second
        await trio.testing.wait_all_tasks_blocked()
        # Chunks loaded from the second are written behind to the first, never back to their source.
        assert set(first.objects) == set(keys)
        assert second.calls.count("put") == 0
        r.assert_clean()


async def test_only_the_contiguous_prefix_is_loaded(kv):
    async with rig(kv) as r:
        adapter = r.adapters[0]
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        keys = r.object_keys(4)
        del adapter.objects[keys[1]]
        r.clear_l1()
        adapter.calls.clear()
        found = await r.lookup()
        assert found.l2_chunks == 1
        assert adapter.calls.count("get") == 1
        assert keys[2] not in r.l1
        r.assert_clean()


async def test_a_full_queue_drops_and_counts_without_delaying_the_store(kv):
    async with rig(kv, queue_size=1, writers_per_adapter=1) as r:
        adapter = r.adapters[0]
        adapter.stall()
        result = await r.store()  # returns although the adapter is stuck
        assert result.stored == 4
        counters = r.tiering.counters(r.l2_tiers[0])
        await trio.testing.wait_all_tasks_blocked()
        # One chunk in the writer's hands, one in the queue, two dropped.
        assert (counters.queued, counters.dropped) == (2, 2)
        # The chunks written and queued are pinned: L1 cannot evict them before their turn.
        assert sum(1 for e in r.l1.entries() if e.readers) == 2
        adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()
        assert counters.written == 2
        r.assert_clean()


async def test_write_failures_are_counted_and_harmless(kv):
    async with rig(kv, adapter_kwargs={"fail_rate": 1.0}) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        counters = r.tiering.counters(r.l2_tiers[0])
        # The first chunk's put failed; the rest would be unreachable without it.
        assert (counters.write_failures, counters.skipped_orphan, counters.lost) == (1, 3, 4)
        assert r.l2_tiers[0].ledger.total == 0
        assert (await r.lookup()).hit_tokens == 4 * CHUNK  # L1 still serves
        r.assert_clean()


async def test_chunks_evicted_before_their_turn_are_skipped(kv):
    async with rig(kv, writers_per_adapter=1) as r:
        adapter = r.adapters[0]
        adapter.stall()
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        r.clear_l1()  # three queued chunks lose their L1 copy; one is pinned by its writer
        adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()
        counters = r.tiering.counters(r.l2_tiers[0])
        assert counters.skipped_evicted == 3
        assert counters.written == 1
        r.assert_clean()


async def test_a_chunk_evicted_while_its_writer_waits_for_a_slot_is_not_written(kv):
    # Regression: the writer checked the chunk was live, then waited for a put slot; if the
    # chunk was evicted meanwhile and its bytes reused, another chunk's bytes went out under its key.
    async with rig(kv, writers_per_adapter=2, max_inflight_writes=1) as r:
        adapter = r.adapters[0]
        adapter.stall("put")
        first, second, third = (list(range(n * 1000, n * 1000 + CHUNK)) for n in (1, 2, 3))
        await r.store(first, [0, 1])  # writer 1 takes the only slot and hangs in put
        await r.store(second, [2, 3])  # writer 2 waits for the slot
        await trio.testing.wait_all_tasks_blocked()
        second_key = r.object_keys(1, second)[0]
        r.clear_l1()  # the second chunk is freed at once (the first stays pinned by its put)
        await r.store(third, [4, 5])  # may reuse the second chunk's bytes
        adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()
        counters = r.tiering.counters(r.l2_tiers[0])
        assert second_key not in adapter.objects
        assert counters.skipped_evicted >= 1
        assert r.object_keys(1, third)[0] in adapter.objects
        r.assert_clean()


async def test_a_stalled_adapter_cannot_hold_a_lookup_past_its_deadline(kv, autojump_clock):
    async with rig(kv, lookup_timeout_s=0.5) as r:
        await r.store(TOKENS[: 2 * CHUNK])
        await trio.testing.wait_all_tasks_blocked()
        r.adapters[0].stall()
        start = trio.current_time()
        found = await r.lookup()  # chunks 2-3 are nowhere; the adapter never answers
        assert trio.current_time() - start == pytest.approx(0.5)
        assert (found.l1_chunks, found.l2_chunks) == (2, 0)
        r.adapters[0].unstall()
        r.assert_clean()


async def test_a_failed_load_is_a_miss_and_frees_its_reservation(kv):
    async with rig(kv) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        r.clear_l1()
        r.adapters[0].fail_rate = 1.0
        r.adapters[0].fail_ops = ("get",)
        found = await r.lookup()
        assert found.hit_tokens == 0
        assert len(r.l1) == 0
        assert r.tiering.counters(r.l2_tiers[0]).load_failures == 4
        r.assert_clean()


async def test_a_lookup_cancelled_while_loading_hands_its_loads_over_and_leaks_nothing(kv):
    async with rig(kv) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        r.clear_l1()
        r.adapters[0].stall("get")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.lookup)
            await trio.testing.wait_all_tasks_blocked()
            assert len(r.l1) == 4  # reservations taken, loads stuck
            nursery.cancel_scope.cancel()
        # The loads outlive the cancelled lookup and still own their reservations: the
        # lookup did not free them under the loads' feet.
        assert len(r.l1) == 4
        assert all(e.state.value == "writing" for e in r.l1.entries())
        r.adapters[0].unstall()
        await trio.testing.wait_all_tasks_blocked()
        # They arrived late: kept as ordinary cached chunks, leased to nobody.
        assert [r.l1.get_ready(k) is not None for k in r.object_keys(4)] == [True] * 4
        assert all(not e.pinned for e in r.l1.entries())
        assert r.tiering.counters(r.l2_tiers[0]).load_timeouts == 4
        r.assert_clean(leases_allowed=False)
        again = await r.lookup()
        assert (again.l1_chunks, again.l2_chunks) == (4, 0)


async def test_a_hung_load_is_abandoned_at_the_deadline_and_kept_when_it_lands(kv, autojump_clock):
    async with rig(kv, load_timeout_s=2.0) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        r.clear_l1()
        r.adapters[0].stall("get")
        start = trio.current_time()
        found = await r.lookup()
        assert trio.current_time() - start == pytest.approx(2.0)
        assert found.hit_tokens == 0
        r.adapters[0].unstall()
        await trio.testing.wait_all_tasks_blocked()
        again = await r.lookup()
        assert (again.l1_chunks, again.l2_chunks) == (4, 0)
        r.assert_clean()


async def test_a_hung_put_is_abandoned_at_the_deadline_and_unpins_when_it_returns(kv, autojump_clock):
    async with rig(kv, write_timeout_s=5.0, writers_per_adapter=1, max_inflight_writes=2) as r:
        adapter = r.adapters[0]
        adapter.stall("put")
        for n in range(4):  # four one-chunk prefixes: none waits for another
            await r.store(list(range(n * 1000, n * 1000 + CHUNK)), [2 * n, 2 * n + 1])
        await trio.sleep(11)  # two puts time out in turn; their slots stay taken
        counters = r.tiering.counters(r.l2_tiers[0])
        assert counters.write_timeouts == 2
        assert adapter.calls.count("put") == 2  # the writer waits for a slot, sending no more
        assert sum(1 for e in r.l1.entries() if e.readers) == 4  # queued chunks stay pinned
        adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()
        assert counters.written == 4
        r.assert_clean()


@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_a_lookup_failing_before_prefetch_leaves_no_trace(kv, mode):
    injector = FaultInjector("lookup.before_prefetch", mode)
    async with rig(kv, faults=injector) as r:
        await r.store(TOKENS[: 2 * CHUNK])
        await trio.testing.wait_all_tasks_blocked()  # write-behind done: its pins are gone
        async with trio.open_nursery() as nursery:

            async def lookup() -> None:
                with suppress(InjectedFault):
                    await r.lookup()

            nursery.start_soon(lookup)
            await injector.reached.wait()
            nursery.cancel_scope.cancel()
        assert all(not e.pinned for e in r.l1.entries())
        r.assert_clean(leases_allowed=False)


async def test_rank_keys_of_one_chunk_may_come_from_l1_and_l2(kv):
    async with rig(kv) as r:
        tokens = TOKENS[:CHUNK]
        for rank, blocks in ((0, [0, 1]), (1, [2, 3])):
            await r.engine.store(Store("w", RequestKey("m", 2, rank, tokens), blocks))
        await trio.testing.wait_all_tasks_blocked()
        rank1 = ObjectKey("m", 2, 1, chunk_hashes(tokens, CHUNK)[0], "")
        r.l1._free(r.l1.get(rank1))
        found = await r.engine.lookup(Lookup(RequestKey("m", 2, None, tokens, request_id="r")))
        assert (found.l1_chunks, found.l2_chunks) == (0, 1)
        assert len(r.engine.leases) == 2
        r.assert_clean()


async def test_clear_with_l2_deletes_the_salts_objects_everywhere(kv):
    async with rig(kv) as r:
        await r.engine.store(Store("w", RequestKey("m", 1, 0, TOKENS, cache_salt="a"), list(range(8))))
        await r.engine.store(Store("w", RequestKey("m", 1, 0, TOKENS, cache_salt="b"), list(range(8))))
        await trio.testing.wait_all_tasks_blocked()
        cleared = await r.engine.clear(Clear("a", include_l2=True))
        assert cleared.l2_objects_deleted == 4
        assert {k.cache_salt for k in r.adapters[0].objects} == {"b"}
        assert r.l2_tiers[0].usage().bytes_by_salt == {"b": 4 * chunk_bytes(kv)}
        r.assert_clean()


async def test_status_reports_each_tier(kv):
    async with rig(kv, 2) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        tiers = r.engine.status().l2
        assert [t.name for t in tiers] == ["mock0", "mock1"]
        assert all(
            t.written == 4 and t.healthy and t.usage.total_bytes_used == 4 * chunk_bytes(kv) for t in tiers
        )


async def test_a_lookup_during_a_claimers_l2_load_waits_for_it_instead_of_claiming_too(kv):
    # A's lookup claims what L1 lacks before it loads from L2 (which awaits): B, meanwhile,
    # waits for A's loads and hits in L1, and is no second claimer that computes the prefix.
    async with rig(kv) as r:
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        r.clear_l1()
        r.adapters[0].stall("get")
        claim = Lookup(RequestKey("m", 1, None, TOKENS, request_id="a"), claim=True)
        found = {}

        async def lookup(name, request):
            found[name] = await r.engine.lookup(request)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup, "a", claim)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(
                lookup, "b", Lookup(RequestKey("m", 1, None, TOKENS, request_id="b"), claim=True)
            )
            await trio.testing.wait_all_tasks_blocked()
            assert found == {}
            r.adapters[0].unstall()
        assert (found["a"].l1_chunks, found["a"].l2_chunks) == (0, 4)
        assert (found["b"].l1_chunks, found["b"].l2_chunks) == (4, 0)
        assert len(r.engine.inflight) == 0  # the loaded chunks settled; nothing left to claim
        r.assert_clean()
