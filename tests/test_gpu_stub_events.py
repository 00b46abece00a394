"""The engine side's interprocess events, against the stub driver (tests/test_gpu_stub.py).

A ring of events is reused: a record overwrites an event's state, and a query reports the
latest record. So a ring must belong to one stream: reused on another stream, a request's event
could complete when that other stream's later work does, before the work it was recorded after.
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


def test_each_stream_records_its_own_ring_of_events(stub_env):
    check(EACH_STREAM_ITS_OWN_RING, stub_env, "rings ok", timeout=60)
