"""End to end, byte for byte: many random prompts under several salts, through L1 and L2."""

from __future__ import annotations

import random

import pytest
import trio.testing

from trio_kv.client import AsyncClient
from trio_kv.keys import RequestKey
from trio_kv.testing import assert_no_leaks, make_kv_cache, running_server

CHUNK = 32
BLOCK = 16
SALTS = ["", "alice", "bob", "carol"]


@pytest.mark.parametrize("through_l2", [False, True])
async def test_every_byte_comes_back_to_the_right_tenant(through_l2):
    rng = random.Random(20261122)
    settings = {"chunk_size": CHUNK, "l1_size": "32MiB"}
    if through_l2:
        settings["l2"] = ["mock:"]
    with make_kv_cache(num_blocks=256, block_size=BLOCK, layout="per_layer") as kv:
        async with running_server(**settings) as server:
            async with await AsyncClient.connect(server.url) as client:
                await client.register_kv_cache("w", kv)
                prompts = []
                for n in range(40):
                    salt = SALTS[n % len(SALTS)]
                    # Prompts share prefixes now and then, across and within tenants.
                    base = (
                        prompts[rng.randrange(len(prompts))][1][:CHUNK]
                        if prompts and rng.random() < 0.3
                        else []
                    )
                    tokens = base + [
                        rng.randrange(100_000) for _ in range(rng.randrange(1, 5) * CHUNK - len(base))
                    ]
                    blocks = rng.sample(range(128), len(tokens) // BLOCK)
                    # Each prompt's KV is written into its blocks first, as a forward pass would.
                    for block in blocks:
                        for tensor, spec in zip(kv.tensors, kv.specs):
                            tensor.select(spec.block_dim, block).normal_()
                    expected = [kv.block_bytes(b) for b in blocks]
                    await client.store("w", RequestKey("m", 1, 0, tokens, cache_salt=salt), blocks)
                    prompts.append((salt, tokens, blocks, expected))
                if through_l2:
                    await trio.testing.wait_all_tasks_blocked()
                    for salt in SALTS:  # L1 only: every chunk must come back from L2
                        await client.clear(salt)
                mismatches = 0
                for i, (salt, tokens, _, _expected) in enumerate(prompts):
                    found = await client.lookup(
                        RequestKey("m", 1, None, tokens, request_id=f"r{i}", cache_salt=salt)
                    )
                    dst = rng.sample(range(128, 256), len(tokens) // BLOCK)
                    got = await client.retrieve(
                        "w", RequestKey("m", 1, 0, tokens, request_id=f"r{i}", cache_salt=salt), dst
                    )
                    # Shared prefixes stored later may have replaced nothing: the first store wins,
                    # so compare against the bytes of whichever prompt stored each chunk first.
                    assert got.hit_tokens == found.hit_tokens == len(tokens)
                    for j, block in enumerate(dst):
                        owner = first_writer(prompts, salt, tokens, j)
                        if kv.block_bytes(block) != owner:
                            mismatches += 1
                assert mismatches == 0
            assert_no_leaks(server)


def first_writer(prompts, salt, tokens, block_index):
    """The bytes the cache must hold for block ``block_index`` of (salt, tokens): those of the
    first stored prompt of that salt whose tokens share the whole chunk prefix."""
    chunk_end = (block_index // (CHUNK // BLOCK) + 1) * CHUNK
    for other_salt, other_tokens, _, expected in prompts:
        if other_salt == salt and other_tokens[:chunk_end] == tokens[:chunk_end]:
            return expected[block_index]
    raise AssertionError("no prompt stored this chunk")
