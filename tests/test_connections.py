"""A registration belongs to the connection that made it: no other connection can replace or
unregister it, the file must be the peer's own, and it goes away with its connection."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from trio_kv.client import AsyncClient
from trio_kv.core import registry
from trio_kv.core.peers import Peer
from trio_kv.errors import ErrorCode, ServerError, TrioKVError
from trio_kv.testing import make_kv_cache

from .conftest import BLOCK_SIZE

# An engine in its own process: registers a plain shared-memory file (no memfd, so no pidfd
# watch) on a connection it keeps open, then waits to be killed.
_ENGINE = textwrap.dedent(
    """
    import sys
    from trio_kv.client import BlockingClient
    from trio_kv.testing import make_kv_cache

    kv = make_kv_cache(num_blocks=16, block_size=16, sealed=False)
    with BlockingClient.connect(sys.argv[1]) as client:
        client.register_kv_cache(sys.argv[2], kv)
        print(kv.path, flush=True)
        sys.stdin.read()
    """
)


def mapped_paths() -> str:
    """What this process maps or holds open: a plain KV file is copied through its descriptor
    (never mapped), a sealed memfd is mapped."""
    with open("/proc/self/maps") as maps:
        held = [maps.read()]
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    return "\n".join(held)


async def test_the_registrations_of_killed_engines_are_dropped_and_unmapped(server):
    closed_before = server.server.connections.closed_count
    children, paths = [], []
    try:
        for n in range(4):
            child = subprocess.Popen(  # noqa: ASYNC220 -- starting it does not block
                [sys.executable, "-c", _ENGINE, server.url, f"engine-{n}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            children.append(child)
            assert child.stdout is not None
            paths.append((await trio.to_thread.run_sync(child.stdout.readline)).strip())
        assert sorted(server.engine.instances) == [f"engine-{n}" for n in range(4)]
        assert all(path in mapped_paths() for path in paths)
        for child in children:
            child.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(child.wait)
        with trio.fail_after(10):
            await server.server.connections.wait_closed(closed_before + 4)
        assert server.engine.instances == {}
        gc.collect()
        assert not any(path in mapped_paths() for path in paths)
    finally:
        for child in children:
            child.kill()
        for path in filter(None, paths):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def test_another_connection_cannot_replace_or_unregister_an_instance(server, kv):
    with make_kv_cache(num_blocks=16, block_size=BLOCK_SIZE) as other_kv:
        async with await AsyncClient.connect(server.url) as owner:
            await owner.register_kv_cache("engine", kv)
            mapped = server.engine.instances["engine"]
            async with await AsyncClient.connect(server.url) as intruder:
                with pytest.raises(ServerError) as err:
                    await intruder.register_kv_cache("engine", other_kv)
                assert err.value.code == ErrorCode.PERMISSION_DENIED
                with pytest.raises(ServerError) as err:
                    await intruder.unregister("engine")
                assert err.value.code == ErrorCode.PERMISSION_DENIED
            assert server.engine.instances["engine"] is mapped
            await owner.register_kv_cache("engine", other_kv)  # its own connection may replace it
            assert server.engine.instances["engine"] is not mapped


async def test_an_instance_id_is_free_again_once_its_connection_is_gone(server, kv):
    closed_before = server.server.connections.closed_count
    async with await AsyncClient.connect(server.url) as first:
        await first.register_kv_cache("engine", kv)
    with trio.fail_after(5):
        await server.server.connections.wait_closed(closed_before + 1)
    assert server.engine.instances == {}
    async with await AsyncClient.connect(server.url) as second:
        await second.register_kv_cache("engine", kv)
        assert list(server.engine.instances) == ["engine"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
@pytest.mark.parametrize("sealed", [True, False], ids=["memfd", "shm-file"])
async def test_a_file_the_peer_does_not_own_is_refused(server, sealed):
    nobody = 65534
    with make_kv_cache(num_blocks=16, block_size=BLOCK_SIZE, sealed=sealed) as kv:
        if kv.sealed is not None:
            os.fchown(kv.sealed.fd, nobody, nobody)
        else:
            os.chown(kv.path, nobody, nobody)
        async with await AsyncClient.connect(server.url) as client:
            with pytest.raises(ServerError) as err:
                await client.register_kv_cache("engine", kv)
            assert err.value.code == ErrorCode.PERMISSION_DENIED
            assert "uid 65534" in err.value.message
        assert server.engine.instances == {}


def _peer(pipe_id: int) -> Peer:
    return Peer(pipe_id, "test://", uid=os.getuid(), pid=os.getpid())


async def test_a_reconnecting_engine_may_register_before_its_old_connection_is_reported_gone(server, kv):
    # nng reports a closed pipe from its own thread, possibly after the engine's new
    # connection has already sent its registration: that one waits for the old hold to end.
    old, new = _peer(9001), _peer(9002)
    request = kv.register_request("engine")
    await server.engine.aregister(request, old)
    registered = []
    async with trio.open_nursery() as nursery:

        async def register_again() -> None:
            registered.append(await server.engine.aregister(request, new))

        nursery.start_soon(register_again)
        await trio.sleep(0.05)
        assert registered == []  # still waiting: the old connection looks open
        old.closed = True  # as nng's thread does, then the Trio-side drop
        assert server.engine.drop_peer(old) == 1
    assert registered and new.instances == {"engine"} and old.instances == set()
    assert server.engine.drop_peer(new) == 1


async def test_a_registration_held_by_an_open_connection_is_refused_after_the_grace(server, kv, monkeypatch):
    monkeypatch.setattr(registry, "HOLDER_GRACE_S", 0.2)
    holder, other = _peer(9011), _peer(9012)
    request = kv.register_request("engine")
    await server.engine.aregister(request, holder)
    started = trio.current_time()
    with pytest.raises(TrioKVError) as err:
        await server.engine.aregister(request, other)
    assert err.value.code == ErrorCode.PERMISSION_DENIED
    assert trio.current_time() - started >= 0.2
    assert server.engine.registry._holders["engine"] is holder and other.instances == set()
    assert server.engine.drop_peer(holder) == 1
