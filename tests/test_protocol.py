"""Wire protocol: every message round-trips, old and new peers interoperate, and bad
bytes become typed errors (never exceptions of another kind)."""

import msgspec
import pytest

from trio_kv.core.ledger import AdapterUsage
from trio_kv.errors import ErrorCode, TrioKVError
from trio_kv.keys import RequestKey
from trio_kv.protocol import (
    PROTOCOL_VERSION,
    REQUEST_KINDS,
    Clear,
    Cleared,
    EndSession,
    Error,
    Hello,
    HelloOk,
    InstanceInfo,
    Limits,
    Lookup,
    LookupResult,
    Ping,
    Pong,
    Registered,
    RegisterKVCache,
    Released,
    ReleaseLookup,
    Retrieve,
    RetrieveResult,
    SessionEnded,
    Status,
    StatusResult,
    Store,
    StoreResult,
    TensorSpec,
    Unregistered,
    UnregisterKVCache,
    decode_reply,
    decode_request,
    encode,
    error_reply,
)

LIMIT = 1 << 20

KEY = RequestKey(
    model="llama",
    world_size=2,
    rank=1,
    tokens=[0, 1, 2**32 - 1],
    start=1,
    end=3,
    request_id="req-1",
    cache_salt="tenant",
)
RANK_LESS_KEY = RequestKey(model="llama", world_size=2, rank=None, tokens=[5, 6])

REQUESTS = [
    Hello(protocol_version=PROTOCOL_VERSION, client_name="vllm"),
    Ping(),
    RegisterKVCache(
        instance_id="worker-0",
        block_size=16,
        tensors=[
            TensorSpec(
                offset=0,
                dtype="float16",
                shape=[2, 8, 16, 2, 32],
                strides=[8192, 1024, 64, 32, 1],
                block_dim=1,
            ),
            TensorSpec(offset=32768, dtype="bfloat16", shape=[8, 64], strides=[64, 1], block_dim=0),
        ],
        shm_path="/dev/shm/kv",
        shm_bytes=65536,
    ),
    UnregisterKVCache(instance_id="worker-0"),
    Store(instance_id="worker-0", key=KEY, block_ids=[3, 1, 4]),
    Lookup(key=RANK_LESS_KEY),
    Retrieve(instance_id="worker-0", key=KEY, block_ids=[2, 7], skip_first_n_tokens=16),
    ReleaseLookup(request_id="req-1", cache_salt="tenant", start=32, end=64),
    ReleaseLookup(request_id="req-1"),
    EndSession(request_id="req-1", cache_salt="tenant"),
    Clear(cache_salt="tenant"),
    Clear(),
    Status(),
]

REPLIES = [
    HelloOk(
        protocol_version=PROTOCOL_VERSION,
        server_version="0.1.0",
        chunk_size=256,
        limits=Limits(max_message_bytes=LIMIT, max_tokens_per_key=1000, max_block_ids=500, max_world_size=8),
    ),
    Pong(),
    Registered(instance_id="worker-0", num_blocks=8, block_bytes=4096),
    Unregistered(existed=True),
    StoreResult(stored=3, skipped_present=1, skipped_no_room=2),
    LookupResult(hit_tokens=512, l1_chunks=1, l2_chunks=1),
    RetrieveResult(hit_tokens=512, chunks_written=2),
    Released(leases_released=4),
    SessionEnded(leases_released=2, had_session=True),
    Cleared(entries_removed=5, bytes_freed=20480),
    StatusResult(
        server_version="0.1.0",
        uptime_s=12.5,
        chunk_size=256,
        l1=AdapterUsage(
            total_bytes_used=8192,
            total_capacity_bytes=65536,
            bytes_by_salt={"": 4096, "tenant": 4096},
            usage_fraction=0.125,
        ),
        l1_entries=2,
        leases=1,
        sessions=3,
        instances=[InstanceInfo(instance_id="worker-0", num_blocks=8, block_size=16, block_bytes=4096)],
        requests_in_flight=1,
    ),
    Error(code=int(ErrorCode.BAD_SALT), message="no"),
]


def decode_error(buf: bytes, max_message_bytes: int = LIMIT) -> TrioKVError:
    with pytest.raises(TrioKVError) as caught:
        decode_request(buf, max_message_bytes)
    return caught.value


def raw(*items) -> bytes:
    return msgspec.msgpack.encode(list(items))


def key_array(tokens: list[int]) -> list:
    return ["llama", 1, 0, tokens]


# ---------------------------------------------------------------- round trips


def test_request_list_covers_every_request_kind():
    assert {type(r).__struct_config__.tag for r in REQUESTS} == REQUEST_KINDS


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trips(request_):
    decoded = decode_request(encode(request_), LIMIT)
    assert type(decoded) is type(request_)
    assert decoded == request_


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_reply_round_trips(reply):
    decoded = decode_reply(encode(reply))
    assert type(decoded) is type(reply)
    assert decoded == reply


def test_message_is_an_array_led_by_its_kind_tag():
    assert msgspec.msgpack.decode(encode(Ping())) == ["ping"]
    assert msgspec.msgpack.decode(encode(UnregisterKVCache(instance_id="w")))[0] == "unregister"


def test_error_reply_carries_the_code_and_message():
    reply = error_reply(TrioKVError(ErrorCode.LIMIT_EXCEEDED, "too many blocks"))
    assert decode_reply(encode(reply)) == Error(code=9, message="too many blocks")


# ---------------------------------------------------------------- compatibility


class OldRetrieve(msgspec.Struct, array_like=True, tag_field="kind", tag="retrieve"):
    """Retrieve as a client that predates ``skip_first_n_tokens`` sends it."""

    instance_id: str
    key: RequestKey
    block_ids: list[int]


class OldLookupResult(msgspec.Struct, array_like=True, tag_field="kind", tag="looked_up"):
    """LookupResult as a server that predates ``l2_chunks`` sends it."""

    hit_tokens: int
    l1_chunks: int


class NewerHello(msgspec.Struct, array_like=True, tag_field="kind", tag="hello"):
    """Hello from a future client that appended a field."""

    protocol_version: int
    client_name: str
    token: str
    features: list[str]


def test_old_retrieve_without_skip_first_n_tokens_defaults_to_zero():
    old = OldRetrieve(instance_id="worker-0", key=KEY, block_ids=[1, 2])
    decoded = decode_request(msgspec.msgpack.encode(old), LIMIT)
    assert decoded == Retrieve(instance_id="worker-0", key=KEY, block_ids=[1, 2], skip_first_n_tokens=0)


def test_old_lookup_result_without_l2_chunks_defaults_to_zero():
    decoded = decode_reply(msgspec.msgpack.encode(OldLookupResult(hit_tokens=256, l1_chunks=1)))
    assert decoded == LookupResult(hit_tokens=256, l1_chunks=1, l2_chunks=0)


def test_request_key_without_trailing_optional_fields_decodes_with_defaults():
    decoded = decode_request(raw("lookup", ["llama", 1, None, [1, 2]]), LIMIT)
    assert decoded == Lookup(key=RequestKey("llama", 1, None, [1, 2], 0, None, "", ""))


def test_newer_peer_appended_field_is_ignored():
    newer = NewerHello(protocol_version=PROTOCOL_VERSION, client_name="next", token="", features=["x"])
    decoded = decode_request(msgspec.msgpack.encode(newer), LIMIT)
    assert decoded == Hello(protocol_version=PROTOCOL_VERSION, client_name="next")


# ---------------------------------------------------------------- bad input


def test_unknown_request_kind_is_unknown_request():
    assert decode_error(raw("teleport", 1, 2)).code is ErrorCode.UNKNOWN_REQUEST


def test_reply_kind_sent_as_request_is_unknown_request():
    assert decode_error(encode(Pong())).code is ErrorCode.UNKNOWN_REQUEST


@pytest.mark.parametrize(
    "buf",
    [b"", b"\xc1", b"\x92\xa4ping", b"not msgpack at all \xff\xfe"],
    ids=["empty", "invalid-opcode", "truncated-array", "garbage"],
)
def test_garbage_bytes_are_bad_request(buf):
    assert decode_error(buf).code is ErrorCode.BAD_REQUEST


def test_truncated_message_is_bad_request():
    whole = encode(Store(instance_id="worker-0", key=KEY, block_ids=[1, 2, 3]))
    for cut in range(len(whole)):
        assert decode_error(whole[:cut]).code is ErrorCode.BAD_REQUEST, cut


def test_trailing_bytes_after_a_message_are_bad_request():
    assert decode_error(encode(Ping()) + b"\x00").code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "buf",
    [
        raw("hello", "one"),
        raw("unregister", 5),
        raw("store", "worker-0", key_array([1]), ["a"]),
        raw("lookup", ["llama", "two", 0, [1]]),
        raw("lookup", "not a key"),
        raw("retrieve", "worker-0", key_array([1]), [1], "16"),
    ],
    ids=["hello", "unregister", "store-block-ids", "lookup-world-size", "lookup-key", "retrieve-skip"],
)
def test_wrong_field_types_are_bad_request(buf):
    assert decode_error(buf).code is ErrorCode.BAD_REQUEST


def test_missing_required_field_is_bad_request():
    assert decode_error(raw("store", "worker-0", key_array([1]))).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "buf",
    [b"\x80", msgspec.msgpack.encode({"kind": "ping"}), raw(), raw(7), msgspec.msgpack.encode("ping")],
    ids=["empty-map", "map", "empty-array", "int-tag", "bare-string"],
)
def test_message_that_is_not_a_tagged_array_is_bad_request(buf):
    assert decode_error(buf).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("token", [-1, 2**32, 2**63])
def test_out_of_range_token_id_is_bad_request(token):
    assert decode_error(raw("lookup", key_array([1, token]))).code is ErrorCode.BAD_REQUEST


def test_largest_uint32_token_id_is_accepted():
    decoded = decode_request(raw("lookup", key_array([2**32 - 1])), LIMIT)
    assert decoded.key.tokens == [2**32 - 1]


def test_message_over_the_limit_is_too_large():
    buf = encode(Store(instance_id="worker-0", key=KEY, block_ids=list(range(100))))
    assert decode_error(buf, max_message_bytes=len(buf) - 1).code is ErrorCode.MESSAGE_TOO_LARGE


def test_message_at_the_limit_is_accepted():
    message = Store(instance_id="worker-0", key=KEY, block_ids=list(range(100)))
    buf = encode(message)
    assert decode_request(buf, max_message_bytes=len(buf)) == message


def test_size_is_checked_before_decoding():
    # Garbage would be BAD_REQUEST if it were decoded; too large must win.
    assert decode_error(b"\xc1" * 65, max_message_bytes=64).code is ErrorCode.MESSAGE_TOO_LARGE


# ---------------------------------------------------------------- CUDA fields (appended with defaults)

from trio_kv.protocol import CudaAllocation, CudaRegistration  # noqa: E402

CUDA_REGISTRATION = CudaRegistration(
    device_uuid=bytes(range(16)),
    allocations=[CudaAllocation(handle=b"\x00\x01" * 32, size=1 << 30)],
    tensor_allocations=[0, 0],
    event_handle=b"\xff" * 64,
)


class OldRegisterKVCache(msgspec.Struct, array_like=True, tag_field="kind", tag="register"):
    """RegisterKVCache as a client that predates ``cuda`` sends it."""

    instance_id: str
    block_size: int
    tensors: list[TensorSpec]
    shm_path: str
    shm_bytes: int


class OldStore(msgspec.Struct, array_like=True, tag_field="kind", tag="store"):
    """Store as a client that predates ``ipc_event`` sends it."""

    instance_id: str
    key: RequestKey
    block_ids: list[int]


class OldRetrieveWithSkip(msgspec.Struct, array_like=True, tag_field="kind", tag="retrieve"):
    """Retrieve as a client that has ``skip_first_n_tokens`` but predates ``ipc_event`` sends it."""

    instance_id: str
    key: RequestKey
    block_ids: list[int]
    skip_first_n_tokens: int


@pytest.mark.parametrize(
    "request_",
    [
        RegisterKVCache(
            instance_id="gpu-0",
            block_size=16,
            tensors=REQUESTS[2].tensors,
            shm_path="",
            shm_bytes=0,
            cuda=CUDA_REGISTRATION,
        ),
        Store(instance_id="gpu-0", key=KEY, block_ids=[1, 2], ipc_event=b"\x07" * 64),
        Retrieve(
            instance_id="gpu-0", key=KEY, block_ids=[1, 2], skip_first_n_tokens=16, ipc_event=b"\x08" * 64
        ),
    ],
    ids=["register", "store", "retrieve"],
)
def test_cuda_fields_round_trip(request_):
    assert decode_request(encode(request_), LIMIT) == request_


def test_old_register_without_cuda_decodes_as_a_shared_memory_registration():
    old = OldRegisterKVCache("worker-0", 16, REQUESTS[2].tensors, "/dev/shm/kv", 65536)
    decoded = decode_request(msgspec.msgpack.encode(old), LIMIT)
    assert decoded == RegisterKVCache("worker-0", 16, REQUESTS[2].tensors, "/dev/shm/kv", 65536)
    assert decoded.cuda is None


def test_old_store_without_ipc_event_decodes_with_an_empty_one():
    decoded = decode_request(msgspec.msgpack.encode(OldStore("worker-0", KEY, [1, 2])), LIMIT)
    assert decoded == Store(instance_id="worker-0", key=KEY, block_ids=[1, 2])
    assert decoded.ipc_event == b""


def test_old_retrieve_without_ipc_event_decodes_with_an_empty_one():
    old = OldRetrieveWithSkip("worker-0", KEY, [1, 2], 16)
    decoded = decode_request(msgspec.msgpack.encode(old), LIMIT)
    assert decoded == Retrieve(instance_id="worker-0", key=KEY, block_ids=[1, 2], skip_first_n_tokens=16)
    assert decoded.ipc_event == b""


def test_cuda_fields_are_appended_after_every_existing_field():
    register = msgspec.msgpack.decode(encode(REQUESTS[2]))
    assert register[:6] == ["register", "worker-0", 16, register[3], "/dev/shm/kv", 65536]
    assert register[6] is None
    store = msgspec.msgpack.decode(encode(Store(instance_id="w", key=KEY, block_ids=[1])))
    assert store[0:2] == ["store", "w"] and store[3] == [1] and store[4] == b""


def test_cuda_registration_without_event_handle_decodes_with_an_empty_one():
    raw_registration = [bytes(16), [[b"\x00" * 64, 4096]], [0]]
    buf = msgspec.msgpack.encode(
        ["register", "gpu-0", 16, [[0, "uint8", [4, 1024], [1024, 1], 0]], "", 0, raw_registration]
    )
    decoded = decode_request(buf, LIMIT)
    assert decoded.cuda == CudaRegistration(bytes(16), [CudaAllocation(b"\x00" * 64, 4096)], [0])
    assert decoded.cuda.event_handle == b""
