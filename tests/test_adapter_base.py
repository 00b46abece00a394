"""What every L2 adapter gets from the base class: exact accounting, pins, LRU eviction."""

import pytest
import trio
import trio.testing

from trio_kv.adapters import AdapterError, MockAdapter
from trio_kv.adapters.base import QuotaExceeded
from trio_kv.keys import ObjectKey

SIZE = 1000


def key(n: int, salt: str = "") -> ObjectKey:
    return ObjectKey("m", 1, 0, n.to_bytes(16, "little"), salt)


def payload(n: int) -> memoryview:
    return memoryview(bytes([n % 256]) * SIZE)


async def test_put_counts_bytes_per_salt_and_a_second_put_counts_nothing():
    adapter = MockAdapter()
    assert await adapter.put(key(1, "a"), payload(1))
    assert not await adapter.put(key(1, "a"), payload(1))
    assert adapter.calls.count("put") == 1
    await adapter.put(key(2, "b"), payload(2))
    assert adapter.usage().bytes_by_salt == {"a": SIZE, "b": SIZE}
    assert adapter.usage().usage_fraction == -1.0


async def test_get_into_fills_the_buffer_and_a_vanished_object_leaves_the_ledger():
    adapter = MockAdapter()
    await adapter.put(key(1), payload(7))
    buffer = bytearray(SIZE)
    assert await adapter.get_into(key(1), memoryview(buffer))
    assert bytes(buffer) == bytes(payload(7))
    del adapter.objects[key(1)]  # deleted behind our back (another server, an operator)
    assert not await adapter.get_into(key(1), memoryview(buffer))
    assert adapter.ledger.total == 0


async def test_a_failed_put_counts_nothing():
    adapter = MockAdapter(fail_rate=1.0)
    with pytest.raises(AdapterError):
        await adapter.put(key(1), payload(1))
    assert adapter.ledger.total == 0


async def test_capacity_evicts_least_recent_objects_with_real_deletes():
    adapter = MockAdapter(capacity=10 * SIZE, high_watermark=0.8, low_watermark=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        for n in range(8):
            await adapter.put(key(n), payload(n))
        await adapter.get_into(key(0), memoryview(bytearray(SIZE)))  # 0 is now recent
        await adapter.put(key(8), payload(8))  # 9 objects: over 80%
        await trio.testing.wait_all_tasks_blocked()
        assert adapter.ledger.total == 5 * SIZE
        assert set(adapter.objects) == {key(n) for n in (0, 5, 6, 7, 8)}
        assert adapter.evictions == 4
        nursery.cancel_scope.cancel()


async def test_eviction_never_deletes_a_pinned_object():
    adapter = MockAdapter(capacity=4 * SIZE, high_watermark=0.5, low_watermark=0.25)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        await adapter.put(key(0), payload(0))
        adapter.pin(key(0))  # a lookup is loading it
        for n in range(1, 4):
            await adapter.put(key(n), payload(n))
        await trio.testing.wait_all_tasks_blocked()
        assert key(0) in adapter.objects
        assert adapter.ledger.total == 1 * SIZE
        adapter.unpin(key(0))
        assert await adapter.delete([key(0)]) == 1
        nursery.cancel_scope.cancel()


async def test_an_object_being_deleted_is_a_miss_and_no_load_starts_on_it():
    adapter = MockAdapter(capacity=4 * SIZE, high_watermark=0.5, low_watermark=0.25)
    adapter.stall("delete")
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        for n in range(3):
            await adapter.put(key(n), payload(n))
        await trio.testing.wait_all_tasks_blocked()  # eviction chose key 0 and hangs deleting it
        assert key(0) in adapter.objects
        buffer = bytearray(SIZE)
        assert not await adapter.get_into(key(0), memoryview(buffer))
        assert "get" not in adapter.calls  # the load never touched the object
        assert await adapter.contains([key(0), key(1)]) == [False, True]
        # A second eviction (a quota, here) does not pick the object already going away.
        adapter.quota = lambda salt: 2 * SIZE
        async with trio.open_nursery() as admitting:
            admitting.start_soon(adapter.put, key(9), payload(9))
            await trio.testing.wait_all_tasks_blocked()
            adapter.unstall()
        await trio.testing.wait_all_tasks_blocked()  # the watermark loop settles too
        assert key(0) not in adapter.objects and key(0) not in adapter.ledger
        assert key(9) in adapter.objects
        # Every eviction deleted a different object: none was picked twice.
        assert adapter.evictions == adapter.calls.count("delete") == 4 - len(adapter.objects)
        assert (
            adapter.ledger.total == adapter.ledger.salt_bytes("") == sum(map(len, adapter.objects.values()))
        )
        nursery.cancel_scope.cancel()


async def test_capacity_alone_turns_eviction_on():
    adapter = MockAdapter(capacity=2 * SIZE)
    async with trio.open_nursery() as nursery:
        await nursery.start(adapter.run)
        for n in range(5):
            await adapter.put(key(n), payload(n))
            await trio.testing.wait_all_tasks_blocked()
        assert adapter.ledger.total <= 2 * SIZE
        nursery.cancel_scope.cancel()


async def test_recovery_rebuilds_usage_from_what_is_stored():
    adapter = MockAdapter()
    adapter.objects = {key(1, "a"): b"x" * 10, key(2, "b"): b"y" * 20}
    assert await adapter.recover() == 2
    assert adapter.usage().bytes_by_salt == {"a": 10, "b": 20}


# ---------------------------------------------------------------- quotas and isolation


async def test_a_tenant_at_its_l2_quota_evicts_its_own_objects_first():
    adapter = MockAdapter()
    adapter.quota = lambda salt: 2 * SIZE if salt == "a" else None
    await adapter.put(key(1, "b"), payload(1))
    for n in (2, 3, 4):
        await adapter.put(key(n, "a"), payload(n))
    assert set(adapter.objects) == {key(1, "b"), key(3, "a"), key(4, "a")}
    assert adapter.usage().bytes_by_salt == {"a": 2 * SIZE, "b": SIZE}


async def test_a_tenant_whose_objects_are_all_pinned_cannot_exceed_its_quota():
    adapter = MockAdapter()
    adapter.quota = lambda salt: SIZE
    await adapter.put(key(1, "a"), payload(1))
    adapter.pin(key(1, "a"))
    with pytest.raises(QuotaExceeded):
        await adapter.put(key(2, "a"), payload(2))
    assert adapter.quota_skips == 1
    assert set(adapter.objects) == {key(1, "a")}


async def test_isolated_l2_eviction_takes_from_the_tenant_over_its_share():
    adapter = MockAdapter(capacity=6 * SIZE, high_watermark=1.0, low_watermark=1.0)
    adapter.policy = "isolated"
    await adapter.put(key(0, "quiet"), payload(0))
    for n in range(1, 7):
        await adapter.put(key(n, "noisy"), payload(n))
    assert await adapter.evict_to(6 * SIZE) == 1
    assert key(0, "quiet") in adapter.objects
    assert key(1, "noisy") not in adapter.objects
