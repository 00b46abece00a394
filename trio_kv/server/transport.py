"""Requests in and replies out of one listener, without Python callbacks on nng's threads.

Each listen URL is one *raw* Rep0 socket. nng signals a received message on the socket's
``recv_fd`` (a pipe it writes from its own threads, in C); the Trio thread waits for that fd
to be readable, then takes every queued message with non-blocking ``nng_recvmsg`` calls and
answers each one that ``handle_now`` can answer without waiting (on this task: no task
switch, no channel; ``ANSWERED_PER_CHECKPOINT`` at most between checkpoints) and hands the
rest to one of ``workers`` handler tasks. A reply goes back in the request's own
message (nng keeps the routing header; only the body is replaced) through ``nng_send_aio``
on an aio with no callback (``SendAios``): the Trio thread starts the send and goes on, nng's
threads finish it, and the aio is reused once nng is done with it. (``nng_sendmsg``, even
with NNG_FLAG_NONBLOCK, waits for nng's own aio to complete on a task thread: measured
~42 us of the loop's wall time per reply, and a busy pipe needed a thread of its own.)

Why not pynng's ``Context.arecv``/``asend``: each of those allocates an nng aio, and each
completion runs a Python callback on an nng thread, which must take the GIL from the Trio
thread and then wake it (``run_sync_soon``). Here nng's threads never run Python, and a busy
loop drains many messages per wake-up. What it bought, and what it did not, is measured in
docs/benchmarks.md#hot-path.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator

import pynng
import trio
from pynng import ffi, lib
from pynng.exceptions import check_err

log = logging.getLogger(__name__)

Handler = Callable[[bytes, int], Awaitable[bytes]]
"""``handler(request bytes, pipe id) -> reply bytes``; never raises but Cancelled."""
HandlerNow = Callable[[bytes, int], "bytes | None"]
"""``handle_now(request bytes, pipe id) -> reply bytes``, or None: ``handler`` must answer it."""

# Requests answered on the receiving task before it lets other tasks run.
ANSWERED_PER_CHECKPOINT = 16


def set_nng_task_threads(threads: int) -> bool:
    """Run nng's aio completions on ``threads`` task threads. Takes effect only before nng
    starts in this process (its first socket); False where this nng cannot be told.

    nng starts a task thread per core (at least 4) by default. The loop is one thread and
    replies need no callback, so more only add wake-ups: on 2 cores, 2 instead of 4 made a
    Trio echo round trip cost 77 instead of 99-105 us of server CPU (docs/benchmarks.md)."""
    if not hasattr(lib, "nng_init_set_parameter"):
        return False
    lib.nng_init_set_parameter(lib.NNG_INIT_NUM_TASK_THREADS, threads)
    lib.nng_init_set_parameter(lib.NNG_INIT_MAX_TASK_THREADS, threads)
    return True


def ipc_path(url: str) -> str | None:
    return url[len("ipc://") :] if url.startswith("ipc://") else None


def remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to steal one a live server holds."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket file %s", path)
        return
    except OSError as exc:
        raise RuntimeError(f"{path} exists and is not a usable socket: {exc}") from exc
    finally:
        probe.close()
    raise RuntimeError(f"another server is already listening on ipc://{path}")


class ListenSockets:
    """The listening sockets of one server and the socket files it created."""

    def __init__(self) -> None:
        self._sockets: list[pynng.Socket] = []
        self._files: list[str] = []

    def listen(self, sock: pynng.Socket, url: str, mode: int) -> None:
        """``sock`` listens on ``url``; an ipc:// socket file is born with ``mode`` (umask), so
        it is never open to others, and a stale one nobody listens on is replaced."""
        path = ipc_path(url)
        if path is not None:
            remove_stale_socket(path)
        previous_umask = os.umask(0o777 & ~mode)
        try:
            sock.listen(url)
        finally:
            os.umask(previous_umask)
        self._sockets.append(sock)
        if path is not None:
            self._files.append(path)
            os.chmod(path, mode)

    def __iter__(self) -> Iterator[pynng.Socket]:
        return iter(self._sockets)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        # Only files this server created: a refused start must not unlink a live server's socket.
        for path in self._files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._files.clear()


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

    def __init__(
        self,
        sock: pynng.Rep0,
        handler: Handler,
        *,
        workers: int,
        handle_now: HandlerNow | None = None,
        max_sends: int = 4096,
    ) -> None:
        self._sock = sock
        self._handler = handler
        self._handle_now = handle_now
        self._workers = workers
        self._msg_p = ffi.new("nng_msg **")
        self._sends = SendAios(sock, max_sends)

    @property
    def dropped_replies(self) -> int:
        """Replies nng did not deliver (peer gone, socket closed, or too many sends pending)."""
        return self._sends.dropped

    async def serve(self) -> None:
        """Run until cancelled or the socket is closed."""
        send, receive = trio.open_memory_channel[RawMessage](0)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._workers):
                    nursery.start_soon(self._work, receive.clone())
                try:
                    await self._receive_loop(send)
                finally:
                    nursery.cancel_scope.cancel()
        finally:  # cancelled too: every aio stopped and freed
            self._sends.close()

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
        answered = 0
        while True:
            try:
                message = self._try_receive()
            except pynng.Closed:
                return
            if message is None:
                answered = 0
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError):
                    return  # the socket (and its fd) closed under us
                continue
            if self._answer_now(message):
                answered += 1
                if answered >= ANSWERED_PER_CHECKPOINT:  # let the rest of the loop run
                    answered = 0
                    await trio.lowlevel.checkpoint()
                continue
            try:
                await send.send(message)  # waits while every worker is busy: back-pressure
            except BaseException:
                message.free()
                raise

    def _answer_now(self, message: RawMessage) -> bool:
        """Reply to ``message`` here if ``handle_now`` can; False: a worker must."""
        if self._handle_now is None:
            return False
        try:
            reply = self._handle_now(message.body, message.pipe_id)
        except Exception:
            log.exception("handle_now failed; a worker answers the request")
            return False
        if reply is None:
            return False
        self._sends.send(message.into_reply(reply))
        return True

    async def _work(self, receive: trio.MemoryReceiveChannel[RawMessage]) -> None:
        async for message in receive:
            try:
                reply = await self._handler(message.body, message.pipe_id)
            except BaseException:
                message.free()
                raise
            self._sends.send(message.into_reply(reply))


class SendAios:
    """Replies sent with ``nng_send_aio`` on a pool of callback-less aios, never waited for.

    An aio is taken back once ``nng_aio_busy`` says nng is done with it (in-flight sends
    are checked oldest first: they finish roughly in order). A send that failed left its
    message with the aio; it is freed and counted. Past ``max_aios`` sends in flight a reply
    is dropped and counted, so a peer that never reads cannot make the server allocate
    without bound here. ``close`` stops every send and frees every aio."""

    def __init__(self, sock: pynng.Socket, max_aios: int) -> None:
        self._socket = sock.socket
        self._max = max_aios
        self._idle: list[object] = []
        self._in_flight: collections.deque[object] = collections.deque()
        self._aio_p = ffi.new("nng_aio **")
        self.dropped = 0
        self._closed = False

    def send(self, msg: object) -> None:
        aio = self._take()
        if aio is None:
            lib.nng_msg_free(msg)
            self.dropped += 1
            return
        lib.nng_aio_set_msg(aio, msg)
        lib.nng_send_aio(self._socket, aio)
        self._in_flight.append(aio)

    def _take(self) -> object | None:
        in_flight = self._in_flight
        while in_flight and not lib.nng_aio_busy(in_flight[0]):
            self._settle(in_flight.popleft())
        if self._idle:
            return self._idle.pop()
        if self._closed or len(in_flight) >= self._max:
            return None
        check_err(lib.nng_aio_alloc(self._aio_p, ffi.NULL, ffi.NULL))
        return self._aio_p[0]

    def _settle(self, aio: object) -> None:
        """A finished aio back to the idle pool; a failed send's message freed and counted."""
        rv = lib.nng_aio_result(aio)
        if rv != 0:
            msg = lib.nng_aio_get_msg(aio)
            if msg != ffi.NULL:
                lib.nng_msg_free(msg)
            lib.nng_aio_set_msg(aio, ffi.NULL)
            self.dropped += 1
            if rv != lib.NNG_ECLOSED:
                log.debug("reply not delivered: nng error %d", rv)
        self._idle.append(aio)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def aios(self) -> int:
        """Aios allocated and not yet freed."""
        return len(self._in_flight) + len(self._idle)

    def close(self) -> None:
        """Stop every send still in flight (its reply is dropped) and free every aio."""
        self._closed = True
        while self._in_flight:
            aio = self._in_flight.popleft()
            lib.nng_aio_stop(aio)  # waits for nng to let go of it
            self._settle(aio)
        while self._idle:
            lib.nng_aio_free(self._idle.pop())
