"""Leases: a lookup's promise that the chunks it counted stay in L1 until they are read.

A lease set belongs to one (cache_salt, request_id). Each lease pins one L1
entry and ends on retrieve, ReleaseLookup, EndSession, a new lookup for the same
request, or its deadline (the backstop against clients that vanish).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence

from ..keys import ObjectKey
from .l1 import Entry, L1Store

LeaseOwner = tuple[str, str]  # (cache_salt, request_id)


class _LeaseSet:
    __slots__ = ("deadline", "held")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.held: dict[ObjectKey, tuple[int, Entry]] = {}  # key -> (chunk index, entry)


def _same_chunks(held: dict[ObjectKey, tuple[int, Entry]], chunks: Sequence[tuple[int, Entry]]) -> bool:
    """Whether ``chunks`` are exactly the ``(chunk index, entry)`` pairs ``held``, in order."""
    if len(held) != len(chunks):
        return False
    for (index, entry), (held_index, held_entry) in zip(chunks, held.values()):
        if entry is not held_entry or index != held_index:
            return False
    return True


class LeaseTable:
    def __init__(self, l1: L1Store) -> None:
        self._l1 = l1
        self._sets: dict[LeaseOwner, _LeaseSet] = {}
        self._deadlines: list[tuple[float, int, LeaseOwner]] = []
        self._sequence = itertools.count()
        self.expired = 0

    def __len__(self) -> int:
        """Leases held (one per pinned entry per owner)."""
        return sum(len(s.held) for s in self._sets.values())

    def owners(self) -> int:
        return len(self._sets)

    def grant(self, owner: LeaseOwner, chunks: Sequence[tuple[int, Entry]], deadline: float) -> int:
        """Lease ``(chunk index, entry)`` pairs to ``owner``, replacing what it held before.

        A lease the owner already held on the same entry is carried over, not dropped and
        taken again (a repeated lookup for one request pins nothing twice); what the new set
        does not hold is released after the new set is pinned, so shared chunks never become
        evictable in between."""
        previous = self._sets.get(owner)
        if previous is not None and _same_chunks(previous.held, chunks):
            # A lookup repeated while nothing changed (a waiting request asked again): the
            # leases stay as they are, only their deadline moves.
            previous.deadline = deadline
            self._push_deadline(deadline, owner)
            return len(previous.held)
        self._sets.pop(owner, None)
        before = previous.held if previous is not None else {}
        fresh = _LeaseSet(deadline)
        for chunk_index, entry in chunks:
            key = entry.key
            if key in fresh.held:
                continue
            held = before.get(key)
            if held is not None and held[1] is entry:
                del before[key]  # still pinned by this owner: carried over
            else:
                self._l1.add_lease(entry)
            fresh.held[key] = (chunk_index, entry)
        for _, entry in before.values():
            self._l1.drop_lease(entry)
        if fresh.held:
            self._sets[owner] = fresh
            self._push_deadline(deadline, owner)
        return len(fresh.held)

    def _push_deadline(self, deadline: float, owner: LeaseOwner) -> None:
        """Queue ``owner``'s new deadline. The entries of replaced or released sets stay in
        the heap until they reach its top; once they outnumber the live sets the heap is
        rebuilt, so lookups repeated at a high rate cannot grow it for a whole TTL."""
        if len(self._deadlines) > 2 * len(self._sets) + 64:
            self._deadlines = [
                (lease_set.deadline, next(self._sequence), live_owner)
                for live_owner, lease_set in self._sets.items()
                if live_owner != owner
            ]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), owner))

    def heap_size(self) -> int:
        """Deadline entries queued, live or stale (tests)."""
        return len(self._deadlines)

    def release_keys(self, owner: LeaseOwner, keys: Iterable[ObjectKey]) -> int:
        lease_set = self._sets.get(owner)
        if lease_set is None:
            return 0
        released = 0
        for key in keys:
            held = lease_set.held.pop(key, None)
            if held is not None:
                self._l1.drop_lease(held[1])
                released += 1
        if not lease_set.held:
            del self._sets[owner]
        return released

    def release_chunks(self, owner: LeaseOwner, start_chunk: int, end_chunk: int | None) -> int:
        """Release leases on chunk indexes in ``[start_chunk, end_chunk)`` (None: to the end)."""
        lease_set = self._sets.get(owner)
        if lease_set is None:
            return 0
        keys = [
            key
            for key, (index, _) in lease_set.held.items()
            if index >= start_chunk and (end_chunk is None or index < end_chunk)
        ]
        return self.release_keys(owner, keys)

    def release_all(self, owner: LeaseOwner) -> int:
        return self._drop_set(owner)

    def release_salt(self, salt: str) -> int:
        return sum(self._drop_set(owner) for owner in list(self._sets) if owner[0] == salt)

    def clear(self) -> int:
        return sum(self._drop_set(owner) for owner in list(self._sets))

    def next_deadline(self) -> float | None:
        while self._deadlines:
            deadline, _, owner = self._deadlines[0]
            lease_set = self._sets.get(owner)
            if lease_set is not None and lease_set.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)  # stale: replaced or released
        return None

    def expire(self, now: float) -> int:
        """Release every lease set whose deadline has passed; returns leases released."""
        released = 0
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, owner = heapq.heappop(self._deadlines)
            count = self._drop_set(owner)
            released += count
            self.expired += count
        return released

    def count_by_entry(self) -> dict[int, int]:
        """Leases per entry (by id) for audits."""
        counts: dict[int, int] = {}
        for lease_set in self._sets.values():
            for _, entry in lease_set.held.values():
                counts[id(entry)] = counts.get(id(entry), 0) + 1
        return counts

    def _drop_set(self, owner: LeaseOwner) -> int:
        lease_set = self._sets.pop(owner, None)
        if lease_set is None:
            return 0
        for _, entry in lease_set.held.values():
            self._l1.drop_lease(entry)
        return len(lease_set.held)
