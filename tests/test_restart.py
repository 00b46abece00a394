"""Restart (issue #3, item 9): chunks written behind to an fs tier outlive the server.

The real ``trio-kv serve`` runs as a child process. Once write-behind has put every
stored chunk to its fs directory, the process is killed (SIGKILL: nothing runs at
exit) or stopped (SIGTERM: a clean drain) and started again on the same directory;
every chunk must then be found in L2 and come back byte for byte through the client.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from trio_kv.client import BlockingClient

from .server_process import (
    BLOCKS_PER_CHUNK,
    CHUNK_SIZE,
    Prompt,
    ServerProcess,
    chunk_digests,
    count_fs_objects,
    make_cross_layer_kv_cache,
)

SALTS = ["", "alice", "bob"]
MAX_CHUNKS = 4
RETRIEVE_TO = (
    MAX_CHUNKS * BLOCKS_PER_CHUNK
)  # blocks [0, RETRIEVE_TO) are stored from, the next ones read into


def wait_until_written(server: ServerProcess, chunks: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """Poll the admin status until the fs tier has written ``chunks`` chunks and its
    queue is empty; returns that tier status."""
    deadline = time.monotonic() + timeout_s
    while True:
        tier = server.fs_tier()
        if tier["written"] >= chunks and tier["queue_depth"] == 0:
            return tier
        assert time.monotonic() < deadline, f"write-behind did not finish: {tier}"
        time.sleep(0.02)  # polling another process


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_chunks_written_behind_before_a_restart_are_served_from_l2_after_it(tmp_path, signum):
    prompts = [Prompt(n, SALTS[n % len(SALTS)], chunks=1 + n % MAX_CHUNKS, first_block=0) for n in range(9)]
    total_chunks = sum(p.chunks for p in prompts)
    with (
        make_cross_layer_kv_cache(num_blocks=2 * RETRIEVE_TO) as kv,
        ServerProcess(tmp_path, tmp_path / "l2") as server,
    ):
        server.start()
        with BlockingClient.connect(server.url, timeout_s=10) as client:
            client.register_kv_cache("w", kv)
            for prompt in prompts:
                prompt.fill(kv)  # blocks are reused: the server has copied them once store returns
                assert client.store("w", prompt.key(), prompt.blocks).stored == prompt.chunks
        before = wait_until_written(server, total_chunks)
        on_disk = count_fs_objects(tmp_path / "l2")
        assert on_disk.objects == {k for p in prompts for k in p.object_keys()}

        exit_status = server.kill(signum)
        assert exit_status == (-signal.SIGKILL if signum == signal.SIGKILL else 0), server.log()
        server.start()

        after = server.fs_tier()
        assert after["usage"] == before["usage"]  # rebuilt by the recovery scan, salt by salt
        assert after["usage"]["bytes_by_salt"] == dict(on_disk.bytes_by_salt)
        with BlockingClient.connect(server.url, timeout_s=10) as client:
            client.register_kv_cache("w", kv)
            for prompt in prompts:
                request_id = f"r{prompt.number}"
                found = client.lookup(prompt.key(rank=None, request_id=request_id))
                assert (found.hit_tokens, found.l1_chunks, found.l2_chunks) == (
                    prompt.chunks * CHUNK_SIZE,
                    0,
                    prompt.chunks,
                )
                destination = list(range(RETRIEVE_TO, RETRIEVE_TO + len(prompt.blocks)))
                got = client.retrieve("w", prompt.key(request_id=request_id), destination)
                assert got.chunks_written == prompt.chunks
                assert chunk_digests(kv, RETRIEVE_TO, prompt.chunks) == prompt.digests
        status = server.status()
        assert status["leases"] == 0
        assert status["l2"][0]["loads"] == total_chunks
        assert server.kill(signal.SIGTERM) == 0
