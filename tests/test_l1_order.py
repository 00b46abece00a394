"""L1's eviction order (intrusive LRU lists) and L1Store, each against a plain model, plus
the metadata budget per cached chunk."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from trio_kv.core.audit import arena_problems
from trio_kv.core.l1 import Entry, EntryState, L1Store, Refusal
from trio_kv.core.l1_order import EvictionOrder
from trio_kv.keys import ObjectKey
from trio_kv.tools.bench_metadata import metadata_bytes_per_chunk

CHUNK = 4096
SALTS = ("", "a", "b")


def key(n: int, salt: str = "") -> ObjectKey:
    return ObjectKey("model", 1, 0, n.to_bytes(16, "little"), salt)


def entry(n: int, salt: str = "") -> Entry:
    return Entry(key(n, salt), n * CHUNK, CHUNK)


# ---------------------------------------------------------------- EvictionOrder, focused


def test_an_empty_order_has_no_oldest_and_no_salts():
    order = EvictionOrder()
    assert order.oldest() is None and order.oldest("a") is None
    assert not order and len(order) == 0 and list(order.salts()) == []


def test_entries_come_out_least_recent_first_globally_and_per_salt():
    order = EvictionOrder()
    first, second, third = entry(1, "a"), entry(2, "b"), entry(3, "a")
    for e in (first, second, third):
        order.push(e)
    assert list(order) == [first, second, third]
    assert list(order.of_salt("a")) == [first, third]
    assert (order.oldest(), order.oldest("a"), order.oldest("b")) == (first, first, second)


def test_touch_makes_an_entry_the_most_recent_in_both_lists():
    order = EvictionOrder()
    first, second, third = entry(1, "a"), entry(2, "b"), entry(3, "a")
    for e in (first, second, third):
        order.push(e)
    order.touch(first)
    assert list(order) == [second, third, first]
    assert list(order.of_salt("a")) == [third, first]
    assert order.problems() == []


def test_touch_of_an_entry_outside_the_order_adds_nothing():
    order = EvictionOrder()
    order.push(entry(1))
    outside = entry(2)
    order.touch(outside)
    assert outside not in order and len(order) == 1


def test_removing_a_salts_last_entry_forgets_the_salt():
    order = EvictionOrder()
    only = entry(1, "a")
    order.push(only)
    assert order.remove(only)
    assert list(order.salts()) == [] and order.oldest("a") is None
    assert (only.prev, only.next, only.salt_prev, only.salt_next) == (None, None, None, None)


def test_removing_an_entry_twice_reports_it_was_not_there():
    order = EvictionOrder()
    e = entry(1)
    order.push(e)
    assert order.remove(e) is True
    assert order.remove(e) is False
    assert len(order) == 0


def test_pushing_an_entry_already_in_the_order_is_an_error():
    order = EvictionOrder()
    e = entry(1)
    order.push(e)
    with pytest.raises(ValueError):
        order.push(e)
    assert list(order) == [e]


def test_clear_unlinks_every_entry():
    order = EvictionOrder()
    entries = [entry(n, SALTS[n % 3]) for n in range(5)]
    for e in entries:
        order.push(e)
    order.clear()
    assert list(order) == [] and len(order) == 0 and list(order.salts()) == []
    assert all(e.prev is e.next is e.salt_prev is e.salt_next is None for e in entries)


def test_a_dropped_order_breaks_the_links_between_its_entries():
    # Entries are untracked by the cycle collector: linked neighbours would never be freed.
    order = EvictionOrder()
    entries = [entry(n) for n in range(3)]
    for e in entries:
        order.push(e)
    del order
    gc.collect()
    assert all(e.prev is None and e.next is None for e in entries)


def test_problems_name_a_broken_link():
    order = EvictionOrder()
    first, second = entry(1), entry(2)
    order.push(first)
    order.push(second)
    second.prev = None  # as if a removal had gone wrong
    assert any("backward link" in p for p in order.problems())


def test_an_entry_repr_does_not_follow_its_links():
    order = EvictionOrder()
    first, second = entry(1), entry(2)
    order.push(first)
    order.push(second)
    assert repr(first) == "Entry(writing, offset=4096, nbytes=4096, leases=0, readers=0)"


# ---------------------------------------------------------------- EvictionOrder vs a model


class EvictionOrderMachine(RuleBasedStateMachine):
    """Push, remove, touch against a list kept in recency order."""

    def __init__(self) -> None:
        super().__init__()
        self.order = EvictionOrder()
        self.model: list[Entry] = []
        self.made: list[Entry] = []

    @rule(salt=st.sampled_from(SALTS))
    def push_a_new_entry(self, salt):
        e = entry(len(self.made), salt)
        self.made.append(e)
        self.order.push(e)
        self.model.append(e)

    @precondition(lambda self: self.made)
    @rule(data=st.data())
    def remove(self, data):
        e = data.draw(st.sampled_from(self.made))
        assert self.order.remove(e) == (e in self.model)
        if e in self.model:
            self.model.remove(e)

    @precondition(lambda self: self.made)
    @rule(data=st.data())
    def touch(self, data):
        e = data.draw(st.sampled_from(self.made))
        self.order.touch(e)
        if e in self.model:
            self.model.remove(e)
            self.model.append(e)

    @precondition(lambda self: self.made)
    @rule(data=st.data())
    def re_push_a_removed_entry(self, data):
        e = data.draw(st.sampled_from(self.made))
        if e in self.model:
            return
        self.order.push(e)
        self.model.append(e)

    @invariant()
    def matches_the_model(self):
        assert list(self.order) == self.model
        assert len(self.order) == len(self.model)
        assert set(self.order.salts()) == {e.key.cache_salt for e in self.model}
        for salt in SALTS:
            of_salt = [e for e in self.model if e.key.cache_salt == salt]
            assert list(self.order.of_salt(salt)) == of_salt
            assert self.order.oldest(salt) == (of_salt[0] if of_salt else None)
        assert self.order.oldest() == (self.model[0] if self.model else None)
        assert all((e in self.order) == (e in self.model) for e in self.made)
        assert self.order.problems() == []


TestEvictionOrderMachine = EvictionOrderMachine.TestCase
TestEvictionOrderMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------- L1Store vs a model

CAPACITY_CHUNKS = 4


class L1StoreMachine(RuleBasedStateMachine):
    """Reservations, commits, aborts, touches, pins, eviction and clears against a model:
    live entries by key, doomed ones, and the recency order of the evictable ones."""

    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.l1 = L1Store(CAPACITY_CHUNKS * CHUNK, high_watermark=1.0, low_watermark=1.0)
        self.live: dict[ObjectKey, Entry] = {}
        self.doomed: list[Entry] = []
        self.recency: list[Entry] = []  # evictable, least recent first
        self.freed: list[Entry] = []
        self.next_key = 0

    def _evictable(self, e: Entry) -> bool:
        return self.live.get(e.key) is e and e.state is EntryState.READY and not e.pinned

    def _make_recent(self, e: Entry) -> None:
        if e in self.recency:
            self.recency.remove(e)
        if self._evictable(e):
            self.recency.append(e)

    def _forget(self, e: Entry, *, doomed: bool = False) -> None:
        """Out of the index: freed, or doomed (bytes held until its copy or reader is done)."""
        del self.live[e.key]
        if e in self.recency:
            self.recency.remove(e)
        (self.doomed if doomed else self.freed).append(e)

    @rule(target=reservations, salt=st.sampled_from(SALTS), nbytes=st.integers(1, CHUNK))
    def reserve(self, salt, nbytes):
        k = key(self.next_key, salt)
        self.next_key += 1
        full = len(self.live) + len(self.doomed) == CAPACITY_CHUNKS
        victim = self.recency[0] if full and self.recency else None
        got = self.l1.reserve(k, nbytes)
        if full and victim is None:
            assert got is Refusal.CAPACITY
            return multiple()
        if victim is not None:
            self._forget(victim)
            assert victim.key not in self.l1 and victim.state is EntryState.FREED
        assert isinstance(got, Entry) and got.state is EntryState.WRITING and got.nbytes == nbytes
        self.live[k] = got
        return got

    @rule(e=consumes(reservations))
    def commit(self, e):
        self.l1.commit(e)
        if e in self.doomed:
            self.doomed.remove(e)
            self.freed.append(e)
            assert e.state is EntryState.FREED
        else:
            assert e.state is EntryState.READY
            self.recency.append(e)

    @rule(e=consumes(reservations))
    def abort(self, e):
        self.l1.abort(e)
        if e in self.doomed:
            self.doomed.remove(e)
            self.freed.append(e)
        else:
            self._forget(e)
        assert e.state is EntryState.FREED

    @precondition(lambda self: self.freed or any(e.state is EntryState.READY for e in self.live.values()))
    @rule(data=st.data())
    def settling_a_committed_or_freed_entry_is_an_error(self, data):
        ready = [e for e in self.live.values() if e.state is EntryState.READY]
        e = data.draw(st.sampled_from([*ready, *self.freed]))
        with pytest.raises(ValueError):
            self.l1.commit(e)
        with pytest.raises(ValueError):
            self.l1.abort(e)
        with pytest.raises(ValueError):
            if e.state is EntryState.FREED:
                self.l1.pin_reader(e)
            else:
                raise ValueError("a ready entry may be pinned")

    @precondition(lambda self: any(e.state is EntryState.READY for e in self.live.values()))
    @rule(data=st.data(), action=st.sampled_from(["touch", "pin_reader", "add_lease"]))
    def use_a_ready_entry(self, data, action):
        e = data.draw(st.sampled_from([e for e in self.live.values() if e.state is EntryState.READY]))
        getattr(self.l1, action)(e)
        if action == "touch":
            if e in self.recency:
                self._make_recent(e)
        elif e in self.recency:
            self.recency.remove(e)

    @precondition(lambda self: any(e.readers or e.leases for e in [*self.live.values(), *self.doomed]))
    @rule(data=st.data())
    def unpin(self, data):
        pinned = [e for e in [*self.live.values(), *self.doomed] if e.readers or e.leases]
        e = data.draw(st.sampled_from(pinned))
        if e.readers:
            self.l1.unpin_reader(e)
        else:
            self.l1.drop_lease(e)
        if e.pinned:
            return
        if e in self.doomed:
            self.doomed.remove(e)
            self.freed.append(e)
            assert e.state is EntryState.FREED
        else:
            self._make_recent(e)

    @rule(target_chunks=st.integers(0, CAPACITY_CHUNKS))
    def evict_to(self, target_chunks):
        evicted = self.l1.evict_to(target_chunks * CHUNK)
        expected = 0
        while len(self.live) + len(self.doomed) > target_chunks and self.recency:
            self._forget(self.recency[0])
            expected += 1
        assert evicted == expected

    @rule(salt=st.one_of(st.none(), st.sampled_from(SALTS)))
    def clear(self, salt):
        gone = [e for e in self.live.values() if salt is None or e.key.cache_salt == salt]
        removed, _ = self.l1.clear(salt)
        assert removed == len(gone)
        for e in gone:
            self._forget(e, doomed=e.state is EntryState.WRITING or e.readers > 0)

    @invariant()
    def matches_the_model(self):
        l1 = self.l1
        assert {e.key for e in l1.entries() if l1.get(e.key) is e} == set(self.live)
        assert all(l1.get(k) is e for k, e in self.live.items())
        assert {id(e) for e in l1.entries() if l1.is_doomed(e)} == {id(e) for e in self.doomed}
        assert all(e.state is EntryState.FREED for e in self.freed)
        assert l1.eviction_order() == self.recency
        for salt in SALTS:
            assert l1.eviction_order(salt) == [e for e in self.recency if e.key.cache_salt == salt]
        held = len(self.live) + len(self.doomed)
        assert l1.allocator.used == l1.ledger.total == held * CHUNK
        assert l1.order_problems() == []
        assert arena_problems(l1.allocator, l1.allocations()) == []


TestL1StoreMachine = L1StoreMachine.TestCase
TestL1StoreMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------- metadata budget


def test_l1_metadata_stays_within_300_bytes_per_cached_chunk():
    # Issue 15's target, at 2*10^4 chunks to stay fast; at 10^6 the index dict is fuller
    # and the figure ~15 B higher (docs/benchmarks.md).
    assert metadata_bytes_per_chunk(20_000) <= 300


@settings(max_examples=200, deadline=None)
@given(
    salts=st.lists(st.sampled_from(SALTS), min_size=1, max_size=12),
    picks=st.lists(st.integers(0, 11), max_size=16),
    tail_in_order=st.booleans(),
)
def test_touch_all_leaves_the_same_order_as_touching_one_by_one(salts, picks, tail_in_order):
    def build() -> tuple[EvictionOrder, list[Entry]]:
        order, entries = EvictionOrder(), [entry(n, salt) for n, salt in enumerate(salts)]
        for e in entries[:-1]:  # the last one stays out of the order (as a pinned entry does)
            order.push(e)
        return order, entries

    def state(order: EvictionOrder, entries: list[Entry]) -> tuple[list[int], dict[str, list[int]]]:
        ids = {id(e): n for n, e in enumerate(entries)}
        return [ids[id(e)] for e in order], {s: [ids[id(e)] for e in order.of_salt(s)] for s in order.salts()}

    one_by_one, entries = build()
    together, twins = build()
    chosen = [n % len(salts) for n in picks]
    if tail_in_order:  # the newest ones, oldest first: what a repeated lookup touches
        chosen = list(range(max(0, len(salts) - 4), len(salts) - 1))
    for n in chosen:
        one_by_one.touch(entries[n])
    together.touch_all([twins[n] for n in chosen])
    assert state(together, twins) == state(one_by_one, entries)
    assert together.problems() == []
