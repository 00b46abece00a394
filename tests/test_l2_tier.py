"""What every L2 adapter gets from its tier: exact accounting, pins, eviction, quotas, recovery."""

import pytest
import trio
import trio.testing

from trio_kv.adapters import AdapterError, MockAdapter
from trio_kv.adapters.base import Unavailable
from trio_kv.adapters.spec import parse_spec
from trio_kv.core.l2_tier import L2Tier, QuotaExceeded
from trio_kv.keys import ObjectKey

SIZE = 1000


def key(n: int, salt: str = "") -> ObjectKey:
    return ObjectKey("m", 1, 0, n.to_bytes(16, "little"), salt)


def payload(n: int) -> memoryview:
    return memoryview(bytes([n % 256]) * SIZE)


async def test_put_counts_bytes_per_salt_and_a_second_put_counts_nothing():
    tier = L2Tier(MockAdapter())
    assert await tier.put(key(1, "a"), payload(1))
    assert not await tier.put(key(1, "a"), payload(1))
    assert tier.adapter.calls.count("put") == 1
    await tier.put(key(2, "b"), payload(2))
    assert tier.usage().bytes_by_salt == {"a": SIZE, "b": SIZE}
    assert tier.usage().usage_fraction == -1.0


async def test_get_into_fills_the_buffer_and_a_vanished_object_leaves_the_ledger():
    tier = L2Tier(MockAdapter())
    await tier.put(key(1), payload(7))
    buffer = bytearray(SIZE)
    assert await tier.get_into(key(1), memoryview(buffer))
    assert bytes(buffer) == bytes(payload(7))
    del tier.adapter.objects[key(1)]  # deleted behind our back (another server, an operator)
    assert not await tier.get_into(key(1), memoryview(buffer))
    assert tier.ledger.total == 0


async def test_a_failed_put_counts_nothing():
    tier = L2Tier(MockAdapter(fail_rate=1.0))
    with pytest.raises(AdapterError):
        await tier.put(key(1), payload(1))
    assert tier.ledger.total == 0


async def test_capacity_evicts_least_recent_objects_with_real_deletes():
    tier = L2Tier(MockAdapter(), capacity=10 * SIZE, high_watermark=0.8, low_watermark=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        for n in range(8):
            await tier.put(key(n), payload(n))
        await tier.get_into(key(0), memoryview(bytearray(SIZE)))  # 0 is now recent
        await tier.put(key(8), payload(8))  # 9 objects: over 80%
        await trio.testing.wait_all_tasks_blocked()
        assert tier.ledger.total == 5 * SIZE
        assert set(tier.adapter.objects) == {key(n) for n in (0, 5, 6, 7, 8)}
        assert tier.evictions == 4
        nursery.cancel_scope.cancel()


async def test_eviction_never_deletes_a_pinned_object():
    tier = L2Tier(MockAdapter(), capacity=4 * SIZE, high_watermark=0.5, low_watermark=0.25)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        await tier.put(key(0), payload(0))
        tier.pin(key(0))  # a lookup is loading it
        for n in range(1, 4):
            await tier.put(key(n), payload(n))
        await trio.testing.wait_all_tasks_blocked()
        assert key(0) in tier.adapter.objects
        assert tier.ledger.total == 1 * SIZE
        tier.unpin(key(0))
        assert await tier.delete([key(0)]) == 1
        nursery.cancel_scope.cancel()


async def test_an_object_being_deleted_is_a_miss_and_no_load_starts_on_it():
    limits: dict[str, int] = {}  # no quota until the test sets one
    tier = L2Tier(MockAdapter(), capacity=4 * SIZE, high_watermark=0.5, low_watermark=0.25, quota=limits.get)
    tier.adapter.stall("delete")
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        for n in range(3):
            await tier.put(key(n), payload(n))
        await trio.testing.wait_all_tasks_blocked()  # eviction chose key 0 and hangs deleting it
        assert key(0) in tier.adapter.objects
        buffer = bytearray(SIZE)
        assert not await tier.get_into(key(0), memoryview(buffer))
        assert "get" not in tier.adapter.calls  # the load never touched the object
        assert await tier.contains([key(0), key(1)]) == [False, True]
        # A second eviction (a quota, here) does not pick the object already going away.
        limits[""] = 2 * SIZE
        async with trio.open_nursery() as admitting:
            admitting.start_soon(tier.put, key(9), payload(9))
            await trio.testing.wait_all_tasks_blocked()
            tier.adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()  # the watermark loop settles too
        assert key(0) not in tier.adapter.objects and key(0) not in tier.ledger
        assert key(9) in tier.adapter.objects
        # Every eviction deleted a different object: none was picked twice.
        assert tier.evictions == tier.adapter.calls.count("delete") == 4 - len(tier.adapter.objects)
        assert tier.ledger.total == tier.ledger.salt_bytes("") == sum(map(len, tier.adapter.objects.values()))
        nursery.cancel_scope.cancel()


async def test_capacity_alone_turns_eviction_on():
    tier = L2Tier(MockAdapter(), capacity=2 * SIZE)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)
        for n in range(5):
            await tier.put(key(n), payload(n))
            await trio.testing.wait_all_tasks_blocked()
        assert tier.ledger.total <= 2 * SIZE
        nursery.cancel_scope.cancel()


async def test_recovery_rebuilds_usage_from_what_is_stored():
    tier = L2Tier(MockAdapter())
    tier.adapter.objects = {key(1, "a"): b"x" * 10, key(2, "b"): b"y" * 20}
    assert await tier.recover() == 2
    assert tier.usage().bytes_by_salt == {"a": 10, "b": 20}


# ---------------------------------------------------------------- quotas and isolation


async def test_a_tenant_at_its_l2_quota_evicts_its_own_objects_first():
    tier = L2Tier(MockAdapter(), quota=lambda salt: 2 * SIZE if salt == "a" else None)
    await tier.put(key(1, "b"), payload(1))
    for n in (2, 3, 4):
        await tier.put(key(n, "a"), payload(n))
    assert set(tier.adapter.objects) == {key(1, "b"), key(3, "a"), key(4, "a")}
    assert tier.usage().bytes_by_salt == {"a": 2 * SIZE, "b": SIZE}


async def test_a_tenant_whose_objects_are_all_pinned_cannot_exceed_its_quota():
    tier = L2Tier(MockAdapter(), quota=lambda salt: SIZE)
    await tier.put(key(1, "a"), payload(1))
    tier.pin(key(1, "a"))
    with pytest.raises(QuotaExceeded):
        await tier.put(key(2, "a"), payload(2))
    assert tier.quota_skips == 1
    assert set(tier.adapter.objects) == {key(1, "a")}


async def test_isolated_l2_eviction_takes_from_the_tenant_over_its_share():
    tier = L2Tier(MockAdapter(), capacity=6 * SIZE, high_watermark=1.0, low_watermark=1.0, policy="isolated")
    await tier.put(key(0, "quiet"), payload(0))
    for n in range(1, 7):
        await tier.put(key(n, "noisy"), payload(n))
    assert await tier.evict_to(6 * SIZE) == 1
    assert key(0, "quiet") in tier.adapter.objects
    assert key(1, "noisy") not in tier.adapter.objects


async def test_a_tenant_that_cannot_make_room_gets_quota_exceeded_and_nothing_is_written():
    tier = L2Tier(MockAdapter(), quota=lambda salt: SIZE // 2)
    with pytest.raises(QuotaExceeded):
        await tier.put(key(1, "a"), payload(1))  # larger than the whole quota
    assert tier.adapter.calls == [] and tier.ledger.total == 0
    assert tier.quota_skips == 1


async def test_without_the_isolated_policy_eviction_is_global_lru():
    tier = L2Tier(MockAdapter(), capacity=6 * SIZE, high_watermark=1.0, low_watermark=1.0)
    await tier.put(key(0, "quiet"), payload(0))
    for n in range(1, 7):
        await tier.put(key(n, "noisy"), payload(n))
    assert await tier.evict_to(6 * SIZE) == 1
    assert key(0, "quiet") not in tier.adapter.objects


def test_settings_are_checked_when_the_tier_is_built():
    with pytest.raises(ValueError, match="capacity"):
        L2Tier(MockAdapter(), capacity=0)
    with pytest.raises(ValueError, match="watermarks"):
        L2Tier(MockAdapter(), high_watermark=0.5, low_watermark=0.6)
    with pytest.raises(ValueError, match="policy"):
        L2Tier(MockAdapter(), policy="fifo")


def test_a_tier_built_from_a_spec_takes_capacity_and_watermarks_and_the_adapter_the_rest():
    tier = L2Tier.from_spec(
        parse_spec("mock:x?capacity=1MiB&high_watermark=0.9&low_watermark=0.5&threads=3&latency_ms=5"),
        policy="isolated",
    )
    assert isinstance(tier.adapter, MockAdapter)
    assert (tier.name, tier.kind, tier.capacity) == ("mock:x", "mock", 1 << 20)
    assert (tier.high_watermark, tier.low_watermark, tier.policy) == (0.9, 0.5, "isolated")
    assert tier.adapter.limiter.total_tokens == 3 and tier.adapter.latency_s == 0.005


# ---------------------------------------------------------------- an unreachable store


class Unreachable(MockAdapter):
    """A mock whose store can be marked unreachable: reads and scans raise Unavailable."""

    def __init__(self) -> None:
        super().__init__()
        self.reachable = trio.Event()

    async def get_into(self, key, buffer):
        if not self.reachable.is_set():
            raise Unavailable(f"{self.name}: unreachable")
        return await super().get_into(key, buffer)

    async def scan(self):
        if not self.reachable.is_set():
            raise Unavailable(f"{self.name}: unreachable")
        async for found in super().scan():
            yield found

    async def wait_available(self):
        await self.reachable.wait()


async def test_an_unavailable_read_is_a_miss_that_keeps_the_key_in_the_ledger():
    adapter = Unreachable()
    adapter.reachable.set()
    tier = L2Tier(adapter)
    await tier.put(key(1), payload(1))
    adapter.reachable = trio.Event()
    assert not await tier.get_into(key(1), memoryview(bytearray(SIZE)))
    assert key(1) in tier.ledger and tier.pinned() == 0
    adapter.reachable.set()
    assert await tier.get_into(key(1), memoryview(bytearray(SIZE)))


async def test_an_unavailable_recovery_scan_runs_once_the_store_is_available():
    adapter = Unreachable()
    adapter.objects = {key(1, "a"): b"x" * 10}
    tier = L2Tier(adapter)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.run)  # starts although the scan could not run
        assert not tier.recovered.is_set() and tier.ledger.total == 0
        adapter.reachable.set()
        with trio.fail_after(5):
            await tier.recovered.wait()
        assert tier.usage().bytes_by_salt == {"a": 10}
        nursery.cancel_scope.cancel()
