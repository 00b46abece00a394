"""L1 store: reservation life cycle, pins, LRU eviction, watermarks, clear, accounting."""

import pytest
import trio
import trio.testing

from trio_kv.keys import ObjectKey
from trio_kv.l1 import EntryState, L1Store

CHUNK = 4096


def key(n: int, salt: str = "") -> ObjectKey:
    return ObjectKey("model", 1, 0, n.to_bytes(16, "little"), salt)


def ready(l1: L1Store, n: int, salt: str = ""):
    entry = l1.reserve(key(n, salt), CHUNK)
    assert entry is not None
    l1.commit(entry)
    return entry


def test_reserve_charges_bytes_to_the_salt_and_commit_makes_it_ready():
    l1 = L1Store(4 * CHUNK)
    entry = l1.reserve(key(1, "tenant"), 100)
    assert entry.state is EntryState.WRITING
    assert l1.get_ready(key(1, "tenant")) is None
    assert l1.ledger.bytes_by_salt == {"tenant": CHUNK}  # aligned size is what the arena loses
    l1.commit(entry)
    assert l1.get_ready(key(1, "tenant")) is entry
    assert l1.view(entry).numel() == 100


def test_abort_frees_the_reservation_and_its_bytes():
    l1 = L1Store(4 * CHUNK)
    entry = l1.reserve(key(1), CHUNK)
    l1.abort(entry)
    assert key(1) not in l1
    assert l1.ledger.total == 0 and l1.allocator.used == 0


def test_reserving_a_present_key_is_an_error():
    l1 = L1Store(4 * CHUNK)
    ready(l1, 1)
    with pytest.raises(KeyError):
        l1.reserve(key(1), CHUNK)


def test_full_store_evicts_least_recently_used_first():
    l1 = L1Store(3 * CHUNK)
    first, second, third = ready(l1, 1), ready(l1, 2), ready(l1, 3)
    l1.touch(first)  # now 2 is the least recent
    assert ready(l1, 4) is not None
    assert key(2) not in l1
    assert {key(1), key(3), key(4)} <= {e.key for e in l1.entries()}
    assert l1.evictions == 1
    del second, third


def test_leased_and_read_entries_are_never_evicted():
    l1 = L1Store(2 * CHUNK)
    leased, read = ready(l1, 1), ready(l1, 2)
    l1.add_lease(leased)
    l1.pin_reader(read)
    assert l1.reserve(key(3), CHUNK) is None
    assert key(1) in l1 and key(2) in l1


def test_half_written_entries_are_never_evicted():
    l1 = L1Store(1 * CHUNK)
    l1.reserve(key(1), CHUNK)
    assert l1.reserve(key(2), CHUNK) is None


def test_unpinned_entry_becomes_evictable_again():
    l1 = L1Store(1 * CHUNK)
    entry = ready(l1, 1)
    l1.add_lease(entry)
    assert l1.reserve(key(2), CHUNK) is None
    l1.drop_lease(entry)
    assert l1.reserve(key(2), CHUNK) is not None
    assert key(1) not in l1


def test_unbalanced_unpins_raise():
    l1 = L1Store(2 * CHUNK)
    entry = ready(l1, 1)
    with pytest.raises(ValueError):
        l1.drop_lease(entry)
    with pytest.raises(ValueError):
        l1.unpin_reader(entry)


def test_oversized_chunk_does_not_fit_and_evicts_nothing():
    l1 = L1Store(2 * CHUNK)
    ready(l1, 1)
    assert l1.reserve(key(2), 3 * CHUNK) is None
    assert key(1) in l1


def test_clear_frees_idle_entries_and_dooms_busy_ones_until_released():
    l1 = L1Store(4 * CHUNK)
    idle = ready(l1, 1)
    being_read = ready(l1, 2)
    l1.pin_reader(being_read)
    being_written = l1.reserve(key(3), CHUNK)
    removed, freed = l1.clear()
    assert (removed, freed) == (3, CHUNK)
    assert len(l1) == 0
    # Busy entries keep their bytes until their copies finish.
    assert l1.ledger.total == 2 * CHUNK
    l1.unpin_reader(being_read)
    l1.commit(being_written)
    assert l1.ledger.total == 0 and l1.allocator.used == 0
    assert l1.entries() == []
    del idle


def test_clear_of_one_salt_keeps_the_others():
    l1 = L1Store(4 * CHUNK)
    ready(l1, 1, "a")
    ready(l1, 2, "b")
    l1.clear("a")
    assert key(1, "a") not in l1
    assert key(2, "b") in l1
    assert l1.ledger.bytes_by_salt == {"b": CHUNK}


def test_a_key_cleared_while_written_can_be_stored_again():
    l1 = L1Store(4 * CHUNK)
    old = l1.reserve(key(1), CHUNK)
    l1.clear()
    new = l1.reserve(key(1), CHUNK)
    l1.abort(old)  # the old writer fails late: it must not touch the new entry
    l1.commit(new)
    assert l1.get_ready(key(1)) is new
    assert l1.ledger.total == CHUNK


async def test_watermark_task_evicts_down_to_the_low_watermark():
    l1 = L1Store(10 * CHUNK, high_watermark=0.8, low_watermark=0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(l1.run_watermark_eviction)
        for n in range(8):
            ready(l1, n)
        await trio.testing.wait_all_tasks_blocked()
        assert l1.allocator.used == 8 * CHUNK  # at, not above, the high watermark
        ready(l1, 8)
        await trio.testing.wait_all_tasks_blocked()
        assert l1.allocator.used == 5 * CHUNK
        # The least recent went first.
        assert [key(n) in l1 for n in range(9)] == [False] * 4 + [True] * 5
        nursery.cancel_scope.cancel()
