"""CopyThreads: parts run in worker threads, are waited for whatever happens, and leave no fd behind."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref

import pytest
import trio

from trio_kv.transfer.copy_threads import CopyThreads


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_every_part_runs_in_a_worker_thread_and_is_done_when_run_returns():
    threads = CopyThreads(2)
    loop_thread = threading.get_ident()
    finished: list[tuple[int, int]] = []

    def part(number: int) -> None:
        time.sleep(0.02)
        finished.append((number, threading.get_ident()))

    await threads.run([lambda n=n: part(n) for n in range(5)])
    assert sorted(number for number, _ in finished) == list(range(5))
    workers = {ident for _, ident in finished}
    assert loop_thread not in workers and 1 <= len(workers) <= 2
    threads.close()


async def test_the_initializer_runs_once_in_each_thread():
    started: list[int] = []
    threads = CopyThreads(2, initializer=lambda: started.append(threading.get_ident()))
    for _ in range(10):
        await threads.run([lambda: time.sleep(0.001)] * 2)
    assert 1 <= len(started) <= 2 and len(set(started)) == len(started)
    threads.close()


async def test_a_failed_part_raises_once_every_part_is_done():
    threads = CopyThreads(2)
    slow_done = threading.Event()

    def slow() -> None:
        time.sleep(0.1)
        slow_done.set()

    def first() -> None:
        raise ValueError("first")

    def second() -> None:
        raise KeyError("second")

    with pytest.raises(ValueError, match="first"):
        await threads.run([slow, first, second])
    assert slow_done.is_set()  # not raised while a part was still copying
    threads.close()


async def test_a_cancelled_run_waits_for_the_running_part_and_skips_the_queued_one():
    threads = CopyThreads(1)
    running, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def held() -> None:
        running.set()
        release.wait(5)
        ran.append("held")

    def queued() -> None:
        ran.append("queued")

    fds = _open_fds()
    returned_at: list[float] = []
    scope = trio.CancelScope()

    async def cancel_then_release() -> None:
        await trio.to_thread.run_sync(running.wait)
        scope.cancel()
        await trio.sleep(0.1)  # the run is cancelled but must still be waiting for its part
        assert not returned_at
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_then_release)
        with scope:
            try:
                await threads.run([held, queued])
            finally:
                returned_at.append(time.monotonic())
    assert scope.cancelled_caught
    assert ran == ["held"]
    assert _open_fds() == fds
    # The threads are fine afterwards.
    await threads.run([lambda: ran.append("again")])
    assert ran == ["held", "again"]
    threads.close()


async def test_concurrent_runs_share_the_threads_and_all_finish():
    threads = CopyThreads(1)
    done: list[int] = []

    async def one(number: int) -> None:
        await threads.run([lambda: (time.sleep(0.01), done.append(number))] * 2)

    async with trio.open_nursery() as nursery:
        for number in range(4):
            nursery.start_soon(one, number)
    assert sorted(done) == sorted([0, 1, 2, 3] * 2)
    threads.close()


async def test_no_parts_and_a_closed_pool():
    threads = CopyThreads(1)
    fds = _open_fds()
    await threads.run([])
    threads.close()
    with pytest.raises(RuntimeError):
        await threads.run([lambda: None])
    assert _open_fds() == fds
    with pytest.raises(ValueError):
        CopyThreads(0)


async def test_the_threads_let_go_of_a_part_and_stop_once_closed():
    class Held:
        pass

    workers: list[threading.Thread] = []
    threads = CopyThreads(2, initializer=lambda: workers.append(threading.current_thread()))
    held = Held()
    gone = weakref.ref(held)
    await threads.run([lambda held=held: None] * 2)
    del held
    gc.collect()
    assert gone() is None  # an idle thread keeps no job (nor the mapping it copied) alive

    assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
    threads.close()
    for worker in workers:
        await trio.to_thread.run_sync(worker.join, 5)
    assert not any(worker.is_alive() for worker in workers)
