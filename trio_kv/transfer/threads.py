"""Blocking driver work in a worker thread that is waited for, whatever is cancelled.

A copy once enqueued writes L1 memory or an engine's blocks, and an opened IPC mapping
must be closed: neither can be abandoned mid-way, as ``trio.to_thread.run_sync`` with
``abandon_on_cancel=True`` would. So the thread is waited for in a shielded scope, and a
cancellation is passed to it as a ``threading.Event`` it checks, to give up at its next
safe point (before anything is enqueued, between two mappings).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import trio


async def run_to_completion(
    function: Callable[..., Any], *args: Any, stop: threading.Event, limiter: trio.CapacityLimiter
) -> Any:
    """``function(*args)`` in a worker thread; its result. A cancellation sets ``stop`` and is
    raised once the thread has returned (its result is then lost: ``function`` must leave
    anything it made where the caller can undo it)."""
    outcome: list[Any] = []
    finished = trio.Event()

    async def run_in_thread() -> None:
        with trio.CancelScope(shield=True):
            outcome.append(await trio.to_thread.run_sync(function, *args, limiter=limiter))
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_in_thread)
        try:
            await finished.wait()
        except trio.Cancelled:
            stop.set()
            raise
    return outcome[0]
