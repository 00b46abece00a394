"""Leases pin L1 entries for a request until released, replaced, or expired."""

from trio_kv.core.l1 import L1Store
from trio_kv.core.leases import LeaseTable
from trio_kv.keys import ObjectKey

CHUNK = 4096
OWNER = ("salt", "req-1")


def make(n_entries: int):
    l1 = L1Store(16 * CHUNK)
    entries = []
    for n in range(n_entries):
        entry = l1.reserve(ObjectKey("m", 1, 0, bytes([n]) * 16, "salt"), CHUNK)
        l1.commit(entry)
        entries.append(entry)
    return l1, LeaseTable(l1), entries


def test_grant_pins_each_entry_once():
    _, leases, entries = make(2)
    assert leases.grant(OWNER, [(0, entries[0]), (1, entries[1]), (1, entries[1])], 10.0) == 2
    assert [e.leases for e in entries] == [1, 1]
    assert len(leases) == 2


def test_a_new_grant_replaces_the_old_set_without_unpinning_shared_entries():
    l1, leases, entries = make(3)
    leases.grant(OWNER, [(0, entries[0]), (1, entries[1])], 10.0)
    leases.grant(OWNER, [(0, entries[1]), (1, entries[2])], 10.0)
    assert [e.leases for e in entries] == [0, 1, 1]
    assert len(leases) == 2
    del l1


def test_release_chunks_releases_only_the_range():
    _, leases, entries = make(3)
    leases.grant(OWNER, list(enumerate(entries)), 10.0)
    assert leases.release_chunks(OWNER, 0, 2) == 2
    assert [e.leases for e in entries] == [0, 0, 1]
    assert leases.release_chunks(OWNER, 0, None) == 1
    assert leases.owners() == 0


def test_release_keys_of_another_owner_releases_nothing():
    _, leases, entries = make(1)
    leases.grant(OWNER, [(0, entries[0])], 10.0)
    assert leases.release_keys(("salt", "other"), [entries[0].key]) == 0
    assert leases.release_keys(("", "req-1"), [entries[0].key]) == 0
    assert entries[0].leases == 1


def test_expire_releases_sets_whose_deadline_passed():
    _, leases, entries = make(2)
    leases.grant(("s", "early"), [(0, entries[0])], 5.0)
    leases.grant(("s", "late"), [(0, entries[1])], 50.0)
    assert leases.next_deadline() == 5.0
    assert leases.expire(4.9) == 0
    assert leases.expire(5.0) == 1
    assert [e.leases for e in entries] == [0, 1]
    assert leases.next_deadline() == 50.0
    assert leases.expired == 1


def test_a_regrant_moves_the_deadline():
    _, leases, entries = make(1)
    leases.grant(OWNER, [(0, entries[0])], 5.0)
    leases.grant(OWNER, [(0, entries[0])], 20.0)
    assert leases.expire(10.0) == 0
    assert entries[0].leases == 1
    assert leases.next_deadline() == 20.0


def test_release_salt_and_clear():
    _, leases, entries = make(2)
    leases.grant(("a", "r"), [(0, entries[0])], 5.0)
    leases.grant(("b", "r"), [(0, entries[1])], 5.0)
    assert leases.release_salt("a") == 1
    assert leases.clear() == 1
    assert [e.leases for e in entries] == [0, 0]
    assert leases.next_deadline() is None


def test_a_regrant_carries_over_the_leases_it_keeps_and_pins_nothing_twice():
    l1, leases, entries = make(3)
    calls = []
    for name in ("add_lease", "drop_lease"):
        method = getattr(l1, name)
        setattr(
            l1, name, lambda entry, method=method, name=name: (calls.append((name, entry.key)), method(entry))
        )
    leases.grant(OWNER, [(0, entries[0]), (1, entries[1])], 10.0)
    calls.clear()
    assert leases.grant(OWNER, [(1, entries[0]), (2, entries[1]), (3, entries[2])], 20.0) == 3
    assert calls == [("add_lease", entries[2].key)]  # the two kept ones were not touched
    assert [e.leases for e in entries] == [1, 1, 1]
    assert leases.release_chunks(OWNER, 1, 2) == 1  # chunk indexes are the new grant's
    assert entries[0].leases == 0
    assert leases.next_deadline() == 20.0


def test_a_repeated_identical_grant_keeps_the_pins_and_a_changed_index_is_a_new_set():
    _, leases, entries = make(2)
    hits = [(0, entries[0]), (1, entries[1])]
    assert leases.grant(OWNER, hits, 5.0) == 2
    assert leases.grant(OWNER, list(hits), 6.0) == 2
    assert [e.leases for e in entries] == [1, 1] and len(leases) == 2
    # The same entries under other chunk indexes: release_chunks must see the new indexes.
    assert leases.grant(OWNER, [(3, entries[0]), (4, entries[1])], 7.0) == 2
    assert leases.release_chunks(OWNER, 0, 3) == 0
    assert leases.release_chunks(OWNER, 3, 4) == 1
    assert [e.leases for e in entries] == [0, 1]


def test_the_deadline_heap_stays_bounded_under_repeated_and_released_grants():
    _, leases, entries = make(3)
    for n in range(5000):
        leases.grant(OWNER, [(0, entries[0])], 10.0 + n)
        leases.grant(("s", f"once-{n}"), [(0, entries[1])], 10.0 + n)
        leases.release_all(("s", f"once-{n}"))
    leases.grant(("s", "late"), [(0, entries[2])], 1e9)
    assert leases.heap_size() <= 2 * leases.owners() + 65
    # Rebuilding kept every live deadline: the repeated owner's last one, then the late one.
    assert leases.next_deadline() == 10.0 + 4999
    assert leases.expire(10.0 + 4999) == 1
    assert leases.next_deadline() == 1e9
    assert [e.leases for e in entries] == [0, 0, 1]
