"""Shared fixtures: a real in-process server on a temporary ipc:// socket, a shared-memory
KV cache registered with it, and an async client."""

from __future__ import annotations

import pytest

from trio_kv.client import AsyncClient
from trio_kv.testing import make_kv_cache, running_server

CHUNK_SIZE = 32  # small chunks keep tests fast: 2 blocks of 16 tokens per chunk
BLOCK_SIZE = 16


@pytest.fixture
async def server():
    async with running_server(chunk_size=CHUNK_SIZE, l1_size="16MiB") as running:
        yield running


@pytest.fixture
def kv():
    with make_kv_cache(
        num_blocks=64, block_size=BLOCK_SIZE, num_layers=2, num_kv_heads=2, head_size=32
    ) as cache:
        yield cache


@pytest.fixture
async def client(server, kv):
    async with await AsyncClient.connect(server.url, timeout_s=10) as connected:
        await connected.register_kv_cache("worker-0", kv)
        yield connected
