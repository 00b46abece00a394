"""Engine side of the CUDA path: export KV tensors and an interprocess event to a trio-kv server.

    export = CudaKVCacheExport.from_tensors(kv_caches, block_dim=1, block_size=16)
    client.register(export.register_request("worker-0"))
    ...  # after the forward pass that wrote the blocks, on the stream that wrote them:
    client.call(Store(..., ipc_event=export.record_event()))  # -> StoreResult

Each tensor's allocation is found with ``cuMemGetAddressRange`` (for PyTorch's
caching allocator, the ``cudaMalloc`` segment holding it) and exported with
``cuIpcGetMemHandle``; one allocation holding several tensors is exported once.
Each stream ``record_event`` is given gets a small ring of ``EVENT_RING`` events
(``CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING``, the first ring made at export);
``record_event`` records that ring's next one and returns its handle, so each
request names its own event: the server waits for that record (not a later
step's) before touching the blocks, and replies only once its copy is complete,
so the engine may reuse the blocks after the reply. An event is recorded again
only ``EVENT_RING`` records later, and on the same stream: a request still waiting
then waits for the later record too, later but never too early (one ring shared
by two streams could let it go early: the later record may complete first).
The registration names no event: every request names its own, and one without
says the engine synchronised before sending it.

Not supported: memory from the virtual-memory APIs (``cuMemCreate``, e.g.
PyTorch's ``expandable_segments:True``) or from stream-ordered pools
(``backend:cudaMallocAsync``), which ``cuIpcGetMemHandle`` rejects; the error
names the allocator setting.

Verified without a GPU: the driver calls against cuda-bindings 13.4.4 and a stub
driver (tests/test_gpu_stub.py, with stand-ins for CUDA tensors). Not verified:
PyTorch CUDA tensors and a real driver (tests/test_gpu_cuda.py runs it in an
engine subprocess where a GPU is present).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from cuda.bindings import driver

from ..protocol import CudaAllocation, CudaRegistration, RegisterKVCache, TensorSpec
from .cuda_driver import CudaError, call, handle_bytes
from .shm import dtype_name

ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
EVENT_RING = 8  # interprocess events recorded in turn; the server keeps up to 64 open per instance


@contextlib.contextmanager
def _current_context(context: Any) -> Iterator[None]:
    """``context`` current on this thread for the block."""
    call(driver.cuCtxPushCurrent, context)
    try:
        yield
    finally:
        call(driver.cuCtxPopCurrent)


def _event_ring() -> list[tuple[Any, bytes]]:
    """``EVENT_RING`` interprocess events and their handles (a context must be current)."""
    flags = driver.CUevent_flags.CU_EVENT_INTERPROCESS | driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
    ring = []
    for _ in range(EVENT_RING):
        event = call(driver.cuEventCreate, flags)
        ring.append((event, handle_bytes(call(driver.cuIpcGetEventHandle, event))))
    return ring


def _export_failed(exc: CudaError) -> ValueError:
    # PyTorch 2.9 renamed the setting PYTORCH_ALLOC_CONF and still reads the old name.
    settings = ", ".join(f"{name}={os.environ.get(name, '')!r}" for name in ALLOC_CONF_VARIABLES)
    return ValueError(
        f"cannot export a KV tensor by CUDA IPC ({exc}): memory from PyTorch's "
        "expandable_segments:True or backend:cudaMallocAsync allocator cannot be exported "
        f"({settings}); run vLLM with the default caching allocator"
    )


class CudaKVCacheExport:
    """KV tensors on one CUDA device, described for ``RegisterKVCache``, plus the engine's event.

    Keeps the tensors referenced: their memory must outlive the registration.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        specs: list[TensorSpec],
        registration: CudaRegistration,
        block_size: int,
        ordinal: int,
        events: list[tuple[Any, bytes]],
        context: Any,
    ) -> None:
        self.tensors = list(tensors)
        self.specs = specs
        self.registration = registration
        self.block_size = block_size
        self.ordinal = ordinal
        self._events = list(events)  # (CUevent, handle): every event made, destroyed at close
        self._spare: list[tuple[Any, bytes]] | None = events  # made at export: the first stream's
        self._rings: dict[int, Iterator[tuple[Any, bytes]]] = {}  # per raw stream, in turn
        self._context = context  # the primary context, retained once

    @classmethod
    def from_tensors(
        cls, tensors: Sequence[torch.Tensor], block_dim: int, block_size: int
    ) -> CudaKVCacheExport:
        """Export ``tensors`` (all on one CUDA device, ``block_dim`` indexing blocks)."""
        if not tensors:
            raise ValueError("at least one tensor is needed")
        devices = {t.device for t in tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"tensors must all be on one CUDA device, got {sorted(map(str, devices))}")
        ordinal = next(iter(devices)).index or 0
        call(driver.cuInit, 0)
        device = call(driver.cuDeviceGet, ordinal)
        context = call(driver.cuDevicePrimaryCtxRetain, device)  # the one PyTorch uses
        with _current_context(context):
            uuid = call(driver.cuDeviceGetUuid, device).bytes
            allocation_index: dict[int, int] = {}
            allocations: list[CudaAllocation] = []
            specs, tensor_allocations = [], []
            for tensor in tensors:
                pointer = tensor.data_ptr()
                base, size = call(driver.cuMemGetAddressRange, driver.CUdeviceptr(pointer))
                base = int(base)
                if base not in allocation_index:
                    try:
                        handle = call(driver.cuIpcGetMemHandle, driver.CUdeviceptr(base))
                    except CudaError as exc:
                        raise _export_failed(exc) from None
                    allocation_index[base] = len(allocations)
                    allocations.append(CudaAllocation(handle=handle_bytes(handle), size=int(size)))
                tensor_allocations.append(allocation_index[base])
                specs.append(
                    TensorSpec(
                        offset=pointer - base,
                        dtype=dtype_name(tensor.dtype),
                        shape=list(tensor.shape),
                        strides=list(tensor.stride()),
                        block_dim=block_dim,
                    )
                )
            events = _event_ring()
        registration = CudaRegistration(
            device_uuid=uuid, allocations=allocations, tensor_allocations=tensor_allocations
        )
        return cls(tensors, specs, registration, block_size, ordinal, events, context)

    def register_request(self, instance_id: str) -> RegisterKVCache:
        return RegisterKVCache(
            instance_id=instance_id,
            block_size=self.block_size,
            tensors=list(self.specs),
            shm_path="",
            shm_bytes=0,
            cuda=self.registration,
        )

    def record_event(self, stream: torch.cuda.Stream | int | None = None) -> bytes:
        """Record the next interprocess event of ``stream``'s ring (default stream: PyTorch's
        current one on the device) and return its handle, for ``Store.ipc_event`` /
        ``Retrieve.ipc_event``: the request waits for the work enqueued on ``stream`` so far."""
        if not self._events:
            raise RuntimeError("record_event after close")
        if stream is None:
            stream = torch.cuda.current_stream(self.ordinal)
        raw_stream = stream if isinstance(stream, int) else int(stream.cuda_stream)
        with _current_context(self._context):
            event, handle = next(self._ring(raw_stream))
            call(driver.cuEventRecord, event, driver.CUstream(raw_stream))
        return handle

    def _ring(self, raw_stream: int) -> Iterator[tuple[Any, bytes]]:
        """``raw_stream``'s ring, in turn (the one made at export for the first stream recorded on)."""
        ring = self._rings.get(raw_stream)
        if ring is None:
            if self._spare is not None:
                events, self._spare = self._spare, None
            else:
                events = _event_ring()
                self._events.extend(events)
            ring = self._rings[raw_stream] = itertools.cycle(events)
        return ring

    def close(self) -> None:
        """Destroy this process's events. Call it once no request naming one is unanswered, after
        UnregisterKVCache: its reply comes once the server has closed what it opened of them."""
        events, self._events, self._rings, self._spare = self._events, [], {}, None
        if events:
            with _current_context(self._context):
                for event, _ in events:
                    call(driver.cuEventDestroy, event)
