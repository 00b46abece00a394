"""The nng data plane's trust model: a tcp:// listener needs a token in Hello, and Clear of
every salt is an admin action; ipc:// peers are who the socket file's mode lets in."""

from __future__ import annotations

import socket

import pytest
import trio

from trio_kv.client import AsyncClient
from trio_kv.errors import ErrorCode, ServerError
from trio_kv.protocol import Status
from trio_kv.server.config import ConfigError, load_config
from trio_kv.testing import running_server

from .conftest import CHUNK_SIZE
from .test_flows import blocks, key, prompt

TOKEN = "data-secret"


def free_tcp_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


async def test_a_tcp_client_without_the_token_is_refused():
    async with running_server(listen=[free_tcp_url()], data_token=TOKEN) as server:
        with pytest.raises(ServerError) as err:
            await AsyncClient.connect(server.url)  # says Hello without a token
        assert err.value.code == ErrorCode.UNAUTHENTICATED
        async with await AsyncClient.connect(server.url, hello=False) as silent:
            with pytest.raises(ServerError) as err:
                await silent.call(Status())
            assert err.value.code == ErrorCode.UNAUTHENTICATED
        with pytest.raises(ServerError) as err:
            await AsyncClient.connect(server.url, token="guessed")
        assert err.value.code == ErrorCode.UNAUTHENTICATED


async def test_a_tcp_client_with_the_token_is_served():
    async with running_server(listen=[free_tcp_url()], data_token=TOKEN) as server:
        async with await AsyncClient.connect(server.url, token=TOKEN) as client:
            assert (await client.lookup(key(prompt(CHUNK_SIZE), rank=None))).hit_tokens == 0
            assert (await client.status()).chunk_size == server.engine.chunk_size


async def test_a_reconnected_tcp_client_says_its_token_again():
    async with running_server(listen=[free_tcp_url()], data_token=TOKEN) as server:
        async with await AsyncClient.connect(server.url, token=TOKEN) as client:
            closed_before = server.server.connections.closed_count
            for sock in server.server._sockets:
                for pipe in sock.pipes:
                    pipe.close()
            with trio.fail_after(5):
                await server.server.connections.wait_closed(closed_before + 1)
                while not len(server.server.connections):  # noqa: ASYNC110 -- nng redials in its thread
                    await trio.sleep(0.01)
            # The new connection has not said Hello: the client does, and the call goes through.
            assert (await client.status()).chunk_size == server.engine.chunk_size


def test_a_tcp_listener_needs_a_token_or_an_explicit_opt_out():
    with pytest.raises(ConfigError, match="data_token"):
        load_config(environ={}, overrides={"listen": ["tcp://127.0.0.1:5555"]})
    assert load_config(environ={"TRIO_KV_DATA_TOKEN": TOKEN}, overrides={"listen": ["tcp://127.0.0.1:5555"]})
    opted_out = load_config(
        environ={}, overrides={"listen": ["tcp://127.0.0.1:5555"], "allow_unauthenticated_tcp": True}
    )
    assert opted_out.allow_unauthenticated_tcp


async def test_clear_of_every_salt_needs_the_admin_token_and_clear_of_one_salt_does_not(kv):
    async with running_server(chunk_size=CHUNK_SIZE, admin_token="admin-secret") as server:
        async with await AsyncClient.connect(server.url) as engine:
            await engine.register_kv_cache("worker-0", kv)
            tokens = prompt(2 * CHUNK_SIZE)
            await engine.store("worker-0", key(tokens, salt="a"), blocks(0, 4))
            await engine.store("worker-0", key(tokens, salt="b"), blocks(0, 4))
            with pytest.raises(ServerError) as err:
                await engine.clear()
            assert err.value.code == ErrorCode.PERMISSION_DENIED
            assert server.engine.l1.ledger.bytes_by_salt.keys() == {"a", "b"}
            assert (await engine.clear("a")).entries_removed == 2
            assert server.engine.l1.ledger.bytes_by_salt.keys() == {"b"}
        async with await AsyncClient.connect(server.url, token="admin-secret") as admin:
            assert (await admin.clear()).entries_removed == 2
        assert server.engine.l1.ledger.total == 0


async def test_without_an_admin_token_no_connection_can_clear_every_salt(client, server):
    await client.store("worker-0", key(prompt(2 * CHUNK_SIZE)), blocks(0, 4))
    with pytest.raises(ServerError) as err:
        await client.clear()
    assert err.value.code == ErrorCode.PERMISSION_DENIED
    assert server.engine.l1.ledger.total > 0
