"""Bad input gets a typed error reply with a clear message; the server keeps serving."""

from __future__ import annotations

import os

import msgspec
import pynng
import pytest

from trio_kv.client import AsyncClient
from trio_kv.errors import ErrorCode, ServerError, TrioKVError
from trio_kv.keys import RequestKey
from trio_kv.protocol import Error, Hello, HelloOk, RegisterKVCache, TensorSpec, decode_reply
from trio_kv.testing import assert_no_leaks, running_server

CHUNK = 32


async def raw_round_trip(url: str, payload: bytes):
    with pynng.Req0(resend_time=-1) as sock:
        sock.dial(url, block=True)
        await sock.asend(payload)
        return decode_reply(await sock.arecv())


async def expect_error(coro, code: ErrorCode, *fragments: str) -> ServerError:
    with pytest.raises(ServerError) as err:
        await coro
    assert err.value.code == code, err.value
    for fragment in fragments:
        assert fragment in err.value.message
    return err.value


def key(tokens, **overrides):
    fields = {"model": "m", "world_size": 1, "rank": 0, "tokens": tokens}
    fields.update(overrides)
    return RequestKey(**fields)


@pytest.fixture
async def small_server():
    async with running_server(
        chunk_size=CHUNK, max_message_bytes=64 * 1024, max_tokens_per_key=4096, max_block_ids=256
    ) as server:
        yield server


async def test_version_mismatch_is_refused(server):
    async with await AsyncClient.connect(server.url, hello=False) as client:
        await expect_error(client.call(Hello(999), HelloOk), ErrorCode.VERSION_MISMATCH, "999")
        await client.ping()


async def test_unknown_request_kind(server):
    reply = await raw_round_trip(server.url, msgspec.msgpack.encode(["teleport", 1, 2]))
    assert isinstance(reply, Error)
    assert reply.code == ErrorCode.UNKNOWN_REQUEST
    assert "teleport" in reply.message


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1\xc1\xc1",  # not msgpack
        b"",  # empty
        msgspec.msgpack.encode({"kind": "ping"}),  # a map, not the array form
        msgspec.msgpack.encode(["lookup", "not a key"]),  # wrong field type
        msgspec.msgpack.encode(["store", "w"]),  # missing fields
        msgspec.msgpack.encode(["lookup", ["m", 1, None, [-1]]]),  # negative token id
    ],
)
async def test_malformed_messages_are_bad_requests(server, payload):
    reply = await raw_round_trip(server.url, payload)
    assert isinstance(reply, Error)
    assert reply.code == ErrorCode.BAD_REQUEST


async def test_oversized_message_is_refused_before_decoding(small_server):
    payload = msgspec.msgpack.encode(["ping", b"x" * (100 * 1024)])
    reply = await raw_round_trip(small_server.url, payload)
    assert reply.code == ErrorCode.MESSAGE_TOO_LARGE
    assert "65536" in reply.message


async def test_client_refuses_to_send_what_the_server_would_refuse(small_server):
    async with await AsyncClient.connect(small_server.url) as client:
        with pytest.raises(TrioKVError) as err:
            await client.lookup(key(list(range(60_000)), rank=None))
        assert err.value.code == ErrorCode.MESSAGE_TOO_LARGE


async def test_too_many_tokens_is_a_limit_error(small_server):
    async with await AsyncClient.connect(small_server.url) as client:
        await expect_error(client.lookup(key(list(range(5000)), rank=None)), ErrorCode.LIMIT_EXCEEDED, "4096")


async def test_too_many_block_ids_is_a_limit_error(small_server, kv):
    async with await AsyncClient.connect(small_server.url) as client:
        await client.register_kv_cache("w", kv)
        await expect_error(
            client.store("w", key(list(range(CHUNK))), [0] * 300), ErrorCode.LIMIT_EXCEEDED, "256"
        )


@pytest.mark.parametrize("salt", ["a@b", "a/b", "a\\b", "a\x00b", "s" * 129])
async def test_bad_salts_are_refused(client, salt):
    tokens = list(range(CHUNK))
    await expect_error(client.store("worker-0", key(tokens, cache_salt=salt), [0, 1]), ErrorCode.BAD_SALT)
    await expect_error(client.lookup(key(tokens, rank=None, cache_salt=salt)), ErrorCode.BAD_SALT)


@pytest.mark.parametrize("salt", ["../x", "a@b", "s" * 129])
async def test_clear_of_a_bad_salt_is_refused(client, salt):
    await expect_error(client.clear(salt), ErrorCode.BAD_SALT)


async def test_a_negative_skip_is_an_invalid_argument(client):
    tokens = list(range(CHUNK))
    await expect_error(
        client.retrieve("worker-0", key(tokens), [0, 1], skip_first_n_tokens=-16),
        ErrorCode.INVALID_ARGUMENT,
        "skip_first_n_tokens",
    )


async def test_unknown_instance(client):
    await expect_error(
        client.store("nobody", key(list(range(CHUNK))), [0, 1]), ErrorCode.UNKNOWN_INSTANCE, "nobody"
    )
    await expect_error(client.retrieve("nobody", key(list(range(CHUNK))), [0, 1]), ErrorCode.UNKNOWN_INSTANCE)


@pytest.mark.parametrize("bad_block", [-1, 64, 10**9])
async def test_out_of_range_blocks_are_refused_and_nothing_is_copied(client, server, bad_block):
    tokens = list(range(2 * CHUNK))
    await expect_error(
        client.store("worker-0", key(tokens), [0, 1, 2, bad_block]), ErrorCode.BLOCK_OUT_OF_RANGE
    )
    assert len(server.engine.l1) == 0
    await client.store("worker-0", key(tokens), [0, 1, 2, 3])
    await expect_error(
        client.retrieve("worker-0", key(tokens), [5, 6, bad_block, 7]), ErrorCode.BLOCK_OUT_OF_RANGE
    )
    assert_no_leaks(server)


async def test_rank_outside_the_world_is_invalid(client):
    await expect_error(
        client.store("worker-0", key(list(range(CHUNK)), rank=3, world_size=2), [0, 1]),
        ErrorCode.INVALID_ARGUMENT,
    )


async def test_store_without_rank_is_invalid(client):
    await expect_error(
        client.store("worker-0", key(list(range(CHUNK)), rank=None), [0, 1]), ErrorCode.INVALID_ARGUMENT
    )


async def test_token_range_outside_the_tokens_is_invalid(client):
    await expect_error(
        client.lookup(key(list(range(CHUNK)), rank=None, end=CHUNK + 1)), ErrorCode.INVALID_ARGUMENT
    )


async def test_registration_outside_the_shm_dir_is_refused(client, tmp_path):
    path = tmp_path / "kv"
    path.write_bytes(bytes(8192))
    spec = TensorSpec(0, "uint8", [2, 4096], [4096, 1], 0)
    await expect_error(
        client.register(RegisterKVCache("x", 16, [spec], str(path), 8192)),
        ErrorCode.BAD_REGISTRATION,
        "not under",
    )


async def test_registration_larger_than_its_file_is_refused(client, kv):
    request = kv.register_request("x")
    request.shm_bytes = kv.nbytes * 2
    await expect_error(client.register(request), ErrorCode.BAD_REGISTRATION, "declared")


async def test_tensor_reaching_past_the_region_is_refused(client, kv):
    request = kv.register_request("x")
    spec = request.tensors[0]
    grown = TensorSpec(
        spec.offset,
        spec.dtype,
        [spec.shape[0], spec.shape[1] * 100, *spec.shape[2:]],
        spec.strides,
        spec.block_dim,
    )
    request.tensors = [grown]
    await expect_error(client.register(request), ErrorCode.BAD_REGISTRATION, "past the end")


async def test_block_size_must_divide_the_chunk_size(client, kv):
    request = kv.register_request("x")
    request.block_size = 5
    await expect_error(client.register(request), ErrorCode.BAD_REGISTRATION, "divide")


async def test_missing_shm_file_is_refused(client):
    spec = TensorSpec(0, "uint8", [2, 4096], [4096, 1], 0)
    await expect_error(
        client.register(RegisterKVCache("x", 16, [spec], "/dev/shm/trio-kv-does-not-exist", 8192)),
        ErrorCode.BAD_REGISTRATION,
    )


async def test_server_survives_a_barrage_of_garbage(server):
    for size in (1, 7, 100, 5000):
        await raw_round_trip(server.url, os.urandom(size))
    async with await AsyncClient.connect(server.url) as client:
        await client.ping()
    assert_no_leaks(server)


async def test_too_many_chunk_keys_is_a_limit_error():
    async with running_server(chunk_size=CHUNK, max_keys_per_request=8) as server:
        async with await AsyncClient.connect(server.url) as client:
            # 4 chunks x 4 ranks = 16 keys: refused before a single key is built.
            await expect_error(
                client.lookup(key(list(range(4 * CHUNK)), rank=None, world_size=4)),
                ErrorCode.LIMIT_EXCEEDED,
                "chunk keys",
            )
            assert (await client.lookup(key(list(range(4 * CHUNK)), rank=None, world_size=2))).hit_tokens == 0
