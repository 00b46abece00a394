"""Clients: ``AsyncClient`` for Trio code and ``BlockingClient`` for engine processes that are not.

Both open one Req0 socket (resend disabled) and use one nng context per request in flight
(the blocking one keeps them open between calls, req_contexts.py), so many requests can be
in flight at once. ``connect`` says Hello first: it
checks the protocol version and learns the server's chunk size and limits,
which the client then enforces before sending anything.

The operations (``ping``, ``store``, ...) are written once, as ``Op``s that build a
request; the two clients differ only in how ``call`` sends it and waits for the
reply, whose type the request declares (``protocol.reply_type``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, Protocol, overload

import pynng
import trio

from .errors import ErrorCode, ServerError, TrioKVError
from .keys import RequestKey, packed_key
from .protocol import (
    PROTOCOL_VERSION,
    Clear,
    EndSession,
    Error,
    Hello,
    HelloOk,
    Lookup,
    Ping,
    RegisterKVCache,
    ReleaseLookup,
    ReplyT,
    RequestFor,
    Retrieve,
    Status,
    Store,
    UnregisterKVCache,
    decode_reply,
    encode,
    reply_type,
)
from .req_contexts import ReqContexts

P = ParamSpec("P")
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


def _unwrap(buf: bytes, expected: type[ReplyT]) -> ReplyT:
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


def _expected(request: RequestFor[ReplyT], expected: type[ReplyT] | None) -> type[ReplyT]:
    """The reply type to accept: the one ``request`` declares, unless the caller names one."""
    return reply_type(type(request)) if expected is None else expected


class Exportable(Protocol):
    """A KV cache that can describe itself for registration: ``export.shm.SharedKVCache`` (CPU path)
    or ``export.ipc.CudaKVCacheExport`` (CUDA path)."""

    def register_request(self, instance_id: str) -> RegisterKVCache: ...


class Op(Generic[P, ReplyT]):
    """One client operation: ``build(*args)`` makes its request, the client's ``call`` sends it.

    On an ``AsyncClient`` the operation returns an awaitable of the request's reply type,
    on a ``BlockingClient`` the reply itself. The bound operation is made once per client and
    kept in its ``__dict__`` (this descriptor has no ``__set__``, so the instance's attribute
    wins from then on): building it, ``functools.update_wrapper`` included, cost ~4 us a call.
    """

    def __init__(self, build: Callable[P, RequestFor[ReplyT]]) -> None:
        self.build = build
        self.name = build.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, client: None, owner: type) -> Op[P, ReplyT]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type) -> Callable[P, Awaitable[ReplyT]]: ...
    @overload
    def __get__(self, client: BlockingClient, owner: type) -> Callable[P, ReplyT]: ...
    @overload
    def __get__(self, client: _Client, owner: type) -> Callable[P, Any]: ...
    def __get__(self, client: _Client | None, owner: type) -> Any:
        if client is None:
            return self
        build = self.build
        call = client.call
        operation: Callable[..., Any]
        if isinstance(client, AsyncClient):
            # A coroutine function, as a hand-written ``async def`` would be: the request is
            # built (and its arguments checked) when awaited, not when called.
            async def operation(*args: Any, **kwargs: Any) -> Any:
                return await call(build(*args, **kwargs))
        else:

            def operation(*args: Any, **kwargs: Any) -> Any:
                return call(build(*args, **kwargs))

        functools.update_wrapper(operation, build)
        operation.__name__ = operation.__qualname__ = self.name
        client.__dict__[self.name] = operation
        return operation

    def __call__(self, client: _Client, *args: P.args, **kwargs: P.kwargs) -> Any:
        """``AsyncClient.ping(client)``, as with a plain method looked up on the class."""
        return self.__get__(client, type(client))(*args, **kwargs)


# ---------------------------------------------------------------- request builders


def _ping() -> Ping:
    """Check the server answers."""
    return Ping()


def _register(request: RegisterKVCache) -> RegisterKVCache:
    """Register a KV cache described by a ready ``RegisterKVCache``."""
    return request


def _register_kv_cache(instance_id: str, kv_cache: Exportable) -> RegisterKVCache:
    """Register ``kv_cache`` (shared memory or CUDA export) as ``instance_id``."""
    return kv_cache.register_request(instance_id)


def _unregister(instance_id: str) -> UnregisterKVCache:
    """Forget an instance's KV cache."""
    return UnregisterKVCache(instance_id)


def _store(instance_id: str, key: RequestKey, block_ids: list[int], *, ipc_event: bytes = b"") -> Store:
    """Copy the KV of ``key``'s full chunks from the instance's ``block_ids`` into the cache."""
    return Store(instance_id, packed_key(key), block_ids, ipc_event=ipc_event)


def _lookup(key: RequestKey, *, claim: bool = False) -> Lookup:
    """How many leading tokens of ``key`` are cached; hits are leased to its request id.
    ``claim``: the caller will store the chunks that miss (other lookups wait for them)."""
    return Lookup(packed_key(key), claim=claim)


def _retrieve(
    instance_id: str,
    key: RequestKey,
    block_ids: list[int],
    skip_first_n_tokens: int = 0,
    *,
    ipc_event: bytes = b"",
) -> Retrieve:
    """Copy cached chunks of ``key`` into the instance's ``block_ids``."""
    return Retrieve(instance_id, packed_key(key), block_ids, skip_first_n_tokens, ipc_event=ipc_event)


def _release(request_id: str, cache_salt: str = "", start: int = 0, end: int | None = None) -> ReleaseLookup:
    """Release a request's leases on chunks inside tokens ``[start, end)`` (end None: all)."""
    return ReleaseLookup(request_id, cache_salt, start, end)


def _end_session(request_id: str, cache_salt: str = "") -> EndSession:
    """End a request's session and release its leases."""
    return EndSession(request_id, cache_salt)


def _clear(cache_salt: str | None = None) -> Clear:
    """Drop cached chunks of ``cache_salt`` (every salt when None)."""
    return Clear(cache_salt)


def _status() -> Status:
    """The server's state: usage, instances, tiers."""
    return Status()


class _Client:
    """What both clients share: the socket, the server's facts, the local size check and the
    operations. Subclasses supply ``call``."""

    hello: HelloOk | None = None
    call: Callable[..., Any]
    # Said again when the server answers UNAUTHENTICATED: nng redialled, and a new connection
    # to a tcp:// listener has not said the token yet.
    _hello_request: Hello | None = None

    def __init__(self, sock: pynng.Req0, timeout_s: float, *, fail_fast: bool = False) -> None:
        self._sock = sock
        self.timeout_s = timeout_s
        # fail_fast: a call while no connection to the server is up raises ConnectionError at
        # once instead of waiting out the timeout (nng redials in the background).
        self.fail_fast = fail_fast

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

    def close(self) -> None:
        self._sock.close()

    def _says_hello_again(self, request: Any, exc: ServerError) -> bool:
        return (
            exc.code == ErrorCode.UNAUTHENTICATED
            and self._hello_request is not None
            and bool(self._hello_request.token)
            and not isinstance(request, Hello)
        )

    ping = Op(_ping)
    register = Op(_register)
    register_kv_cache = Op(_register_kv_cache)
    unregister = Op(_unregister)
    store = Op(_store)
    lookup = Op(_lookup)
    retrieve = Op(_retrieve)
    release = Op(_release)
    end_session = Op(_end_session)
    clear = Op(_clear)
    status = Op(_status)


class AsyncClient(_Client):
    """A Trio client. Use ``async with await AsyncClient.connect(url) as client:``."""

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait: bool = False,
        hello: bool = True,
        token: str = "",
    ) -> AsyncClient:
        """Dial ``url`` and say Hello. ``wait=True`` keeps redialling until a server appears.
        ``token``: the data token a tcp:// listener needs, or the admin token."""
        client = cls(_open_socket(url, wait=wait, timeout_s=timeout_s), timeout_s)
        client._hello_request = Hello(PROTOCOL_VERSION, "trio_kv.AsyncClient", token)
        if hello:
            try:
                client.hello = await client.call(client._hello_request)
            except BaseException:
                client.close()
                raise
        return client

    async def call(
        self,
        request: RequestFor[ReplyT],
        expected: type[ReplyT] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> ReplyT:
        """Send one request and wait for its reply; raises ServerError on an error reply."""
        try:
            return await self._call_once(request, expected, timeout_s)
        except ServerError as exc:
            if not self._says_hello_again(request, exc):
                raise
        assert self._hello_request is not None
        self.hello = await self._call_once(self._hello_request, HelloOk, timeout_s)
        return await self._call_once(request, expected, timeout_s)

    async def _call_once(
        self, request: RequestFor[ReplyT], expected: type[ReplyT] | None, timeout_s: float | None
    ) -> ReplyT:
        buf = self._encode(request)
        with trio.fail_after(self.timeout_s if timeout_s is None else timeout_s):
            ctx = self._sock.new_context()
            try:
                await ctx.asend(buf)
                reply = await ctx.arecv()
            finally:
                ctx.close()
        return _unwrap(reply, _expected(request, expected))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class BlockingClient(_Client):
    """A blocking client, safe to share between threads (each call uses its own nng context)."""

    def __init__(self, sock: pynng.Req0, timeout_s: float, *, fail_fast: bool = False) -> None:
        super().__init__(sock, timeout_s, fail_fast=fail_fast)
        self._contexts = ReqContexts(sock, timeout_s)

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        wait: bool = False,
        hello: bool = True,
        token: str = "",
    ) -> BlockingClient:
        client = cls(_open_socket(url, wait=wait, timeout_s=timeout_s), timeout_s)
        client._hello_request = Hello(PROTOCOL_VERSION, "trio_kv.BlockingClient", token)
        if hello:
            try:
                client.hello = client.call(client._hello_request)
            except BaseException:
                client.close()
                raise
        return client

    def call(self, request: RequestFor[ReplyT], expected: type[ReplyT] | None = None) -> ReplyT:
        """Send one request and wait for its reply; raises ServerError on an error reply,
        TimeoutError past ``timeout_s``, ConnectionError at once when ``fail_fast`` and
        no connection is up. A reconnected client says its Hello (token) again when asked."""
        try:
            return self._call_once(request, expected)
        except ServerError as exc:
            if not self._says_hello_again(request, exc):
                raise
        assert self._hello_request is not None
        self.hello = self._call_once(self._hello_request, HelloOk)
        return self._call_once(request, expected)

    def _call_once(self, request: RequestFor[ReplyT], expected: type[ReplyT] | None) -> ReplyT:
        buf = self._encode(request)
        if self.fail_fast and not self._sock.pipes:
            raise ConnectionError("not connected to the trio-kv server (nng is redialling)")
        try:
            reply = self._contexts.call(buf)
        except TimeoutError:
            raise TimeoutError(f"no reply within {self.timeout_s} s") from None
        return _unwrap(reply, _expected(request, expected))

    def close(self) -> None:
        self._contexts.close()
        super().close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
