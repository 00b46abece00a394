"""The listener transport (server/transport.py): raw Rep0 sockets polled from the Trio thread."""

from __future__ import annotations

import pynng._aio
import trio
import trio.testing

from trio_kv.client import AsyncClient, BlockingClient
from trio_kv.keys import RequestKey
from trio_kv.testing import FaultInjector, assert_no_leaks, make_kv_cache, running_server

CHUNK = 16


async def test_no_nng_operation_waits_on_a_python_callback():
    # pynng's async calls each park a Python callback that nng's threads must run (taking the
    # GIL from the Trio thread); the server's listeners use none, idle or serving.
    async with running_server(chunk_size=CHUNK) as server:
        await trio.testing.wait_all_tasks_blocked()
        assert len(pynng._aio._aio_map) == 0
        client = await trio.to_thread.run_sync(BlockingClient.connect, server.url)
        with client:
            for _ in range(20):
                await trio.to_thread.run_sync(client.ping)
        await trio.testing.wait_all_tasks_blocked()
        assert len(pynng._aio._aio_map) == 0


async def test_many_requests_in_flight_on_one_connection_each_get_their_own_reply():
    async with running_server(chunk_size=CHUNK) as server, await AsyncClient.connect(server.url) as client:
        with make_kv_cache(block_size=CHUNK) as kv:
            await client.register_kv_cache("a", kv)
            keys = [
                RequestKey("m", 1, 0, [1000 * n + t for t in range(CHUNK * (n % 4 + 1))]) for n in range(40)
            ]
            for n, key in enumerate(keys):
                await client.store("a", key, list(range(n % 4 + 1)))
            hits: dict[int, int] = {}

            async def look(n: int) -> None:
                hits[n] = (await client.lookup(keys[n])).hit_tokens

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    for n in range(len(keys)):
                        nursery.start_soon(look, n)
            assert hits == {n: len(key.tokens) for n, key in enumerate(keys)}
            for key in keys:
                await client.end_session(key.request_id)
        assert_no_leaks(server)


async def test_at_most_workers_requests_are_handled_at_once_and_the_rest_wait():
    release, two_in = trio.Event(), trio.Event()
    inside = []

    async def hold(point: str) -> None:
        if point == "lookup.before_scan":
            inside.append(point)
            if len(inside) == 2:
                two_in.set()
            await release.wait()

    async with (
        running_server(chunk_size=CHUNK, workers=2, faults=hold) as server,
        await AsyncClient.connect(server.url) as client,
    ):
        answered = []

        async def look(n: int) -> None:
            await client.lookup(RequestKey("m", 1, 0, list(range(CHUNK)), request_id=f"r{n}"))
            answered.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(look, n)
            await two_in.wait()
            await trio.sleep(0.1)  # time for a third request to get in, were it let in
            assert server.engine.requests_in_flight == 2
            assert answered == []
            release.set()
        assert sorted(answered) == list(range(5))
        assert len(inside) == 5


async def test_a_client_gone_before_its_reply_costs_the_server_nothing():
    faults = FaultInjector("lookup.before_scan", mode="hang")
    async with running_server(chunk_size=CHUNK, faults=faults) as server:
        client = await AsyncClient.connect(server.url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.lookup, RequestKey("m", 1, 0, list(range(CHUNK))))
            await faults.reached.wait()
            nursery.cancel_scope.cancel()
        client.close()
        await server.server.connections.wait_closed(1)
        faults.release.set()
        await server.server.wait_idle()
        async with await AsyncClient.connect(server.url) as again:
            await again.ping()
        assert_no_leaks(server)


async def test_copies_run_in_threads_nicer_than_the_event_loop():
    # On as many cores as copy threads, a copy thread at the loop's priority keeps the loop
    # from a core for a time slice (loop lag p99 8 ms while copying on 2 cores, 4.5 after).
    import os
    import threading

    from trio_kv.transfer.cpu import COPY_NICE, CpuTransfer

    seen = []

    def copy(jobs, part, parts):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    class Cache:
        def copy_bytes(self, jobs):
            return 0

    await CpuTransfer()._run(copy, Cache(), [])  # type: ignore[arg-type]
    loop_priority = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [loop_priority + COPY_NICE] or seen == [19]


def _message(body: bytes) -> object:
    from pynng import ffi, lib

    msg_p = ffi.new("nng_msg **")
    assert lib.nng_msg_alloc(msg_p, 0) == 0
    assert lib.nng_msg_append(msg_p[0], body, len(body)) == 0
    return msg_p[0]


async def _until(condition, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        # nng's threads finish the sends and signal nothing a task could wait on: poll.
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_replies_wait_in_nng_for_a_busy_peer_and_arrive_in_order(tmp_path):
    # A send the peer cannot take yet stays with its aio; the loop never waits for it.
    import pynng

    from trio_kv.server.transport import SendAios

    url = f"ipc://{tmp_path}/push"
    with pynng.Push0(listen=url) as push:
        sends = SendAios(push, max_aios=64)
        for n in range(20):
            sends.send(_message(b"%d" % n))
        assert sends.in_flight == 20
        with pynng.Pull0(dial=url, recv_timeout=5000) as pull:
            got = [await trio.to_thread.run_sync(pull.recv) for _ in range(20)]
        assert got == [b"%d" % n for n in range(20)]
        sends.send(_message(b"after"))  # takes finished aios back
        await _until(lambda: sends.in_flight <= 1 and sends.dropped == 0)
        sends.close()


async def test_past_max_sends_in_flight_a_reply_is_dropped_and_counted(tmp_path):
    import pynng

    from trio_kv.server.transport import SendAios

    with pynng.Push0(listen=f"ipc://{tmp_path}/push") as push:
        sends = SendAios(push, max_aios=3)
        for n in range(5):
            sends.send(_message(b"%d" % n))
        assert (sends.in_flight, sends.dropped) == (3, 2)
        sends.close()  # stops the three: their replies are dropped too
        assert (sends.in_flight, sends.dropped) == (0, 5)
        sends.send(_message(b"late"))  # after close: dropped, nothing allocated
        assert (sends.in_flight, sends.dropped) == (0, 6)


async def test_a_failed_send_frees_its_message_and_counts_it(tmp_path):
    import pynng

    from trio_kv.server.transport import SendAios

    push = pynng.Push0(listen=f"ipc://{tmp_path}/push")
    sends = SendAios(push, max_aios=8)
    sends.send(_message(b"x"))
    push.close()  # the send fails with ECLOSED
    await _until(lambda: (sends.send(_message(b"y")), sends.dropped)[1] >= 2)
    sends.close()


async def test_the_server_counts_no_dropped_reply_in_normal_traffic():
    async with running_server(chunk_size=CHUNK) as server, await AsyncClient.connect(server.url) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(client.ping)
        listeners = server.server.listeners
        assert listeners and all(listener.dropped_replies == 0 for listener in listeners)


def test_trio_kv_serve_runs_nng_on_the_task_threads_it_was_given(tmp_path):
    import os
    import time

    from trio_kv.tools import bench_refs as refs

    def task_threads(pid: int) -> int:
        names = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                    names.append(comm.read().strip())
            except FileNotFoundError:
                pass  # a thread that just ended
        return names.count("nng:task")

    for threads in (2, 3):
        url = f"ipc://{tmp_path}/t{threads}.sock"
        env = {"TRIO_KV_NNG_TASK_THREADS": str(threads)}
        with refs.serve(url, admin_port=refs.free_port(), env=env) as process:
            deadline = time.monotonic() + 5
            while task_threads(process.pid) != threads and time.monotonic() < deadline:
                time.sleep(0.05)
            assert task_threads(process.pid) == threads


def test_nng_task_threads_below_two_are_refused():
    import pytest

    from trio_kv.server.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError, match="nng_task_threads"):
        ServerConfig(nng_task_threads=1).validate()


def test_the_loop_asks_for_short_time_slices_and_copy_threads_for_the_default():
    import threading

    import pytest

    from trio_kv.transfer.sched import set_thread_slice, thread_slice_ns

    before = thread_slice_ns()
    if before is None or not set_thread_slice(100_000):
        pytest.skip("this kernel does not report or set a thread's slice")
    try:
        assert thread_slice_ns() == 100_000
        seen = []
        worker = threading.Thread(target=lambda: (set_thread_slice(0), seen.append(thread_slice_ns())))
        worker.start()
        worker.join()
        assert seen and seen[0] != 100_000  # back to the kernel's default
    finally:
        set_thread_slice(0)


async def test_a_served_loop_runs_with_the_slice_it_was_given():
    import pytest

    from trio_kv.transfer.sched import set_thread_slice, thread_slice_ns

    if thread_slice_ns() is None:
        pytest.skip("this kernel does not report a thread's slice")
    try:
        async with running_server(chunk_size=CHUNK, loop_slice_us=250):
            assert thread_slice_ns() == 250_000
    finally:
        set_thread_slice(0)


async def test_dropped_replies_are_exported_as_a_metric():
    async with running_server(chunk_size=CHUNK) as server, await AsyncClient.connect(server.url) as client:
        await client.ping()

        def exported() -> str:
            text = server.server.metrics.exposition()[0].decode()
            return next(
                line for line in text.splitlines() if line.startswith("trio_kv_dropped_replies_total")
            )

        assert exported() == "trio_kv_dropped_replies_total 0.0"
        server.server.listeners[0]._sends.dropped += 2  # as two replies to vanished clients would
        assert exported() == "trio_kv_dropped_replies_total 2.0"


async def test_a_cancelled_listener_stops_and_frees_every_send_aio():
    async with running_server(chunk_size=CHUNK) as server:
        async with await AsyncClient.connect(server.url) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(client.ping)
        (listener,) = server.server.listeners
        assert listener._sends.aios > 0
    # running_server cancelled the server's nursery, the listener's serve with it
    assert listener._sends.aios == 0 and listener._sends._closed


class SilentPeer:
    """A raw SP Req peer over ipc:// that sends requests and never reads a reply."""

    def __init__(self, path: str) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(path)

    def flood(self, body: bytes, count: int) -> None:
        import struct

        self.sock.sendall(b"\x00SP\x00" + struct.pack(">H", 0x30) + b"\x00\x00")  # we are Req0
        assert self.sock.recv(8)[:4] == b"\x00SP\x00"
        for n in range(count):
            payload = struct.pack(">I", 0x80000000 | n) + body  # request id, then the request
            self.sock.sendall(b"\x01" + struct.pack(">Q", len(payload)) + payload)

    def close(self) -> None:
        self.sock.close()


async def test_a_peer_that_never_reads_holds_up_no_one_and_nothing_stays_in_flight():
    from trio_kv.protocol import Status, encode

    async with running_server(chunk_size=CHUNK) as server, await AsyncClient.connect(server.url) as client:
        peer = SilentPeer(server.url[len("ipc://") :])
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, peer.flood, encode(Status()), 3000)
                    for _ in range(50):  # answered while the flood goes on
                        await client.ping()
                await _until(lambda: server.server.engine.requests_in_flight == 0)
                await client.ping()
            (listener,) = server.server.listeners
            assert listener._sends.in_flight <= 2  # nng took the rest (and dropped what it could not send)
        finally:
            peer.close()
        await server.server.connections.wait_closed(1)
        assert_no_leaks(server)
