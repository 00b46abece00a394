"""CUDA driver plumbing: checked calls, IPC handle bytes, devices, and running copies to completion.

``run_copies`` is the one place bytes move on the CUDA path. It runs in a
worker thread, in two stages:

1. it waits, from the host, for the engine's interprocess event: ``cuEventQuery``
   polled with a short backoff, up to a deadline, and given up at once when the
   caller asks (``stop``). Nothing is enqueued before the event is complete, so a
   hung or killed engine costs one bounded wait and never a stream blocked on the
   GPU behind an event that may never complete (``cuStreamWaitEvent`` cannot be
   bounded or recalled);
2. it enqueues every piece of the plan (one ``cuMemcpyBatchAsync`` call per
   million pieces, or one ``cuMemcpyAsync`` per piece on drivers before CUDA
   12.8), records a blocking-sync event and blocks in ``cuEventSynchronize``,
   which releases the GIL. Copies once enqueued are always waited for: they
   write L1 memory or the engine's blocks, and they no longer depend on the engine.

So the Trio thread neither blocks nor polls (``trio.sleep`` is ~1 ms coarse),
and the thread's return is the completion signal.

``cuMemcpyBatchAsync`` is called through ``ctypes`` on the plan's numpy arrays,
at the entry point ``cuGetProcAddress`` gives for CUDA 12.8 (the signature with
``failIdx``, which newer drivers keep), resolved once when the backend starts
(``Copier``): the cuda-bindings wrapper wants a list of ``CUdeviceptr`` objects,
about 0.2 us of Python per piece, 3 ms for the 16,384 pieces of 16 per-layer
chunks. vLLM's ``simple_kv_offload`` calls it the same way.

A host function (``cuLaunchHostFunc``) writing an eventfd was the other option.
It was not taken: a Python host function needs the GIL on the driver's callback
thread, which can deadlock against a thread that enters the driver holding the
GIL, and it stalls the stream while it waits for the GIL.

Verified without a GPU (cuda-bindings 13.4.4, no driver): names, signatures and
result tuples from the installed docstrings; argument marshalling (IPC handles
as 64 raw bytes through ``getPtr()``, since 13.4 removed ``.reserved``); that
cuda-bindings' ``CUmemcpyAttributes`` is laid out as CUDA's struct (six 32-bit
fields), so its ``getPtr()`` can go to the ctypes call; and the whole path
(export, IPC open, event waits, batched and per-piece copies, completion,
release) against a stub libcuda.so.1 whose streams run later, whose events
complete only once the work before their record is done, and which refuses
destroyed handles (tests/test_gpu_stub.py). Not verified: a real driver and
device (tests/test_gpu_cuda.py, skipped here): IPC opens across processes,
``cuMemGetAddressRange`` on IPC mappings, stream and event semantics, and
throughput (``trio-kv bench gpu``).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from cuda.bindings import driver

from ..export.cuda_driver import CudaError, call
from .plan import CopyPlan

MIN_DRIVER_VERSION = 12000  # what cuda-bindings 12.x and 13.x load
BATCH_DRIVER_VERSION = 12080  # cuMemcpyBatchAsync appeared in CUDA 12.8
MAX_BATCH = 1 << 20  # pieces per cuMemcpyBatchAsync call
SIZE_MAX = (1 << 64) - 1  # failIdx when no single piece is to blame
POLL_FIRST_S, POLL_MAX_S = 20e-6, 1e-3  # backoff while polling the engine's event


UNREGISTERED_WHILE_WAITING = "the KV cache was unregistered while its copy waited for the engine's event"


# After these the context is unusable: "any further CUDA work will return the same error. To
# continue using CUDA, the process must be terminated and relaunched" (CUDA's CUresult docs).
STICKY_ERRORS = frozenset(
    int(getattr(driver.CUresult, name))
    for name in (
        "CUDA_ERROR_ECC_UNCORRECTABLE",
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        "CUDA_ERROR_HARDWARE_STACK_ERROR",
        "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        "CUDA_ERROR_MISALIGNED_ADDRESS",
        "CUDA_ERROR_INVALID_ADDRESS_SPACE",
        "CUDA_ERROR_INVALID_PC",
        "CUDA_ERROR_LAUNCH_FAILED",
    )
    if hasattr(driver.CUresult, name)
)


class EngineEventError(CudaError):
    """Querying the engine's event failed: the engine's trouble, not this server's context's."""


class EngineEventTimeout(RuntimeError):
    """The engine's event did not complete in time: nothing was enqueued."""


class CopyAbandoned(RuntimeError):
    """The caller stopped waiting for the engine's event: nothing was enqueued."""


@functools.cache
def driver_status() -> str | None:
    """None when a CUDA device and a recent enough driver are present, else why not."""
    try:
        call(driver.cuInit, 0)
        count = call(driver.cuDeviceGetCount)
        version = call(driver.cuDriverGetVersion)
    except Exception as exc:
        return f"no usable CUDA driver ({type(exc).__name__}: {exc})"
    if count < 1:
        return "the CUDA driver reports no device"
    if version < MIN_DRIVER_VERSION:
        return f"the driver supports CUDA {cuda_version(version)}; 12.0 or newer is needed"
    return None


def cuda_version(version: int) -> str:
    """``12080`` -> ``"12.8"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


class Device:
    """One CUDA device and its primary context, retained once here (any thread may activate it)."""

    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.handle = call(driver.cuDeviceGet, ordinal)
        self.uuid: bytes = call(driver.cuDeviceGetUuid, self.handle).bytes
        self.context: Any = call(driver.cuDevicePrimaryCtxRetain, self.handle)
        self.failed: str | None = None  # the first sticky error: the context is unusable

    def activate(self) -> None:
        """Make this device's context current on the calling thread."""
        call(driver.cuCtxSetCurrent, self.context)

    def note(self, exc: CudaError) -> None:
        """Remember ``exc`` if it leaves this process's context unusable (``STICKY_ERRORS``)."""
        if self.failed is None and int(exc.result) in STICKY_ERRORS:
            self.failed = str(exc)


def batch_attributes() -> Any:
    """One attribute set for every piece: sources read in stream order (after the engine's event)."""
    attributes = driver.CUmemcpyAttributes()
    attributes.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    return attributes


# CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
#     CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, size_t *failIdx, CUstream hStream)
_BATCH_12080 = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
)


def _batch_copy() -> Callable[..., int] | None:
    """The driver's cuMemcpyBatchAsync with CUDA 12.8's signature (ctypes releases the GIL),
    or None when the driver has none."""
    pointer, found = call(driver.cuGetProcAddress, b"cuMemcpyBatchAsync", BATCH_DRIVER_VERSION, 0)
    if not pointer or found != driver.CUdriverProcAddressQueryResult.CU_GET_PROC_ADDRESS_SUCCESS:
        return None
    return _BATCH_12080(int(pointer))


class Copier:
    """How pieces are enqueued on this driver, decided once at start: one ``cuMemcpyBatchAsync``
    call for many pieces (CUDA 12.8 and newer), else one ``cuMemcpyAsync`` per piece."""

    def __init__(self) -> None:
        self.driver_version: int = call(driver.cuDriverGetVersion)
        self.batch = _batch_copy() if self.driver_version >= BATCH_DRIVER_VERSION else None
        self.attributes: Any = batch_attributes() if self.batch is not None else None

    def describe(self) -> str:
        version = cuda_version(self.driver_version)
        if self.batch is not None:
            return f"batched copies (cuMemcpyBatchAsync), driver CUDA {version}"
        if self.driver_version >= BATCH_DRIVER_VERSION:
            why = "the driver gave no cuMemcpyBatchAsync entry point"
        else:
            why = "cuMemcpyBatchAsync needs CUDA 12.8"
        return f"one cuMemcpyAsync per piece, driver CUDA {version} ({why})"

    def enqueue(self, stream: Any, plan: CopyPlan, to_host: bool) -> None:
        sources, targets = (plan.device, plan.host) if to_host else (plan.host, plan.device)
        if len(plan) == 1 or self.batch is None:
            for target, source, size in zip(targets.tolist(), sources.tolist(), plan.sizes.tolist()):
                call(driver.cuMemcpyAsync, target, source, size, stream)
            return
        attributes_index = ctypes.c_size_t(0)  # the one attribute set applies from piece 0 on
        failed_at = ctypes.c_size_t(0)
        for start in range(0, len(plan), MAX_BATCH):
            part = slice(start, start + MAX_BATCH)
            dsts, srcs, sizes = targets[part], sources[part], plan.sizes[part]  # contiguous uint64 views
            failed_at.value = SIZE_MAX
            result = self.batch(
                dsts.ctypes.data,
                srcs.ctypes.data,
                sizes.ctypes.data,
                len(sizes),
                self.attributes.getPtr(),
                ctypes.addressof(attributes_index),
                1,
                ctypes.addressof(failed_at),
                int(stream),
            )
            if result != 0:
                where = (
                    "no single piece" if failed_at.value == SIZE_MAX else f"piece {start + failed_at.value}"
                )
                raise CudaError(f"cuMemcpyBatchAsync ({where})", result)


def wait_for_event(event: Any, timeout_s: float, stop: threading.Event, retired: threading.Event) -> None:
    """Block until the work recorded before ``event`` is complete, polling ``cuEventQuery``.
    Raises EngineEventTimeout after ``timeout_s``, CopyAbandoned once ``stop`` (the caller was
    cancelled) or ``retired`` (the registration is gone: the engine may be dead) is set."""
    deadline = time.monotonic() + timeout_s
    pause = POLL_FIRST_S
    while True:
        (result,) = driver.cuEventQuery(event)
        if result == driver.CUresult.CUDA_SUCCESS:
            return
        if result != driver.CUresult.CUDA_ERROR_NOT_READY:
            raise EngineEventError("cuEventQuery (the engine's event)", result)
        if stop.is_set():
            raise CopyAbandoned("cancelled while waiting for the engine's event")
        if retired.is_set():
            raise CopyAbandoned(UNREGISTERED_WHILE_WAITING)
        now = time.monotonic()
        if now >= deadline:
            raise EngineEventTimeout(
                f"the engine's event did not complete within {timeout_s:g} s "
                "(engine hung or gone?); nothing was copied"
            )
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, POLL_MAX_S)


def run_copies(
    device: Device,
    stream: Any,
    engine_event: Any,
    plan: CopyPlan,
    to_host: bool,
    copier: Copier,
    timeout_s: float,
    stop: threading.Event,
    retired: threading.Event,
) -> None:
    """Copy every piece of ``plan`` on ``stream`` once ``engine_event`` (if any) is complete, and
    return only once the copies are complete. Blocking: run it in a worker thread.

    The wait for the engine's event is bounded (``wait_for_event``); it raises before anything is
    enqueued, as it does at once if the cache is ``retired``. If enqueueing fails part way, what
    was enqueued is still waited for before the error is raised, so the caller may free its
    buffers whenever this returns or raises.
    """
    if retired.is_set():
        raise CopyAbandoned(UNREGISTERED_WHILE_WAITING)
    try:
        device.activate()
        if engine_event is not None:
            wait_for_event(engine_event, timeout_s, stop, retired)
        _copy_and_wait(stream, plan, to_host, copier)
    except EngineEventError:
        raise
    except CudaError as exc:
        device.note(exc)
        raise


def _copy_and_wait(stream: Any, plan: CopyPlan, to_host: bool, copier: Copier) -> None:
    """Enqueue the plan's pieces and block until they are complete (also when enqueueing failed)."""
    flags = driver.CUevent_flags.CU_EVENT_DISABLE_TIMING | driver.CUevent_flags.CU_EVENT_BLOCKING_SYNC
    done = call(driver.cuEventCreate, flags)
    failure: Exception | None = None
    try:
        try:
            copier.enqueue(stream, plan, to_host)
        except Exception as exc:
            failure = exc
        try:
            call(driver.cuEventRecord, done, stream)
            call(driver.cuEventSynchronize, done)
        except CudaError as exc:
            failure = failure or exc
            call(driver.cuStreamSynchronize, stream)  # the event failed us; the stream cannot
    finally:
        call(driver.cuEventDestroy, done)
    if failure is not None:
        raise failure
