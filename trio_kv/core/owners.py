"""Watch the processes that own registered KV memory; report each one's exit once.

Each watched process is a pidfd (readable once the process exits), waited on
by Trio without polling. ``watch`` and ``forget`` are plain calls from the Trio
thread; ``run`` is the task (in the server's nursery) that does the waiting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable

import trio


class OwnerWatch:
    """Calls ``on_exit(key)`` when the process behind ``key``'s pidfd exits, unless forgotten first."""

    def __init__(self, on_exit: Callable[[Hashable], None]) -> None:
        self._on_exit = on_exit
        self._send, self._receive = trio.open_memory_channel[tuple[Hashable, int, trio.CancelScope]](math.inf)
        self._scopes: dict[Hashable, trio.CancelScope] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    def watch(self, key: Hashable, pidfd: int) -> None:
        """Start watching; the watch owns ``pidfd`` from now on and closes it when it ends."""
        self.forget(key)
        scope = trio.CancelScope()
        self._scopes[key] = scope
        self._send.send_nowait((key, pidfd, scope))

    def forget(self, key: Hashable) -> None:
        """Stop watching ``key`` (no call to ``on_exit``); a key not watched is ignored."""
        scope = self._scopes.pop(key, None)
        if scope is not None:
            scope.cancel()

    async def run(self) -> None:
        """Wait on every watched pidfd until cancelled; a cancelled run closes them all."""
        async with trio.open_nursery() as nursery:
            async for key, pidfd, scope in self._receive:
                nursery.start_soon(self._wait_for_exit, key, pidfd, scope)

    async def _wait_for_exit(self, key: Hashable, pidfd: int, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await trio.lowlevel.wait_readable(pidfd)
            if not scope.cancel_called and self._scopes.get(key) is scope:
                del self._scopes[key]
                self._on_exit(key)
        finally:
            os.close(pidfd)
