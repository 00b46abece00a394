"""Lookups answered without waiting: ``CacheEngine.lookup_now`` and the listener's ``handle_now``
path. Where a lookup would wait (a chunk in flight, L2 to ask, fault injection) the now path
answers None and does nothing, and the async path answers as before."""

from __future__ import annotations

import pynng
import pytest
import trio
import trio.testing

from trio_kv.client import AsyncClient
from trio_kv.keys import RequestKey
from trio_kv.protocol import Error, Lookup, decode_reply, encode
from trio_kv.server.transport import ANSWERED_PER_CHECKPOINT, RawListener, open_raw_rep
from trio_kv.testing import FaultInjector, make_kv_cache, running_server

from .test_inflight import CHUNK, TOKENS, lookup, make_engine, store


@pytest.fixture
def kv():
    with make_kv_cache(num_blocks=32, block_size=16, num_layers=2) as cache:
        yield cache


async def test_lookup_now_answers_as_lookup_does_hit_partial_and_miss(kv):
    now, later = make_engine(kv), make_engine(kv)
    for engine in (now, later):
        await engine.store(store("s", tokens=TOKENS[: 2 * CHUNK]))
    for request_id, tokens in [("hit", TOKENS[: 2 * CHUNK]), ("partial", TOKENS), ("miss", [7] * CHUNK)]:
        request = Lookup(RequestKey("m", 1, None, tokens, request_id=request_id))
        assert now.lookup_now(request) == await later.lookup(request)
    assert len(now.leases) == len(later.leases) == 4  # "hit" and "partial" each lease 2 chunks
    assert now.audit() == [] and later.audit() == []


async def test_lookup_now_claims_what_misses_as_lookup_does(kv):
    engine = make_engine(kv)
    result = engine.lookup_now(lookup("a", claim=True))
    assert result is not None and result.hit_tokens == 0
    assert len(engine.inflight) == 3


async def test_a_chunk_in_flight_for_another_request_sends_it_to_lookup_untouched(kv):
    engine = make_engine(kv)
    await engine.lookup(lookup("a", claim=True))
    assert engine.lookup_now(lookup("b")) is None
    assert len(engine.leases) == 0 and len(engine.inflight) == 3
    again = engine.lookup_now(lookup("a", claim=True))  # its own claim is not waited for
    assert again is not None and again.hit_tokens == 0


async def test_with_fault_injection_every_lookup_goes_the_async_way(kv):
    engine = make_engine(kv, faults=FaultInjector("never.reached", "hang"))
    assert engine.lookup_now(lookup("a")) is None


async def test_with_an_l2_tier_only_a_whole_l1_hit_is_answered_now(tmp_path):
    async with (
        running_server(chunk_size=CHUNK, l2=[f"fs://{tmp_path}"]) as server,
        await AsyncClient.connect(server.url) as client,
    ):
        with make_kv_cache(num_blocks=32, block_size=16, num_layers=2) as cache:
            await client.register_kv_cache("w", cache)
            key = RequestKey("m", 1, 0, TOKENS[: 2 * CHUNK], request_id="s")
            await client.store("w", key, list(range(4)))
            engine = server.server.engine
            whole = Lookup(RequestKey("m", 1, None, TOKENS[: 2 * CHUNK], request_id="x"))
            partial = Lookup(RequestKey("m", 1, None, TOKENS, request_id="y"))
            assert engine.lookup_now(whole) is not None
            assert engine.lookup_now(partial) is None  # L2 may hold the third chunk
            assert (await client.lookup(partial.key)).hit_tokens == 2 * CHUNK


async def test_a_bad_key_is_refused_by_the_now_path_as_by_the_async_one():
    async with running_server(chunk_size=CHUNK) as server:
        bad = Lookup(RequestKey("m", 1, 0, TOKENS, request_id="r", cache_salt="x" * 100_000))
        buf = encode(bad)
        now = server.server.handle_now(buf)
        assert now is not None
        assert decode_reply(now) == decode_reply(await server.server.handle(buf))
        assert type(decode_reply(now)) is Error


async def test_requests_answered_now_do_not_wait_for_busy_workers(tmp_path):
    # One worker, held by a request the now path declines; requests it answers still get replies.
    held, release = trio.Event(), trio.Event()

    async def handler(body: bytes, pipe_id: int) -> bytes:
        held.set()
        await release.wait()
        return b"slow:" + body

    def handle_now(body: bytes, pipe_id: int) -> bytes | None:
        return None if body.startswith(b"slow") else b"now:" + body

    url = f"ipc://{tmp_path}/l.sock"
    sock = open_raw_rep(listen=url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(RawListener(sock, handler, workers=1, handle_now=handle_now).serve)
        with pynng.Req0(dial=url, recv_timeout=5000) as req:
            slow = req.new_context()
            await slow.asend(b"slow")
            await held.wait()
            replies = []
            for n in range(3 * ANSWERED_PER_CHECKPOINT):
                await req.asend(b"%d" % n)
                replies.append(await req.arecv())
            assert replies == [b"now:%d" % n for n in range(3 * ANSWERED_PER_CHECKPOINT)]
            release.set()
            assert await slow.arecv() == b"slow:slow"
            slow.close()
        nursery.cancel_scope.cancel()
    sock.close()


async def test_a_flood_of_requests_answered_now_still_lets_other_tasks_run(tmp_path):
    # The receiving task checkpoints every ANSWERED_PER_CHECKPOINT replies, so another task
    # gets a turn while a burst is queued. Trio runs a round's tasks in random order, so the
    # other task may see two batches in a row between its turns, never more.
    turns = 0
    runs = [0]  # replies in a row since the other task's last turn

    async def handler(body: bytes, pipe_id: int) -> bytes:
        raise AssertionError("every request is answered now")

    def handle_now(body: bytes, pipe_id: int) -> bytes | None:
        nonlocal turns
        if turns:
            runs.append(0)
            turns = 0
        runs[-1] += 1
        return body

    async def other_task() -> None:
        nonlocal turns
        while True:
            await trio.lowlevel.checkpoint()
            turns += 1

    url = f"ipc://{tmp_path}/l.sock"
    sock = open_raw_rep(listen=url)
    burst = 6 * ANSWERED_PER_CHECKPOINT
    with pynng.Req0(dial=url, recv_timeout=5000) as req:
        contexts = [req.new_context() for _ in range(burst)]
        for n, ctx in enumerate(contexts):
            await ctx.asend(b"%d" % n)
        await trio.sleep(0.2)  # all queued in nng before the listener starts
        async with trio.open_nursery() as nursery:
            nursery.start_soon(RawListener(sock, handler, workers=1, handle_now=handle_now).serve)
            nursery.start_soon(other_task)
            got = [await ctx.arecv() for ctx in contexts]
            nursery.cancel_scope.cancel()
        for ctx in contexts:
            ctx.close()
    sock.close()
    assert got == [b"%d" % n for n in range(burst)]
    assert sum(runs) == burst
    assert max(runs) <= 2 * ANSWERED_PER_CHECKPOINT  # without the checkpoints: the whole burst
