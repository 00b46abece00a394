"""The CUDA path on a real device (skipped without one).

In-process tests map device memory of this process with ``open_local`` (CUDA IPC
handles cannot be opened by the process that exported them) and gate the
instance's stream with ``cuStreamWaitValue32`` on a pinned host word, so "a copy
is in flight" and "the engine has not finished writing" are set up
deterministically, without sleeps. The IPC tests run the engine side in a
subprocess with PyTorch CUDA tensors, exported through ``trio_kv.export.ipc``.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import trio
import trio.testing
from cuda.bindings import driver

from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.export.cuda_driver import CudaError, call
from trio_kv.protocol import CudaAllocation, CudaRegistration, RegisterKVCache, TensorSpec
from trio_kv.testing import running_server
from trio_kv.transfer.cpu import CopyJob, MappedKVCache
from trio_kv.transfer.cuda import CudaTransfer, MappedCudaKVCache, cuda_available
from trio_kv.transfer.layout import plan_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]

NB, BS, LAYERS, HEADS, HEAD = 32, 16, 2, 2, 64
BLOCKS_PER_CHUNK = 2
SOURCES = [[3, 17], [25, 9], [30, 0]]
TARGETS = [[4, 18], [26, 10], [31, 1]]


def specs_for(layout: str) -> list[TensorSpec]:
    if layout == "cross_layer":
        shapes = [[NB, LAYERS, 2, BS, HEADS, HEAD]]
        block_dim = 0
    else:
        shapes = [[2, NB, BS, HEADS, HEAD]] * LAYERS
        block_dim = 1
    return [
        TensorSpec(0, "bfloat16", shape, [int(np.prod(shape[i + 1 :])) for i in range(len(shape))], block_dim)
        for shape in shapes
    ]


def nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape)) * 2


class DeviceKV:
    """A KV cache in device memory of this process, with a host mirror for expectations."""

    def __init__(self, transfer: CudaTransfer, layout: str) -> None:
        transfer.devices[0].activate()
        self.specs = specs_for(layout)
        self.pointers: list[int] = []
        self.mirror: list[np.ndarray] = []
        rng = np.random.default_rng(5)
        for spec in self.specs:
            pattern = rng.integers(0, 256, nbytes(spec), dtype=np.uint8)
            self.pointers.append(int(call(driver.cuMemAlloc, nbytes(spec))))
            call(driver.cuMemcpyHtoD, self.pointers[-1], pattern.ctypes.data, nbytes(spec))
            self.mirror.append(pattern)
        self.cache = transfer.open_local(self.specs, BS, self.pointers, [nbytes(s) for s in self.specs])

    def host_cache(self, region: np.ndarray) -> MappedKVCache:
        """The CPU path over a host copy laid out the same way (tensors back to back)."""
        offsets = np.concatenate(([0], np.cumsum([nbytes(s) for s in self.specs[:-1]]))).tolist()
        specs = [
            TensorSpec(int(o), s.dtype, s.shape, s.strides, s.block_dim) for s, o in zip(self.specs, offsets)
        ]
        tensor = torch.from_numpy(region)
        return MappedKVCache(plan_layout(specs, BS, tensor.numel()), tensor)

    def read_back(self) -> np.ndarray:
        out = []
        for pointer, spec in zip(self.pointers, self.specs):
            host = np.empty(nbytes(spec), dtype=np.uint8)
            call(driver.cuMemcpyDtoH, host.ctypes.data, pointer, nbytes(spec))
            out.append(host)
        return np.concatenate(out)

    def free(self) -> None:
        del self.cache
        for pointer in self.pointers:
            call(driver.cuMemFree, pointer)


@pytest.fixture
def transfer() -> CudaTransfer:
    return CudaTransfer()


@pytest.fixture(params=["per_layer", "cross_layer"])
def device_kv(request, transfer) -> Iterator[DeviceKV]:
    kv = DeviceKV(transfer, request.param)
    try:
        yield kv
    finally:
        kv.free()


@pytest.fixture
def arena(transfer) -> torch.Tensor:
    area = torch.zeros(8 << 20, dtype=torch.uint8)
    transfer.pin_host(area)
    return area


def jobs(kv: DeviceKV, area: torch.Tensor, block_ids: list[list[int]], first_block: int = 0) -> list[CopyJob]:
    size = kv.cache.layout.chunk_bytes(BLOCKS_PER_CHUNK)
    return [CopyJob(ids, area[i * size : (i + 1) * size], first_block) for i, ids in enumerate(block_ids)]


@contextlib.contextmanager
def gated(transfer: CudaTransfer, stream: Any) -> Iterator[Any]:
    """Hold ``stream`` until the block exits: work enqueued on it meanwhile waits on the GPU."""
    word = torch.zeros(1, dtype=torch.int32)
    transfer.pin_host(word)
    pointer = call(driver.cuMemHostGetDevicePointer, word.data_ptr(), 0)
    try:
        call(
            driver.cuStreamWaitValue32,
            stream,
            pointer,
            1,
            driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_EQ,
        )
    except CudaError as exc:
        pytest.skip(f"stream memory operations unsupported here: {exc}")
    try:
        yield word
    finally:
        word[0] = 1  # never leave a stream blocked


# ---------------------------------------------------------------- bytes


async def test_store_copies_each_block_byte_for_byte(transfer, device_kv, arena):
    store_jobs = jobs(device_kv, arena, SOURCES)
    await transfer.store(device_kv.cache, store_jobs)

    expected = torch.zeros_like(arena)
    device_kv.host_cache(np.concatenate(device_kv.mirror)).gather(jobs(device_kv, expected, SOURCES))
    assert torch.equal(arena, expected)


@pytest.mark.parametrize("first_block", [0, 1])
async def test_retrieve_writes_the_chunks_into_blocks_from_first_block_on(
    transfer, device_kv, arena, first_block
):
    arena.copy_(torch.randint(0, 256, arena.shape, dtype=torch.uint8))
    chunks = arena.clone()
    await transfer.retrieve(device_kv.cache, jobs(device_kv, arena, TARGETS, first_block))

    expected = np.concatenate(device_kv.mirror)
    device_kv.host_cache(expected).scatter(jobs(device_kv, chunks, TARGETS, first_block))
    assert torch.equal(arena, chunks)  # a retrieve only reads L1
    assert np.array_equal(device_kv.read_back(), expected)


async def test_store_then_retrieve_moves_blocks_unchanged(transfer, device_kv, arena):
    half = arena.numel() // 2
    await transfer.store(device_kv.cache, jobs(device_kv, arena[:half], SOURCES))
    stored = arena[:half].clone()
    await transfer.retrieve(device_kv.cache, jobs(device_kv, arena[:half], TARGETS))
    await transfer.store(device_kv.cache, jobs(device_kv, arena[half:], TARGETS))
    assert torch.equal(arena[half:], stored)


async def test_a_buffer_outside_the_pinned_arena_is_refused(transfer, device_kv):
    loose = torch.zeros(8 << 20, dtype=torch.uint8)
    with pytest.raises(TrioKVError) as caught:
        await transfer.store(device_kv.cache, jobs(device_kv, loose, SOURCES))
    assert caught.value.code is ErrorCode.TRANSFER_FAILED


# ---------------------------------------------------------------- events and cancellation


async def test_copy_waits_for_the_engine_event_before_reading_blocks(transfer, device_kv, arena):
    engine_stream = call(driver.cuStreamCreate, driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
    engine_event = call(driver.cuEventCreate, driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
    try:
        with gated(transfer, engine_stream) as gate:
            # The "engine" overwrites every block with 0x5A, but only once the gate opens.
            for pointer, spec in zip(device_kv.pointers, device_kv.specs):
                call(driver.cuMemsetD8Async, pointer, 0x5A, nbytes(spec), engine_stream)
            call(driver.cuEventRecord, engine_event, engine_stream)
            device_kv.cache.registered_event = engine_event
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transfer.store, device_kv.cache, jobs(device_kv, arena, SOURCES))
                await trio.testing.wait_all_tasks_blocked()
                gate[0] = 1
        used = sum(j.buffer.numel() for j in jobs(device_kv, arena, SOURCES))
        assert bool((arena[:used] == 0x5A).all())
    finally:
        device_kv.cache.registered_event = None
        call(driver.cuEventDestroy, engine_event)
        call(driver.cuStreamDestroy, engine_stream)


async def test_cancelled_store_returns_only_once_its_copy_is_complete(transfer, device_kv, arena):
    finished = trio.Event()
    outcome: list[str] = []

    async def store_then_note() -> None:
        with trio.CancelScope() as scope:
            cancel_scopes.append(scope)
            await transfer.store(device_kv.cache, jobs(device_kv, arena, SOURCES))
            await trio.lowlevel.checkpoint()
        outcome.append("cancelled" if scope.cancelled_caught else "completed")
        finished.set()

    cancel_scopes: list[trio.CancelScope] = []
    with gated(transfer, device_kv.cache.store_stream) as gate:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store_then_note)
            await trio.testing.wait_all_tasks_blocked()
            cancel_scopes[0].cancel()
            with trio.move_on_after(0.5):
                await finished.wait()
            assert not finished.is_set(), "returned while its copy was still queued behind the gate"
            gate[0] = 1
            await finished.wait()
    assert outcome == ["cancelled"]
    expected = torch.zeros_like(arena)
    device_kv.host_cache(np.concatenate(device_kv.mirror)).gather(jobs(device_kv, expected, SOURCES))
    assert torch.equal(arena, expected)


# ---------------------------------------------------------------- registration and server


def test_registration_naming_an_unknown_device_is_bad_registration(transfer):
    request = RegisterKVCache(
        instance_id="ghost",
        block_size=BS,
        tensors=specs_for("cross_layer"),
        shm_path="",
        shm_bytes=0,
        cuda=CudaRegistration(bytes(16), [CudaAllocation(bytes(64), 1 << 20)], [0]),
    )
    with pytest.raises(TrioKVError) as caught:
        transfer.open(request)
    assert caught.value.code is ErrorCode.BAD_REGISTRATION


async def test_cuda_server_pins_its_arena_and_still_serves_shared_memory_caches(kv, client, server):
    transfer = server.engine.transfer
    arena = server.engine.l1.arena
    assert isinstance(transfer, CudaTransfer)
    assert (arena.data_ptr(), arena.data_ptr() + arena.numel()) in transfer._pinned
    assert not isinstance(server.engine.instances["worker-0"], MappedCudaKVCache)


# ---------------------------------------------------------------- IPC from an engine process

ENGINE = textwrap.dedent(
    """
    import sys, torch
    from trio_kv.client import BlockingClient
    from trio_kv.export.ipc import CudaKVCacheExport
    from trio_kv.keys import RequestKey
    from trio_kv.protocol import Retrieve, RetrieveResult, Store, StoreResult

    url, layout = sys.argv[1], sys.argv[2]
    NB, BS, LAYERS, HEADS, HEAD = 32, 16, 2, 2, 64
    if layout == "per_layer":
        tensors = [torch.randn(2, NB, BS, HEADS, HEAD, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
        block_dim = 1
    else:
        tensors = [torch.randn(NB, LAYERS, 2, BS, HEADS, HEAD, dtype=torch.bfloat16, device="cuda")]
        block_dim = 0

    def block(b):
        return torch.cat([t.select(block_dim, b).flatten() for t in tensors])

    export = CudaKVCacheExport.from_tensors(tensors, block_dim, BS)
    key = RequestKey(model="m", world_size=1, rank=0, tokens=list(range(64)))
    sources, targets, skipped = [3, 9, 17, 25], [4, 10, 18, 26], [5, 11, 19, 27]
    torch.cuda.synchronize()
    with BlockingClient.connect(url, timeout_s=60) as client:
        client.register(export.register_request("engine"))
        # The blocks get their final values only after ~0.1 s of GPU work on a side stream; the
        # Store goes out at once, carrying the event recorded after those writes.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            for i, b in enumerate(sources):
                for t in tensors:
                    t.select(block_dim, b).fill_(float(i + 1))
        stored = client.call(Store("engine", key, sources, ipc_event=export.record_event(side)), StoreResult)
        assert stored.stored == 2, stored
        torch.cuda.synchronize()
        client.call(Retrieve("engine", key, targets, ipc_event=export.record_event()), RetrieveResult)
        before = block(skipped[0]).clone()
        client.call(
            Retrieve("engine", key, skipped, skip_first_n_tokens=BS, ipc_event=export.record_event()),
            RetrieveResult,
        )
    for i, (s, t) in enumerate(zip(sources, targets)):
        assert bool((block(s) == float(i + 1)).all()), ("store read before the engine's writes", s)
        assert torch.equal(block(s), block(t)), ("retrieve", s, t)
    assert torch.equal(block(skipped[0]), before), "skip_first_n_tokens"
    for s, t in zip(sources[1:], skipped[1:]):
        assert torch.equal(block(s), block(t)), ("retrieve with skip", s, t)
    export.close()
    print("engine ok")
    """
)


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
async def test_engine_process_stores_and_retrieves_through_ipc_handles(tmp_path, layout):
    if not torch.cuda.is_available():
        pytest.skip("the engine side needs PyTorch with CUDA")
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    async with running_server(transfer="cuda", chunk_size=32, l1_size="64MiB") as server:
        # The registration goes away with the engine's connection: note what was mapped.
        mapped = []
        add = server.engine.registry.add

        def recording_add(instance_id, cache, peer):
            mapped.append(cache)
            add(instance_id, cache, peer)

        server.engine.registry.add = recording_add
        done = await trio.run_process(
            [sys.executable, str(script), server.url, layout],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-4000:]
        assert b"engine ok" in done.stdout
        assert [type(cache) for cache in mapped] == [MappedCudaKVCache]
