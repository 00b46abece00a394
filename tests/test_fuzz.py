"""Hostile input: arbitrary bytes and well-formed-but-wrong messages always get a typed
reply; the server never crashes, never leaks, never copies outside a registered region."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_kv.errors import ErrorCode
from trio_kv.keys import RequestKey
from trio_kv.protocol import REQUEST_KINDS, Error, Lookup, Retrieve, Store, decode_reply, encode
from trio_kv.testing import assert_no_leaks, make_kv_cache, running_server

CHUNK = 32
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.binary(max_size=64),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
kinds = st.sampled_from([*sorted(REQUEST_KINDS), "nope", ""])
shaped = st.builds(
    lambda kind, rest: msgspec.msgpack.encode([kind, *rest]), kinds, st.lists(values, max_size=8)
)

KNOWN_CODES = {int(code) for code in ErrorCode}


@pytest.fixture
async def harness():
    with make_kv_cache(num_blocks=16, block_size=16) as kv:
        async with running_server(chunk_size=CHUNK, max_message_bytes=64 * 1024) as server:
            await server.server.handle(encode(kv.register_request("w")))
            yield server
            assert_no_leaks(server, leases_allowed=True)


async def reply_to(server, payload: bytes):
    return decode_reply(await server.server.handle(payload))


async def test_arbitrary_bytes_get_a_typed_error(harness):
    @FUZZ
    @given(st.binary(max_size=2048))
    def check(payload: bytes) -> None:
        checks.append(payload)

    checks: list[bytes] = []
    check()
    for payload in checks:
        reply = await reply_to(harness, payload)
        if isinstance(reply, Error):
            assert reply.code in KNOWN_CODES
    assert checks


async def test_well_formed_but_wrong_messages_get_a_typed_reply(harness):
    payloads: list[bytes] = []

    @FUZZ
    @given(shaped)
    def collect(payload: bytes) -> None:
        payloads.append(payload)

    collect()
    codes = set()
    for payload in payloads:
        reply = await reply_to(harness, payload)
        if isinstance(reply, Error):
            assert reply.code in KNOWN_CODES, reply
            assert reply.code != ErrorCode.INTERNAL, reply
            codes.add(reply.code)
    assert {ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_REQUEST} <= codes


hostile_ints = st.one_of(
    st.integers(min_value=-(2**31), max_value=2**31), st.sampled_from([-1, 0, 2**31 - 1, 2**40])
)


async def test_hostile_values_in_valid_messages_never_copy_outside_the_region(harness):
    cases: list[bytes] = []

    @FUZZ
    @given(
        kind=st.sampled_from(["store", "retrieve", "lookup"]),
        world_size=hostile_ints,
        rank=st.one_of(st.none(), hostile_ints),
        n_tokens=st.integers(min_value=0, max_value=5 * CHUNK),
        start=hostile_ints,
        end=st.one_of(st.none(), hostile_ints),
        blocks=st.lists(hostile_ints, max_size=12),
        skip=hostile_ints,
    )
    def collect(kind, world_size, rank, n_tokens, start, end, blocks, skip) -> None:
        key = RequestKey("m", world_size, rank, list(range(n_tokens)), start, end, "fuzz", "")
        if kind == "store":
            cases.append(encode(Store("w", key, blocks)))
        elif kind == "retrieve":
            cases.append(encode(Retrieve("w", key, blocks, skip)))
        else:
            cases.append(encode(Lookup(key)))

    collect()
    expected = {
        ErrorCode.BAD_REQUEST,
        ErrorCode.INVALID_ARGUMENT,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.BLOCK_OUT_OF_RANGE,
    }
    for payload in cases:
        reply = await reply_to(harness, payload)
        # Every hostile value is caught by validation before any copy is planned.
        if isinstance(reply, Error):
            assert reply.code in expected, reply
    assert harness.engine.status().requests_in_flight == 0
