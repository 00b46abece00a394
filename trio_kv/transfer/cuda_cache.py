"""A mapped CUDA KV cache: its stream, the engine's events it opened, its driver objects, and
the thread that releases them.

A mapped cache's IPC mappings, events and streams are released once nothing uses
the cache any more: when it is retired (unregistered, replaced, or its connection
went away) and no copy holds it, or when the last copy that held it ends; failing
that, when its last reference goes. That moment is on the Trio thread (or on
whichever thread drops the last reference), and ``cuIpcCloseMemHandle`` unmaps
device memory, which can take milliseconds per allocation. So releases are handed
to one ``Releaser`` thread per backend and done there in the order they came.

Retiring a cache also tells its copies still waiting for the engine's event to stop
(the engine may be dead, and its event may never complete), and no copy starts on it
afterwards. ``CudaResources.released`` is set once its mappings are closed: an
Unregister is answered only then, since by CUDA's rules the engine must not free
memory (or destroy events) another process still has open.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

from cuda.bindings import driver

from ..errors import ErrorCode, TrioKVError
from ..export.cuda_driver import CudaError, call, handle_from_bytes
from .cpu import CopyJob, MappedKVCache
from .events import Device
from .layout import KVLayout
from .plan import IPC_HANDLE_BYTES

log = logging.getLogger(__name__)

MAX_OPEN_EVENTS = 64  # per instance: idle IPC events kept open (from request handles)


class CudaResources:
    """Driver objects of one mapped cache, released together (``release``, on any thread)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.memory: list[Any] = []  # pointers from cuIpcOpenMemHandle
        self.events: list[Any] = []
        self.streams: list[Any] = []
        self.released = threading.Event()  # set once release() has run

    def release(self) -> None:
        try:
            self._release()
        finally:
            self.released.set()

    def _release(self) -> None:
        try:
            self.device.activate()
        except Exception as exc:
            log.warning("cannot release CUDA resources: %s", exc)
            return
        releases = [
            *((driver.cuEventDestroy, e) for e in self.events),
            *((driver.cuStreamDestroy, s) for s in self.streams),
            *((driver.cuIpcCloseMemHandle, m) for m in self.memory),
        ]
        for function, obj in releases:
            try:
                call(function, obj)
            except Exception as exc:  # shutting down or a broken context: keep releasing the rest
                log.warning("while releasing a CUDA KV cache: %s", exc)
        self.events, self.streams, self.memory = [], [], []


class Releaser:
    """Releases ``CudaResources`` in a worker thread of its own, in submission order.

    ``submit`` never blocks, so a finalizer may call it on any thread. The thread is a
    daemon started on the first submission; ``wait`` blocks until everything submitted
    before it is released (the server's shutdown waits on it, bounded).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[CudaResources] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, resources: CudaResources) -> None:
        with self._changed:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trio-kv-cuda-release", daemon=True)
                self._thread.start()
        self._queue.put(resources)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until nothing submitted is left to release; False if ``timeout_s`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending == 0, timeout_s)

    def _run(self) -> None:
        while True:
            resources = self._queue.get()
            try:
                resources.release()  # logs what it cannot release; never raises
            finally:
                del resources  # hold nothing while idle
                with self._changed:
                    self._pending -= 1
                    self._changed.notify_all()


class MappedCudaKVCache(MappedKVCache):
    """A registered CUDA KV cache: device-address layout, its device and its own streams (one
    per direction, retrieves at the device's greatest priority).

    Subclasses MappedKVCache only so the engine, typed against the CPU path, accepts
    it; it has no host views, so the CPU gather/scatter refuse it. Driver objects
    are released, by ``releaser``'s thread, when the last reference goes (copies in
    flight hold one), or at ``close``.
    """

    owner_pidfd = None  # IPC mappings name no owning process; the connection holds them

    def __init__(
        self, layout: KVLayout, device: Device, resources: CudaResources, releaser: Releaser
    ) -> None:
        self.layout = layout
        self.device = device
        self._resources = resources
        self._release = weakref.finalize(self, releaser.submit, resources)
        device.activate()
        # One stream per direction: a retrieve (the engine waits for it before its forward pass)
        # never queues behind stores' copies, and the two directions' copy engines run at once.
        flags = driver.CUstream_flags.CU_STREAM_NON_BLOCKING
        _, greatest = call(driver.cuCtxGetStreamPriorityRange)
        self.store_stream = call(driver.cuStreamCreate, flags)
        resources.streams.append(self.store_stream)
        self.retrieve_stream = call(driver.cuStreamCreateWithPriority, flags, greatest)
        resources.streams.append(self.retrieve_stream)
        self.registered_event: Any = None
        self._events: OrderedDict[bytes, Any] = OrderedDict()
        self._holds: dict[bytes, int] = {}  # copies (queued or running) that need the event
        self.retired = threading.Event()  # the registration is gone: waiting copies stop
        self._copies = 0  # copies (queued or running) on this cache; Trio thread only

    @property
    def released(self) -> threading.Event:
        """Set once the driver objects (IPC mappings first of all) are released."""
        return self._resources.released

    def close(self) -> None:
        """Release the driver objects now (in the releaser's thread): for a cache that was
        never registered, which no copy can hold."""
        self._release()

    def retire(self) -> None:
        """The registration is gone: copies still waiting for the engine's event stop, no copy
        starts, and the driver objects are released once no copy holds the cache."""
        self.retired.set()
        if not self._copies:
            self._release()

    @contextlib.contextmanager
    def copying(self, ipc_event: bytes) -> Iterator[Any]:
        """Hold the cache, and the request's ``ipc_event`` if it sent one, for one copy; yields
        the engine's event to wait for (that one, else the registration's, else None). Refused
        once the cache is retired; the last copy to end on a retired cache releases it."""
        if self.retired.is_set():
            raise TrioKVError(ErrorCode.UNKNOWN_INSTANCE, "the KV cache was unregistered")
        self._copies += 1
        try:
            if not ipc_event:
                yield self.registered_event
                return
            event = self.hold_event(ipc_event)
            try:
                yield event
            finally:
                self.release_event(ipc_event)
        finally:
            self._copies -= 1
            if not self._copies and self.retired.is_set():
                self._release()

    def gather(self, jobs: Sequence[CopyJob], part: int = 0, parts: int = 1) -> None:
        raise TypeError("a CUDA KV cache is copied by CudaTransfer, not by the CPU path")

    scatter = gather

    def hold_event(self, raw: bytes) -> Any:
        """The CUevent for an interprocess event handle, opened once and kept; it stays open at
        least until ``release_event(raw)`` (one release per hold)."""
        event = self._events.get(raw)
        if event is None:
            if len(raw) != IPC_HANDLE_BYTES:
                raise TrioKVError(ErrorCode.INVALID_ARGUMENT, f"ipc_event must be {IPC_HANDLE_BYTES} bytes")
            self.device.activate()
            try:
                event = call(driver.cuIpcOpenEventHandle, handle_from_bytes(driver.CUipcEventHandle, raw))
            except CudaError as exc:
                raise TrioKVError(ErrorCode.INVALID_ARGUMENT, f"cannot open ipc_event: {exc}") from None
            self._events[raw] = event
            self._resources.events.append(event)
        self._events.move_to_end(raw)
        self._holds[raw] = self._holds.get(raw, 0) + 1
        self._evict_idle_events()
        return event

    def release_event(self, raw: bytes) -> None:
        holds = self._holds.pop(raw) - 1
        if holds:
            self._holds[raw] = holds
        self._evict_idle_events()

    def _evict_idle_events(self) -> None:
        """Destroy the least recently used events no copy holds, down to MAX_OPEN_EVENTS."""
        excess = len(self._events) - MAX_OPEN_EVENTS
        idle = [raw for raw in self._events if raw not in self._holds][: max(0, excess)]
        if idle:
            self.device.activate()  # the calling thread may have another device's context current
        for raw in idle:
            event = self._events.pop(raw)
            self._resources.events.remove(event)
            call(driver.cuEventDestroy, event)
