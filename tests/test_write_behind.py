"""Write-behind keeps what it queues: queued chunks stay in L1 until written, a tier gets only
whole prefixes, and every chunk handed over is either written or counted in ``lost``."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_kv.adapters import AdapterError, MockAdapter
from trio_kv.adapters.s3 import S3Adapter
from trio_kv.core.engine import CacheEngine, EngineSettings
from trio_kv.core.l1 import L1Store
from trio_kv.core.l2_tier import L2Tier
from trio_kv.core.tiering import TierCounters, Tiering, TieringSettings
from trio_kv.keys import ObjectKey, RequestKey
from trio_kv.protocol import Store
from trio_kv.testing import make_kv_cache
from trio_kv.transfer import CpuTransfer

from .s3_server import S3TestServer, running_s3_server, use_fake_credentials
from .test_tiering import CHUNK, TOKENS, chunk_bytes, rig

OTHER = list(range(5000, 5000 + 4 * CHUNK))


@pytest.fixture
def kv():
    with make_kv_cache(num_blocks=64, block_size=CHUNK // 2, num_layers=2) as cache:
        yield cache


def settled(counters: TierCounters) -> bool:
    """Every chunk handed to write-behind is accounted for: written or lost."""
    return counters.queued + counters.dropped == counters.written + counters.lost


class FailsFor(MockAdapter):
    """A mock whose puts of the given keys fail."""

    def __init__(self, failing: set[ObjectKey]) -> None:
        super().__init__("mock0")
        self.failing = failing

    async def put(self, key: ObjectKey, payload: memoryview, layout: str = "") -> None:
        if key in self.failing:
            raise AdapterError(f"{self.name}: put of {key} failed")
        await super().put(key, payload, layout)


async def test_queued_chunks_stay_in_l1_and_new_stores_are_refused_instead(kv):
    room = L1Store(1).allocator.rounded(chunk_bytes(kv))
    async with rig(kv, l1_bytes=4 * room, writers_per_adapter=1) as r:
        adapter = r.adapters[0]
        adapter.stall("put")
        assert (await r.store()).stored == 4
        # L1 is full of chunks still on their way to L2: a new store is refused, none is evicted.
        refused = await r.store(OTHER)
        assert (refused.stored, refused.skipped_no_room) == (0, 4)
        adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()
        counters = r.tiering.counters(r.l2_tiers[0])
        assert set(adapter.objects) == set(r.object_keys(4))
        assert (counters.written, counters.skipped_evicted, counters.lost) == (4, 0, 0)
        assert settled(counters)
        assert (await r.store(OTHER)).stored == 4  # written chunks are evictable again
        await trio.testing.wait_all_tasks_blocked()
        r.assert_clean()


async def test_a_chunk_after_a_lost_one_is_not_written_and_is_counted_lost(kv):
    async with rig(kv) as r:
        keys = r.object_keys(4)
        l2 = L2Tier(FailsFor({keys[1]}))
        r.tiering.tiers[0].l2 = l2  # the rig's tier, over an adapter that loses chunk 1
        await r.store()
        await trio.testing.wait_all_tasks_blocked()
        counters = r.tiering.counters(l2)
        # Chunks 2 and 3 would be unreachable orphans in the tier: they are not written.
        assert set(l2.adapter.objects) == {keys[0]}
        assert (counters.written, counters.write_failures, counters.skipped_orphan) == (1, 1, 2)
        assert counters.lost == 3
        assert settled(counters)
        r.assert_clean()


async def test_a_chunk_whose_predecessor_another_server_wrote_is_written(kv):
    async with rig(kv) as r:
        adapter = r.adapters[0]
        first, second = r.object_keys(2)
        adapter.objects[first] = b"written by another server"  # in the store, not in our ledger
        key = RequestKey("m", 1, 0, TOKENS[: 2 * CHUNK], start=CHUNK)
        await r.engine.store(Store("w", key, [0, 1, 2, 3]))
        await trio.testing.wait_all_tasks_blocked()
        assert second in adapter.objects
        assert r.tiering.counters(r.l2_tiers[0]).lost == 0
        r.assert_clean()


async def test_a_chunk_after_a_dropped_one_is_not_written(kv):
    async with rig(kv, queue_size=1, writers_per_adapter=1) as r:
        adapter = r.adapters[0]
        adapter.stall("put")
        await r.store(TOKENS[: 2 * CHUNK])  # chunk 0 in the writer's hands, chunk 1 queued
        await r.store()  # chunks 2 and 3: the queue is full, both dropped
        adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()
        # Now the prefix grows: chunk 4 arrives with room in the queue, but chunks 2-3 are gone.
        longer = [*TOKENS, *range(9000, 9000 + CHUNK)]
        await r.store(longer, list(range(10)))
        await trio.testing.wait_all_tasks_blocked()
        counters = r.tiering.counters(r.l2_tiers[0])
        assert set(adapter.objects) == set(r.object_keys(2))
        assert (counters.dropped, counters.skipped_orphan, counters.lost) == (2, 1, 3)
        assert settled(counters)
        r.assert_clean()


# ------------------------------------------------------------ breaker skips are not failures


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch):
    use_fake_credentials(monkeypatch)
    with running_s3_server() as server:
        yield server


async def test_chunks_not_sent_while_the_breaker_is_open_are_breaker_skips_not_failures(
    own_server: S3TestServer, kv
):
    adapter = S3Adapter(
        own_server.create_bucket(),
        endpoint_url=own_server.endpoint_url,
        breaker_failures=2,
        breaker_cooldown_s=60.0,
        connect_timeout_s=1.0,
    )
    adapter.retry_base_s = 0.001
    l2 = L2Tier(adapter)
    l1 = L1Store(8 << 20)
    tiering = Tiering(l1, [l2], TieringSettings(writers_per_adapter=1))
    engine = CacheEngine(EngineSettings(chunk_size=CHUNK), l1, CpuTransfer(), tiering=tiering)
    engine.register(kv.register_request("w"))
    async with trio.open_nursery() as nursery:
        await nursery.start(l2.run)
        await nursery.start(tiering.run)
        own_server.stop()
        for n in range(4):  # four one-chunk prefixes
            tokens = list(range(n * 1000, n * 1000 + CHUNK))
            await engine.store(Store("w", RequestKey("m", 1, 0, tokens), [2 * n, 2 * n + 1]))
        counters = tiering.counters(l2)
        with trio.fail_after(10):
            await tiering.tiers[0].wait_settled()  # puts run in worker threads
        assert settled(counters)
        # The first put was sent (and its attempts opened the breaker); the rest were not sent.
        assert (counters.write_failures, counters.breaker_skips, counters.lost) == (1, 3, 4)
        status = engine.status().l2[0]
        assert (status.write_failures, status.breaker_skips, status.lost) == (1, 3, 4)
        nursery.cancel_scope.cancel()
