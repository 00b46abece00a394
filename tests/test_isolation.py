"""Noisy neighbours: a tenant flooding the cache cannot push another tenant's chunks out."""

from __future__ import annotations

import random

from trio_kv.client import AsyncClient
from trio_kv.keys import RequestKey
from trio_kv.testing import assert_no_leaks, make_kv_cache, running_server

CHUNK = 32
BLOCK = 16


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(2 * CHUNK)]


async def flood_and_probe(policy: str, quota_chunks: int | None) -> tuple[int, int, dict]:
    """B stores 2 prompts, A stores 20; returns B's hit tokens, A's share, and A's last store."""
    with make_kv_cache(num_blocks=16, block_size=BLOCK) as kv:
        chunk_bytes = (CHUNK // BLOCK) * len(kv.block_bytes(0))
        async with running_server(
            chunk_size=CHUNK,
            l1_size=12 * chunk_bytes,
            eviction_policy=policy,
            # Eviction on demand only, so the counts below are exact.
            evict_high_watermark=1.0,
            evict_low_watermark=1.0,
        ) as server:
            if quota_chunks is not None:
                server.server.quotas.set("tenant-a", {"l1": quota_chunks * chunk_bytes})
            async with await AsyncClient.connect(server.url) as client:
                await client.register_kv_cache("w", kv)
                for seed in (1, 2):
                    await client.store(
                        "w", RequestKey("m", 1, 0, prompt(seed), cache_salt="tenant-b"), list(range(4))
                    )
                last = None
                for seed in range(100, 120):
                    last = await client.store(
                        "w", RequestKey("m", 1, 0, prompt(seed), cache_salt="tenant-a"), list(range(4, 8))
                    )
                hits = 0
                for seed in (1, 2):
                    found = await client.lookup(RequestKey("m", 1, None, prompt(seed), cache_salt="tenant-b"))
                    hits += found.hit_tokens
                a_bytes = server.engine.l1.ledger.salt_bytes("tenant-a")
            assert_no_leaks(server)
            return hits, a_bytes // chunk_bytes, {"last": last}


async def test_a_tenant_with_a_quota_cannot_evict_another_tenant():
    hits, a_chunks, _ = await flood_and_probe("lru", quota_chunks=4)
    assert hits == 4 * CHUNK  # both of B's prompts, every chunk
    assert a_chunks == 4  # A recycled its own chunks within its quota


async def test_isolated_eviction_protects_a_tenant_under_its_fair_share():
    hits, a_chunks, _ = await flood_and_probe("isolated", quota_chunks=None)
    assert hits == 4 * CHUNK
    assert a_chunks == 8  # the arena's 12 chunks less B's 4


async def test_global_lru_without_quotas_lets_the_flood_evict_everyone():
    hits, _, _ = await flood_and_probe("lru", quota_chunks=None)
    assert hits == 0  # the contrast the two tests above rely on


async def test_a_chunk_larger_than_the_quota_is_skipped_and_counted():
    with make_kv_cache(num_blocks=8, block_size=BLOCK) as kv:
        chunk_bytes = (CHUNK // BLOCK) * len(kv.block_bytes(0))
        async with running_server(chunk_size=CHUNK) as server:
            server.server.quotas.set("tiny", {"l1": chunk_bytes - 1})
            async with await AsyncClient.connect(server.url) as client:
                await client.register_kv_cache("w", kv)
                result = await client.store(
                    "w", RequestKey("m", 1, 0, prompt(1), cache_salt="tiny"), list(range(4))
                )
            assert (result.stored, result.skipped_quota) == (0, 2)
            assert server.engine.l1.ledger.salt_bytes("tiny") == 0
