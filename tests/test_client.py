"""The client core: operations are written once and behave alike on both clients; a reply is
checked against the type its request declares; the module stays light to import."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time

import pynng
import pytest
import trio

from trio_kv.client import AsyncClient, BlockingClient, Op
from trio_kv.errors import ErrorCode, ServerError, TrioKVError
from trio_kv.keys import RequestKey
from trio_kv.protocol import Error, Ping, Pong, Status, decode_request, encode

OPERATIONS = [name for name in dir(AsyncClient) if isinstance(inspect.getattr_static(AsyncClient, name), Op)]
KEY = RequestKey(model="m", world_size=1, rank=0, tokens=[1, 2])


@pytest.fixture
def unconnected():
    """One client of each kind on a socket that dials nowhere."""
    with pynng.Req0() as sock:
        yield AsyncClient(sock, 1.0), BlockingClient(sock, 1.0)


def test_both_clients_offer_the_same_operations():
    assert OPERATIONS == [
        "clear",
        "end_session",
        "lookup",
        "ping",
        "register",
        "register_kv_cache",
        "release",
        "retrieve",
        "status",
        "store",
        "unregister",
    ]


@pytest.mark.parametrize("name", OPERATIONS)
def test_an_operation_has_one_signature_on_both_clients(unconnected, name):
    async_client, blocking_client = unconnected
    async_operation = getattr(async_client, name)
    blocking_operation = getattr(blocking_client, name)
    assert inspect.signature(async_operation) == inspect.signature(blocking_operation)
    assert async_operation.__name__ == blocking_operation.__name__ == name
    assert inspect.iscoroutinefunction(async_operation)
    assert not inspect.iscoroutinefunction(blocking_operation)


def test_an_operation_is_bound_once_per_client_and_calls_that_client(unconnected):
    async_client, blocking_client = unconnected
    assert blocking_client.lookup is blocking_client.lookup  # kept, not rebuilt per call
    assert async_client.lookup is async_client.lookup
    with pynng.Req0() as sock:
        other = BlockingClient(sock, 1.0)
        other.fail_fast = True
        assert other.ping is not blocking_client.ping
        with pytest.raises(ConnectionError):
            other.ping()  # the other client's own call, not the first client's


async def test_an_operation_looked_up_on_the_class_takes_the_client_first(unconnected):
    _, blocking_client = unconnected
    blocking_client.fail_fast = True
    with pytest.raises(ConnectionError):
        BlockingClient.ping(blocking_client)


async def test_an_async_operation_builds_its_request_when_awaited(unconnected):
    async_client, _ = unconnected
    bad_key = RequestKey(model="m", world_size=1, rank=0, tokens=[-1])
    pending = async_client.lookup(bad_key)  # an invalid token id raises only once awaited
    with pytest.raises(TrioKVError) as err:
        await pending
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


async def answer_once(sock: pynng.Rep0, reply: object) -> None:
    request = decode_request(await sock.arecv(), 1 << 20)
    assert isinstance(request, Status | Ping)
    await sock.asend(encode(reply))


@pytest.fixture
def fake_server(tmp_path):
    url = f"ipc://{tmp_path}/fake.sock"
    with pynng.Rep0(listen=url) as sock:
        yield url, sock


async def test_a_reply_of_another_type_than_the_request_declares_is_an_internal_error(fake_server):
    url, sock = fake_server
    async with (
        await AsyncClient.connect(url, hello=False, timeout_s=5) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(answer_once, sock, Pong())
        with pytest.raises(TrioKVError) as err:
            await client.status()
    assert err.value.code is ErrorCode.INTERNAL
    assert "expected StatusResult, got Pong" in err.value.message


async def test_an_explicit_expected_type_is_still_accepted(fake_server):
    url, sock = fake_server
    async with (
        await AsyncClient.connect(url, hello=False, timeout_s=5) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(answer_once, sock, Pong())
        assert await client.call(Ping(), Pong) == Pong()


async def test_an_error_reply_is_a_server_error_with_its_code(fake_server):
    url, sock = fake_server
    async with (
        await AsyncClient.connect(url, hello=False, timeout_s=5) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(answer_once, sock, Error(code=int(ErrorCode.BAD_SALT), message="no"))
        with pytest.raises(ServerError) as err:
            await client.call(Status())
    assert err.value.code is ErrorCode.BAD_SALT


def test_blocking_call_checks_the_declared_reply_type(fake_server):
    url, sock = fake_server

    def answer_with_pong() -> None:
        assert isinstance(decode_request(sock.recv(), 1 << 20), Status)
        sock.send(encode(Pong()))

    with BlockingClient.connect(url, hello=False, timeout_s=5) as client:
        server_thread = threading.Thread(target=answer_with_pong)
        server_thread.start()
        try:
            with pytest.raises(TrioKVError) as err:
                client.status()
        finally:
            server_thread.join()
    assert err.value.code is ErrorCode.INTERNAL
    assert "expected StatusResult, got Pong" in err.value.message


def test_the_client_imports_without_torch_or_the_server():
    code = (
        "import sys, trio_kv.client; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or 'cuda' in m "
        "or m.startswith(('trio_kv.server', 'trio_kv.core', 'trio_kv.transfer', 'trio_kv.export'))); "
        "assert not heavy, heavy"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_a_blocking_call_with_no_server_to_send_to_times_out(tmp_path):
    # nng waits for a connection before it sends; that wait is bounded by the client's timeout.
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        BlockingClient.connect(f"ipc://{tmp_path}/nobody.sock", wait=True, timeout_s=0.3)
    assert time.monotonic() - started < 5
