"""Store, lookup and retrieve end to end: real server, real nng sockets, real shared memory."""

from __future__ import annotations

import random

import pytest
import trio

from trio_kv.client import AsyncClient, BlockingClient
from trio_kv.errors import ErrorCode, ServerError, TrioKVError
from trio_kv.keys import RequestKey
from trio_kv.protocol import Lookup, LookupResult
from trio_kv.testing import assert_no_leaks, make_kv_cache, running_server

from .conftest import BLOCK_SIZE, CHUNK_SIZE

BLOCKS_PER_CHUNK = CHUNK_SIZE // BLOCK_SIZE


def prompt(n_tokens: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128_000) for _ in range(n_tokens)]


def key(tokens, rank=0, request_id="req", salt="", start=0, end=None, world_size=1):
    return RequestKey("llama", world_size, rank, tokens, start, end, request_id, salt)


def blocks(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


def assert_same_blocks(kv, src: list[int], dst: list[int]) -> None:
    for s, d in zip(src, dst):
        assert kv.block_bytes(s) == kv.block_bytes(d), f"block {s} != block {d}"


@pytest.mark.parametrize("layout", ["per_layer", "cross_layer"])
async def test_retrieve_returns_exactly_the_stored_bytes(server, layout):
    with make_kv_cache(num_blocks=32, block_size=BLOCK_SIZE, layout=layout) as kv:
        async with await AsyncClient.connect(server.url) as client:
            await client.register_kv_cache("w", kv)
            tokens = prompt(4 * CHUNK_SIZE)
            stored = await client.store("w", key(tokens), blocks(0, 8))
            assert stored.stored == 4
            got = await client.retrieve("w", key(tokens, request_id="other"), blocks(16, 8))
            assert (got.hit_tokens, got.chunks_written) == (4 * CHUNK_SIZE, 4)
            assert_same_blocks(kv, blocks(0, 8), blocks(16, 8))
    assert_no_leaks(server)


async def test_only_full_chunks_are_stored(client, server):
    tokens = prompt(3 * CHUNK_SIZE - 1)
    result = await client.store("worker-0", key(tokens), blocks(0, 6))
    assert result.stored == 2
    assert len(server.engine.l1) == 2


async def test_storing_again_skips_present_chunks(client):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 4))
    again = await client.store("worker-0", key(tokens + prompt(CHUNK_SIZE, 1)), blocks(0, 6))
    assert (again.stored, again.skipped_present, again.skipped_no_room) == (1, 2, 0)


async def test_store_skips_chunks_that_start_before_start(client):
    tokens = prompt(3 * CHUNK_SIZE)
    result = await client.store("worker-0", key(tokens, start=CHUNK_SIZE + 1), blocks(0, 6))
    assert result.stored == 1  # chunk 2 only: chunk 1 starts before token 33


async def test_store_needs_the_blocks_of_a_whole_chunk(client):
    tokens = prompt(2 * CHUNK_SIZE)
    result = await client.store("worker-0", key(tokens), blocks(0, 3))  # 1.5 chunks of blocks
    assert result.stored == 1


async def test_lookup_counts_leading_chunks_and_leases_them(client, server):
    tokens = prompt(4 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens[: 2 * CHUNK_SIZE]), blocks(0, 4))
    found = await client.lookup(key(tokens, rank=None, request_id="r1"))
    assert (found.hit_tokens, found.l1_chunks) == (2 * CHUNK_SIZE, 2)
    assert len(server.engine.leases) == 2
    assert_no_leaks(server, leases_allowed=True)


async def test_a_gap_ends_the_hit(client):
    tokens = prompt(3 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens, start=CHUNK_SIZE), blocks(0, 6))  # chunks 1, 2
    found = await client.lookup(key(tokens, rank=None))
    assert found.hit_tokens == 0


async def test_lookup_without_rank_needs_every_rank(server, kv):
    tokens = prompt(CHUNK_SIZE)
    async with await AsyncClient.connect(server.url) as client:
        await client.register_kv_cache("w", kv)
        await client.store("w", key(tokens, rank=0, world_size=2), blocks(0, 2))
        assert (await client.lookup(key(tokens, rank=None, world_size=2))).hit_tokens == 0
        await client.store("w", key(tokens, rank=1, world_size=2), blocks(2, 2))
        assert (await client.lookup(key(tokens, rank=None, world_size=2))).hit_tokens == CHUNK_SIZE
        assert (await client.lookup(key(tokens, rank=1, world_size=2))).hit_tokens == CHUNK_SIZE


async def test_salts_never_share_chunks(client):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens, salt="alice"), blocks(0, 4))
    assert (await client.lookup(key(tokens, rank=None, salt="bob"))).hit_tokens == 0
    assert (await client.lookup(key(tokens, rank=None, salt=""))).hit_tokens == 0
    assert (await client.lookup(key(tokens, rank=None, salt="alice"))).hit_tokens == 2 * CHUNK_SIZE
    got = await client.retrieve("worker-0", key(tokens, salt="bob"), blocks(10, 4))
    assert got.hit_tokens == 0


async def test_models_never_share_chunks(client):
    tokens = prompt(CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 2))
    other = RequestKey("mistral", 1, None, tokens)
    assert (await client.lookup(other)).hit_tokens == 0


async def test_partial_hit_retrieves_the_leading_chunks(client, kv):
    tokens = prompt(4 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens[: 2 * CHUNK_SIZE]), blocks(0, 4))
    got = await client.retrieve("worker-0", key(tokens), blocks(20, 8))
    assert (got.hit_tokens, got.chunks_written) == (2 * CHUNK_SIZE, 2)
    assert_same_blocks(kv, blocks(0, 4), blocks(20, 4))


async def test_retrieve_leaves_skipped_blocks_untouched(client, kv):
    tokens = prompt(3 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 6))
    before = [kv.block_bytes(b) for b in blocks(30, 3)]
    skip = 3 * BLOCK_SIZE  # the engine holds chunk 0 and half of chunk 1
    got = await client.retrieve("worker-0", key(tokens), blocks(30, 6), skip_first_n_tokens=skip)
    assert got.hit_tokens == 3 * CHUNK_SIZE
    assert got.chunks_written == 2
    assert [kv.block_bytes(b) for b in blocks(30, 3)] == before
    assert_same_blocks(kv, blocks(3, 3), blocks(33, 3))


async def test_skip_must_be_block_aligned(client):
    tokens = prompt(CHUNK_SIZE)
    with pytest.raises(ServerError) as err:
        await client.retrieve("worker-0", key(tokens), blocks(0, 2), skip_first_n_tokens=5)
    assert err.value.code == ErrorCode.INVALID_ARGUMENT


async def test_retrieve_ends_that_ranks_leases(client, server):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 4))
    await client.lookup(key(tokens, rank=None, request_id="r"))
    assert len(server.engine.leases) == 2
    await client.retrieve("worker-0", key(tokens, request_id="r"), blocks(10, 4))
    assert len(server.engine.leases) == 0
    assert_no_leaks(server)


async def test_release_lookup_releases_a_token_range(client, server):
    tokens = prompt(3 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 6))
    await client.lookup(key(tokens, rank=None, request_id="r", salt=""))
    released = await client.release("r", "", 0, 2 * CHUNK_SIZE)
    assert released.leases_released == 2
    assert len(server.engine.leases) == 1
    assert (await client.release("r")).leases_released == 1


async def test_end_session_releases_leases_and_forgets_hashes(client, server):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens, request_id="r"), blocks(0, 4))
    await client.lookup(key(tokens, rank=None, request_id="r"))
    ended = await client.end_session("r")
    assert (ended.leases_released, ended.had_session) == (2, True)
    assert len(server.engine.sessions) == 0
    assert_no_leaks(server)


async def test_a_second_lookup_replaces_the_first_leases(client, server):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 4))
    for _ in range(3):
        await client.lookup(key(tokens, rank=None, request_id="r"))
    assert len(server.engine.leases) == 2


async def test_leased_chunks_survive_pressure_and_others_are_evicted(kv):
    chunk_bytes = 2 * BLOCKS_PER_CHUNK * kv.block_bytes(0).__len__() // 2
    async with running_server(chunk_size=CHUNK_SIZE, l1_size=4 * chunk_bytes) as server:
        async with await AsyncClient.connect(server.url) as client:
            await client.register_kv_cache("w", kv)
            pinned = prompt(2 * CHUNK_SIZE, seed=1)
            await client.store("w", key(pinned), blocks(0, 4))
            await client.lookup(key(pinned, rank=None, request_id="keep"))
            for seed in range(2, 6):
                await client.store("w", key(prompt(2 * CHUNK_SIZE, seed)), blocks(0, 4))
            found = await client.lookup(key(pinned, rank=None, request_id="keep"))
            assert found.hit_tokens == 2 * CHUNK_SIZE
            assert server.engine.l1.evictions > 0
        assert_no_leaks(server, leases_allowed=True)


async def test_store_reports_chunks_that_did_not_fit(kv):
    chunk_bytes = BLOCKS_PER_CHUNK * len(kv.block_bytes(0))
    async with running_server(chunk_size=CHUNK_SIZE, l1_size=2 * chunk_bytes) as server:
        async with await AsyncClient.connect(server.url) as client:
            await client.register_kv_cache("w", kv)
            first = prompt(2 * CHUNK_SIZE, seed=1)
            await client.store("w", key(first), blocks(0, 4))
            await client.lookup(key(first, rank=None, request_id="pin"))
            result = await client.store("w", key(prompt(3 * CHUNK_SIZE, seed=2)), blocks(0, 6))
            assert (result.stored, result.skipped_no_room) == (0, 3)
        assert_no_leaks(server, leases_allowed=True)


async def test_clear_drops_chunks_leases_and_bytes(kv):
    async with (
        running_server(chunk_size=CHUNK_SIZE, admin_token="admin-secret") as server,
        await AsyncClient.connect(server.url, token="admin-secret") as client,
    ):
        await client.register_kv_cache("worker-0", kv)
        tokens = prompt(2 * CHUNK_SIZE)
        await client.store("worker-0", key(tokens, salt="a"), blocks(0, 4))
        await client.store("worker-0", key(tokens, salt="b"), blocks(0, 4))
        await client.lookup(key(tokens, rank=None, salt="a", request_id="r"))
        cleared = await client.clear("a")
        assert cleared.entries_removed == 2
        assert server.engine.l1.ledger.bytes_by_salt.keys() == {"b"}
        assert (await client.clear()).entries_removed == 2  # every salt: this client said the admin token
        assert server.engine.l1.ledger.total == 0
        assert_no_leaks(server)


async def test_unregister_makes_the_instance_unknown(client):
    assert (await client.unregister("worker-0")).existed
    assert not (await client.unregister("worker-0")).existed
    with pytest.raises(ServerError) as err:
        await client.store("worker-0", key(prompt(CHUNK_SIZE)), blocks(0, 2))
    assert err.value.code == ErrorCode.UNKNOWN_INSTANCE


async def test_status_reports_usage_instances_and_leases(client, server):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens, salt="t"), blocks(0, 4))
    await client.lookup(key(tokens, rank=None, request_id="r", salt="t"))
    status = await client.status()
    assert status.l1_entries == 2
    assert status.leases == 2
    assert status.l1.bytes_by_salt == {"t": server.engine.l1.ledger.total}
    assert [i.instance_id for i in status.instances] == ["worker-0"]
    assert status.chunk_size == CHUNK_SIZE


async def test_concurrent_clients_store_and_retrieve_without_mixing_bytes(server):
    with make_kv_cache(num_blocks=128, block_size=BLOCK_SIZE) as kv:
        client = await AsyncClient.connect(server.url)
        await client.register_kv_cache("w", kv)

        async def one(i: int) -> None:
            tokens = prompt(2 * CHUNK_SIZE, seed=100 + i)
            src, dst = blocks(4 * i, 4), blocks(64 + 4 * i, 4)
            await client.store("w", key(tokens, request_id=f"s{i}"), src)
            await client.lookup(key(tokens, rank=None, request_id=f"r{i}"))
            got = await client.retrieve("w", key(tokens, request_id=f"r{i}"), dst)
            assert got.hit_tokens == 2 * CHUNK_SIZE
            assert_same_blocks(kv, src, dst)

        async with client, trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
    assert_no_leaks(server)


async def test_blocking_client_does_the_full_cycle(server, kv):
    tokens = prompt(2 * CHUNK_SIZE)

    def engine_process() -> tuple[int, int]:
        with BlockingClient.connect(server.url, timeout_s=10) as client:
            client.ping()
            client.register_kv_cache("blocking", kv)
            client.store("blocking", key(tokens), blocks(0, 4))
            hit = client.lookup(key(tokens, rank=None, request_id="b")).hit_tokens
            got = client.retrieve("blocking", key(tokens, request_id="b"), blocks(8, 4))
            client.end_session("b")
            return hit, got.chunks_written

    hit, written = await trio.to_thread.run_sync(engine_process)
    assert (hit, written) == (2 * CHUNK_SIZE, 2)
    assert_same_blocks(kv, blocks(0, 4), blocks(8, 4))
    assert_no_leaks(server)


async def test_tcp_listener_serves_too():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    async with running_server(chunk_size=CHUNK_SIZE, listen=[url], data_token="data-secret") as server:
        async with await AsyncClient.connect(server.url, token="data-secret") as client:
            await client.ping()
            assert client.chunk_size == CHUNK_SIZE


async def test_packed_and_listed_tokens_name_the_same_chunks(client, server):
    tokens = prompt(2 * CHUNK_SIZE)
    await client.store("worker-0", key(tokens), blocks(0, 4))  # the client sends packed tokens
    # A peer that sends plain integer lists (e.g. an older client) hits the same chunks.
    listed = await client.call(Lookup(key(tokens, rank=None)), LookupResult)
    assert listed.hit_tokens == 2 * CHUNK_SIZE


async def test_client_refuses_token_ids_outside_uint32(client):
    for bad in (-1, 2**32):
        with pytest.raises(TrioKVError) as err:
            await client.lookup(key([bad] * CHUNK_SIZE, rank=None))
        assert err.value.code == ErrorCode.INVALID_ARGUMENT
