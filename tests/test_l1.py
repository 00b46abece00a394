"""L1 store: reservation life cycle, pins, LRU eviction, watermarks, clear, accounting."""

import pytest
import trio
import trio.testing

from trio_kv.core.l1 import EntryState, L1Store, Refusal
from trio_kv.keys import ObjectKey

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
    assert l1.reserve(key(3), CHUNK) is Refusal.CAPACITY
    assert key(1) in l1 and key(2) in l1


def test_half_written_entries_are_never_evicted():
    l1 = L1Store(1 * CHUNK)
    l1.reserve(key(1), CHUNK)
    assert l1.reserve(key(2), CHUNK) is Refusal.CAPACITY


def test_unpinned_entry_becomes_evictable_again():
    l1 = L1Store(1 * CHUNK)
    entry = ready(l1, 1)
    l1.add_lease(entry)
    assert l1.reserve(key(2), CHUNK) is Refusal.CAPACITY
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
    assert l1.reserve(key(2), 3 * CHUNK) is Refusal.CAPACITY
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


# ---------------------------------------------------------------- quotas and isolation


def test_a_tenant_at_its_quota_evicts_its_own_chunks_first():
    l1 = L1Store(8 * CHUNK, quota=lambda salt: 2 * CHUNK if salt == "a" else None)
    ready(l1, 1, "b")
    ready(l1, 2, "a")
    ready(l1, 3, "a")
    ready(l1, 4, "a")  # a is at 2 chunks: its least recent (2) makes room
    assert key(2, "a") not in l1
    assert {key(1, "b"), key(3, "a"), key(4, "a")} <= {e.key for e in l1.entries()}
    assert l1.ledger.salt_bytes("a") == 2 * CHUNK
    assert l1.evictions_by_reason["quota"] == 1


def test_a_tenant_at_its_quota_with_everything_pinned_is_refused():
    l1 = L1Store(8 * CHUNK, quota=lambda salt: CHUNK)
    l1.add_lease(ready(l1, 1, "a"))
    assert l1.reserve(key(2, "a"), CHUNK) is Refusal.QUOTA
    assert l1.reserve(key(3, "a"), 2 * CHUNK) is Refusal.QUOTA  # larger than the quota itself
    assert l1.refusals[Refusal.QUOTA] == 2
    assert l1.reserve(key(4, "b"), CHUNK) is not Refusal.QUOTA


def test_isolated_policy_evicts_from_the_tenant_furthest_over_its_share():
    l1 = L1Store(6 * CHUNK, policy="isolated")
    ready(l1, 1, "quiet")
    for n in range(10, 15):
        ready(l1, n, "noisy")  # full now: quiet 1, noisy 5
    l1.touch(l1.get(key(10, "noisy")))
    ready(l1, 20, "noisy")
    ready(l1, 21, "quiet")
    # Under global LRU, quiet's old chunk 1 would have gone first; isolation takes from noisy.
    assert key(1, "quiet") in l1
    assert key(21, "quiet") in l1
    assert l1.ledger.salt_bytes("noisy") == 4 * CHUNK


def test_lru_policy_evicts_by_global_recency():
    l1 = L1Store(2 * CHUNK, policy="lru")
    ready(l1, 1, "quiet")
    ready(l1, 2, "noisy")
    ready(l1, 3, "noisy")
    assert key(1, "quiet") not in l1


def test_isolated_policy_respects_quotas_as_shares():
    quotas = {"big": 5 * CHUNK, "small": 1 * CHUNK}
    l1 = L1Store(6 * CHUNK, policy="isolated", quota=quotas.get)
    for n in range(4):
        ready(l1, n, "big")
    ready(l1, 10, "small")
    ready(l1, 11, "other")  # full: big 4/5 of its share, small 1/1, other 1/3 of an equal split
    ready(l1, 12, "other")
    assert l1.ledger.salt_bytes("big") == 4 * CHUNK
    assert l1.ledger.salt_bytes("small") == 0


def test_both_lru_orders_stay_consistent_through_pins_and_clears():
    l1 = L1Store(8 * CHUNK, policy="isolated")
    entries = [ready(l1, n, "ab"[n % 2]) for n in range(6)]
    l1.add_lease(entries[0])
    l1.pin_reader(entries[1])
    l1.clear("a")
    l1.drop_lease(entries[0])
    l1.unpin_reader(entries[1])
    assert l1.evict_to(0) == 3  # b's three chunks; a's were cleared
    assert len(l1) == 0 and l1.ledger.total == 0


def test_an_evicted_or_cleared_entry_cannot_be_pinned_again():
    l1 = L1Store(4 * CHUNK)
    gone = ready(l1, 1)
    l1.clear()
    ready(l1, 2)  # may take the bytes the first entry had
    with pytest.raises(ValueError, match="live"):
        l1.pin_reader(gone)
    with pytest.raises(ValueError, match="live"):
        l1.add_lease(gone)


def test_committing_or_aborting_a_freed_reservation_raises_and_changes_nothing():
    l1 = L1Store(4 * CHUNK)
    aborted = l1.reserve(key(1), CHUNK)
    l1.abort(aborted)
    taker = ready(l1, 2)  # takes the bytes the aborted reservation had
    assert taker.offset == aborted.offset
    for settle in (l1.commit, l1.abort):
        with pytest.raises(ValueError):
            settle(aborted)
    assert l1.eviction_order() == [taker]
    assert l1.allocator.used == l1.ledger.total == CHUNK


def test_a_reservation_of_another_store_cannot_be_committed_here():
    here, there = L1Store(4 * CHUNK), L1Store(4 * CHUNK)
    stranger = there.reserve(key(1), CHUNK)
    with pytest.raises(ValueError, match="does not hold"):
        here.commit(stranger)
    assert len(here) == 0 and here.eviction_order() == []


def test_allocations_are_recounted_from_the_entries_and_doomed_ones():
    l1 = L1Store(4 * CHUNK)
    first = ready(l1, 1)
    written = l1.reserve(key(2), 2 * CHUNK)
    l1.clear()  # the half-written one is doomed: it keeps its bytes
    assert l1.allocations() == {written.offset: 2 * CHUNK}
    assert first.state is EntryState.FREED


def test_entries_of_one_chunk_size_share_one_size_object():
    l1 = L1Store(4 * CHUNK)
    # Sizes computed per request, as the engine does: equal values, distinct objects.
    a, b = (l1.reserve(key(n), int(str(CHUNK + 1))) for n in (1, 2))
    assert a.nbytes is b.nbytes
    assert l1.size_of(a) == l1.size_of(b) == 2 * CHUNK


def test_ready_prefix_stops_at_the_first_chunk_with_a_key_missing_or_still_being_written():
    l1 = L1Store(64 * CHUNK)
    a, b, c = (ready(l1, n) for n in range(3))
    writing = l1.reserve(key(3), CHUNK)
    assert not isinstance(writing, Refusal)
    chunks = [[a.key, b.key], [c.key], [key(3)], [a.key]]
    assert l1.ready_prefix(chunks) == [[a, b], [c]]  # key 3 is reserved, not ready
    assert l1.ready_prefix([[a.key, key(9)], [b.key]]) == []  # one rank missing: none of it
    l1.commit(writing)
    assert l1.ready_prefix(chunks) == [[a, b], [c], [writing], [a]]
