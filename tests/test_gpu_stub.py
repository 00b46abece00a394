"""The CUDA path against a stub libcuda.so.1, on hosts without a GPU.

The stub (``stub_libcuda.c`` next to this file, compiled with the host's C compiler; skipped
without one) answers cuda-bindings' loader (``cuGetProcAddress_v2``) and implements the driver
calls trio-kv makes, with host memory as "device" memory. It is honest about time and handles:
enqueued work runs later (a worker thread, or whoever waits), an event completes only once the
work before its latest record is done, destroyed events and closed mappings are refused, and a
stream can be held so an engine's event never completes. So these tests check what cannot be
checked by reading: that cuda-bindings accepts every argument as trio-kv passes it, that results
are unpacked right, that bytes land where the CPU path puts them, that waiting releases the GIL,
that a failed enqueue is still waited for, and that waits on the engine are bounded.
They say nothing about a real driver's behaviour or speed (tests/test_gpu_cuda.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STUB_C = (Path(__file__).parent / "stub_libcuda.c").read_text()

# What every check below starts from, in a subprocess whose libcuda.so.1 is the stub.
PRELUDE = textwrap.dedent(
    """
    import ctypes, gc, threading, time
    import torch, trio, trio.testing
    from cuda.bindings import driver
    from trio_kv.errors import ErrorCode, TrioKVError
    from trio_kv.transfer import cuda_cache
    from trio_kv.transfer.cpu import CopyJob
    from trio_kv.transfer.cuda import CudaTransfer, MappedCudaKVCache
    from trio_kv.export.cuda_driver import call, handle_bytes
    from trio_kv.export.ipc import CudaKVCacheExport
    from trio_kv.protocol import decode_request, encode

    stub = ctypes.CDLL("libcuda.so.1")
    stub.stub_hold.argtypes = [ctypes.c_void_p, ctypes.c_int]
    stub.stub_wait_blocked.argtypes = [ctypes.c_long, ctypes.c_long]
    def gate(opens=False, closes=False):  # make cuIpcOpenMemHandle / cuIpcCloseMemHandle wait
        stub.stub_gate(int(opens), int(closes))
    async def ipc_call_waiting():  # True once a gated call waits (a worker thread of ours waits for it)
        return bool(await trio.to_thread.run_sync(stub.stub_wait_blocked, 1, 10_000))
    def counter(name, kind=ctypes.c_long):
        return kind.in_dll(stub, name)
    def hang_engine(hung=True):  # the engine records on the legacy stream (0): hold it
        stub.stub_hold(None, int(hung))

    class Tensor:  # what CudaKVCacheExport reads from a torch CUDA tensor
        def __init__(self, host, pointer):
            self.host, self.pointer = host, pointer
            self.device, self.dtype, self.shape = torch.device("cuda", 0), host.dtype, host.shape
        def data_ptr(self):
            return self.pointer
        def stride(self):
            return self.host.stride()

    SHAPE, NBYTES = (2, 8, 4, 2, 8), 2 * 8 * 4 * 2 * 8 * 2

    def device_tensors():
        tensors = []
        for _ in range(2):
            pointer = int(call(driver.cuMemAlloc, NBYTES))
            host = torch.frombuffer((ctypes.c_uint8 * NBYTES).from_address(pointer), dtype=torch.bfloat16)
            host = host.view(*SHAPE)
            host.copy_(torch.randn(SHAPE))
            tensors.append(Tensor(host, pointer))
        return tensors

    def setup(**options):
        transfer = CudaTransfer(**options)
        arena = torch.zeros(1 << 20, dtype=torch.uint8)
        transfer.pin_host(arena)
        tensors = device_tensors()
        export = CudaKVCacheExport.from_tensors(tensors, block_dim=1, block_size=4)
        cache = transfer.open(decode_request(encode(export.register_request("w")), 1 << 20))
        return transfer, arena, tensors, export, cache

    def jobs_for(cache, arena, block_ids=([5, 2], [7, 0]), at=0):
        size = cache.layout.chunk_bytes(2)
        return [CopyJob(list(ids), arena[at + i * size : at + (i + 1) * size]) for i, ids in enumerate(block_ids)]

    def expected_store(tensors, block_ids=([5, 2], [7, 0])):
        return torch.cat([torch.cat([t.host[kv, b].flatten() for b in ids]).view(torch.uint8)
                          for ids in block_ids for t in tensors for kv in (0, 1)])

    def interprocess_event():
        flags = driver.CUevent_flags.CU_EVENT_INTERPROCESS | driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
        event = call(driver.cuEventCreate, flags)
        return event, handle_bytes(call(driver.cuIpcGetEventHandle, event))
    """
)

# Export, IPC open, a batched store, the GIL released while waiting, a cancelled copy still
# waited for, a failed enqueue still waited for, and release of every driver object.
CHECKS = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        assert isinstance(cache, MappedCudaKVCache) and counter("stub_ipc_open").value == 2
        jobs = jobs_for(cache, arena)
        size = cache.layout.chunk_bytes(2)

        batches = counter("stub_batch_calls").value
        await transfer.store(cache, jobs, ipc_event=export.record_event(stream=0))
        assert counter("stub_batch_calls").value == batches + 1, "one batch call for 16 pieces"
        assert torch.equal(arena[: 2 * size], expected_store(tensors)), "store bytes"

        counter("stub_sync_sleep_us").value = 300_000
        ticks = []
        done = threading.Event()
        def tick():
            while not done.is_set():
                ticks.append(1)
                time.sleep(0.001)
        thread = threading.Thread(target=tick)
        thread.start()
        with trio.move_on_after(0.01) as scope:
            started = time.perf_counter()
            try:
                await transfer.store(cache, jobs)
                await trio.lowlevel.checkpoint()
            finally:
                returned_after = time.perf_counter() - started
        done.set()
        thread.join()
        assert scope.cancelled_caught and returned_after >= 0.29, "cancelled copy still waited for"
        assert len(ticks) > 50, "the GIL was held while waiting"
        counter("stub_sync_sleep_us").value = 1000

        counter("stub_fail_batch", ctypes.c_int).value = 1
        syncs = counter("stub_syncs").value
        try:
            await transfer.store(cache, jobs)
        except Exception as exc:
            assert "cuMemcpyBatchAsync" in str(exc), exc
        else:
            raise AssertionError("a failed batch call was not reported")
        assert counter("stub_syncs").value == syncs + 1, "a failed enqueue was not waited for"
        counter("stub_fail_batch", ctypes.c_int).value = 0

        del cache
        gc.collect()
        assert await transfer.wait_released(), "the releaser thread did not finish"
        assert counter("stub_ipc_close").value == 2 and counter("stub_live_streams").value == 0
        del jobs, arena
        gc.collect()
        assert counter("stub_unregistered").value == 1, "arena unpinned when freed"
        print("stub checks ok")

    trio.run(main)
    """
)

# A store waits for the work recorded before its event, not for the engine's later work.
EACH_REQUEST_ITS_OWN_EVENT = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        first = export.record_event(stream=0)  # after the step that wrote the blocks
        hang_engine()
        second = export.record_event(stream=0)  # after the next step's work, which never finishes
        assert first != second, "both records name one event: the first request waits for the second step"
        jobs = jobs_for(cache, arena)
        await transfer.store(cache, jobs, ipc_event=first)
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        hang_engine(False)
        print("own event ok")

    trio.run(main)
    """
)

# A copy whose engine event never completes fails in time, enqueues nothing, frees its slot.
HUNG_ENGINE_TIMES_OUT = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        transfer.copy_timeout_s = 0.3
        hang_engine()
        event = export.record_event(stream=0)
        batches, copied = counter("stub_batch_calls").value, counter("stub_copies_done").value
        started = time.perf_counter()
        try:
            await transfer.store(cache, jobs_for(cache, arena), ipc_event=event)
        except TrioKVError as exc:
            assert exc.code is ErrorCode.TRANSFER_FAILED, exc
            assert "engine" in exc.message and "0.3" in exc.message, exc.message
        else:
            raise AssertionError("a copy behind a hung engine's event succeeded")
        waited = time.perf_counter() - started
        assert 0.3 <= waited < 5, waited
        assert counter("stub_batch_calls").value == batches, "copies enqueued behind a hung engine"
        assert counter("stub_copies_done").value == copied
        assert transfer.copy_slots.borrowed_tokens == 0, "the copy slot was not freed"
        hang_engine(False)
        await transfer.store(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        print("hung engine ok")

    trio.run(main)
    """
)

# Cancelling (server shutdown) a copy that waits on a hung engine returns at once.
HUNG_ENGINE_CANCELLED = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        transfer.copy_timeout_s = 600
        hang_engine()
        event = export.record_event(stream=0)
        started = time.perf_counter()
        with trio.move_on_after(0.2) as scope:
            await transfer.store(cache, jobs_for(cache, arena), ipc_event=event)
        assert scope.cancelled_caught
        assert time.perf_counter() - started < 5, "cancellation waited for the hung engine"
        assert transfer.copy_slots.borrowed_tokens == 0
        hang_engine(False)
        print("cancelled ok")

    trio.run(main)
    """
)

# With room for one opened event, an event a queued copy still needs is not destroyed.
QUEUED_EVENTS_ARE_KEPT = PRELUDE + textwrap.dedent(
    """
    async def main():
        cuda_cache.MAX_OPEN_EVENTS = 1
        transfer, arena, tensors, export, cache = setup(copies_in_flight=1)
        transfer.copy_timeout_s = 600
        events = [interprocess_event() for _ in range(3)]
        hang_engine()
        for event, _ in events:
            call(driver.cuEventRecord, event, 0)
        size = cache.layout.chunk_bytes(2)
        failures = []
        async def store(n):
            try:
                await transfer.store(cache, jobs_for(cache, arena, at=n * 2 * size), ipc_event=events[n][1])
            except TrioKVError as exc:
                failures.append((n, exc.message))
        async with trio.open_nursery() as nursery:
            for n in range(3):  # the first copies, the next two queue for the one slot
                nursery.start_soon(store, n)
                await trio.testing.wait_all_tasks_blocked()
            hang_engine(False)
        assert failures == [], failures
        for n in range(3):
            assert torch.equal(arena[n * 2 * size : (n + 1) * 2 * size], expected_store(tensors)), n
        assert len(cache._events) <= 1 + (cache.registered_event is not None), "idle events were not evicted"
        print("queued events ok")

    trio.run(main)
    """
)

# Dropping a CUDA registration (its connection went away) closes its IPC mappings.
DROPPED_REGISTRATION_IS_UNMAPPED = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            closed_before = server.server.connections.closed_count
            opened, closed = counter("stub_ipc_open").value, counter("stub_ipc_close").value
            client = await AsyncClient.connect(server.url)
            await client.register(export.register_request("engine"))
            assert isinstance(server.engine.instances["engine"], MappedCudaKVCache)
            assert counter("stub_ipc_open").value == opened + 2
            client.close()
            with trio.fail_after(10):
                await server.server.connections.wait_closed(closed_before + 1)
            assert server.engine.instances == {}
            gc.collect()
            assert await server.engine.transfer.wait_released()
            assert counter("stub_ipc_close").value == closed + 2, "the dead engine's memory is still mapped"
        print("dropped ok")

    trio.run(main)
    """
)

# The event loop answers a Ping while a registration's cuIpcOpenMemHandle is still under way.
LOOP_RUNS_WHILE_A_REGISTRATION_OPENS = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            opened = counter("stub_ipc_open").value
            async with await AsyncClient.connect(server.url) as engine, await AsyncClient.connect(server.url) as other:
                gate(opens=True)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(engine.register, export.register_request("engine"))
                    assert await ipc_call_waiting()
                    with trio.fail_after(2):
                        await other.ping()
                    assert counter("stub_ipc_blocked").value == 1, "the Ping waited for the IPC open"
                    gate()
                assert counter("stub_gate_timeouts").value == 0
                assert counter("stub_ipc_open").value == opened + 2
                assert isinstance(server.engine.instances["engine"], MappedCudaKVCache)
        print("loop runs while opening ok")

    trio.run(main)
    """
)

# ... and while a dropped registration's cuIpcCloseMemHandle is under way.
LOOP_RUNS_WHILE_A_DROPPED_REGISTRATION_CLOSES = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            closed = counter("stub_ipc_close").value
            async with await AsyncClient.connect(server.url) as other:
                engine = await AsyncClient.connect(server.url)
                await engine.register(export.register_request("engine"))
                gate(closes=True)
                closed_before = server.server.connections.closed_count
                engine.close()
                assert await ipc_call_waiting()
                with trio.fail_after(2):
                    await server.server.connections.wait_closed(closed_before + 1)
                    await other.ping()
                assert counter("stub_ipc_blocked").value == 1, "the Ping waited for the IPC close"
                gate()
                assert await server.engine.transfer.wait_released()
            assert counter("stub_gate_timeouts").value == 0
            assert counter("stub_ipc_close").value == closed + 2
        print("loop runs while closing ok")

    trio.run(main)
    """
)

# A registration cancelled while its mappings open stops there and closes what it opened.
CANCELLED_OPEN_CLOSES_WHAT_IT_OPENED = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer = CudaTransfer()
        export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
        request = decode_request(encode(export.register_request("w")), 1 << 20)
        opened, closed = counter("stub_ipc_open").value, counter("stub_ipc_close").value
        async def open_then_cancelled(task_status):
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await transfer.aopen(request)
            assert scope.cancelled_caught

        gate(opens=True)
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(open_then_cancelled)
            assert await ipc_call_waiting()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()  # aopen saw the cancellation
            gate()
        assert await transfer.wait_released()
        assert counter("stub_gate_timeouts").value == 0
        assert counter("stub_ipc_open").value == opened + 1, "kept opening after it was cancelled"
        assert counter("stub_ipc_close").value == closed + 1, "a cancelled registration left a mapping open"
        assert counter("stub_live_streams").value == 0
        print("cancelled open ok")

    trio.run(main)
    """
)

# A registration whose connection goes away while it opens is closed, not kept for no one.
REGISTRATION_OF_A_GONE_CONNECTION_IS_CLOSED = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            opened, closed = counter("stub_ipc_open").value, counter("stub_ipc_close").value
            engine = await AsyncClient.connect(server.url, timeout_s=1)
            gate(opens=True)
            async with trio.open_nursery() as nursery:
                async def register():
                    with trio.move_on_after(30):
                        try:
                            await engine.register(export.register_request("engine"))
                        except Exception:
                            pass  # no reply comes: the connection is gone
                nursery.start_soon(register)
                assert await ipc_call_waiting()
                closed_before = server.server.connections.closed_count
                engine.close()
                await server.server.connections.wait_closed(closed_before + 1)
                gate()
                await server.server.wait_idle()
            assert server.engine.instances == {}, "a registration is held for a connection that is gone"
            gc.collect()
            assert await server.engine.transfer.wait_released()
            assert counter("stub_ipc_open").value == opened + 2
            assert counter("stub_ipc_close").value == closed + 2
        print("gone connection ok")

    trio.run(main)
    """
)

# Stopping the server closes the mappings of engines still connected.
SHUTDOWN_CLOSES_EVERY_MAPPING = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        closed = counter("stub_ipc_close").value
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            engine = await AsyncClient.connect(server.url)
            await engine.register(export.register_request("engine"))
        assert counter("stub_ipc_close").value == closed + 2, "the server stopped with mappings open"
        engine.close()
        print("shutdown ok")

    trio.run(main)
    """
)

# The batch entry point is looked up when the backend starts, never again by a copy.
BATCH_ENTRY_RESOLVED_AT_START = PRELUDE + textwrap.dedent(
    """
    import logging, sys
    from trio_kv.transfer.events import driver_status
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)

    async def main():
        assert driver_status() is None, driver_status()
        before = counter("stub_batch_lookups").value
        transfer, arena, tensors, export, cache = setup()
        at_start = counter("stub_batch_lookups").value
        assert at_start == before + 1, "the backend did not look up cuMemcpyBatchAsync when it started"
        print("copier:", transfer.copier.describe())
        await transfer.store(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
        await transfer.retrieve(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
        assert counter("stub_batch_lookups").value == at_start, "a copy looked the entry point up again"
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        print("resolved at start ok")

    trio.run(main)
    """
)

# Below CUDA 12.8 (no cuMemcpyBatchAsync) every piece is copied with cuMemcpyAsync.
PER_PIECE_BELOW_12_8 = PRELUDE + textwrap.dedent(
    """
    import logging
    from trio_kv.transfer.events import driver_status
    logging.basicConfig(level=logging.INFO)

    async def main():
        assert driver_status() is None, driver_status()
        transfer, arena, tensors, export, cache = setup()
        batches, pieces = counter("stub_batch_calls").value, counter("stub_memcpy_calls").value
        await transfer.store(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
        assert counter("stub_batch_calls").value == batches
        assert counter("stub_memcpy_calls").value == pieces + 16, "one cuMemcpyAsync per piece"
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        print("per piece ok")

    trio.run(main)
    """
)


@pytest.fixture(scope="module")
def stub_env(tmp_path_factory) -> dict[str, str]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler to build the stub driver")
    where = tmp_path_factory.mktemp("stub-cuda")
    source = where / "stub.c"
    source.write_text(STUB_C)
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-O1",
            "-o",
            str(where / "libcuda.so.1"),
            str(source),
            "-ldl",
            "-lpthread",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env = {**os.environ, "LD_LIBRARY_PATH": f"{where}{os.pathsep}{os.environ.get('LD_LIBRARY_PATH', '')}"}
    probe = "from trio_kv.transfer.events import driver_status; print(driver_status())"
    status = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    if status.stdout.strip() != "None":
        pytest.skip(
            f"cuda-bindings did not load the stub driver: {status.stdout.strip() or status.stderr[-500:]}"
        )
    return env


def run(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    pytest.fail(f"still running after {timeout} s (a wait without bound?)")


def check(script: str, env: dict[str, str], ok: str, timeout: float = 120) -> None:
    done = run([sys.executable, "-c", script], env, timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert ok in done.stdout


def test_ipc_export_open_store_wait_cancel_and_release_against_the_stub(stub_env):
    check(CHECKS, stub_env, "stub checks ok")


def test_a_request_waits_for_its_own_event_not_the_engines_next_step(stub_env):
    check(EACH_REQUEST_ITS_OWN_EVENT, stub_env, "own event ok", timeout=60)


def test_a_copy_behind_a_hung_engine_fails_in_time_and_frees_its_slot(stub_env):
    check(HUNG_ENGINE_TIMES_OUT, stub_env, "hung engine ok", timeout=60)


def test_cancelling_a_copy_behind_a_hung_engine_returns_at_once(stub_env):
    check(HUNG_ENGINE_CANCELLED, stub_env, "cancelled ok", timeout=60)


def test_an_event_a_queued_copy_needs_is_not_evicted(stub_env):
    check(QUEUED_EVENTS_ARE_KEPT, stub_env, "queued events ok", timeout=60)


def test_dropping_a_cuda_registration_closes_its_ipc_mappings(stub_env):
    check(DROPPED_REGISTRATION_IS_UNMAPPED, stub_env, "dropped ok")


def test_the_event_loop_runs_while_a_registration_opens_its_mappings(stub_env):
    check(LOOP_RUNS_WHILE_A_REGISTRATION_OPENS, stub_env, "loop runs while opening ok", timeout=60)


def test_the_event_loop_runs_while_a_dropped_registration_closes_its_mappings(stub_env):
    check(LOOP_RUNS_WHILE_A_DROPPED_REGISTRATION_CLOSES, stub_env, "loop runs while closing ok", timeout=60)


def test_a_registration_cancelled_while_opening_closes_what_it_opened(stub_env):
    check(CANCELLED_OPEN_CLOSES_WHAT_IT_OPENED, stub_env, "cancelled open ok", timeout=60)


def test_a_registration_whose_connection_went_away_while_opening_is_closed(stub_env):
    check(REGISTRATION_OF_A_GONE_CONNECTION_IS_CLOSED, stub_env, "gone connection ok", timeout=60)


def test_stopping_the_server_closes_every_mapping(stub_env):
    check(SHUTDOWN_CLOSES_EVERY_MAPPING, stub_env, "shutdown ok", timeout=60)


def test_the_batch_entry_point_is_resolved_when_the_backend_starts(stub_env):
    done = run([sys.executable, "-c", BATCH_ENTRY_RESOLVED_AT_START], stub_env, 60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "copier: batched copies (cuMemcpyBatchAsync)" in done.stdout
    assert "resolved at start ok" in done.stdout


def test_a_driver_without_the_batch_entry_point_is_named_at_start_and_copies_per_piece(stub_env):
    env = {**stub_env, "STUB_BATCH_ENTRY": "none"}
    done = run([sys.executable, "-c", BATCH_ENTRY_RESOLVED_AT_START], env, 60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    said = done.stdout.split("resolved at start ok")[0]
    # Said before the first copy: the backend's start line and the copier's description.
    assert "the driver gave no cuMemcpyBatchAsync entry point" in said.split("copier:")[0], said
    assert "copier: one cuMemcpyAsync per piece" in said


def test_a_failing_batch_entry_point_lookup_stops_the_cuda_backend_at_start(stub_env):
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from trio_kv.transfer import CpuTransfer, CudaUnavailable, select_backend
        try:
            select_backend("cuda")
        except CudaUnavailable as exc:
            print("cuda refused:", exc)
        else:
            raise AssertionError("the cuda backend started with a failing cuGetProcAddress")
        backend = select_backend("auto")
        assert type(backend) is CpuTransfer, backend
        print("auto fell back ok")
        """
    )
    done = run([sys.executable, "-c", script], {**stub_env, "STUB_BATCH_ENTRY": "fail"}, 60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "cuda refused:" in done.stdout and "cuGetProcAddress" in done.stdout, done.stdout
    assert "auto fell back ok" in done.stdout
    assert "cuda backend failed" in done.stdout, "auto did not say why it used cpu"


def test_below_cuda_12_8_pieces_are_copied_one_by_one(stub_env):
    env = {**stub_env, "STUB_CUDA_VERSION": "12040"}
    done = run([sys.executable, "-c", PER_PIECE_BELOW_12_8], env, 60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "per piece ok" in done.stdout
    assert "cuMemcpyAsync" in done.stderr and "12.4" in done.stderr, "the backend's choice was not logged"


def test_an_allocation_cuda_ipc_cannot_export_names_the_allocator(stub_env):
    script = PRELUDE + textwrap.dedent(
        """
        counter("stub_fail_ipc_get", ctypes.c_int).value = 1
        try:
            CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
        except ValueError as exc:
            assert "expandable_segments" in str(exc) and "PYTORCH_CUDA_ALLOC_CONF" in str(exc), exc
            assert "PYTORCH_ALLOC_CONF=" in str(exc), exc
            print("allocator named ok")
        """
    )
    check(script, stub_env, "allocator named ok", timeout=60)


def test_device_tests_pass_against_the_stub(stub_env):
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_gpu_cuda.py"],
        stub_env,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout
    # Only the engine-process test may skip (it needs PyTorch with CUDA): the ordering and
    # cancellation tests hold a stream with cuStreamWaitValue32, which the stub runs.
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("needs PyTorch with CUDA" in line for line in skips), skips


def test_bench_gpu_runs_and_verifies_against_the_stub(stub_env):
    code = (
        "import argparse, sys\n"
        "from trio_kv.tools import bench_gpu\n"
        "parser = argparse.ArgumentParser()\n"
        "bench_gpu.add_parser(parser.add_subparsers(dest='bench'))\n"
        "args = parser.parse_args(['gpu', '--json', '--chunks', '1', '--layers', '2', '--rounds', '1'])\n"
        "sys.exit(bench_gpu.main(args))\n"
    )
    done = run([sys.executable, "-c", code], stub_env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert '"verified": true' in done.stdout and '"per_layer"' in done.stdout
