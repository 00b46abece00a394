"""The registered KV caches: instance id -> mapped cache, and which connection holds each.

An instance belongs to the connection (``Peer``) that registered it: another connection can
neither replace nor unregister it while that one is open, and it is dropped when that
connection goes away, or (sealed memfds) when the process that owns the memory exits. A
registration made with no peer (from inside the server's process) belongs to no connection.
A connection that closes and dials again (an engine reconnecting) may reach the server before
nng has reported the old pipe gone: a registration of an instance another open connection
holds therefore waits up to ``HOLDER_GRACE_S`` for that holder to go before it is refused.
Dropping one retires the mapping: a copy in flight keeps its own reference to it, and the
transfer backend releases it once nothing does (CUDA: copies still waiting for the engine
stop, and the IPC mappings are closed in a thread, off the event loop).
"""

from __future__ import annotations

import logging

import trio

from ..errors import ErrorCode, TrioKVError
from ..protocol import Registered, RegisterKVCache
from ..transfer import CpuTransfer, MappedKVCache
from .owners import OwnerWatch
from .peers import Peer

log = logging.getLogger(__name__)

HOLDER_GRACE_S = 1.0  # how long a registration waits for another connection's hold to end


class InstanceRegistry:
    def __init__(self) -> None:
        self.instances: dict[str, MappedKVCache] = {}
        self._holders: dict[str, Peer] = {}
        self._freed: dict[str, trio.Event] = {}  # set once the instance id's holder lets go
        # Registrations of sealed memfds are dropped when the process that owns the memory exits.
        self.owners = OwnerWatch(self._owner_exited)

    def register(self, transfer: CpuTransfer, request: RegisterKVCache, peer: Peer | None) -> Registered:
        """Open ``request`` with ``transfer`` (blocking) and register it for ``peer``. Registering
        a known instance id replaces it, unless another open connection holds it; on ipc:// the
        file must be the peer's own."""
        self.check_may_register(request.instance_id, peer)
        cache = transfer.open(request, owner_uid=None if peer is None else peer.uid)
        self.add(request.instance_id, cache, peer)
        return _registered(request, cache)

    async def aregister(
        self, transfer: CpuTransfer, request: RegisterKVCache, peer: Peer | None
    ) -> Registered:
        """``register``, opened with ``transfer.aopen`` (CUDA: in a worker thread). What the peer
        may do is checked again once it is open: the connection may have gone away meanwhile, and
        its drop found nothing to drop. A registration refused then, or cancelled, is closed.
        An instance another open connection holds is waited for (``HOLDER_GRACE_S``) first."""
        await self._wait_for_holder(request.instance_id, peer)
        self.check_may_register(request.instance_id, peer)
        cache = await transfer.aopen(request, owner_uid=None if peer is None else peer.uid)
        try:
            self.check_may_register(request.instance_id, peer)
            self.add(request.instance_id, cache, peer)
        except BaseException:
            transfer.discard(cache)
            raise
        return _registered(request, cache)

    def check_may_register(self, instance_id: str, peer: Peer | None) -> None:
        """Raise PERMISSION_DENIED if ``peer`` may not (re)register ``instance_id`` now."""
        if peer is not None and peer.closed:
            raise TrioKVError(ErrorCode.PERMISSION_DENIED, f"{peer.describe()} is closed")
        self._check_holder(instance_id, peer, "replace")

    def add(self, instance_id: str, cache: MappedKVCache, peer: Peer | None) -> None:
        """Register ``cache`` as ``instance_id`` for ``peer`` (after ``check_may_register``)."""
        self._check_holder(instance_id, peer, "replace")
        self._forget(instance_id)
        self.instances[instance_id] = cache
        if peer is not None:
            self._holders[instance_id] = peer
            peer.instances.add(instance_id)
        if cache.owner_pidfd is not None:
            self.owners.watch(cache, cache.owner_pidfd)

    def remove(self, instance_id: str, peer: Peer | None) -> bool:
        """Unregister ``instance_id``; False if it was not registered."""
        self._check_holder(instance_id, peer, "unregister")
        return self._forget(instance_id)

    def drop_peer(self, peer: Peer) -> int:
        """Unregister every instance ``peer`` holds (its connection went away); how many."""
        dropped = 0
        for instance_id in sorted(peer.instances):
            if self._holders.get(instance_id) is peer:
                self._forget(instance_id)
                dropped += 1
                log.info("KV cache %r unregistered: %s went away", instance_id, peer.describe())
        peer.instances.clear()
        return dropped

    async def aclose(self, transfer: CpuTransfer) -> None:
        """Unregister everything (the server stops) and wait until ``transfer`` has released it."""
        for instance_id in list(self.instances):
            self._forget(instance_id)
        if not await transfer.wait_released():
            log.warning("KV cache mappings were still being released at shutdown")

    def get(self, instance_id: str) -> MappedKVCache:
        cache = self.instances.get(instance_id)
        if cache is None:
            raise TrioKVError(ErrorCode.UNKNOWN_INSTANCE, f"no KV cache registered as {instance_id!r}")
        return cache

    async def _wait_for_holder(self, instance_id: str, peer: Peer | None) -> None:
        """Wait (bounded) until no other open connection holds ``instance_id``."""
        with trio.move_on_after(HOLDER_GRACE_S):
            while self._held_by_other(instance_id, peer):
                freed = self._freed.setdefault(instance_id, trio.Event())
                await freed.wait()

    def _held_by_other(self, instance_id: str, peer: Peer | None) -> bool:
        holder = self._holders.get(instance_id)
        return not (peer is None or holder is None or holder is peer or holder.closed)

    def _check_holder(self, instance_id: str, peer: Peer | None, action: str) -> None:
        if not self._held_by_other(instance_id, peer):
            return
        holder = self._holders[instance_id]
        raise TrioKVError(
            ErrorCode.PERMISSION_DENIED,
            f"cannot {action} {instance_id!r}: it belongs to {holder.describe()}, still open",
        )

    def _forget(self, instance_id: str) -> bool:
        cache = self.instances.pop(instance_id, None)
        holder = self._holders.pop(instance_id, None)
        if holder is not None:
            holder.instances.discard(instance_id)
        freed = self._freed.pop(instance_id, None)
        if freed is not None:
            freed.set()
        if cache is not None:
            self.owners.forget(cache)
            cache.retire()
        return cache is not None

    def _owner_exited(self, cache: object) -> None:
        for instance_id, registered in list(self.instances.items()):
            if registered is cache:
                self._forget(instance_id)
                log.info("KV cache %r unregistered: the process that owns its memory exited", instance_id)


def _registered(request: RegisterKVCache, cache: MappedKVCache) -> Registered:
    return Registered(request.instance_id, cache.layout.num_blocks, cache.layout.block_bytes)
