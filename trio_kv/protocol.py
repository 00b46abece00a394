"""Wire protocol: msgspec-msgpack tagged unions of request and reply structs. Pure: no sockets.

Every message is one msgpack array whose first element is the kind tag. New
fields are only ever appended, with defaults, so older peers keep working.

Each request class names its reply type once, as its base: ``class Ping(RequestFor[Pong])``.
Type checkers read it from there (``client.call(Ping())`` is a ``Pong``); at runtime
``reply_type(Ping)`` (the ``REPLY_OF`` table) does.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar, Union, get_args, get_origin

import msgspec

from .errors import ErrorCode, TrioKVError
from .keys import RequestKey
from .msgpack_peek import head_kind

PROTOCOL_VERSION = 1
# Checked from an array's header before any element is built (millions of 6-byte tensor specs
# cost seconds); registration refuses over 4096 tensors anyway (transfer/layout.py).
_Dims = Annotated[list[int], msgspec.Meta(max_length=64)]
_MAX_TENSORS_ON_THE_WIRE = 1 << 14


class AdapterUsage(msgspec.Struct, frozen=True):
    """A snapshot of one tier's usage. ``usage_fraction`` is -1.0 when capacity is unbounded."""

    total_bytes_used: int
    total_capacity_bytes: int | None
    bytes_by_salt: dict[str, int]
    usage_fraction: float


class _Message(msgspec.Struct, array_like=True, tag_field="kind", omit_defaults=False):
    pass


# ---------------------------------------------------------------- replies


class Limits(msgspec.Struct, array_like=True, frozen=True):
    max_message_bytes: int
    max_tokens_per_key: int
    max_block_ids: int
    max_world_size: int
    max_keys_per_request: int = 1 << 18  # chunks x ranks one request may name
    max_id_chars: int = 256  # request ids, instance ids and model names


class HelloOk(_Message, tag="hello_ok"):
    protocol_version: int
    server_version: str
    chunk_size: int
    limits: Limits


class Pong(_Message, tag="pong"):
    pass


class Registered(_Message, tag="registered"):
    instance_id: str
    num_blocks: int
    block_bytes: int  # bytes per block across every tensor


class Unregistered(_Message, tag="unregistered"):
    existed: bool


class StoreResult(_Message, tag="stored"):
    """Chunk counts: written now, already present (or being written), skipped for lack of
    room, skipped because the tenant is at its L1 quota with nothing of its own to evict."""

    stored: int
    skipped_present: int
    skipped_no_room: int
    skipped_quota: int = 0


class LookupResult(_Message, tag="looked_up"):
    hit_tokens: int
    l1_chunks: int
    l2_chunks: int = 0


class RetrieveResult(_Message, tag="retrieved"):
    """``hit_tokens``: leading tokens valid in the engine's blocks after this call
    (chunks it already held count); ``chunks_written``: chunks whose bytes were copied."""

    hit_tokens: int
    chunks_written: int


class Released(_Message, tag="released"):
    leases_released: int


class SessionEnded(_Message, tag="session_ended"):
    leases_released: int
    had_session: bool


class Cleared(_Message, tag="cleared"):
    entries_removed: int
    bytes_freed: int
    l2_objects_deleted: int = 0


class InstanceInfo(msgspec.Struct, array_like=True, frozen=True):
    instance_id: str
    num_blocks: int
    block_size: int
    block_bytes: int


class TierStatus(msgspec.Struct, frozen=True):
    """One L2 adapter as status reports it."""

    name: str
    kind: str
    usage: AdapterUsage
    healthy: bool
    state: str
    reason: str
    queue_depth: int
    queued: int
    dropped: int
    skipped_evicted: int
    written: int
    write_failures: int
    loads: int
    load_failures: int
    lookup_errors: int
    evictions: int
    quota_skips: int = 0
    write_timeouts: int = 0
    load_timeouts: int = 0
    evictions_by_reason: dict[str, int] = {}
    evict_errors: int = 0  # failed eviction passes (the tier backs off and retries)
    lost: int = 0  # chunks handed to write-behind and never written, for any reason
    skipped_orphan: int = 0  # not written: the chunk before it is not in this tier
    breaker_skips: int = 0  # not sent: the circuit breaker was open (not in write_failures)


class StatusResult(_Message, tag="status_ok"):
    server_version: str
    uptime_s: float
    chunk_size: int
    l1: AdapterUsage
    l1_entries: int
    leases: int
    sessions: int
    instances: list[InstanceInfo]
    requests_in_flight: int
    l2: list[TierStatus] = []
    l1_evictions: dict[str, int] = {}  # by reason: watermark, quota, ...
    l1_refusals: dict[str, int] = {}  # reservations refused, by reason: quota, capacity
    session_bytes: int = 0  # what the hash sessions hold (bounded by max_session_bytes)
    memory_bytes: dict[str, int] = {}  # estimated by part: l1_arena, l1_metadata, l2_metadata, sessions
    layout_mismatches: int = 0  # retrieves that stopped at a chunk another KV layout stored
    inflight_hits: int = 0  # chunks a lookup waited for while they were being stored, then hit
    inflight_wait_timeouts: int = 0  # such waits that ended at the deadline (a miss there)
    inflight_chunks: int = 0  # chunks pending now (claimed by a lookup, or being stored)


class Error(_Message, tag="error"):
    code: int
    message: str


Reply = Union[
    HelloOk,
    Pong,
    Registered,
    Unregistered,
    StoreResult,
    LookupResult,
    RetrieveResult,
    Released,
    SessionEnded,
    Cleared,
    StatusResult,
    Error,
]

# ---------------------------------------------------------------- requests

ReplyT = TypeVar("ReplyT", bound=_Message)


class RequestFor(_Message, Generic[ReplyT]):
    """A request whose successful reply is a ``ReplyT`` (any request may also get an ``Error``).

    The type parameter is not a field, so it changes nothing on the wire."""


class Hello(RequestFor[HelloOk], tag="hello"):
    """The first request on a connection. ``token``: the data-plane token a tcp:// listener
    needs, or the admin token (which also allows admin requests such as Clear of every salt)."""

    protocol_version: int
    client_name: str = ""
    token: str = ""


class Ping(RequestFor[Pong], tag="ping"):
    pass


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    """One KV tensor inside a registered region.

    ``offset`` is in bytes from the region start; ``strides`` are in elements,
    as torch reports them; ``block_dim`` is the dimension that indexes blocks.
    """

    offset: int
    dtype: str
    shape: _Dims
    strides: _Dims
    block_dim: int


class CudaAllocation(msgspec.Struct, array_like=True, frozen=True):
    """One device allocation the engine exports: ``cuIpcGetMemHandle`` bytes of its base."""

    handle: bytes  # CU_IPC_HANDLE_SIZE (64) bytes
    size: int  # bytes from the allocation base that the tensors may reach


class CudaRegistration(msgspec.Struct, array_like=True, frozen=True):
    """Where a CUDA KV cache lives: ``tensors[i]`` is in ``allocations[tensor_allocations[i]]``,
    at ``TensorSpec.offset`` bytes from its base. ``event_handle`` is an interprocess event the
    engine records before each store or retrieve (used when a request carries none)."""

    device_uuid: bytes  # 16 bytes, as cuDeviceGetUuid reports
    allocations: Annotated[list[CudaAllocation], msgspec.Meta(max_length=_MAX_TENSORS_ON_THE_WIRE)]
    tensor_allocations: Annotated[list[int], msgspec.Meta(max_length=_MAX_TENSORS_ON_THE_WIRE)]
    event_handle: bytes = b""


class RegisterKVCache(RequestFor[Registered], tag="register"):
    """Register an engine's KV cache. On the CPU path the tensors live in one shared-memory file;
    on the CUDA path (``cuda`` set, ``shm_path`` empty) in device allocations shared by IPC handles."""

    instance_id: str
    block_size: int  # tokens per block
    tensors: Annotated[list[TensorSpec], msgspec.Meta(max_length=_MAX_TENSORS_ON_THE_WIRE)]
    shm_path: str
    shm_bytes: int
    cuda: CudaRegistration | None = None


class UnregisterKVCache(RequestFor[Unregistered], tag="unregister"):
    instance_id: str


class Store(RequestFor[StoreResult], tag="store"):
    """Copy the KV of ``key``'s full chunks from the instance's blocks into the cache.

    ``block_ids[j]`` holds tokens ``[j*block_size, (j+1)*block_size)`` of the
    prompt. Chunks that start before ``key.start`` are not stored.
    """

    instance_id: str
    key: RequestKey
    block_ids: list[int]
    ipc_event: bytes = b""  # CUDA path: interprocess event handle to wait on before reading the blocks


class Lookup(RequestFor[LookupResult], tag="lookup"):
    """How many leading tokens of ``key`` are held? Hits are leased to the request id. A chunk
    another request is storing (or has claimed) is waited for, briefly. ``claim``: the requester
    will compute and store the chunks that miss, so lookups of other requests wait for them."""

    key: RequestKey
    claim: bool = False


class Retrieve(RequestFor[RetrieveResult], tag="retrieve"):
    """Copy cached chunks into the instance's blocks, leaving tokens before
    ``max(key.start, skip_first_n_tokens)`` untouched."""

    instance_id: str
    key: RequestKey
    block_ids: list[int]
    skip_first_n_tokens: int = 0
    ipc_event: bytes = b""  # CUDA path: interprocess event handle to wait on before writing the blocks


class ReleaseLookup(RequestFor[Released], tag="release"):
    """Release a request's leases on chunks inside tokens ``[start, end)`` (end None: all)."""

    request_id: str
    cache_salt: str = ""
    start: int = 0
    end: int | None = None


class EndSession(RequestFor[SessionEnded], tag="end_session"):
    request_id: str
    cache_salt: str = ""


class Clear(RequestFor[Cleared], tag="clear"):
    """Drop cached chunks: every salt when ``cache_salt`` is None; L2 objects too with ``include_l2``."""

    cache_salt: str | None = None
    include_l2: bool = False


class Status(RequestFor[StatusResult], tag="status"):
    pass


Request = Union[
    Hello,
    Ping,
    RegisterKVCache,
    UnregisterKVCache,
    Store,
    Lookup,
    Retrieve,
    ReleaseLookup,
    EndSession,
    Clear,
    Status,
]
REQUEST_KINDS = frozenset(t.__struct_config__.tag for t in get_args(Request))


def _declared_reply(request_type: type) -> type[_Message]:
    """The ``ReplyT`` of the ``RequestFor[ReplyT]`` that ``request_type`` derives from."""
    for cls in request_type.__mro__:
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is RequestFor:
                reply: type[_Message] = get_args(base)[0]
                return reply
    raise TypeError(f"{request_type.__name__} does not derive from RequestFor[<reply type>]")


# Built once from the classes: request type -> the reply type it declares.
REPLY_OF: dict[type, type[_Message]] = {request: _declared_reply(request) for request in get_args(Request)}


def reply_type(request_type: type[RequestFor[ReplyT]]) -> type[ReplyT]:
    """The reply type a request type declares, e.g. ``reply_type(Ping) is Pong``."""
    return REPLY_OF[request_type]  # type: ignore[return-value]


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


def decode_request(buf: bytes, max_message_bytes: int) -> Request:
    """Decode one request, or raise a typed error saying why it is not one (BAD_REQUEST,
    UNKNOWN_REQUEST, MESSAGE_TOO_LARGE: the size is checked first, so that allocates nothing)."""
    if len(buf) > max_message_bytes:
        raise TrioKVError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"message of {len(buf)} bytes exceeds the limit of {max_message_bytes}",
        )
    try:
        return _request_decoder.decode(buf)
    except msgspec.ValidationError as exc:
        kind = head_kind(buf)  # an unknown kind, or a malformed known one?
        if kind is None or kind in REQUEST_KINDS:
            raise TrioKVError(ErrorCode.BAD_REQUEST, f"malformed request: {exc}") from None
        known = f"this server knows {sorted(REQUEST_KINDS)}"
        raise TrioKVError(ErrorCode.UNKNOWN_REQUEST, f"unknown request kind {kind!r}; {known}") from None
    except msgspec.DecodeError as exc:
        raise TrioKVError(ErrorCode.BAD_REQUEST, f"not a msgpack message: {exc}") from None
    except RecursionError:  # msgspec stops at the interpreter's depth limit, in bounded time
        raise TrioKVError(ErrorCode.BAD_REQUEST, "malformed request: nested too deeply") from None


def decode_reply(buf: bytes) -> Reply:
    return _reply_decoder.decode(buf)


def error_reply(error: TrioKVError) -> Error:
    return Error(code=int(error.code), message=error.message)
