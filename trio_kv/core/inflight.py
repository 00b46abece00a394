"""Chunks in flight: being stored, or claimed by a request that will store them.

A lookup that reaches such a chunk waits for it (bounded) instead of missing, so
requests that share a prefix and arrive together load it from the one that computes
it. A chunk is *pending* from the moment a lookup with ``claim`` missed it (the
requester will compute and store it) or a Store reserved it, until that chunk's store
commits or fails, the claimer's connection goes away, or the deadline passes (``wait_s`` after the claim, pushed back each time the claimer stores
a chunk). Plain objects on the Trio thread; a waiting lookup holds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import trio

from ..keys import ObjectKey
from .l1 import Entry, L1Store
from .peers import Peer


def flat(chunks: Iterable[Sequence[ObjectKey]]) -> list[ObjectKey]:
    """The keys of ``chunks`` (each chunk's keys: one per rank), in order."""
    return [key for keys in chunks for key in keys]


Owner = tuple[str, str]  # (cache_salt, request_id) of the request that will store the chunk


class OwnerDeadline:
    """One owner's deadline, shared by all its pending chunks: its progress pushes back all."""

    __slots__ = ("at", "entries")

    def __init__(self, at: float) -> None:
        self.at = at
        self.entries = 0


class Pending:
    __slots__ = ("deadline", "event", "owner", "peer", "writing")

    def __init__(self, owner: Owner, peer: Peer | None, deadline: OwnerDeadline, writing: bool) -> None:
        self.owner = owner
        self.peer = peer  # the connection that claimed it (None: a store's own reservation)
        self.deadline = deadline
        self.writing = writing  # a Store reserved it (not only claimed): its bytes are being copied
        self.event = trio.Event()  # set once the entry leaves the table, whatever the reason


class InflightChunks:
    """The pending chunks, oldest first. ``wait_s`` <= 0 turns the whole thing off."""

    def __init__(
        self,
        wait_s: float,
        *,
        max_waiters: int = 32,
        clock: Callable[[], float] = trio.current_time,
        max_entries: int = 1 << 18,
    ) -> None:
        self.wait_s = wait_s
        # Each waiting lookup holds one of the server's request workers: never all of them, or
        # the stores they wait for could not get in.
        self.max_waiters = max_waiters
        self.waiting = 0
        self._clock = clock
        self.max_entries = max_entries
        self._pending: dict[ObjectKey, Pending] = {}
        self._deadlines: dict[Owner, OwnerDeadline] = {}
        self.hits = 0  # chunks a lookup found only after waiting for chunks in flight
        self.wait_timeouts = 0  # waits that ended at the deadline, the chunk not stored

    def __len__(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ what makes a chunk pending

    def claim(self, keys: Iterable[ObjectKey], owner: Owner, peer: Peer | None) -> int:
        """Mark ``keys`` as to be stored by ``owner`` (keys pending for another are left as they
        are); returns how many were claimed: none when turned off or full."""
        if self.wait_s <= 0:
            return 0
        self._expire()
        deadline = self._progress(owner)
        claimed = 0
        for key in keys:
            held = self._pending.get(key)
            if held is None:
                if len(self._pending) >= self.max_entries:
                    break
                self._put(key, Pending(owner, peer, deadline, writing=False))
            elif held.owner != owner:
                continue
            claimed += 1
        self._forget_if_unused(owner)
        return claimed

    def writing(self, keys: Iterable[ObjectKey], owner: Owner) -> None:
        """A Store reserved ``keys`` and is copying their bytes: pending until ``settle``."""
        if self.wait_s <= 0:
            return
        deadline = self._progress(owner)
        for key in keys:
            held = self._pending.get(key)
            entry = Pending(owner, None if held is None else held.peer, deadline, writing=True)
            if held is not None:
                entry.event = held.event  # its waiters keep waiting for the same chunk
                held.deadline.entries -= 1
                if held.owner != owner:
                    self._forget_if_unused(held.owner)
            self._put(key, entry)

    def settle(self, keys: Iterable[ObjectKey], owner: Owner) -> None:
        """``keys``' stores have committed or failed: wake their waiters. ``owner`` made progress,
        so its other pending chunks get a fresh deadline."""
        for key in keys:
            held = self._pop(key)
            if held is not None:
                held.event.set()
        if owner in self._deadlines:
            self._progress(owner)

    def drop_peer(self, peer: Peer) -> None:
        """``peer``'s connection went away: what it claimed will not be stored by it."""
        self._drop(lambda p: p.peer is peer and not p.writing)

    # ------------------------------------------------------------ the lookup's walk

    async def walk(
        self, l1: L1Store, chunk_keys: Sequence[Sequence[ObjectKey]], owner: Owner
    ) -> list[list[Entry]]:
        """The leading chunks ready in L1 for each of their keys, touched. A chunk pending for
        another request is waited for (until it settles or its deadline), then the walk starts
        over, since what it saw may have been evicted meanwhile. Cancellation leaves nothing:
        a waiting walk holds no pin, lease or reservation."""
        waited: set[int] = set()
        while True:
            ready, pending = self._scan(l1, chunk_keys, owner)
            if pending is None:
                if waited:  # what it found past the first chunk it had to wait for
                    self.hits += max(0, len(ready) - min(waited))
                _touch(l1, ready)
                return ready
            waited.add(len(ready))
            await self._wait(pending)

    def walk_now(
        self, l1: L1Store, chunk_keys: Sequence[Sequence[ObjectKey]], owner: Owner, *, whole: bool = False
    ) -> list[list[Entry]] | None:
        """``walk`` where it would not wait, else None (and nothing touched). With ``whole``,
        also None unless every chunk is ready."""
        ready, pending = self._scan(l1, chunk_keys, owner)
        if pending is not None or (whole and len(ready) < len(chunk_keys)):
            return None
        _touch(l1, ready)
        return ready

    def _scan(
        self, l1: L1Store, chunk_keys: Sequence[Sequence[ObjectKey]], owner: Owner
    ) -> tuple[list[list[Entry]], Pending | None]:
        """The leading chunks ready for every key, and what a walk waits for at the first that
        is not (None: nothing to wait for, the walk ends there)."""
        ready = l1.ready_prefix(chunk_keys)
        if len(ready) == len(chunk_keys):
            return ready, None
        return ready, self._first_pending(chunk_keys[len(ready)], owner)

    async def _wait(self, pending: Pending) -> None:
        self.waiting += 1
        try:
            await self._wait_for(pending)
        finally:
            self.waiting -= 1

    async def _wait_for(self, pending: Pending) -> None:
        while not pending.event.is_set():
            if self._clock() >= pending.deadline.at:
                self.wait_timeouts += 1
                # Every chunk of that deadline is as late: each waiter on one stops here.
                self._drop(lambda p: p.deadline is pending.deadline)
                return
            with trio.move_on_at(pending.deadline.at):  # the deadline may move: look again after it
                await pending.event.wait()

    def _first_pending(self, keys: Sequence[ObjectKey], owner: Owner) -> Pending | None:
        for key in keys:
            held = self._pending.get(key)
            # A request does not wait for its own claim (a lookup again after a preemption).
            if held is not None and (held.owner != owner or held.writing):
                return held if self.waiting < self.max_waiters else None
        return None

    # ------------------------------------------------------------ bookkeeping

    def _progress(self, owner: Owner) -> OwnerDeadline:
        deadline = self._deadlines.get(owner)
        if deadline is None:
            deadline = self._deadlines[owner] = OwnerDeadline(0.0)
        deadline.at = self._clock() + self.wait_s
        return deadline

    def _forget_if_unused(self, owner: Owner) -> None:
        deadline = self._deadlines.get(owner)
        if deadline is not None and deadline.entries == 0:
            del self._deadlines[owner]

    def _put(self, key: ObjectKey, entry: Pending) -> None:
        self._pending[key] = entry
        entry.deadline.entries += 1

    def _pop(self, key: ObjectKey) -> Pending | None:
        held = self._pending.pop(key, None)
        if held is not None:
            held.deadline.entries -= 1
            self._forget_if_unused(held.owner)
        return held

    def _expire(self) -> None:
        """Drop the oldest entries while they are past their deadline (memory only: a waiter
        checks the deadline itself)."""
        now = self._clock()
        while self._pending:
            key, held = next(iter(self._pending.items()))
            if held.deadline.at > now:
                return
            self._pop(key)
            held.event.set()

    def _drop(self, gone: Callable[[Pending], bool]) -> None:
        for key in [k for k, p in self._pending.items() if gone(p)]:
            held = self._pop(key)
            assert held is not None
            held.event.set()


def _touch(l1: L1Store, ready: list[list[Entry]]) -> None:
    l1.touch_all([entry for chunk in ready for entry in chunk])
