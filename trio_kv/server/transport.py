"""Requests in and replies out of one listener, without Python callbacks on nng's threads.

Each listen URL is one *raw* Rep0 socket. nng signals a received message on the socket's
``recv_fd`` (a pipe it writes from its own threads, in C); the Trio thread waits for that fd
to be readable, then takes every queued message with non-blocking ``nng_recvmsg`` calls and
hands each to one of ``workers`` handler tasks. A reply goes back in the request's own
message (nng keeps the routing header; only the body is replaced) with a non-blocking
``nng_sendmsg``; in the rare case that its pipe is still busy with an earlier reply, one
blocking send (bounded by the socket's send timeout) runs in a thread instead.

Why not pynng's ``Context.arecv``/``asend``: each of those allocates an nng aio, and each
completion runs a Python callback on an nng thread, which must take the GIL from the Trio
thread and then wake it (``run_sync_soon``). Here nng's threads never run Python, and a busy
loop drains many messages per wake-up. What it bought, and what it did not, is measured in
docs/benchmarks.md#hot-path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable

import pynng
import trio
from pynng import ffi, lib
from pynng.exceptions import check_err

log = logging.getLogger(__name__)

Handler = Callable[[bytes, int], Awaitable[bytes]]
"""``handler(request bytes, pipe id) -> reply bytes``; never raises but Cancelled."""


def open_raw_rep(**options: object) -> pynng.Rep0:
    """A Rep0 socket in raw mode: many requests outstanding at once, routed by header."""
    return pynng.Rep0(opener=lib.nng_rep0_open_raw, **options)


class RawMessage:
    """One received message (owned until handed back to nng or freed)."""

    __slots__ = ("_msg", "body", "pipe_id")

    def __init__(self, msg: object) -> None:
        self._msg = msg
        self.body: bytes = ffi.unpack(ffi.cast("char *", lib.nng_msg_body(msg)), lib.nng_msg_len(msg))
        self.pipe_id: int = lib.nng_msg_get_pipe(msg).id

    def into_reply(self, reply: bytes) -> object:
        """The same message with ``reply`` as its body (the routing header kept)."""
        msg, self._msg = self._msg, None
        lib.nng_msg_clear(msg)
        if lib.nng_msg_append(msg, reply, len(reply)) != 0:
            lib.nng_msg_free(msg)
            raise MemoryError("nng could not grow a reply message")
        return msg

    def free(self) -> None:
        if self._msg is not None:
            lib.nng_msg_free(self._msg)
            self._msg = None


class RawListener:
    """Serve one raw Rep0 socket from the Trio thread (see the module docstring)."""

    def __init__(self, sock: pynng.Rep0, handler: Handler, *, workers: int) -> None:
        self._sock = sock
        self._handler = handler
        self._workers = workers
        self._msg_p = ffi.new("nng_msg **")
        self.busy_pipe_sends = 0  # replies that waited in a thread for their pipe
        self.dropped_replies = 0  # replies nng would not take (peer gone or never reading)

    async def serve(self) -> None:
        """Run until cancelled or the socket is closed."""
        send, receive = trio.open_memory_channel[RawMessage](0)
        async with trio.open_nursery() as nursery:
            for _ in range(self._workers):
                nursery.start_soon(self._work, receive.clone())
            try:
                await self._receive_loop(send)
            finally:
                nursery.cancel_scope.cancel()

    def _try_receive(self) -> RawMessage | None:
        rv = lib.nng_recvmsg(self._sock.socket, self._msg_p, lib.NNG_FLAG_NONBLOCK)
        if rv == 0:
            return RawMessage(self._msg_p[0])
        if rv in (lib.NNG_EAGAIN, lib.NNG_ETIMEDOUT):
            return None
        check_err(rv)  # raises the matching pynng exception (Closed once the socket is)
        return None

    async def _receive_loop(self, send: trio.MemorySendChannel[RawMessage]) -> None:
        try:
            fd = self._sock.recv_fd
        except pynng.Closed:
            return
        while True:
            try:
                message = self._try_receive()
            except pynng.Closed:
                return
            if message is None:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError):
                    return  # the socket (and its fd) closed under us
                continue
            try:
                await send.send(message)  # waits while every worker is busy: back-pressure
            except BaseException:
                message.free()
                raise

    async def _work(self, receive: trio.MemoryReceiveChannel[RawMessage]) -> None:
        async for message in receive:
            try:
                reply = await self._handler(message.body, message.pipe_id)
            except BaseException:
                message.free()
                raise
            self._send(message.into_reply(reply))

    def _send(self, msg: object) -> None:
        rv = lib.nng_sendmsg(self._sock.socket, msg, lib.NNG_FLAG_NONBLOCK)
        if rv in (lib.NNG_EAGAIN, lib.NNG_ETIMEDOUT):
            # The pipe is still writing an earlier reply: wait for it (up to the socket's send
            # timeout) in a thread of its own, so it holds up no other peer.
            self.busy_pipe_sends += 1
            threading.Thread(target=self._send_blocking, args=(msg,), daemon=True).start()
        elif rv != 0:
            self._dropped(msg, rv)

    def _send_blocking(self, msg: object) -> None:
        rv = lib.nng_sendmsg(self._sock.socket, msg, 0)
        if rv != 0:
            self._dropped(msg, rv)

    def _dropped(self, msg: object, rv: int) -> None:
        lib.nng_msg_free(msg)
        self.dropped_replies += 1
        if rv != lib.NNG_ECLOSED:
            log.debug("reply not delivered: nng error %d", rv)
