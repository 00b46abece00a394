"""Two servers, one bucket: what one server stores, the other finds, through S3 alone."""

from __future__ import annotations

import random

import trio
import trio.testing

from trio_kv.client import AsyncClient
from trio_kv.keys import RequestKey
from trio_kv.testing import assert_no_leaks, make_kv_cache, running_server

from .s3_server import S3Bucket, s3_bucket_fixture, s3_server_fixture  # noqa: F401

CHUNK = 32
BLOCK = 16


async def wait_written(server, n_chunks: int) -> None:
    with trio.fail_after(20):
        # The puts run in worker threads: no Trio event to wait on, so poll.
        while sum(t.written for t in server.engine.status().l2) < n_chunks:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_a_chunk_stored_through_one_server_hits_through_another(s3_bucket: S3Bucket):
    spec = f"s3://{s3_bucket.bucket}/shared?endpoint={s3_bucket.endpoint_url}&region=us-east-1"
    rng = random.Random(3)
    tokens = [rng.randrange(50_000) for _ in range(3 * CHUNK)]
    prompts = {salt: tokens for salt in ("", "tenant-a")}  # equal tokens, different tenants
    blocks = list(range(3 * CHUNK // BLOCK))
    with make_kv_cache(num_blocks=32, block_size=BLOCK, num_layers=2) as kv:
        async with running_server(chunk_size=CHUNK, l2=[spec]) as writer:
            async with await AsyncClient.connect(writer.url) as client:
                await client.register_kv_cache("w", kv)
                for salt, tokens in prompts.items():
                    for tensor in kv.tensors:
                        tensor.normal_()  # each tenant's prompt has KV of its own
                    await client.store("w", RequestKey("m", 1, 0, tokens, cache_salt=salt), blocks)
            await wait_written(writer, 6)
            assert_no_leaks(writer)
        expected = [kv.block_bytes(b) for b in blocks]  # tenant-a's KV, stored last
        async with running_server(chunk_size=CHUNK, l2=[spec]) as reader:  # another L1, same bucket
            async with await AsyncClient.connect(reader.url) as client:
                await client.register_kv_cache("w", kv)
                found = await client.lookup(
                    RequestKey("m", 1, None, prompts["tenant-a"], request_id="r", cache_salt="tenant-a")
                )
                assert (found.hit_tokens, found.l1_chunks, found.l2_chunks) == (3 * CHUNK, 0, 3)
                target = list(range(16, 16 + len(blocks)))
                got = await client.retrieve(
                    "w",
                    RequestKey("m", 1, 0, prompts["tenant-a"], request_id="r", cache_salt="tenant-a"),
                    target,
                )
                assert got.hit_tokens == 3 * CHUNK
                assert [kv.block_bytes(b) for b in target] == expected
                # The salt is part of the key in the bucket too: the bytes above are tenant-a's, not
                # those of the empty salt's equal tokens, and a third tenant finds nothing.
                other = await client.lookup(RequestKey("m", 1, None, tokens, cache_salt="tenant-b"))
                assert other.hit_tokens == 0
            assert_no_leaks(reader)
