"""The L2 adapter interface: pure I/O against one store, and its health.

An adapter stores whole chunks ("objects") under their ObjectKey through five
primitives (``put``, ``get_into``, ``contains``, ``delete``, ``scan``). It keeps
no accounting: the byte ledger, pins, quotas and eviction belong to the tier
that wraps it (``core.l2_tier.L2Tier``).

Primitives may block in threads (bounded by ``self.limiter``) but must be
cancellation-safe: an object is either fully published or absent.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence

import msgspec
import trio

from ..keys import ObjectKey


class AdapterError(Exception):
    """An adapter operation failed (I/O error, endpoint down, breaker open)."""


class Unavailable(AdapterError):
    """The adapter did not ask its store, which it knows to be unreachable (a circuit
    breaker is open). A read that raises it is a miss of an object that is most likely
    still there; a scan that raises it can be tried again once ``wait_available`` returns."""


class Hit(msgspec.Struct, frozen=True):
    """A read that filled the buffer. ``layout``: the fingerprint of the KV layout that
    stored the object ("" for objects written without one)."""

    layout: str = ""


class StoreMissing(AdapterError):
    """The store itself does not exist (an S3 bucket): a setting is wrong or the store was
    removed, and calling again soon will not help. At start it is a configuration error."""


class AdapterHealth(msgspec.Struct, frozen=True):
    healthy: bool
    state: str = "ok"  # e.g. "ok", "breaker-open", "degraded"
    reason: str = ""


class L2Adapter(abc.ABC):
    """Base class of every L2 adapter. ``name`` identifies it in logs, status and metrics;
    ``limiter`` bounds its blocking calls in threads."""

    kind = "abstract"
    needs_capacity = False  # True where the store has a fixed size (a disk): warn without a capacity

    def __init__(self, name: str, *, max_threads: int = 8) -> None:
        self.name = name
        self.limiter = trio.CapacityLimiter(max_threads)

    @abc.abstractmethod
    async def put(self, key: ObjectKey, payload: memoryview, layout: str = "") -> None:
        """Publish ``payload`` under ``key`` atomically, with the fingerprint of the KV layout
        that stored it; raise AdapterError on failure."""

    @abc.abstractmethod
    async def get_into(self, key: ObjectKey, buffer: memoryview) -> Hit | None:
        """Fill ``buffer`` with the object's bytes; None if absent, corrupt or of another size."""

    @abc.abstractmethod
    async def contains(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Which keys are stored (one round trip or scan for the batch where possible)."""

    @abc.abstractmethod
    async def delete(self, keys: Sequence[ObjectKey]) -> None:
        """Delete objects; absent ones are not an error."""

    @abc.abstractmethod
    def scan(self) -> AsyncIterator[tuple[ObjectKey, int]]:
        """Every stored object and its payload size (for recovery at start)."""

    def health(self) -> AdapterHealth:
        return AdapterHealth(healthy=True)

    async def wait_available(self) -> None:
        """Return once a call that raised Unavailable may succeed; adapters that raise it
        override this (the default returns at once)."""
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The adapter's own background tasks (e.g. a breaker's probe); none by default.
        Reports started at once; runs until cancelled or, with nothing to do, returns."""
        task_status.started()
