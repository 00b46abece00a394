"""Worker threads the event loop hands the parts of a copy to, and hears back from through a pipe.

``trio.to_thread.run_sync`` costs a CPU copy twice per call. Measured on the 2-core VM in a
bare Trio loop (two 32 MiB parts per call, p50 of 40 calls): 106-158 us from the call to a
thread running, and 241-394 us from the last part's end to the task running again: the result
comes back through Trio's ``run_sync_soon`` queue, a task of its own. A ``ThreadPoolExecutor``
whose futures write a pipe the task waits on: 70-81 / 97-107 us. These threads: 70-72 / 97-103
us (a prototype writing an eventfd with nothing else around it: 50-63 / 47-79). In a 4-chunk
store (128 MiB, ~7 ms) that is ~0.3 ms less per call, a larger share of a small one.

So: ``threads`` long-lived threads take parts from one queue (first come, first served, as the
thread limiter's tokens were) and write one byte to the part's call's pipe as the last thing
before taking the next; the task waits with ``wait_readable`` until it has read one byte per
part. The threads start with the first call and stop once the pool is closed or collected.

Nothing is abandoned: a cancelled call marks its parts so that those not yet started are
skipped, and waits, shielded, until every part has been run or skipped; no part of it runs
once ``run`` returns or raises.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence

import trio


class _Call:
    """One ``run``: its parts' pipe, failures, and whether it was cancelled."""

    __slots__ = ("cancelled", "errors", "signal")

    def __init__(self, signal: int, parts: int) -> None:
        self.signal = signal
        self.errors: list[BaseException | None] = [None] * parts
        self.cancelled = False


_Work = tuple[Callable[[], None], int, _Call] | None  # None: the thread stops


class CopyThreads:
    """``threads`` worker threads; ``initializer`` runs once in each as it starts."""

    def __init__(self, threads: int, initializer: Callable[[], None] | None = None) -> None:
        if threads < 1:
            raise ValueError(f"copy threads must be >= 1, got {threads}")
        self.threads = threads
        self._initializer = initializer
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._started = False
        self._closed = False
        # The threads hold the queue, not this object: once it is collected they are told to stop.
        self._stop = weakref.finalize(self, _stop_threads, self._queue, threads)

    async def run(self, parts: Sequence[Callable[[], None]]) -> None:
        """Run every part in a worker thread and return once all have returned; an exception
        of a part is raised (the first part's in order, if several failed) after all are done."""
        if self._closed:
            raise RuntimeError("these copy threads are closed")
        if not parts:
            return
        if not self._started:
            self._start()
        done, signal = os.pipe()
        os.set_blocking(done, False)
        call = _Call(signal, len(parts))
        try:
            for index, part in enumerate(parts):
                self._queue.put((part, index, call))
            count = _Count(done, len(parts))
            try:
                await count.all_read()
            except BaseException:
                call.cancelled = True  # a part not yet started is skipped (and still counted)
                with trio.CancelScope(shield=True):
                    await count.all_read()
                raise
        finally:
            trio.lowlevel.notify_closing(done)
            os.close(done)
            os.close(signal)
        for error in call.errors:
            if error is not None:
                raise error

    def close(self) -> None:
        """Stop the threads once the parts queued before are done; ``run`` refuses from now on."""
        self._closed = True
        self._stop()  # threads never started leave the stop marks in a queue no one reads

    def _start(self) -> None:
        self._started = True
        for number in range(self.threads):
            thread = threading.Thread(
                target=_work,
                args=(self._queue, self._initializer),
                name=f"trio-kv-copy-{number}",
                daemon=True,
            )
            thread.start()


def _work(work: queue.SimpleQueue[_Work], initializer: Callable[[], None] | None) -> None:
    if initializer is not None:
        initializer()
    while True:
        item = work.get()
        if item is None:
            return
        part, index, call = item
        if not call.cancelled:
            try:
                part()
            except BaseException as exc:  # raised by run, in the loop's thread
                call.errors[index] = exc
        signal = call.signal
        # Nothing of the part (its jobs, the mapping they copy) stays referenced while the thread waits.
        del item, part, call
        os.write(signal, b"\0")


def _stop_threads(work: queue.SimpleQueue[_Work], threads: int) -> None:
    for _ in range(threads):
        work.put(None)


class _Count:
    """Bytes read from a call's pipe: one per part run or skipped."""

    __slots__ = ("_fd", "_left")

    def __init__(self, fd: int, parts: int) -> None:
        self._fd, self._left = fd, parts

    async def all_read(self) -> None:
        while self._left:
            try:
                self._left -= len(os.read(self._fd, self._left))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._fd)
