"""Blocking request/reply calls on a Req0 socket, through nng contexts kept open between calls.

A call takes a free context (or opens one), so threads may share one socket with as many
requests in flight as callers; each call is one ``nng_ctx_sendmsg`` and one
``nng_ctx_recvmsg``, with no nng aio allocated and no Python callback for nng's threads to
run. (pynng's ``Context.send``/``recv`` allocate an aio per operation, and a new context per
request cost as much again.) A context whose call failed is closed, not reused.
"""

from __future__ import annotations

import collections
import math

import pynng
from pynng import ffi, lib
from pynng.exceptions import check_err


class ReqContexts:
    def __init__(self, sock: pynng.Req0, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_ms = max(1, int(timeout_s * 1000)) if math.isfinite(timeout_s) else -1
        self._free: collections.deque[object] = collections.deque()

    def call(self, request: bytes) -> bytes:
        """Send ``request`` and return the reply's bytes; TimeoutError past the timeout."""
        try:
            ctx = self._free.pop()
        except IndexError:
            ctx = self._open()
        msg_p = ffi.new("nng_msg **")
        try:
            check_err(lib.nng_msg_alloc(msg_p, len(request)))
            ffi.memmove(lib.nng_msg_body(msg_p[0]), request, len(request))
            rv = lib.nng_ctx_sendmsg(ctx[0], msg_p[0], 0)  # type: ignore[index]
            if rv != 0:
                lib.nng_msg_free(msg_p[0])
                if rv == lib.NNG_ETIMEDOUT:
                    raise TimeoutError
                check_err(rv)
            rv = lib.nng_ctx_recvmsg(ctx[0], msg_p, 0)  # type: ignore[index]
            if rv == lib.NNG_ETIMEDOUT:
                raise TimeoutError
            check_err(rv)
        except BaseException:
            lib.nng_ctx_close(ctx[0])  # type: ignore[index]
            raise
        msg = msg_p[0]
        reply: bytes = ffi.unpack(ffi.cast("char *", lib.nng_msg_body(msg)), lib.nng_msg_len(msg))
        lib.nng_msg_free(msg)
        self._free.append(ctx)
        return reply

    def _open(self) -> object:
        ctx = ffi.new("nng_ctx *")
        check_err(lib.nng_ctx_open(ctx, self._sock.socket))
        # A send waits for a connection (nng redials in the background): bounded as well.
        for option in (b"recv-timeout", b"send-timeout"):
            check_err(lib.nng_ctx_set_ms(ctx[0], option, self._timeout_ms))
        return ctx

    def close(self) -> None:
        """Close the idle contexts (the socket's close closes any still in a call)."""
        while self._free:
            lib.nng_ctx_close(self._free.pop()[0])  # type: ignore[index]
