"""A lookup sees stores still in flight: chunks a Store is copying, or that another request's
lookup claimed (it will store them), are waited for, bounded by ``inflight_wait_s``."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trio_kv.client import AsyncClient
from trio_kv.core.engine import CacheEngine, EngineSettings
from trio_kv.core.l1 import L1Store
from trio_kv.keys import RequestKey
from trio_kv.protocol import EndSession, Lookup, LookupResult, Store
from trio_kv.testing import FaultInjector, assert_no_leaks, make_kv_cache, running_server
from trio_kv.transfer import CpuTransfer

CHUNK = 32
TOKENS = list(range(3 * CHUNK))
WAIT_S = 2.0


def store(request_id: str = "a", tokens: list[int] = TOKENS) -> Store:
    return Store("w", RequestKey("m", 1, 0, tokens, request_id=request_id), list(range(6)))


def lookup(request_id: str, *, claim: bool = False, tokens: list[int] = TOKENS) -> Lookup:
    return Lookup(RequestKey("m", 1, None, tokens, request_id=request_id), claim=claim)


@pytest.fixture
def kv():
    with make_kv_cache(num_blocks=32, block_size=16, num_layers=2) as cache:
        yield cache


class InlineTransfer(CpuTransfer):
    """The CPU copies, run on the Trio thread: with the autojump clock, virtual time must not
    jump while a copy runs in a worker thread."""

    async def _run(self, copy, cache, jobs) -> None:
        copy(jobs, 0, 1)


def make_engine(
    kv, faults=None, wait_s: float = WAIT_S, l1_bytes: int = 8 * 1024 * 1024, max_waiters: int = 32
) -> CacheEngine:
    engine = CacheEngine(
        EngineSettings(chunk_size=CHUNK, inflight_wait_s=wait_s, inflight_max_waiters=max_waiters),
        L1Store(l1_bytes),
        InlineTransfer(),
        faults=faults,
    )
    engine.register(kv.register_request("w"))
    return engine


class Answer:
    """Runs a lookup in the background and keeps its result."""

    def __init__(self) -> None:
        self.result: LookupResult | None = None

    async def run(self, engine: CacheEngine, request: Lookup) -> None:
        self.result = await engine.lookup(request)


async def test_a_lookup_waits_for_a_store_being_copied_and_hits_once_it_commits(kv):
    faults = FaultInjector("store.before_copy", "hang")
    engine = make_engine(kv, faults)
    answer = Answer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.store, store())
        await faults.reached.wait()
        nursery.start_soon(answer.run, engine, lookup("b"))
        await trio.testing.wait_all_tasks_blocked()
        assert answer.result is None  # waiting, not a miss
        faults.release.set()
    assert answer.result is not None and answer.result.hit_tokens == 3 * CHUNK
    assert engine.status().inflight_hits == 3
    assert len(engine.inflight) == 0 and engine.audit() == []


async def test_a_claimed_chunk_is_waited_for_until_the_claimer_stores_it(kv):
    engine = make_engine(kv)
    first = await engine.lookup(lookup("a", claim=True))
    assert first.hit_tokens == 0 and len(engine.inflight) == 3
    answer = Answer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer.run, engine, lookup("b"))
        await trio.testing.wait_all_tasks_blocked()
        assert answer.result is None
        await engine.store(store("a"))
    assert answer.result is not None and answer.result.hit_tokens == 3 * CHUNK
    assert len(engine.leases) == 3  # leased to "b" as any hit is
    assert len(engine.inflight) == 0


async def test_a_lookup_without_claim_makes_nothing_pending(kv):
    engine = make_engine(kv)
    await engine.lookup(lookup("a"))
    assert len(engine.inflight) == 0
    assert (await engine.lookup(lookup("b"))).hit_tokens == 0


async def test_a_request_does_not_wait_for_its_own_claim(kv):
    engine = make_engine(kv)
    await engine.lookup(lookup("a", claim=True))
    with trio.fail_after(1):  # autojump would hide a wait: real time, far below WAIT_S
        again = await engine.lookup(lookup("a", claim=True))
    assert again.hit_tokens == 0


async def test_a_claim_not_stored_in_time_is_a_miss_at_the_deadline(kv, autojump_clock):
    engine = make_engine(kv)
    await engine.lookup(lookup("a", claim=True))
    started = trio.current_time()
    result = await engine.lookup(lookup("b"))
    assert result.hit_tokens == 0
    assert trio.current_time() - started == pytest.approx(WAIT_S)
    status = engine.status()
    assert (status.inflight_wait_timeouts, status.inflight_hits, status.inflight_chunks) == (1, 0, 0)
    assert len(engine.leases) == 0 and engine.audit() == []


async def test_each_chunk_the_claimer_stores_pushes_the_deadline_back(kv, autojump_clock):
    engine = make_engine(kv)
    await engine.lookup(lookup("a", claim=True))
    answer = Answer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer.run, engine, lookup("b"))
        # A prefill that stores a chunk every 1.5 s: 4.5 s in all, each step inside WAIT_S.
        for end in (1, 2, 3):
            await trio.sleep(1.5)
            await engine.store(store("a", TOKENS[: end * CHUNK]))
    assert answer.result is not None and answer.result.hit_tokens == 3 * CHUNK
    assert engine.status().inflight_wait_timeouts == 0


async def test_the_claimers_session_end_before_its_store_still_lets_waiters_hit(kv):
    # vLLM's scheduler ends a finished request's session while its workers' stores may still be
    # on their way: the claim must outlive the session.
    engine = make_engine(kv)
    await engine.lookup(lookup("a", claim=True))
    answer = Answer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer.run, engine, lookup("b"))
        await trio.testing.wait_all_tasks_blocked()
        engine.end_session(EndSession("a"))
        await trio.testing.wait_all_tasks_blocked()
        assert answer.result is None
        await engine.store(store("a"))
    assert answer.result is not None and answer.result.hit_tokens == 3 * CHUNK


async def test_a_store_refused_for_lack_of_room_wakes_its_waiters_as_a_miss(kv, autojump_clock):
    engine = make_engine(kv, l1_bytes=4096)  # room for no chunk
    await engine.lookup(lookup("a", claim=True))
    answer = Answer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer.run, engine, lookup("b"))
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        result = await engine.store(store("a"))
    assert (result.stored, result.skipped_no_room) == (0, 3)
    assert answer.result is not None and answer.result.hit_tokens == 0
    assert trio.current_time() == started
    assert len(engine.inflight) == 0


async def test_a_zero_wait_turns_it_off(kv):
    engine = make_engine(kv, wait_s=0)
    await engine.lookup(lookup("a", claim=True))
    assert len(engine.inflight) == 0
    assert (await engine.lookup(lookup("b"))).hit_tokens == 0


async def test_the_claiming_connection_going_away_ends_a_waiting_lookup_as_a_miss():
    async with running_server(chunk_size=CHUNK, inflight_wait_s=60) as server:
        claimer = await AsyncClient.connect(server.url)
        assert (
            await claimer.lookup(RequestKey("m", 1, None, TOKENS, request_id="a"), claim=True)
        ).hit_tokens == 0
        async with await AsyncClient.connect(server.url) as other:
            answer: list[int] = []

            async def wait_for_it() -> None:
                result = await other.lookup(RequestKey("m", 1, None, TOKENS, request_id="b"))
                answer.append(result.hit_tokens)

            with trio.fail_after(10):  # far below inflight_wait_s
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_for_it)
                    while server.engine.requests_in_flight == 0:
                        await trio.testing.wait_all_tasks_blocked()
                    claimer.close()
            assert answer == [0]
        assert len(server.engine.inflight) == 0
        assert_no_leaks(server)


async def test_lookups_past_the_waiter_limit_miss_at_once_so_stores_still_get_a_worker(kv):
    engine = make_engine(kv, max_waiters=1)
    await engine.lookup(lookup("a", claim=True))
    answer = Answer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer.run, engine, lookup("b"))
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1):  # real time, far below WAIT_S
            assert (await engine.lookup(lookup("c"))).hit_tokens == 0
        await engine.store(store("a"))
    assert answer.result is not None and answer.result.hit_tokens == 3 * CHUNK
