"""Byte accounting shared by every tier: totals and per-salt buckets. Pure."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

from ..keys import ObjectKey
from ..protocol import AdapterUsage

log = logging.getLogger(__name__)


class ByteLedger:
    """Bytes in use, in total and per cache_salt, against an optional capacity.

    Only positive salt buckets are kept. A release that would drive a count
    below zero clamps it at zero and logs a warning (it means a caller
    double-released, which tests treat as a bug). Listeners are called after
    every change, with the ledger already updated.
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.total = 0
        self._by_salt: dict[str, int] = {}
        self._listeners: list[Callable[[ByteLedger], None]] = []

    def add_listener(self, listener: Callable[[ByteLedger], None]) -> None:
        self._listeners.append(listener)

    def charge(self, salt: str, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot charge a negative byte count: {nbytes}")
        if nbytes == 0:
            return
        self.total += nbytes
        self._by_salt[salt] = self._by_salt.get(salt, 0) + nbytes
        self._notify()

    def release(self, salt: str, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"cannot release a negative byte count: {nbytes}")
        if nbytes == 0:
            return
        bucket = self._by_salt.get(salt, 0)
        if nbytes > bucket or nbytes > self.total:
            log.warning(
                "ledger release of %d bytes for salt %r exceeds its %d bytes; clamping at 0",
                nbytes,
                salt,
                bucket,
            )
        remaining = bucket - nbytes
        if remaining > 0:
            self._by_salt[salt] = remaining
        else:
            self._by_salt.pop(salt, None)
        self.total = max(0, self.total - min(nbytes, bucket))
        self._notify()

    def reset(self) -> None:
        self.total = 0
        self._by_salt.clear()
        self._notify()

    def salt_bytes(self, salt: str) -> int:
        return self._by_salt.get(salt, 0)

    @property
    def bytes_by_salt(self) -> Mapping[str, int]:
        """A read-only view of the positive per-salt buckets."""
        return MappingProxyType(self._by_salt)

    def usage(self) -> AdapterUsage:
        fraction = -1.0 if not self.capacity else self.total / self.capacity
        return AdapterUsage(
            total_bytes_used=self.total,
            total_capacity_bytes=self.capacity,
            bytes_by_salt=dict(self._by_salt),
            usage_fraction=fraction,
        )

    def _notify(self) -> None:
        for listener in self._listeners:
            listener(self)


LedgerListener = Callable[[str, Sequence[ObjectKey]], None]


class KeyedLedger(ByteLedger):
    """A ByteLedger that knows which keys hold its bytes, in least-recently-used order.

    ``add`` of a key already present counts 0 bytes but refreshes its recency;
    ``remove`` of an unknown key counts 0. Listeners registered with
    ``add_key_listener`` hear ``("add" | "touch" | "remove", keys)`` after the
    ledger is updated (eviction policies and metrics listen here).
    """

    def __init__(self, capacity: int | None) -> None:
        super().__init__(capacity)
        self._sizes: OrderedDict[ObjectKey, int] = OrderedDict()
        self._salt_order: dict[str, OrderedDict[ObjectKey, None]] = {}
        self._key_listeners: list[LedgerListener] = []

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def add_key_listener(self, listener: LedgerListener) -> None:
        self._key_listeners.append(listener)

    def size_of(self, key: ObjectKey) -> int | None:
        return self._sizes.get(key)

    def add(self, keys: Sequence[ObjectKey], sizes: Sequence[int]) -> int:
        """Record stored objects; returns the bytes newly counted."""
        if len(keys) != len(sizes):
            raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes")
        added, fresh, touched = 0, [], []
        for key, size in zip(keys, sizes):
            if size < 0:
                raise ValueError(f"negative size {size} for {key}")
            if key in self._sizes:
                self._refresh(key)
                touched.append(key)
                continue
            self._sizes[key] = size
            self._salt_order.setdefault(key.cache_salt, OrderedDict())[key] = None
            self.charge(key.cache_salt, size)
            added += size
            fresh.append(key)
        self._notify_keys("add", fresh)
        self._notify_keys("touch", touched)
        return added

    def touch(self, keys: Sequence[ObjectKey]) -> None:
        """Mark keys as just used (a read hit)."""
        present = [k for k in keys if k in self._sizes]
        for key in present:
            self._refresh(key)
        self._notify_keys("touch", present)

    def remove(self, keys: Sequence[ObjectKey]) -> int:
        """Forget deleted objects; returns the bytes released."""
        removed, gone = 0, []
        for key in keys:
            size = self._sizes.pop(key, None)
            if size is None:
                continue
            order = self._salt_order[key.cache_salt]
            del order[key]
            if not order:
                del self._salt_order[key.cache_salt]
            self.release(key.cache_salt, size)
            removed += size
            gone.append(key)
        self._notify_keys("remove", gone)
        return removed

    def least_recent(self, salt: str | None = None) -> Iterator[ObjectKey]:
        """Keys (of one salt, or all) from least to most recently used; a snapshot, so the
        ledger may change while it is iterated."""
        if salt is None:
            return iter(list(self._sizes))
        return iter(list(self._salt_order.get(salt, ())))

    def oldest(
        self, salt: str | None = None, skip: Callable[[ObjectKey], bool] | None = None
    ) -> ObjectKey | None:
        """The least recently used key (of one salt, or of all) that ``skip`` does not reject;
        walks the live order without copying it."""
        order: Iterable[ObjectKey] = self._sizes if salt is None else self._salt_order.get(salt, ())
        for key in order:
            if skip is None or not skip(key):
                return key
        return None

    def keys_of_salt(self, salt: str) -> list[ObjectKey]:
        return list(self._salt_order.get(salt, ()))

    def salts(self) -> list[str]:
        """Salts that hold at least one key."""
        return list(self._salt_order)

    def _refresh(self, key: ObjectKey) -> None:
        self._sizes.move_to_end(key)
        self._salt_order[key.cache_salt].move_to_end(key)

    def clear_keys(self) -> None:
        gone = list(self._sizes)
        self._sizes.clear()
        self._salt_order.clear()
        self.reset()
        self._notify_keys("remove", gone)

    def _notify_keys(self, event: str, keys: Sequence[ObjectKey]) -> None:
        if keys:
            for listener in self._key_listeners:
                listener(event, keys)
