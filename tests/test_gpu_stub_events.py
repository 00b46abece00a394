"""Events and streams, against the stub driver (tests/test_gpu_stub.py).

A ring of events is reused: a record overwrites an event's state, and a query reports the
latest record. So a ring must belong to one stream: reused on another stream, a request's event
could complete when that other stream's later work does, before the work it was recorded after.
On the server side a retrieve (the engine waits for it before its forward pass) must not queue
behind stores' copies: each direction has its own stream, retrieves the higher priority.
"""

from __future__ import annotations

import textwrap

from tests import test_gpu_stub
from tests.test_gpu_stub import PRELUDE, check

stub_env = test_gpu_stub.stub_env  # the fixture that builds the stub driver

EACH_STREAM_ITS_OWN_RING = PRELUDE + textwrap.dedent(
    """
    from trio_kv.export.ipc import EVENT_RING

    async def main():
        transfer, arena, tensors, export, cache = setup()
        assert export.registration.event_handle == b"", "the registration names an event no one records"
        transfer.copy_timeout_s = 0.3
        side = call(driver.cuStreamCreate, driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
        hang_engine()  # stream 0's work never completes
        on_main = export.record_event(stream=0)
        on_side = [export.record_event(stream=int(side)) for _ in range(EVENT_RING)]
        assert on_main not in on_side, "a request's event was re-recorded on another stream"
        try:
            await transfer.store(cache, jobs_for(cache, arena), ipc_event=on_main)
        except TrioKVError as exc:
            assert exc.code is ErrorCode.TRANSFER_FAILED and "0.3" in exc.message, exc
        else:
            raise AssertionError("a store ran before the work its event was recorded after")
        await transfer.store(cache, jobs_for(cache, arena), ipc_event=on_side[-1])
        assert torch.equal(arena[: 2 * cache.layout.chunk_bytes(2)], expected_store(tensors))
        hang_engine(False)
        later = [export.record_event(stream=0) for _ in range(EVENT_RING)]
        assert later[-1] == on_main, "stream 0's ring is not reused in turn"
        export.close()
        assert counter("stub_live_events").value == len(cache._events), "the export left events alive"
        print("rings ok")

    trio.run(main)
    """
)


RETRIEVES_DO_NOT_QUEUE_BEHIND_STORES = PRELUDE + textwrap.dedent(
    """
    async def main():
        priority_streams = counter("stub_priority_streams").value
        transfer, arena, tensors, export, cache = setup()
        assert counter("stub_priority_streams").value == priority_streams + 1, "no high-priority stream"
        assert int(cache.store_stream) != int(cache.retrieve_stream)
        size = cache.layout.chunk_bytes(2)
        stored = trio.Event()
        async def store():
            await transfer.store(cache, jobs_for(cache, arena))
            stored.set()
        stub.stub_hold(int(cache.store_stream), 1)  # the stores' copies wait on the "GPU"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            await trio.testing.wait_all_tasks_blocked()
            arena[4 * size : 6 * size] = 7
            with trio.fail_after(5):
                await transfer.retrieve(cache, jobs_for(cache, arena, at=4 * size))
            assert not stored.is_set(), "the store was not held"
            assert all(bool((t.host[:, b].view(torch.uint8) == 7).all()) for t in tensors for b in (5, 2, 7, 0))
            stub.stub_hold(int(cache.store_stream), 0)
        assert torch.equal(arena[: 2 * size], expected_store(tensors))
        print("streams ok")

    trio.run(main)
    """
)


def test_a_retrieve_does_not_queue_behind_a_store(stub_env):
    check(RETRIEVES_DO_NOT_QUEUE_BEHIND_STORES, stub_env, "streams ok", timeout=60)


def test_each_stream_records_its_own_ring_of_events(stub_env):
    check(EACH_STREAM_ITS_OWN_RING, stub_env, "rings ok", timeout=60)
