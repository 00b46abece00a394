"""Blocking request/reply calls on a Req0 socket, through nng contexts kept open between calls.

A call takes a free context (or opens one), so threads may share one socket with as many
requests in flight as callers; each call starts one ``nng_ctx_send`` on the context's own
aio (allocated once, no callback: the caller does not wait for nng's thread to finish it)
and waits in one ``nng_ctx_recvmsg`` for the reply, with no Python callback for nng's
threads to run. (pynng's ``Context.send``/``recv`` allocate an aio per operation, and a new context per
request cost as much again.) A context whose call failed is closed, not reused.
"""

from __future__ import annotations

import collections
import math

import pynng
from pynng import ffi, lib
from pynng.exceptions import check_err


class _Context:
    """One nng context with the aio its sends go out on (no callback) and a message slot."""

    __slots__ = ("aio", "ctx", "msg_p")

    def __init__(self, sock: pynng.Req0, timeout_ms: int) -> None:
        self.ctx = ffi.new("nng_ctx *")
        check_err(lib.nng_ctx_open(self.ctx, sock.socket))
        # A send waits for a connection (nng redials in the background): bounded as well.
        for option in (b"recv-timeout", b"send-timeout"):
            check_err(lib.nng_ctx_set_ms(self.ctx[0], option, timeout_ms))
        aio_p = ffi.new("nng_aio **")
        check_err(lib.nng_aio_alloc(aio_p, ffi.NULL, ffi.NULL))
        self.aio = aio_p[0]
        lib.nng_aio_set_timeout(self.aio, timeout_ms)
        self.msg_p = ffi.new("nng_msg **")

    def close(self) -> None:
        lib.nng_ctx_close(self.ctx[0])
        self._settle_send()
        lib.nng_aio_free(self.aio)

    def _settle_send(self) -> int:
        """Wait for the send to finish (at once, after its reply came); free a message it
        did not send. Returns its result."""
        lib.nng_aio_wait(self.aio)
        rv: int = lib.nng_aio_result(self.aio)
        if rv != 0:
            msg = lib.nng_aio_get_msg(self.aio)
            if msg != ffi.NULL:
                lib.nng_msg_free(msg)
            lib.nng_aio_set_msg(self.aio, ffi.NULL)
        return rv


class ReqContexts:
    def __init__(self, sock: pynng.Req0, timeout_s: float) -> None:
        self._sock = sock
        self._timeout_ms = max(1, int(timeout_s * 1000)) if math.isfinite(timeout_s) else -1
        self._free: collections.deque[_Context] = collections.deque()

    def call(self, request: bytes) -> bytes:
        """Send ``request`` and return the reply's bytes; TimeoutError past the timeout."""
        try:
            context = self._free.pop()
        except IndexError:
            context = _Context(self._sock, self._timeout_ms)
        msg_p = context.msg_p
        try:
            check_err(lib.nng_msg_alloc(msg_p, len(request)))
            ffi.memmove(lib.nng_msg_body(msg_p[0]), request, len(request))
            # The send completes on nng's thread; nothing here waits for it but the reply.
            lib.nng_aio_set_msg(context.aio, msg_p[0])
            lib.nng_ctx_send(context.ctx[0], context.aio)
            rv = lib.nng_ctx_recvmsg(context.ctx[0], msg_p, 0)
            if rv != 0:
                lib.nng_aio_cancel(context.aio)
                sent = context._settle_send()
                if sent not in (0, lib.NNG_ECANCELED):
                    rv = sent  # the send's own failure says more than the recv's
                if rv == lib.NNG_ETIMEDOUT:
                    raise TimeoutError
                check_err(rv)
            context._settle_send()
        except BaseException:
            context.close()
            raise
        msg = msg_p[0]
        reply: bytes = ffi.unpack(ffi.cast("char *", lib.nng_msg_body(msg)), lib.nng_msg_len(msg))
        lib.nng_msg_free(msg)
        self._free.append(context)
        return reply

    def close(self) -> None:
        """Close the idle contexts (the socket's close closes any still in a call)."""
        while self._free:
            self._free.pop().close()
