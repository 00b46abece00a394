"""Clients: ``AsyncClient`` for Trio code and ``BlockingClient`` for engine processes that are not.

Both open one Req0 socket (resend disabled) and one nng context per request,
so many requests can be in flight at once. ``connect`` says Hello first: it
checks the protocol version and learns the server's chunk size and limits,
which the client then enforces before sending anything.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeVar

import pynng
import trio

from .errors import ErrorCode, ServerError, TrioKVError
from .keys import RequestKey, packed_key
from .protocol import (
    PROTOCOL_VERSION,
    Clear,
    Cleared,
    EndSession,
    Error,
    Hello,
    HelloOk,
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
    Unregistered,
    UnregisterKVCache,
    decode_reply,
    encode,
)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0


def _open_socket(url: str, *, wait: bool, timeout_s: float) -> pynng.Req0:
    sock = pynng.Req0(resend_time=-1, recv_max_size=0)
    sock.recv_timeout = max(1, int(timeout_s * 1000)) if math.isfinite(timeout_s) else -1
    try:
        sock.dial(url, block=not wait)
    except pynng.NNGException as exc:
        sock.close()
        raise ConnectionError(f"no trio-kv server answers at {url}: {exc}") from None
    return sock


def _unwrap(buf: bytes, expected: type[T]) -> T:
    reply = decode_reply(buf)
    if isinstance(reply, Error):
        try:
            code = ErrorCode(reply.code)
        except ValueError:
            code = ErrorCode.INTERNAL
        raise ServerError(code, reply.message)
    if not isinstance(reply, expected):
        raise TrioKVError(ErrorCode.INTERNAL, f"expected {expected.__name__}, got {type(reply).__name__}")
    return reply


class Exportable(Protocol):
    """A KV cache that can describe itself for registration: ``gpu.shm.SharedKVCache`` (CPU path)
    or ``gpu.ipc.CudaKVCacheExport`` (CUDA path)."""

    def register_request(self, instance_id: str) -> RegisterKVCache: ...


class _Session:
    """What both clients share: the server's facts and the local size check."""

    hello: HelloOk | None = None

    def _encode(self, request: Any) -> bytes:
        buf = encode(request)
        if self.hello is not None and len(buf) > self.hello.limits.max_message_bytes:
            raise TrioKVError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"request of {len(buf)} bytes exceeds the server's limit of "
                f"{self.hello.limits.max_message_bytes}",
            )
        return buf

    @property
    def chunk_size(self) -> int:
        assert self.hello is not None, "connect first"
        return self.hello.chunk_size


class AsyncClient(_Session):
    """A Trio client. Use ``async with await AsyncClient.connect(url) as client:``."""

    def __init__(self, sock: pynng.Req0, timeout_s: float, *, fail_fast: bool = False) -> None:
        self._sock = sock
        self.timeout_s = timeout_s
        # fail_fast: a call while no connection to the server is up raises ConnectionError at
        # once instead of waiting out the timeout (nng redials in the background).
        self.fail_fast = fail_fast

    @classmethod
    async def connect(
        cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, wait: bool = False, hello: bool = True
    ) -> AsyncClient:
        """Dial ``url`` and say Hello. ``wait=True`` keeps redialling until a server appears."""
        client = cls(_open_socket(url, wait=wait, timeout_s=timeout_s), timeout_s)
        if hello:
            try:
                client.hello = await client.call(Hello(PROTOCOL_VERSION, "trio_kv.AsyncClient"), HelloOk)
            except BaseException:
                client.close()
                raise
        return client

    async def call(self, request: Any, expected: type[T], *, timeout_s: float | None = None) -> T:
        """Send one request and wait for its reply; raises ServerError on an error reply."""
        buf = self._encode(request)
        with trio.fail_after(self.timeout_s if timeout_s is None else timeout_s):
            ctx = self._sock.new_context()
            try:
                await ctx.asend(buf)
                reply = await ctx.arecv()
            finally:
                ctx.close()
        return _unwrap(reply, expected)

    def close(self) -> None:
        self._sock.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def ping(self) -> Pong:
        return await self.call(Ping(), Pong)

    async def register(self, request: RegisterKVCache) -> Registered:
        return await self.call(request, Registered)

    async def register_kv_cache(self, instance_id: str, kv_cache: Exportable) -> Registered:
        return await self.call(kv_cache.register_request(instance_id), Registered)

    async def unregister(self, instance_id: str) -> Unregistered:
        return await self.call(UnregisterKVCache(instance_id), Unregistered)

    async def store(
        self, instance_id: str, key: RequestKey, block_ids: list[int], *, ipc_event: bytes = b""
    ) -> StoreResult:
        return await self.call(
            Store(instance_id, packed_key(key), block_ids, ipc_event=ipc_event), StoreResult
        )

    async def lookup(self, key: RequestKey) -> LookupResult:
        return await self.call(Lookup(packed_key(key)), LookupResult)

    async def retrieve(
        self,
        instance_id: str,
        key: RequestKey,
        block_ids: list[int],
        skip_first_n_tokens: int = 0,
        *,
        ipc_event: bytes = b"",
    ) -> RetrieveResult:
        return await self.call(
            Retrieve(instance_id, packed_key(key), block_ids, skip_first_n_tokens, ipc_event=ipc_event),
            RetrieveResult,
        )

    async def release(
        self, request_id: str, cache_salt: str = "", start: int = 0, end: int | None = None
    ) -> Released:
        return await self.call(ReleaseLookup(request_id, cache_salt, start, end), Released)

    async def end_session(self, request_id: str, cache_salt: str = "") -> SessionEnded:
        return await self.call(EndSession(request_id, cache_salt), SessionEnded)

    async def clear(self, cache_salt: str | None = None) -> Cleared:
        return await self.call(Clear(cache_salt), Cleared)

    async def status(self) -> StatusResult:
        return await self.call(Status(), StatusResult)


class BlockingClient(_Session):
    """A blocking client, safe to share between threads (each call uses its own nng context)."""

    def __init__(self, sock: pynng.Req0, timeout_s: float, *, fail_fast: bool = False) -> None:
        self._sock = sock
        self.timeout_s = timeout_s
        # fail_fast: a call while no connection to the server is up raises ConnectionError at
        # once instead of waiting out the timeout (nng redials in the background).
        self.fail_fast = fail_fast

    @classmethod
    def connect(
        cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, wait: bool = False, hello: bool = True
    ) -> BlockingClient:
        client = cls(_open_socket(url, wait=wait, timeout_s=timeout_s), timeout_s)
        if hello:
            try:
                client.hello = client.call(Hello(PROTOCOL_VERSION, "trio_kv.BlockingClient"), HelloOk)
            except BaseException:
                client.close()
                raise
        return client

    def call(self, request: Any, expected: type[T]) -> T:
        buf = self._encode(request)
        if self.fail_fast and not self._sock.pipes:
            raise ConnectionError("not connected to the trio-kv server (nng is redialling)")
        ctx = self._sock.new_context()
        try:
            ctx.send(buf)
            try:
                reply = ctx.recv()
            except pynng.Timeout:
                raise TimeoutError(f"no reply within {self.timeout_s} s") from None
        finally:
            ctx.close()
        return _unwrap(reply, expected)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ping(self) -> Pong:
        return self.call(Ping(), Pong)

    def register(self, request: RegisterKVCache) -> Registered:
        return self.call(request, Registered)

    def register_kv_cache(self, instance_id: str, kv_cache: Exportable) -> Registered:
        return self.call(kv_cache.register_request(instance_id), Registered)

    def unregister(self, instance_id: str) -> Unregistered:
        return self.call(UnregisterKVCache(instance_id), Unregistered)

    def store(
        self, instance_id: str, key: RequestKey, block_ids: list[int], *, ipc_event: bytes = b""
    ) -> StoreResult:
        return self.call(Store(instance_id, packed_key(key), block_ids, ipc_event=ipc_event), StoreResult)

    def lookup(self, key: RequestKey) -> LookupResult:
        return self.call(Lookup(packed_key(key)), LookupResult)

    def retrieve(
        self,
        instance_id: str,
        key: RequestKey,
        block_ids: list[int],
        skip_first_n_tokens: int = 0,
        *,
        ipc_event: bytes = b"",
    ) -> RetrieveResult:
        return self.call(
            Retrieve(instance_id, packed_key(key), block_ids, skip_first_n_tokens, ipc_event=ipc_event),
            RetrieveResult,
        )

    def release(
        self, request_id: str, cache_salt: str = "", start: int = 0, end: int | None = None
    ) -> Released:
        return self.call(ReleaseLookup(request_id, cache_salt, start, end), Released)

    def end_session(self, request_id: str, cache_salt: str = "") -> SessionEnded:
        return self.call(EndSession(request_id, cache_salt), SessionEnded)

    def clear(self, cache_salt: str | None = None) -> Cleared:
        return self.call(Clear(cache_salt), Cleared)

    def status(self) -> StatusResult:
        return self.call(Status(), StatusResult)
