"""Every reservation, pin, lease and byte is given back when a request fails, times out,
is cancelled, or its client vanishes, at every await point of store, lookup and retrieve."""

from __future__ import annotations

import threading

import pynng
import pytest
import trio
import trio.testing

from trio_kv.client import AsyncClient
from trio_kv.core.engine import CacheEngine, EngineSettings
from trio_kv.core.l1 import L1Store
from trio_kv.errors import ErrorCode, ServerError
from trio_kv.keys import RequestKey
from trio_kv.protocol import Lookup, ReleaseLookup, Retrieve, Store, encode
from trio_kv.testing import FaultInjector, InjectedFault, assert_no_leaks, make_kv_cache, running_server
from trio_kv.transfer import CpuTransfer

CHUNK = 32
TOKENS = list(range(3 * CHUNK))


def store_request(request_id: str = "r") -> Store:
    return Store("w", RequestKey("m", 1, 0, TOKENS, request_id=request_id), list(range(6)))


def lookup_request(request_id: str = "r") -> Lookup:
    return Lookup(RequestKey("m", 1, None, TOKENS, request_id=request_id))


def retrieve_request(request_id: str = "r") -> Retrieve:
    return Retrieve("w", RequestKey("m", 1, 0, TOKENS, request_id=request_id), list(range(10, 16)))


class Setup:
    """An engine over real shared memory and a real CPU transfer path, no sockets."""

    def __init__(self, kv, faults=None, transfer=None) -> None:
        self.l1 = L1Store(8 * 1024 * 1024)
        self.engine = CacheEngine(
            EngineSettings(chunk_size=CHUNK), self.l1, transfer or CpuTransfer(), faults=faults
        )
        self.engine.register(kv.register_request("w"))

    def assert_clean(self, *, leases_allowed: bool = False) -> None:
        assert self.engine.audit() == []
        if not leases_allowed:
            assert len(self.engine.leases) == 0


FLOWS = {
    "store": lambda engine: engine.store(store_request()),
    "lookup": lambda engine: engine.lookup(lookup_request()),
    "retrieve": lambda engine: engine.retrieve(retrieve_request()),
}


async def prepare(setup: Setup, flow: str) -> None:
    """Put the cache in the state the flow under test expects (chunks stored for lookups
    and retrieves, plus the leases a lookup leaves for retrieve)."""
    faults, setup.engine.faults = setup.engine.faults, None
    if flow != "store":
        await setup.engine.store(store_request("setup"))
    if flow == "retrieve":
        await setup.engine.lookup(lookup_request())
    setup.engine.faults = faults


async def points_of(flow: str, kv) -> list[str]:
    recorder = FaultInjector()
    setup = Setup(kv)
    await prepare(setup, flow)
    setup.engine.faults = recorder
    await FLOWS[flow](setup.engine)
    return recorder.seen


@pytest.fixture
def kv():
    with make_kv_cache(num_blocks=32, block_size=16, num_layers=2) as cache:
        yield cache


async def test_every_flow_has_fault_points(kv):
    assert await points_of("store", kv) == ["store.before_copy", "store.after_copy"]
    assert await points_of("lookup", kv) == ["lookup.before_scan"]
    assert await points_of("retrieve", kv) == ["retrieve.before_copy", "retrieve.after_copy"]


@pytest.mark.parametrize("flow", list(FLOWS))
async def test_a_failure_at_any_point_leaves_no_trace(kv, flow):
    for point in await points_of(flow, kv):
        injector = FaultInjector(point, "raise")
        setup = Setup(kv, faults=injector)
        await prepare(setup, flow)
        before = (setup.l1.ledger.total, len(setup.l1), len(setup.engine.leases))
        with pytest.raises(InjectedFault):
            await FLOWS[flow](setup.engine)
        assert injector.fired == 1
        setup.assert_clean(leases_allowed=True)
        # A failed request changes nothing: the lookup's leases stay for a retry.
        assert (setup.l1.ledger.total, len(setup.l1), len(setup.engine.leases)) == before, point


@pytest.mark.parametrize("flow", list(FLOWS))
async def test_a_cancellation_at_any_point_leaves_no_trace(kv, flow):
    for point in await points_of(flow, kv):
        injector = FaultInjector(point, "hang")
        setup = Setup(kv, faults=injector)
        await prepare(setup, flow)
        before = (setup.l1.ledger.total, len(setup.l1), len(setup.engine.leases))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(FLOWS[flow], setup.engine)
            await injector.reached.wait()
            nursery.cancel_scope.cancel()
        setup.assert_clean(leases_allowed=True)
        assert (setup.l1.ledger.total, len(setup.l1), len(setup.engine.leases)) == before, point


class BlockingTransfer(CpuTransfer):
    """A CPU transfer whose copies wait for the test to let them go."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.go = threading.Event()

    def _wait(self) -> None:
        self.started.set()
        assert self.go.wait(10)

    async def store(self, cache, jobs, *, ipc_event=b""):
        await trio.to_thread.run_sync(self._wait)
        await super().store(cache, jobs, ipc_event=ipc_event)

    async def retrieve(self, cache, jobs, *, ipc_event=b""):
        await trio.to_thread.run_sync(self._wait)
        await super().retrieve(cache, jobs, ipc_event=ipc_event)


async def test_a_cancelled_store_frees_its_buffers_only_after_the_copy_thread_is_done(kv):
    transfer = BlockingTransfer()
    setup = Setup(kv, transfer=transfer)
    request_scope = trio.CancelScope()

    async def store() -> None:
        with request_scope:
            await setup.engine.store(store_request())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store)
        await trio.to_thread.run_sync(transfer.started.wait)
        request_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        # Still copying: the reservations must still be held.
        assert setup.l1.ledger.total > 0
        transfer.go.set()
    setup.assert_clean()
    assert len(setup.l1) == 0


class FailingTransfer(CpuTransfer):
    async def store(self, cache, jobs, *, ipc_event=b""):
        raise OSError("device fell off the bus")

    async def retrieve(self, cache, jobs, *, ipc_event=b""):
        raise OSError("device fell off the bus")


async def test_a_failed_copy_is_a_transfer_error_and_frees_everything(kv):
    setup = Setup(kv, transfer=FailingTransfer())
    with pytest.raises(Exception) as err:
        await setup.engine.store(store_request())
    assert err.value.code == ErrorCode.TRANSFER_FAILED
    setup.assert_clean()
    assert len(setup.l1) == 0


async def test_a_request_that_times_out_gets_a_timeout_error_and_leaks_nothing(kv):
    injector = FaultInjector("store.before_copy", "hang")
    async with running_server(chunk_size=CHUNK, request_timeout_s=0.2, faults=injector) as server:
        async with await AsyncClient.connect(server.url) as client:
            await client.register_kv_cache("w", kv)
            with pytest.raises(ServerError) as err:
                await client.call(store_request(), object)
            assert err.value.code == ErrorCode.TIMEOUT
        assert_no_leaks(server)
        assert len(server.engine.l1) == 0


async def test_a_vanished_client_leaks_nothing(kv):
    injector = FaultInjector("store.after_copy", "hang")
    async with running_server(chunk_size=CHUNK, faults=injector) as server:
        # The engine's connection (which holds the registration) stays; the storing one vanishes.
        async with await AsyncClient.connect(server.url) as client:
            await client.register_kv_cache("w", kv)
            with pynng.Req0(resend_time=-1) as sock:
                sock.dial(server.url, block=True)
                await sock.asend(encode(store_request()))
                await injector.reached.wait()
            # The client is gone; the request completes and its reply goes nowhere.
            injector.release.set()
            with trio.fail_after(5):
                await server.server.wait_idle()
            assert_no_leaks(server)
            assert len(server.engine.l1) == 3  # the store finished all its chunks


async def test_a_lookup_cancelled_while_waiting_for_a_chunk_in_flight_leaves_no_trace(kv):
    # Chunk 0 is held; chunks 1 and 2 are claimed by request "a", which has not stored them.
    setup = Setup(kv)
    await setup.engine.store(Store("w", RequestKey("m", 1, 0, TOKENS[:CHUNK], request_id="s"), [0, 1]))
    await setup.engine.lookup(Lookup(RequestKey("m", 1, None, TOKENS, request_id="a"), claim=True))
    setup.engine.release(ReleaseLookup("a"))
    waiting = trio.CancelScope()

    async def lookup() -> None:
        with waiting:
            await setup.engine.lookup(lookup_request("b"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        assert not waiting.cancel_called and len(setup.engine.inflight) == 2
        waiting.cancel()
    setup.assert_clean()
    assert all(not entry.pinned for entry in setup.l1._entries.values())
    assert len(setup.engine.inflight) == 2  # the claim stays for the lookups still to come


async def test_a_lookup_waiting_past_the_request_timeout_gets_a_timeout_error_and_leaks_nothing():
    async with running_server(chunk_size=CHUNK, request_timeout_s=0.2, inflight_wait_s=60) as server:
        async with await AsyncClient.connect(server.url) as client:
            await client.lookup(RequestKey("m", 1, None, TOKENS, request_id="a"), claim=True)
            with pytest.raises(ServerError) as err:
                await client.lookup(RequestKey("m", 1, None, TOKENS, request_id="b"))
            assert err.value.code == ErrorCode.TIMEOUT
        assert_no_leaks(server)
        assert len(server.engine.leases) == 0
