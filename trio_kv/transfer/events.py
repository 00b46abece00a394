"""CUDA driver plumbing: checked calls, IPC handle bytes, devices, and running copies to completion.

``run_copies`` is the one place bytes move on the CUDA path. It runs in a
worker thread: it makes the stream wait on the engine's event, enqueues every
piece of the plan in one ``cuMemcpyBatchAsync`` call, records a blocking-sync
event and blocks in ``cuEventSynchronize``, which releases the GIL. So the Trio
thread neither blocks nor polls (``trio.sleep`` is ~1 ms coarse), and the
thread's return is the completion signal.

``cuMemcpyBatchAsync`` is called through ``ctypes`` on the plan's numpy arrays,
at the entry point ``cuGetProcAddress`` gives for CUDA 12.8 (the signature with
``failIdx``, which newer drivers keep): the cuda-bindings wrapper wants a list of
``CUdeviceptr`` objects, about 0.2 us of Python per piece, 3 ms for the 16,384
pieces of 16 per-layer chunks. vLLM's ``simple_kv_offload`` calls it the same way.

A host function (``cuLaunchHostFunc``) writing an eventfd was the other option.
It was not taken: a Python host function needs the GIL on the driver's callback
thread, which can deadlock against a thread that enters the driver holding the
GIL, and it stalls the stream while it waits for the GIL.

Verified without a GPU (cuda-bindings 13.4.4, no driver): names, signatures and
result tuples from the installed docstrings; argument marshalling (IPC handles
as 64 raw bytes through ``getPtr()``, since 13.4 removed ``.reserved``); that
cuda-bindings' ``CUmemcpyAttributes`` is laid out as CUDA's struct (six 32-bit
fields), so its ``getPtr()`` can go to the ctypes call; and the whole path
(export, IPC open, event waits, batched copies, completion, release) against a
stub libcuda.so.1 that copies host memory (tests/test_gpu_stub.py), which also
shows the GIL released while a thread waits in ``cuEventSynchronize``.
Not verified: a real driver and device (tests/test_gpu_cuda.py, skipped here):
IPC opens across processes, ``cuMemGetAddressRange`` on IPC mappings, stream
and event semantics, and throughput (``trio-kv bench gpu``).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

from cuda.bindings import driver

from ..export.cuda_driver import CudaError, call
from .plan import CopyPlan

MIN_DRIVER_VERSION = 12080  # cuMemcpyBatchAsync appeared in CUDA 12.8
MAX_BATCH = 1 << 20  # pieces per cuMemcpyBatchAsync call


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
        return f"the driver supports CUDA {version // 1000}.{version % 1000 // 10}; 12.8 or newer is needed"
    return None


class Device:
    """One CUDA device; its primary context is retained on first use."""

    def __init__(self, ordinal: int) -> None:
        self.ordinal = ordinal
        self.handle = call(driver.cuDeviceGet, ordinal)
        self.uuid: bytes = call(driver.cuDeviceGetUuid, self.handle).bytes
        self._context: Any = None

    @property
    def context(self) -> Any:
        if self._context is None:
            self._context = call(driver.cuDevicePrimaryCtxRetain, self.handle)
        return self._context

    def activate(self) -> None:
        """Make this device's context current on the calling thread."""
        call(driver.cuCtxSetCurrent, self.context)


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


@functools.cache
def _batch_copy() -> Callable[..., int]:
    """The driver's cuMemcpyBatchAsync with CUDA 12.8's signature (ctypes releases the GIL)."""
    pointer, found = call(driver.cuGetProcAddress, b"cuMemcpyBatchAsync", MIN_DRIVER_VERSION, 0)
    if not pointer or found != driver.CUdriverProcAddressQueryResult.CU_GET_PROC_ADDRESS_SUCCESS:
        raise CudaError("cuGetProcAddress(cuMemcpyBatchAsync)", driver.CUresult.CUDA_ERROR_NOT_FOUND)
    return _BATCH_12080(int(pointer))


def run_copies(
    device: Device, stream: Any, engine_event: Any, plan: CopyPlan, to_host: bool, attributes: Any
) -> None:
    """Copy every piece of ``plan`` on ``stream`` after ``engine_event`` (if any), and return only
    once the copies are complete. Blocking: run it in a worker thread.

    If enqueueing fails part way, what was enqueued is still waited for before the error is raised,
    so the caller may free its buffers whenever this returns or raises.
    """
    device.activate()
    flags = driver.CUevent_flags.CU_EVENT_DISABLE_TIMING | driver.CUevent_flags.CU_EVENT_BLOCKING_SYNC
    done = call(driver.cuEventCreate, flags)
    failure: Exception | None = None
    try:
        try:
            if engine_event is not None:
                call(driver.cuStreamWaitEvent, stream, engine_event, 0)
            _enqueue(stream, plan, to_host, attributes)
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


def _enqueue(stream: Any, plan: CopyPlan, to_host: bool, attributes: Any) -> None:
    sources, targets = (plan.device, plan.host) if to_host else (plan.host, plan.device)
    if len(plan) == 1:
        call(driver.cuMemcpyAsync, int(targets[0]), int(sources[0]), int(plan.sizes[0]), stream)
        return
    batch_copy = _batch_copy()
    attributes_index = ctypes.c_size_t(0)  # the one attribute set applies from piece 0 on
    failed_at = ctypes.c_size_t(0)
    for start in range(0, len(plan), MAX_BATCH):
        part = slice(start, start + MAX_BATCH)
        dsts, srcs, sizes = targets[part], sources[part], plan.sizes[part]  # contiguous uint64 views
        result = batch_copy(
            dsts.ctypes.data,
            srcs.ctypes.data,
            sizes.ctypes.data,
            len(sizes),
            attributes.getPtr(),
            ctypes.addressof(attributes_index),
            1,
            ctypes.addressof(failed_at),
            int(stream),
        )
        if result != 0:
            raise CudaError(f"cuMemcpyBatchAsync (piece {start + failed_at.value})", result)
