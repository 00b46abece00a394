"""The CUDA transfer path: engine KV blocks in device memory (CUDA IPC) <-> chunks in pinned L1.

``CudaTransfer`` has CpuTransfer's interface and *is* one: registrations without
a ``cuda`` part (shared-memory KV caches) and their copies go to the CPU path,
so one server serves both kinds of engine. For a CUDA registration it

- opens every allocation's IPC memory handle (``cuIpcOpenMemHandle``) in the
  primary context of the device whose UUID the registration names, in a worker
  thread (``aopen``), and derives the copy plan from the tensor descriptions
  (``plan.device_layout``); a cache no longer used is released (IPC handles
  closed) by the backend's releaser thread (``cuda_release``), never on the loop;
- creates two non-blocking streams per registered instance, one for stores and
  one, at the device's greatest priority, for retrieves; before a copy the
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
from collections.abc import Callable, Sequence
from typing import Any

import torch
import trio
from cuda.bindings import driver

from ..errors import ErrorCode, TrioKVError
from ..export.cuda_driver import CudaError, call, handle_from_bytes
from ..protocol import CudaRegistration, RegisterKVCache, TensorSpec
from . import CudaUnavailable
from .cpu import CopyJob, CpuTransfer, MappedKVCache
from .cuda_cache import MAX_OPEN_EVENTS, CudaResources, MappedCudaKVCache, Releaser
from .events import Copier, CopyAbandoned, Device, EngineEventTimeout, driver_status, run_copies
from .plan import ChunkCopy, check_cuda_registration, device_layout, plan_copies
from .threads import run_to_completion

__all__ = [
    "MAX_OPEN_EVENTS",
    "CudaTransfer",
    "CudaUnavailable",
    "MappedCudaKVCache",
    "cuda_available",
    "driver_status",
]

log = logging.getLogger(__name__)

DEFAULT_COPY_TIMEOUT_S = 30.0  # how long a copy waits for the engine's event


def cuda_available() -> bool:
    return driver_status() is None


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
        self.releaser = Releaser()  # closes IPC mappings off the event loop
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
        against a shared-memory file's owner; CUDA IPC handles name no file to check.
        Blocking, on the calling thread: the server uses ``aopen``."""
        if request.cuda is None:
            return super().open(request, owner_uid=owner_uid)
        return self._open_cuda(request, threading.Event())

    async def aopen(self, request: RegisterKVCache, *, owner_uid: int | None = None) -> MappedKVCache:
        """``open``, with a CUDA registration's IPC handles opened (one ``cuIpcOpenMemHandle``
        per allocation) in a worker thread, so the event loop runs meanwhile. Cancelled, it
        stops after the allocation being opened, closes what it opened, then raises; a failure
        closes what it opened too."""
        if request.cuda is None:
            return super().open(request, owner_uid=owner_uid)
        stop = threading.Event()
        opened: list[MappedCudaKVCache] = []
        try:
            args = (self._open_cuda, request, stop, opened)
            failure = await run_to_completion(_open_reporting, *args, stop=stop, limiter=self._threads)
        except BaseException:  # cancelled: the thread has returned, perhaps with a cache
            for cache in opened:
                cache.close()
            raise
        if failure is not None:
            raise failure
        return opened[0]

    def discard(self, cache: MappedKVCache) -> None:
        if isinstance(cache, MappedCudaKVCache):
            cache.close()
        else:
            super().discard(cache)

    def _open_cuda(self, request: RegisterKVCache, stop: threading.Event) -> MappedCudaKVCache:
        """Open a CUDA registration (blocking); raises OpenAbandoned once ``stop`` is set."""
        assert request.cuda is not None
        cuda: CudaRegistration = request.cuda
        check_cuda_registration(request.tensors, cuda)
        device = self._device(cuda.device_uuid)
        resources = CudaResources(device)
        cache: MappedCudaKVCache | None = None
        try:
            device.activate()
            bases = []
            for allocation in cuda.allocations:
                if stop.is_set():
                    raise OpenAbandoned("cancelled while opening the CUDA KV cache")
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
            cache = MappedCudaKVCache(layout, device, resources, self.releaser)
            if cuda.event_handle:
                try:  # held for the cache's life
                    cache.registered_event = cache.hold_event(cuda.event_handle)
                except TrioKVError as exc:
                    raise TrioKVError(ErrorCode.BAD_REGISTRATION, f"event_handle: {exc.message}") from None
            return cache
        except BaseException as exc:
            if cache is not None:
                cache._release.detach()  # released here, at once
            resources.release()
            if isinstance(exc, CudaError):
                raise TrioKVError(
                    ErrorCode.BAD_REGISTRATION, f"cannot map the CUDA KV cache: {exc}"
                ) from None
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
        return MappedCudaKVCache(layout, owner, CudaResources(owner), self.releaser)

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
        with cache.copying(ipc_event) as engine_event:
            async with self.copy_slots:
                failure = await self._run_copies(cache, engine_event, plan, to_host)
        if failure is None and to_host and cache.retired.is_set():
            # A dead engine's event may have completed with its blocks half written: keep nothing.
            failure = "the KV cache was unregistered during the copy (engine gone?); nothing is kept"
        if failure is not None:
            raise TrioKVError(ErrorCode.TRANSFER_FAILED, f"CUDA copy failed: {failure}")

    async def _run_copies(
        self, cache: MappedCudaKVCache, engine_event: Any, plan: Any, to_host: bool
    ) -> str | None:
        """``run_copies`` in a worker thread, waited for whatever is cancelled; a cancellation
        while it still waits for the engine's event stops that wait (nothing is enqueued yet)."""
        stop = threading.Event()
        args = (
            cache.device,
            cache.store_stream if to_host else cache.retrieve_stream,
            engine_event,
            plan,
            to_host,
            self.copier,
            self.copy_timeout_s,
            stop,
            cache.retired,
        )
        failure: str | None = await run_to_completion(
            _run_copies_reporting, *args, stop=stop, limiter=self._threads
        )
        return failure

    def problems(self) -> list[str]:
        """Devices whose context a sticky error (an illegal address, say) left unusable: every
        copy on them fails until the server is restarted."""
        return [
            f"CUDA device {device.ordinal}: {device.failed}; its context is unusable, restart the server"
            for device in self.devices
            if device.failed is not None
        ]

    async def wait_unmapped(self, cache: MappedKVCache, timeout_s: float = 10.0) -> bool:
        """Return once a retired CUDA ``cache`` has closed its IPC mappings (its copies have ended
        or stopped first); False if that took longer than ``timeout_s``."""
        if not isinstance(cache, MappedCudaKVCache) or cache.released.is_set():
            return True
        return await trio.to_thread.run_sync(cache.released.wait, timeout_s, abandon_on_cancel=True)

    # ------------------------------------------------------------ shutdown

    async def wait_released(self, timeout_s: float = 10.0) -> bool:
        """Return once the driver objects of every cache gone so far are released (the server's
        shutdown, tests); False if that took longer than ``timeout_s``."""
        if not self.releaser.pending:
            return True
        return await trio.to_thread.run_sync(self.releaser.wait, timeout_s, abandon_on_cancel=True)


class OpenAbandoned(RuntimeError):
    """The caller stopped waiting while a CUDA registration was being opened."""


def _open_reporting(
    open_cuda: Callable[[RegisterKVCache, threading.Event], MappedCudaKVCache],
    request: RegisterKVCache,
    stop: threading.Event,
    opened: list[MappedCudaKVCache],
) -> Exception | None:
    """``open_cuda``, the cache put in ``opened`` and a failure returned (not raised in Trio's
    worker thread: see ``_run_copies_reporting``)."""
    try:
        opened.append(open_cuda(request, stop))
    except Exception as exc:
        return exc
    return None


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
