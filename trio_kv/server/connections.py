"""The open connections of every nng listener: one ``Peer`` per pipe, with its credentials.

nng reports a pipe's arrival and departure from its own threads. A pipe's ``Peer`` is made
when it arrives (before any of its messages can be received) and marked closed when it goes,
both under a lock; what the engine must do about a departure (drop the pipe's registrations)
then runs on the Trio thread. A registration that races with its pipe's departure is either
refused (the peer is already closed) or dropped by that later Trio-side step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import pynng
import trio
from pynng import ffi, lib

from ..core.peers import Peer

log = logging.getLogger(__name__)


def _pipe_uint64(pipe: pynng.Pipe, option: bytes) -> int | None:
    value = ffi.new("uint64_t *")
    if lib.nng_pipe_get_uint64(pipe.pipe, option, value) != 0:
        return None  # not an ipc:// pipe, or the platform does not say
    return int(value[0])


class Connections:
    """Calls ``on_closed(peer)`` on the Trio thread once each connection has gone away."""

    def __init__(self, on_closed: Callable[[Peer], object]) -> None:
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._peers: dict[int, Peer] = {}
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self.closed_count = 0  # connections gone, as seen on the Trio thread
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._peers)

    def attach(self, sock: pynng.Socket, url: str, *, needs_token: bool) -> None:
        """Track ``sock``'s pipes (before it listens). On ``needs_token`` listeners a peer is
        unauthenticated until it says a valid token in Hello. Call from the Trio thread."""
        self._trio_token = trio.lowlevel.current_trio_token()

        def arrived(pipe: pynng.Pipe) -> None:
            peer = Peer(
                pipe.id,
                url,
                uid=_pipe_uint64(pipe, b"ipc:peer-uid"),
                pid=_pipe_uint64(pipe, b"ipc:peer-pid"),
                authenticated=not needs_token,
            )
            with self._lock:
                self._peers.setdefault(pipe.id, peer)

        sock.add_pre_pipe_connect_cb(arrived)
        sock.add_post_pipe_remove_cb(self._left)

    def peer_of(self, pipe: pynng.Pipe | None, url: str) -> Peer:
        """The peer a received message came from; a closed one if its pipe is gone already."""
        with self._lock:
            peer = None if pipe is None else self._peers.get(pipe.id)
        if peer is None:
            return Peer(-1 if pipe is None else pipe.id, url, authenticated=False, closed=True)
        return peer

    def peer_by_id(self, pipe_id: int, url: str) -> Peer:
        """The peer of pipe ``pipe_id``; a closed one if that pipe is gone already."""
        with self._lock:
            peer = self._peers.get(pipe_id)
        if peer is None:
            return Peer(pipe_id, url, authenticated=False, closed=True)
        return peer

    async def wait_closed(self, count: int) -> None:
        """Return once ``count`` connections in all have gone away (tests, tools)."""
        while self.closed_count < count:
            await self._changed.wait()

    def _left(self, pipe: pynng.Pipe) -> None:  # nng's thread
        with self._lock:
            peer = self._peers.pop(pipe.id, None)
            if peer is None:
                return
            peer.closed = True
        assert self._trio_token is not None
        # After the server has stopped there is nothing registered left to drop.
        with contextlib.suppress(trio.RunFinishedError):
            self._trio_token.run_sync_soon(self._closed, peer)

    def _closed(self, peer: Peer) -> None:  # the Trio thread
        try:
            self._on_closed(peer)
        except Exception:
            log.exception("dropping what %s held failed", peer.describe())
        self.closed_count += 1
        self._changed.set()
        self._changed = trio.Event()
