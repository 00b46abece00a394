"""Byte accounting shared by every tier: totals and per-salt buckets. Pure."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType

import msgspec

log = logging.getLogger(__name__)


class AdapterUsage(msgspec.Struct, frozen=True):
    """A snapshot of one tier's usage. ``usage_fraction`` is -1.0 when capacity is unbounded."""

    total_bytes_used: int
    total_capacity_bytes: int | None
    bytes_by_salt: dict[str, int]
    usage_fraction: float


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
