"""L1's entry record and its eviction order: intrusive least-recently-used lists. Pure.

An L1 may hold millions of chunks, so an entry is one small untracked struct and the
eviction order lives in links inside the entries (one global list, one per salt) rather
than in ordered maps keyed by chunk: push, remove, touch and oldest are O(1) and an
evictable chunk costs four pointers, not two ordered-map records.

Entries are not tracked by the cycle collector (``gc=False``), and linked neighbours
refer to each other: every entry leaves the order with its links cleared, and an order
that is dropped unlinks what it still holds (``clear``), so no cycle outlives its store.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, KeysView, Sequence

import msgspec

from ..keys import ObjectKey


class EntryState(enum.Enum):
    WRITING = "writing"
    READY = "ready"
    FREED = "freed"  # its bytes went back to the arena: the record is dead


class Entry(msgspec.Struct, gc=False, eq=False):
    """One chunk in L1. Equality and hashing are by identity."""

    key: ObjectKey
    offset: int
    nbytes: int  # payload bytes; the arena takes them rounded up (``L1Store.size_of``)
    # The fingerprint of the KV layout that stored the bytes ("" unknown: an L2 object
    # written before objects carried one); retrieves by another layout miss.
    layout: str = ""
    state: EntryState = EntryState.WRITING
    leases: int = 0
    readers: int = 0
    # Links of the eviction order (None at the ends and while not evictable).
    prev: Entry | None = None
    next: Entry | None = None
    salt_prev: Entry | None = None
    salt_next: Entry | None = None

    @property
    def pinned(self) -> bool:
        return self.leases > 0 or self.readers > 0

    def __repr__(self) -> str:
        # Not the generated repr: it would follow the links through the whole order.
        return (
            f"Entry({self.state.value}, offset={self.offset}, nbytes={self.nbytes}, "
            f"leases={self.leases}, readers={self.readers})"
        )


class _Ends:
    """The oldest and newest entry of one salt's list."""

    __slots__ = ("newest", "oldest")

    def __init__(self, entry: Entry) -> None:
        self.oldest: Entry = entry
        self.newest: Entry = entry


class EvictionOrder:
    """Evictable entries, least recent first, globally and per salt. Entries passed in must
    belong to this order's store (membership is read from the links)."""

    __slots__ = ("_by_salt", "_count", "_newest", "_oldest")

    def __init__(self) -> None:
        self._oldest: Entry | None = None
        self._newest: Entry | None = None
        self._by_salt: dict[str, _Ends] = {}
        self._count = 0

    def __del__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._oldest is not None

    def __contains__(self, entry: Entry) -> bool:
        return entry.prev is not None or self._oldest is entry

    def salts(self) -> KeysView[str]:
        """The salts that have something evictable."""
        return self._by_salt.keys()

    def oldest(self, salt: str | None = None) -> Entry | None:
        """The least recent entry (of ``salt``, or of all), or None if there is none."""
        if salt is None:
            return self._oldest
        ends = self._by_salt.get(salt)
        return ends.oldest if ends is not None else None

    def push(self, entry: Entry) -> None:
        """Add ``entry`` as the most recent."""
        if entry in self:
            raise ValueError(f"{entry} is already in the eviction order")
        newest = self._newest
        entry.prev = newest
        if newest is None:
            self._oldest = entry
        else:
            newest.next = entry
        self._newest = entry
        salt = entry.key.cache_salt
        ends = self._by_salt.get(salt)
        if ends is None:
            self._by_salt[salt] = _Ends(entry)
        else:
            entry.salt_prev = ends.newest
            ends.newest.salt_next = entry
            ends.newest = entry
        self._count += 1

    def remove(self, entry: Entry) -> bool:
        """Take ``entry`` out of the order; False if it was not in it."""
        if entry not in self:
            return False
        prev, after = entry.prev, entry.next
        if prev is None:
            self._oldest = after
        else:
            prev.next = after
        if after is None:
            self._newest = prev
        else:
            after.prev = prev
        salt = entry.key.cache_salt
        ends = self._by_salt[salt]
        prev, after = entry.salt_prev, entry.salt_next
        if prev is None and after is None:
            del self._by_salt[salt]
        else:
            if prev is None:
                ends.oldest = after  # type: ignore[assignment]  # after is set: not both None
            else:
                prev.salt_next = after
            if after is None:
                ends.newest = prev  # type: ignore[assignment]
            else:
                after.salt_prev = prev
        entry.prev = entry.next = entry.salt_prev = entry.salt_next = None
        self._count -= 1
        return True

    def touch(self, entry: Entry) -> None:
        """Make ``entry`` the most recent, if it is in the order."""
        # The newest of all is also the newest of its salt: nothing to move.
        if entry is not self._newest and self.remove(entry):
            self.push(entry)

    def touch_all(self, entries: Sequence[Entry]) -> None:
        """``touch`` each of ``entries`` in turn, with no call for those that stay put: the
        newest already, or not in the order (pinned: a lookup's leased hits). Entries that
        already are the newest, in this order, are left as they are (a repeated lookup)."""
        node = self._newest
        for entry in reversed(entries):
            if node is not entry:
                break
            node = entry.prev
        else:
            return
        for entry in entries:
            if entry is self._newest or (entry.prev is None and self._oldest is not entry):
                continue
            self.remove(entry)
            self.push(entry)

    def __iter__(self) -> Iterator[Entry]:
        """Every entry, least recent first."""
        entry = self._oldest
        while entry is not None:
            yield entry
            entry = entry.next

    def of_salt(self, salt: str) -> Iterator[Entry]:
        """``salt``'s entries, least recent first."""
        ends = self._by_salt.get(salt)
        entry = ends.oldest if ends is not None else None
        while entry is not None:
            yield entry
            entry = entry.salt_next

    def clear(self) -> None:
        """Empty the order, unlinking every entry."""
        entry = self._oldest
        while entry is not None:
            after = entry.next
            entry.prev = entry.next = entry.salt_prev = entry.salt_next = None
            entry = after
        self._oldest = self._newest = None
        self._by_salt.clear()
        self._count = 0

    def problems(self) -> list[str]:
        """Broken links or counts, and disagreements between the global and per-salt lists."""
        problems: list[str] = []
        forward = _walk(self._oldest, "next", "prev", "global", problems)
        if forward and forward[-1] is not self._newest:
            problems.append("the global list's newest end is not its last entry")
        if len(forward) != self._count:
            problems.append(f"the global list holds {len(forward)} entries, its count says {self._count}")
        per_salt: set[int] = set()
        for salt, ends in self._by_salt.items():
            bucket = _walk(ends.oldest, "salt_next", "salt_prev", f"salt {salt!r}", problems)
            if bucket[-1:] != [ends.newest]:
                problems.append(f"salt {salt!r}'s newest end is not its last entry")
            if any(e.key.cache_salt != salt for e in bucket):
                problems.append(f"salt {salt!r}'s list holds another salt's entry")
            per_salt.update(id(e) for e in bucket)
        if per_salt != {id(e) for e in forward}:
            problems.append("the global and per-salt eviction orders disagree")
        return problems


def _walk(start: Entry | None, forward: str, backward: str, name: str, problems: list[str]) -> list[Entry]:
    """The entries of one list from ``start``, checking each backward link on the way."""
    seen: list[Entry] = []
    ids: set[int] = set()
    previous: Entry | None = None
    entry = start
    while entry is not None:
        if id(entry) in ids:
            problems.append(f"the {name} list loops")
            break
        if getattr(entry, backward) is not previous:
            problems.append(f"the {name} list has a broken backward link at {entry}")
        ids.add(id(entry))
        seen.append(entry)
        previous, entry = entry, getattr(entry, forward)
    return seen
