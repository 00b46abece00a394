"""KV caches in sealed memfds: they cannot shrink under the server, unsealed ones are refused,
and a registration goes away with the process that owns its memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import trio

from trio_kv.client import AsyncClient
from trio_kv.errors import ErrorCode, ServerError
from trio_kv.export.memfd import create_sealed_region, sealed_path_owner
from trio_kv.keys import RequestKey
from trio_kv.testing import assert_no_leaks, make_kv_cache

from .conftest import BLOCK_SIZE, CHUNK_SIZE


def test_a_sealed_region_refuses_to_shrink():
    region = create_sealed_region(1 << 16)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)
        assert os.fstat(region.fd).st_size == 1 << 16
    finally:
        region.close()


def test_a_sealed_region_is_zeroed_shared_memory():
    region = create_sealed_region(8192)
    try:
        assert int(region.tensor.abs().sum()) == 0
        region.tensor[100] = 7
        with open(region.path, "rb") as other_view:
            assert other_view.read()[100] == 7
    finally:
        region.close()


def test_only_proc_fd_paths_name_sealed_regions():
    assert sealed_path_owner("/proc/123/fd/7") == 123
    for path in ("/dev/shm/x", "/proc/self/fd/7", "/proc/0/fd/7", "/proc/12/fd/7/../8", "/proc/12/fdx/1"):
        assert sealed_path_owner(path) is None


async def test_a_sealed_kv_cache_stores_and_retrieves_byte_exact(server):
    with (
        make_kv_cache(num_blocks=16, block_size=BLOCK_SIZE) as source,
        make_kv_cache(num_blocks=16, block_size=BLOCK_SIZE, fill="zeros") as target,
    ):
        assert source.sealed is not None and source.path.startswith("/proc/")
        async with await AsyncClient.connect(server.url) as client:
            await client.register_kv_cache("source", source)
            await client.register_kv_cache("target", target)
            key = RequestKey("m", 1, 0, list(range(2 * CHUNK_SIZE)))
            assert (await client.store("source", key, [0, 1, 2, 3])).stored == 2
            await client.lookup(RequestKey("m", 1, None, list(range(2 * CHUNK_SIZE))))
            assert (await client.retrieve("target", key, [8, 9, 10, 11])).chunks_written == 2
        for block in range(4):
            assert target.block_bytes(8 + block) == source.block_bytes(block)
    assert_no_leaks(server)


async def test_a_memfd_without_the_shrink_seal_is_refused(server):
    with make_kv_cache(num_blocks=16, block_size=BLOCK_SIZE, sealed=False) as template:
        fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, template.nbytes)
            request = template.register_request("unsealed")
            request.shm_path = f"/proc/{os.getpid()}/fd/{fd}"
            async with await AsyncClient.connect(server.url) as client:
                with pytest.raises(ServerError) as refused:
                    await client.register(request)
        finally:
            os.close(fd)
    assert refused.value.code == ErrorCode.BAD_REGISTRATION
    assert "F_SEAL_SHRINK" in refused.value.message
    assert server.engine.instances == {}


async def test_a_region_smaller_than_declared_is_refused(server):
    with make_kv_cache(num_blocks=16, block_size=BLOCK_SIZE) as kv:
        request = kv.register_request("short")
        request.shm_bytes = kv.nbytes + 4096
        async with await AsyncClient.connect(server.url) as client:
            with pytest.raises(ServerError) as refused:
                await client.register(request)
    assert refused.value.code == ErrorCode.BAD_REGISTRATION


_ENGINE = textwrap.dedent(
    """
    import sys
    from trio_kv.client import BlockingClient
    from trio_kv.testing import make_kv_cache

    kv = make_kv_cache(num_blocks=16, block_size=16)
    with BlockingClient.connect(sys.argv[1]) as client:
        client.register_kv_cache("engine-in-a-child", kv)
        print("registered", flush=True)
        sys.stdin.read()  # until the test closes our stdin or kills us
    """
)


async def _registered_child(url: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(  # noqa: ASYNC220 -- starting it does not block; reads go to a thread
        [sys.executable, "-c", _ENGINE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = await trio.to_thread.run_sync(child.stdout.readline)
    assert line.strip() == "registered"
    return child


async def _until_unregistered(server, timeout_s: float = 10.0) -> None:
    # The child is another process: wait for the server to see it go, with a bound.
    with trio.fail_after(timeout_s):
        while server.engine.instances:  # noqa: ASYNC110 -- set by another process's exit
            await trio.sleep(0.01)


async def test_a_registration_is_dropped_when_its_engine_is_killed(server):
    child = await _registered_child(server.url)
    try:
        assert list(server.engine.instances) == ["engine-in-a-child"]
        child.kill()
        await trio.to_thread.run_sync(child.wait)
        await _until_unregistered(server)
    finally:
        child.kill()
    assert len(server.engine.owners) == 0


async def test_a_registration_is_dropped_when_its_engine_exits(server):
    child = await _registered_child(server.url)
    assert child.stdin is not None
    child.stdin.close()
    assert await trio.to_thread.run_sync(child.wait) == 0
    await _until_unregistered(server)


async def test_unregistering_stops_watching_the_owner(server, kv):
    async with await AsyncClient.connect(server.url) as client:
        await client.register_kv_cache("a", kv)
        await client.register_kv_cache("a", kv)  # replaced: still one watch
        assert len(server.engine.owners) == 1
        assert (await client.unregister("a")).existed
    assert len(server.engine.owners) == 0
