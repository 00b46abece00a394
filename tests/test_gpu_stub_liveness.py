"""A CUDA registration that goes away, against the stub driver (tests/test_gpu_stub.py).

By CUDA's rules an engine must not free memory, or destroy events, that another process still
has open, and a dead engine's event may never complete (or may complete with its blocks half
written). So: an Unregister is answered only once the server has closed the IPC mappings;
copies still waiting for the engine's event stop when the registration goes; and a store whose
registration went during its copy keeps nothing.
"""

from __future__ import annotations

import textwrap

from tests import test_gpu_stub
from tests.test_gpu_stub import PRELUDE, check

stub_env = test_gpu_stub.stub_env  # the fixture that builds the stub driver

UNREGISTER_ANSWERED_ONCE_UNMAPPED = PRELUDE + textwrap.dedent(
    """
    from trio_kv.client import AsyncClient
    from trio_kv.testing import running_server

    async def main():
        async with running_server(transfer="cuda", chunk_size=8, l1_size="8MiB") as server:
            export = CudaKVCacheExport.from_tensors(device_tensors(), block_dim=1, block_size=4)
            closed = counter("stub_ipc_close").value
            async with await AsyncClient.connect(server.url) as engine:
                await engine.register(export.register_request("engine"))
                answered = trio.Event()
                async def unregister():
                    assert (await engine.unregister("engine")).existed
                    answered.set()
                gate(closes=True)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(unregister)
                    assert await ipc_call_waiting(), "the mappings were not closed"
                    await trio.sleep(0.2)
                    assert not answered.is_set(), "Unregister answered while the memory was still mapped"
                    gate()
                assert counter("stub_ipc_close").value == closed + 2
                assert counter("stub_gate_timeouts").value == 0
                assert server.engine.instances == {}
        print("unregister ok")

    trio.run(main)
    """
)

# Retiring a cache (its connection went away) stops a copy behind its hung engine at once.
RETIRED_CACHE_STOPS_WAITING_COPIES = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        transfer.copy_timeout_s = 60
        hang_engine()
        event = export.record_event(stream=0)
        batches, closed = counter("stub_batch_calls").value, counter("stub_ipc_close").value
        failures = []
        async def store():
            try:
                await transfer.store(cache, jobs_for(cache, arena), ipc_event=event)
            except TrioKVError as exc:
                failures.append(exc)
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            await trio.testing.wait_all_tasks_blocked()
            cache.retire()
        assert time.perf_counter() - started < 5, "the copy waited on for the dead engine's event"
        [failure] = failures
        assert failure.code is ErrorCode.TRANSFER_FAILED and "unregistered" in failure.message, failure
        assert counter("stub_batch_calls").value == batches, "copied from a retired cache"
        assert transfer.copy_slots.borrowed_tokens == 0
        assert await transfer.wait_unmapped(cache, 5), "the mappings stayed open after the copy stopped"
        assert counter("stub_ipc_close").value == closed + 2
        try:
            await transfer.store(cache, jobs_for(cache, arena))
        except TrioKVError as exc:
            assert exc.code is ErrorCode.UNKNOWN_INSTANCE, exc
        else:
            raise AssertionError("a copy started on a retired cache")
        hang_engine(False)
        print("retired ok")

    trio.run(main)
    """
)

# A store whose registration goes while its bytes are moving keeps nothing.
RETIRED_DURING_THE_COPY_KEEPS_NOTHING = PRELUDE + textwrap.dedent(
    """
    async def main():
        transfer, arena, tensors, export, cache = setup()
        counter("stub_sync_sleep_us").value = 300_000  # the copy takes 300 ms to complete
        closed = counter("stub_ipc_close").value
        failures = []
        async def store():
            try:
                await transfer.store(cache, jobs_for(cache, arena), ipc_event=export.record_event(stream=0))
            except TrioKVError as exc:
                failures.append(exc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            await trio.sleep(0.1)
            cache.retire()
            assert counter("stub_ipc_close").value == closed, "unmapped under a running copy"
        [failure] = failures
        assert failure.code is ErrorCode.TRANSFER_FAILED and "during the copy" in failure.message, failure
        assert await transfer.wait_unmapped(cache, 5)
        assert counter("stub_ipc_close").value == closed + 2
        counter("stub_sync_sleep_us").value = 1000
        print("during ok")

    trio.run(main)
    """
)


def test_an_unregister_is_answered_only_once_the_ipc_mappings_are_closed(stub_env):
    check(UNREGISTER_ANSWERED_ONCE_UNMAPPED, stub_env, "unregister ok", timeout=60)


def test_a_dropped_registration_stops_copies_waiting_for_its_engine(stub_env):
    check(RETIRED_CACHE_STOPS_WAITING_COPIES, stub_env, "retired ok", timeout=60)


def test_a_store_whose_registration_goes_during_its_copy_keeps_nothing(stub_env):
    check(RETIRED_DURING_THE_COPY_KEEPS_NOTHING, stub_env, "during ok", timeout=60)
