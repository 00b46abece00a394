"""Register a shared-memory KV cache, store a prompt's KV, look it up, retrieve it into
other blocks, and compare bytes. Run `trio-kv serve` first (or set TRIO_KV_URL)."""

import os
import random

from trio_kv.client import BlockingClient
from trio_kv.export.shm import create_shared_kv_cache
from trio_kv.keys import RequestKey

url = os.environ.get("TRIO_KV_URL", "ipc:///tmp/trio-kv.sock")

# The engine's KV cache: 2 layers of (2, num_blocks, block_size, kv_heads, head_size) bf16.
with (
    create_shared_kv_cache(num_blocks=64, block_size=16, num_layers=2) as kv,
    BlockingClient.connect(url) as client,
):
    client.register_kv_cache("engine-0", kv)
    chunk = client.chunk_size  # 256 tokens by default: 16 blocks of 16 tokens
    tokens = [random.randrange(32_000) for _ in range(2 * chunk)]
    n_blocks = 2 * chunk // 16

    # A worker stores the prompt's KV from blocks 0..n_blocks-1.
    stored = client.store("engine-0", RequestKey("my-model", 1, 0, tokens), list(range(n_blocks)))
    print("stored", stored)

    # The scheduler asks how much of a new request is cached (rank None: every rank).
    hit = client.lookup(RequestKey("my-model", 1, None, tokens, request_id="req-2"))
    print("lookup", hit)

    # The worker loads it into other blocks; the lookup's leases end here.
    dst = list(range(n_blocks, 2 * n_blocks))
    got = client.retrieve("engine-0", RequestKey("my-model", 1, 0, tokens, request_id="req-2"), dst)
    print("retrieve", got)
    assert all(kv.block_bytes(s) == kv.block_bytes(d) for s, d in zip(range(n_blocks), dst))
    client.end_session("req-2")
    client.unregister("engine-0")
    print("bytes match")
