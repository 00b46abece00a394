"""Chunks stored by one KV layout are never served to an engine of another layout, even when
the two have the same bytes per block: a chunk's bytes are only meaningful in the layout
(per-layer or cross-layer, layer count, K/V split, dtype, block shape) that stored it."""

from __future__ import annotations

import msgspec
import pytest

from trio_kv.adapters import codec
from trio_kv.client import AsyncClient
from trio_kv.keys import ObjectKey, RequestKey
from trio_kv.testing import assert_no_leaks, make_kv_cache, running_server
from trio_kv.transfer.layout import plan_layout

from .conftest import BLOCK_SIZE, CHUNK_SIZE

BLOCKS = [0, 1, 2, 3]  # two chunks of two blocks
SHAPE = {"num_blocks": 16, "block_size": BLOCK_SIZE, "num_layers": 2, "num_kv_heads": 2, "head_size": 32}


def _key(first: int = 0, *, rank: int | None = 0) -> RequestKey:
    return RequestKey("m", 1, rank, list(range(first, first + 2 * CHUNK_SIZE)))


def _caches(layout: str, fill: str = "random"):
    return make_kv_cache(**SHAPE, layout=layout, fill=fill)


async def test_a_chunk_stored_by_another_layout_is_a_miss(server):
    with _caches("per_layer") as per_layer, _caches("cross_layer", fill="zeros") as cross_layer:
        async with await AsyncClient.connect(server.url, timeout_s=10) as client:
            a = await client.register_kv_cache("a", per_layer)
            b = await client.register_kv_cache("b", cross_layer)
            assert a.block_bytes == b.block_bytes  # the sizes alone cannot tell them apart
            assert (await client.store("a", _key(), BLOCKS)).stored == 2

            got = await client.retrieve("b", _key(), BLOCKS)
            assert (got.hit_tokens, got.chunks_written) == (0, 0)
            assert all(set(cross_layer.block_bytes(block)) == {0} for block in BLOCKS)
            assert (await client.status()).layout_mismatches == 1
    assert_no_leaks(server)


async def test_each_layout_round_trips_its_own_bytes_under_the_same_key(server):
    with (
        _caches("per_layer") as per_layer,
        _caches("cross_layer") as cross_layer,
        _caches("cross_layer", fill="zeros") as cross_target,
    ):
        async with await AsyncClient.connect(server.url, timeout_s=10) as client:
            await client.register_kv_cache("a", per_layer)
            await client.register_kv_cache("b", cross_layer)
            await client.register_kv_cache("b-target", cross_target)
            await client.store("a", _key(), BLOCKS)
            await client.clear("")  # B's own store takes the key over
            assert (await client.store("b", _key(), BLOCKS)).stored == 2
            assert (await client.retrieve("b-target", _key(), BLOCKS)).chunks_written == 2
            # And A, of the other layout, now misses.
            assert (await client.retrieve("a", _key(), BLOCKS)).chunks_written == 0
    for block in BLOCKS:
        assert cross_target.block_bytes(block) == cross_layer.block_bytes(block)
    assert_no_leaks(server)


@pytest.mark.parametrize("l2", ["mock:only", "fs"])
async def test_a_chunk_loaded_from_l2_keeps_the_layout_that_stored_it(l2, tmp_path):
    spec = f"fs:{tmp_path / 'l2'}?create=true" if l2 == "fs" else l2
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB", l2=[spec]) as server:
        with (
            _caches("per_layer") as per_layer,
            _caches("per_layer", fill="zeros") as per_layer_target,
            _caches("cross_layer", fill="zeros") as cross_layer,
        ):
            async with await AsyncClient.connect(server.url, timeout_s=10) as client:
                await client.register_kv_cache("a", per_layer)
                await client.register_kv_cache("a-target", per_layer_target)
                await client.register_kv_cache("b", cross_layer)
                await client.store("a", _key(), BLOCKS)
                for tier in server.engine.tiering.tiers:  # written behind to L2
                    await tier.wait_settled()
                await client.clear("")  # L1 only

                assert (await client.lookup(_key(rank=None))).l2_chunks == 2  # held: lookups know no layout
                assert (await client.retrieve("b", _key(), BLOCKS)).chunks_written == 0
                assert (await client.retrieve("a-target", _key(), BLOCKS)).chunks_written == 2
            for block in BLOCKS:
                assert per_layer_target.block_bytes(block) == per_layer.block_bytes(block)
        assert_no_leaks(server)


def test_the_fingerprint_tells_apart_what_sizes_cannot_and_ignores_the_block_count():
    with _caches("per_layer") as per_layer, _caches("cross_layer") as cross_layer:
        plans = [plan_layout(kv.specs, kv.block_size, kv.nbytes) for kv in (per_layer, cross_layer)]
        with make_kv_cache(**{**SHAPE, "num_blocks": 40}) as larger:
            again = plan_layout(larger.specs, larger.block_size, larger.nbytes)
    assert plans[0].block_bytes == plans[1].block_bytes
    assert plans[0].fingerprint != plans[1].fingerprint
    assert again.fingerprint == plans[0].fingerprint


class _KeyRecordBeforeLayouts(msgspec.Struct, array_like=True):
    model: str
    world_size: int
    rank: int
    chunk_hash: bytes
    cache_salt: str


def test_key_records_with_and_without_a_layout_read_both_ways():
    key = ObjectKey("m", 2, 1, bytes(16), "salt")
    old = msgspec.msgpack.encode(_KeyRecordBeforeLayouts("m", 2, 1, bytes(16), "salt"))
    new = codec.encode_key_record(key, "0123456789abcdef")
    assert codec.decode_key_record(old) == codec.decode_key_record(new) == key
    assert codec.record_layout(old) == ""  # checked by size only, as before
    assert codec.record_layout(new) == "0123456789abcdef"
    # A reader from before layouts ignores the appended field.
    assert msgspec.msgpack.decode(new, type=_KeyRecordBeforeLayouts).cache_salt == "salt"
