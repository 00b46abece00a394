"""A plain shared-memory KV file truncated under a real server: the request fails, the server lives.

A sealed memfd cannot shrink; a plain file under ``shm_dir`` can, and touching a mapping
past the end of a truncated file raises SIGBUS. The server copies plain files with
preadv/pwritev instead, so a truncation is a TRANSFER_FAILED reply, not a dead process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trio_kv.client import BlockingClient
from trio_kv.errors import ErrorCode, ServerError
from trio_kv.keys import RequestKey
from trio_kv.testing import make_kv_cache

from .server_process import BLOCK_SIZE, CHUNK_SIZE, MODEL, ServerProcess


def _key(first_token: int, chunks: int = 2) -> RequestKey:
    return RequestKey(MODEL, 1, 0, list(range(first_token, first_token + chunks * CHUNK_SIZE)))


def test_truncating_a_plain_kv_file_fails_the_request_and_the_server_lives(tmp_path: Path):
    blocks = list(range(2 * CHUNK_SIZE // BLOCK_SIZE))
    with (
        ServerProcess(tmp_path, tmp_path / "l2") as server,
        make_kv_cache(num_blocks=32, block_size=BLOCK_SIZE, sealed=False) as plain,
        make_kv_cache(num_blocks=32, block_size=BLOCK_SIZE) as sealed,
        make_kv_cache(num_blocks=32, block_size=BLOCK_SIZE, fill="zeros") as target,
    ):
        server.start()
        assert server.proc is not None
        with BlockingClient.connect(server.url, timeout_s=20) as client:
            client.register_kv_cache("plain", plain)
            assert client.store("plain", _key(0), blocks).stored == 2  # cached before the truncation
            os.truncate(plain.path, 0)

            with pytest.raises(ServerError) as store_failed:
                client.store("plain", _key(10_000), blocks)
            with pytest.raises(ServerError) as retrieve_failed:
                client.retrieve("plain", _key(0), blocks)
            assert server.proc.poll() is None, f"the server died:\n{server.log()}"
            assert store_failed.value.code == ErrorCode.TRANSFER_FAILED
            assert retrieve_failed.value.code == ErrorCode.TRANSFER_FAILED

            # The next engine is served as if nothing had happened.
            client.register_kv_cache("sealed", sealed)
            client.register_kv_cache("target", target)
            assert client.store("sealed", _key(20_000), blocks).stored == 2
            assert client.retrieve("target", _key(20_000), blocks).chunks_written == 2
        for block in blocks:
            assert target.block_bytes(block) == sealed.block_bytes(block)
        assert server.status()["requests_in_flight"] == 0
