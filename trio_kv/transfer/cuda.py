"""The CUDA transfer path: engine KV blocks in device memory (CUDA IPC) <-> chunks in pinned L1.

``CudaTransfer`` has CpuTransfer's interface and *is* one: registrations without
a ``cuda`` part (shared-memory KV caches) and their copies go to the CPU path,
so one server serves both kinds of engine. For a CUDA registration it

- opens every allocation's IPC memory handle (``cuIpcOpenMemHandle``) in the
  primary context of the device whose UUID the registration names, and derives
  the copy plan from the tensor descriptions (``plan.device_layout``);
- creates one non-blocking stream per registered instance; before a copy the
  worker thread waits, bounded by ``copy_timeout_s``, for the engine's
  interprocess event: the one sent with the request, else the one sent at
  registration, else none (the engine then must have synchronised before
  sending). An event that does not complete in time fails the copy with
  TRANSFER_FAILED before anything is enqueued;
- moves the bytes with ``events.run_copies`` in a worker thread: batched
  copies (or one per piece before CUDA 12.8), then a wait on a completion
  event that releases the GIL.

Opened interprocess events are kept per instance, at most ``MAX_OPEN_EVENTS``
idle ones (least recently used go first); an event a copy holds, queued or
running, is never destroyed.

Cancellation: a copy already enqueued cannot be recalled, so the thread that
enqueues and waits runs inside a shielded scope; a cancellation while it still
waits for the engine's event makes it give up at its next poll (within a
millisecond), before anything is enqueued. ``store`` and ``retrieve`` therefore
never return or raise while a copy they enqueued may still touch an L1 buffer,
and the engine's ``finally`` may free the buffers as soon as they do; a
cancellation lands at the caller's next checkpoint.

The L1 arena must be page-locked (``pin_host``, given to ``L1Store(pin=...)``);
a copy into a buffer outside every pinned range is refused.

What was and was not verified without a GPU: see ``events.py``.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import trio
from cuda.bindings import driver

from ..errors import ErrorCode, TrioKVError
from ..export.cuda_driver import CudaError, call, handle_from_bytes
from ..protocol import CudaRegistration, RegisterKVCache, TensorSpec
from . import CudaUnavailable
from .cpu import CopyJob, CpuTransfer, MappedKVCache
from .events import Copier, CopyAbandoned, Device, EngineEventTimeout, driver_status, run_copies
from .layout import KVLayout
from .plan import IPC_HANDLE_BYTES, ChunkCopy, check_cuda_registration, device_layout, plan_copies

__all__ = ["CudaTransfer", "CudaUnavailable", "MappedCudaKVCache", "cuda_available", "driver_status"]

log = logging.getLogger(__name__)

MAX_OPEN_EVENTS = 64  # per instance: idle IPC events kept open (from request handles)
DEFAULT_COPY_TIMEOUT_S = 30.0  # how long a copy waits for the engine's event


def cuda_available() -> bool:
    return driver_status() is None


class _Resources:
    """Driver objects of one mapped cache, released together once nothing uses the cache."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.memory: list[Any] = []  # pointers from cuIpcOpenMemHandle
        self.events: list[Any] = []
        self.streams: list[Any] = []

    def release(self) -> None:
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


class MappedCudaKVCache(MappedKVCache):
    """A registered CUDA KV cache: device-address layout, its device and its own stream.

    Subclasses MappedKVCache only so the engine, typed against the CPU path, accepts
    it; it has no host views, so the CPU gather/scatter refuse it. Driver objects
    are released when the last reference goes (copies in flight hold one).
    """

    owner_pidfd = None  # IPC mappings name no owning process; the connection holds them

    def __init__(self, layout: KVLayout, device: Device, resources: _Resources) -> None:
        self.layout = layout
        self.device = device
        self._resources = resources
        weakref.finalize(self, resources.release)
        device.activate()
        self.stream = call(driver.cuStreamCreate, driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
        resources.streams.append(self.stream)
        self.registered_event: Any = None
        self._events: OrderedDict[bytes, Any] = OrderedDict()
        self._holds: dict[bytes, int] = {}  # copies (queued or running) that need the event

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
        for raw in [raw for raw in self._events if raw not in self._holds][: max(0, excess)]:
            event = self._events.pop(raw)
            self._resources.events.remove(event)
            call(driver.cuEventDestroy, event)


class CudaTransfer(CpuTransfer):
    """Transfer backend for CUDA KV caches (and, through CpuTransfer, shared-memory ones).

    Raises CudaUnavailable when there is no usable device or driver. At most
    ``copies_in_flight`` CUDA copies run at once, each holding a worker thread.
    """

    name = "cuda"

    def __init__(
        self,
        threads: int = 2,
        shm_dir: str = "/dev/shm",
        *,
        copies_in_flight: int = 64,
        copy_timeout_s: float = DEFAULT_COPY_TIMEOUT_S,
    ) -> None:
        super().__init__(threads=threads, shm_dir=shm_dir)
        reason = driver_status()
        if reason is not None:
            raise CudaUnavailable(f"transfer backend 'cuda' cannot start: {reason}")
        self.devices = [Device(ordinal) for ordinal in range(call(driver.cuDeviceGetCount))]
        self.copy_slots = trio.CapacityLimiter(copies_in_flight)
        self.copy_timeout_s = copy_timeout_s
        self._threads = trio.CapacityLimiter(math.inf)  # slots are taken (cancellably) from copy_slots
        self._pinned: list[tuple[int, int]] = []
        self.copier = Copier()
        log.info("cuda transfer backend: %d device(s), %s", len(self.devices), self.copier.describe())

    # ------------------------------------------------------------ host memory

    def pin_host(self, tensor: torch.Tensor) -> None:
        """Page-lock a CPU tensor's bytes for every context (the L1 arena); unpinned when it is freed."""
        address, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        device = self.devices[0]
        device.activate()
        flags = driver.CU_MEMHOSTREGISTER_PORTABLE | driver.CU_MEMHOSTREGISTER_DEVICEMAP
        call(driver.cuMemHostRegister, address, nbytes, flags)
        span = (address, address + nbytes)
        self._pinned.append(span)
        weakref.finalize(tensor, _unpin, device, span, self._pinned)

    def _check_pinned(self, jobs: Sequence[CopyJob]) -> None:
        for job in jobs:
            start = job.buffer.data_ptr()
            end = start + job.buffer.numel() * job.buffer.element_size()
            if not any(low <= start and end <= high for low, high in self._pinned):
                raise TrioKVError(
                    ErrorCode.TRANSFER_FAILED,
                    "an L1 buffer is not page-locked: build L1Store with pin=transfer.pin_host",
                )

    # ------------------------------------------------------------ registration

    def _device(self, uuid: bytes) -> Device:
        for device in self.devices:
            if device.uuid == uuid:
                return device
        raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"no CUDA device with UUID {uuid.hex()} on this host")

    def open(self, request: RegisterKVCache, *, owner_uid: int | None = None) -> MappedKVCache:
        """Map a registration: CUDA IPC handles when it has a ``cuda`` part, else shared memory.
        Raises BAD_REGISTRATION for anything that cannot be mapped. ``owner_uid`` is checked
        against a shared-memory file's owner; CUDA IPC handles name no file to check."""
        if request.cuda is None:
            return super().open(request, owner_uid=owner_uid)
        cuda: CudaRegistration = request.cuda
        check_cuda_registration(request.tensors, cuda)
        device = self._device(cuda.device_uuid)
        resources = _Resources(device)
        try:
            device.activate()
            bases = []
            for allocation in cuda.allocations:
                handle = handle_from_bytes(driver.CUipcMemHandle, allocation.handle)
                flags = driver.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
                pointer = call(driver.cuIpcOpenMemHandle, handle, flags)
                resources.memory.append(pointer)
                _, mapped = call(driver.cuMemGetAddressRange, pointer)
                if allocation.size > mapped:
                    raise TrioKVError(
                        ErrorCode.BAD_REGISTRATION,
                        f"an allocation declared as {allocation.size} bytes maps only {mapped}",
                    )
                bases.append(int(pointer))
            layout = device_layout(
                request.tensors,
                request.block_size,
                [bases[i] for i in cuda.tensor_allocations],
                [cuda.allocations[i].size for i in cuda.tensor_allocations],
            )
            cache = MappedCudaKVCache(layout, device, resources)
            if cuda.event_handle:
                try:  # held for the cache's life
                    cache.registered_event = cache.hold_event(cuda.event_handle)
                except TrioKVError as exc:
                    raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"event_handle: {exc.message}") from None
            return cache
        except CudaError as exc:
            resources.release()
            raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"cannot map the CUDA KV cache: {exc}") from None
        except BaseException:
            resources.release()
            raise

    def open_local(
        self,
        tensors: Sequence[TensorSpec],
        block_size: int,
        bases: Sequence[int],
        sizes: Sequence[int],
        *,
        device: int = 0,
    ) -> MappedCudaKVCache:
        """Map device memory of this process (no IPC): ``tensors[i]`` lies in ``sizes[i]`` bytes
        from ``bases[i]``. The caller keeps that memory alive longer than the cache."""
        owner = self.devices[device]
        layout = device_layout(tensors, block_size, bases, sizes)
        return MappedCudaKVCache(layout, owner, _Resources(owner))

    # ------------------------------------------------------------ copies

    async def store(self, cache: MappedKVCache, jobs: Sequence[CopyJob], *, ipc_event: bytes = b"") -> None:
        """Copy blocks into L1 after the engine's event. Returns or raises only once no copy it
        enqueued can still run, so the caller may free the buffers then."""
        if not isinstance(cache, MappedCudaKVCache):
            await super().store(cache, jobs)
            return
        await self._transfer(cache, jobs, to_host=True, ipc_event=ipc_event)

    async def retrieve(
        self, cache: MappedKVCache, jobs: Sequence[CopyJob], *, ipc_event: bytes = b""
    ) -> None:
        """Copy L1 chunks into blocks after the engine's event; as ``store`` on cancellation."""
        if not isinstance(cache, MappedCudaKVCache):
            await super().retrieve(cache, jobs)
            return
        await self._transfer(cache, jobs, to_host=False, ipc_event=ipc_event)

    async def _transfer(
        self, cache: MappedCudaKVCache, jobs: Sequence[CopyJob], *, to_host: bool, ipc_event: bytes
    ) -> None:
        chunks = [
            ChunkCopy(job.block_ids, job.buffer.data_ptr(), job.buffer.numel(), job.first_block)
            for job in jobs
        ]
        plan = plan_copies(cache.layout, chunks)
        if not len(plan):
            return
        self._check_pinned(jobs)
        engine_event = cache.hold_event(ipc_event) if ipc_event else cache.registered_event
        try:
            async with self.copy_slots:
                failure = await self._run_copies(cache, engine_event, plan, to_host)
        finally:
            if ipc_event:
                cache.release_event(ipc_event)
        if failure is not None:
            raise TrioKVError(ErrorCode.TRANSFER_FAILED, f"CUDA copy failed: {failure}")

    async def _run_copies(
        self, cache: MappedCudaKVCache, engine_event: Any, plan: Any, to_host: bool
    ) -> str | None:
        """``run_copies`` in a worker thread, waited for whatever is cancelled; a cancellation
        while it still waits for the engine's event stops that wait (nothing is enqueued yet)."""
        stop = threading.Event()
        outcome: list[str | None] = []
        finished = trio.Event()

        async def run_in_thread() -> None:
            # From here a copy may be enqueued: it must be waited for, whatever is cancelled.
            with trio.CancelScope(shield=True):
                outcome.append(
                    await trio.to_thread.run_sync(
                        _run_copies_reporting,
                        cache.device,
                        cache.stream,
                        engine_event,
                        plan,
                        to_host,
                        self.copier,
                        self.copy_timeout_s,
                        stop,
                        limiter=self._threads,
                    )
                )
            finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_in_thread)
            try:
                await finished.wait()
            except trio.Cancelled:
                stop.set()
                raise
        return outcome[0]


def _run_copies_reporting(*args: Any) -> str | None:
    """``run_copies``, with a failure returned as text. An exception would stay referenced by
    Trio's idle worker thread until its next job, and with it every frame of its traceback,
    keeping this cache (its IPC mappings and stream) alive after it is unregistered."""
    try:
        run_copies(*args)
    except (EngineEventTimeout, CopyAbandoned) as exc:
        return str(exc)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _unpin(device: Device, span: tuple[int, int], pinned: list[tuple[int, int]]) -> None:
    if span in pinned:
        pinned.remove(span)
    try:
        device.activate()
        call(driver.cuMemHostUnregister, span[0])
    except Exception as exc:  # at interpreter exit the driver may already be gone
        log.debug("cuMemHostUnregister at %#x: %s", span[0], exc)
